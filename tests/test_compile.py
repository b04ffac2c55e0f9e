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
