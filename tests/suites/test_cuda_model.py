"""The whole model on the CUDA C++ backend, on a GPU: torch.compile(fullgraph=True) of the model, and training steps
under bf16 autocast whose first gradients point where the reference backend's do."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import autocast_losses

import vit_fast
from vit_fast.tolerance import assert_close


@pytest.mark.cuda
def test_compiled_model_fullgraph_under_cuda():
    torch._dynamo.reset()
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10).cuda().to(torch.bfloat16)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    with vit_fast.set_backend("cuda"):
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True)
        out = compiled(x)
        out.float().square().mean().backward()
    with vit_fast.set_backend("reference"), torch.no_grad():
        ref = m(x)
        oracle = copy.deepcopy(m).double()(x.double())
    assert_close(eager, ref, oracle, name="eager logits")
    assert_close(out, ref, oracle, name="compiled logits")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.cuda
def test_training_steps_under_autocast():
    torch.manual_seed(0)
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10).cuda()
    x = torch.randn(8, 3, 64, 64, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    losses = autocast_losses(m, x, y, 6, "cuda")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    # The first step's gradients point where the reference backend's do.
    m2 = vit_fast.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10).cuda()
    grads = {}
    for backend in ("cuda", "reference"):
        m2.zero_grad()
        with vit_fast.set_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            torch.nn.functional.cross_entropy(m2(x), y).backward()
        grads[backend] = {n: p.grad.float().flatten() for n, p in m2.named_parameters()}
    for n, g in grads["cuda"].items():
        r = grads["reference"][n]
        if r.norm() > 1e-6:
            assert torch.nn.functional.cosine_similarity(g, r, dim=0) > 0.98, n
