"""torch.compile(fullgraph=True) traces the whole model: dispatch turns into guards, not graph breaks."""

from __future__ import annotations

import torch

import vit_fast


def test_compiled_model_matches_eager_on_the_reference_backend():
    torch._dynamo.reset()
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10, embed_dim=96)
    x = torch.randn(2, 3, 32, 32)
    with vit_fast.set_backend("reference"):
        compiled = torch.compile(m, fullgraph=True)
        out = compiled(x)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        ref = m(x)
        ref.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-3, msg=n)


def test_compiled_model_matches_eager_on_the_triton_backend():
    """The Triton ops are custom ops with fake implementations: the whole ViT traces with zero graph breaks."""
    from vit_fast import backends

    if backends.reasons("triton", "attention", (torch.ones(1, 1, 1, 16),) * 3, {}):
        import pytest

        pytest.skip("triton cannot run here")
    torch._dynamo.reset()
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                              num_heads=2, num_classes=5)
    x = torch.randn(2, 3, 16, 16)
    with vit_fast.set_backend("triton"):
        compiled = torch.compile(m, fullgraph=True)
        out = compiled(x)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        ref = m(x)
        ref.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-3, msg=n)
