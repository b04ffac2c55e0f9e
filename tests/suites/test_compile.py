"""torch.compile(fullgraph=True) traces the whole model: dispatch turns into guards, not graph breaks.

The default run traces with aot_eager (Dynamo and AOTAutograd: where graph breaks and guards come from); the
inductor code generation of the same graphs runs under ``-m slow`` (half a minute per model on a small CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import launches

import vit_fast
from vit_fast import backends
from vit_fast.tolerance import assert_close

COMPILERS = [pytest.param("aot_eager"), pytest.param("inductor", marks=pytest.mark.slow)]


def _compiled_matches_eager(backend: str, compiler: str, **overrides: object) -> None:
    """Logits and every parameter gradient of the compiled model equal eager under ``backend``."""
    torch._dynamo.reset()
    m = vit_fast.create_model("vit_tiny_patch16_224", depth=2, num_classes=5, **overrides)
    x = torch.randn(2, 3, *m.patch_embed.img_size)
    with vit_fast.set_backend(backend):
        compiled = torch.compile(m, fullgraph=True, backend=compiler)
        with launches() as rec:
            out = compiled(x)
            out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        with launches() as eager_rec:
            ref = m(x)
            ref.square().mean().backward()
    assert_close(out, ref, ref, name="logits")
    for n, p in m.named_parameters():
        assert_close(grads[n], p.grad, p.grad, name=n)
    if backend != "reference":  # kernel backends record from inside their custom ops, compiled or not
        ran = {(r.op, r.phase) for r in rec if r.backend == backend}
        assert ran == {(r.op, phase) for r in eager_rec for phase in ("fwd", "bwd")}, ran


@pytest.mark.parametrize("compiler", COMPILERS)
def test_compiled_model_matches_eager_on_the_reference_backend(compiler):
    _compiled_matches_eager("reference", compiler, img_size=32, embed_dim=96)


@pytest.mark.parametrize("compiler", COMPILERS)
def test_compiled_model_matches_eager_on_the_triton_backend(compiler):
    """The Triton ops are custom ops with fake implementations: the whole ViT traces with zero graph breaks."""
    why = backends.reasons("triton", "attention", (torch.ones(1, 1, 1, 16),) * 3, {})
    if why:
        pytest.skip("triton cannot run here: " + "; ".join(why))
    _compiled_matches_eager("triton", compiler, img_size=16, patch_size=4, embed_dim=32, num_heads=2)
