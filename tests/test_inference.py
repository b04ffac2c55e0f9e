"""The serving path: optimize_for_inference's eager fallback on CPU (with its reason) and, on a GPU, CUDA graphs per
batch-size bucket whose outputs equal the eager model's."""

from __future__ import annotations

import pytest
import torch

import vit_fast
from vit_fast.inference import Predictor, optimize_for_inference


def _model(device: str = "cpu") -> torch.nn.Module:
    return vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=2).to(device)


def test_cpu_falls_back_to_eager_and_says_why():
    m = _model().train()
    p = optimize_for_inference(m, dtype=torch.float32, batch_sizes=(4, 1))
    assert isinstance(p, Predictor) and not p.graphed
    assert "CUDA graphs need a CUDA device" in p.why_not_graphed and "eager" in repr(p)
    assert p.buckets == (1, 4) and not m.training and not any(q.requires_grad for q in m.parameters())
    x = torch.randn(6, 3, 32, 32)  # larger than every bucket: eager runs it whole
    with torch.no_grad():
        torch.testing.assert_close(p(x), m(x), rtol=0, atol=0)
    assert p.bucket_for(1) == 1 and p.bucket_for(3) == 4 and p.bucket_for(9) == 4


def test_cast_and_quantized_models():
    m = _model()
    p = optimize_for_inference(m, dtype=torch.float64, batch_sizes=(2,), cuda_graphs=False)
    assert p.why_not_graphed.startswith("cuda_graphs=False")
    x = torch.randn(2, 3, 32, 32)
    assert p(x).dtype == torch.float64  # inputs follow the predictor's dtype
    q = vit_fast.quantize(_model(), "int8")
    with pytest.raises(ValueError, match="float32"):
        optimize_for_inference(q, dtype=torch.bfloat16)
    pq = optimize_for_inference(q, batch_sizes=(2,))
    with torch.no_grad():
        torch.testing.assert_close(pq(x), q(x), rtol=0, atol=0)


def test_bad_requests():
    with pytest.raises(ValueError, match="positive"):
        optimize_for_inference(_model(), batch_sizes=(0,))
    p = optimize_for_inference(_model(), batch_sizes=(1,))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 32, 32\)"):
        p(torch.randn(1, 3, 16, 16))


@pytest.mark.cuda
@pytest.mark.parametrize("quantized", [False, True])
def test_graphs_equal_eager_on_gpu(quantized):
    from vit_fast.quantization import supported_formats

    if quantized and supported_formats("cuda")["fp8"] is not None:
        pytest.skip(supported_formats("cuda")["fp8"])
    torch.manual_seed(0)
    m = _model("cuda").eval().to(torch.bfloat16)
    if quantized:
        m = vit_fast.quantize(m, "fp8")
    p = optimize_for_inference(m, dtype=torch.bfloat16, batch_sizes=(1, 4, 8))
    assert p.graphed and p.why_not_graphed is None
    with torch.no_grad():
        for n in (1, 3, 4, 8, 11):
            x = torch.randn(n, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
            out = p(x)
            assert out.shape == (n, m.num_classes)
            if n in p.buckets:  # the same kernels on the same shapes: bitwise the eager result
                torch.testing.assert_close(out, m(x), rtol=0, atol=0)
            else:  # padded up to a bucket (or chunked): each image's logits are computed independently
                b = p.bucket_for(n) if n <= p.buckets[-1] else p.buckets[-1]
                pad = torch.cat([x, x.new_zeros((-n) % b, *x.shape[1:])])
                eager = torch.cat([m(c) for c in pad.split(b)])[:n]
                torch.testing.assert_close(out, eager, rtol=0, atol=0)
        # a replay sees new inputs, and its result is not overwritten by the next one
        a = p(torch.ones(1, 3, 32, 32, device="cuda", dtype=torch.bfloat16))
        b = p(-torch.ones(1, 3, 32, 32, device="cuda", dtype=torch.bfloat16))
        assert not torch.equal(a, b)
