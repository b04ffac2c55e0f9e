"""scaled_linear: the FP8 Linear's reference paths (torch._scaled_mm row-wise, the exact fp32 product of the e4m3
operands) against each other and the dequantized product, and the per-group activation scales attention_fp8's
kernel emits, on the reference and the Triton kernel (through the interpreter). The contract, the property tests
(odd M and N, groups, bias, every output dtype) and the error budget are the op's spec's
(vit_fast/ops/scaled_linear.py)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_interpreter, needs_tma
from vit_fast.kernels import use_variant

import vit_fast
from vit_fast import backends
from vit_fast.ops import quantize_rows_ref, scaled_linear, scaled_linear_ref
from vit_fast.ops.scaled_linear import close_gemm


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_scaled_linear_applies_row_and_channel_scales():
    x, w, bias = torch.randn(13, 64), torch.randn(48, 64) * 0.1, torch.randn(48)
    xq, xs = quantize_rows_ref(x)
    wq, ws = quantize_rows_ref(w)  # per output channel = per row of the (N, K) weight
    out = scaled_linear(xq, xs, wq, ws, bias, out_dtype=torch.float32)
    emulated = scaled_linear_ref(xq, xs, wq, ws, bias, out_dtype=torch.float32, upcast=True)
    torch.testing.assert_close(out, emulated, rtol=1e-4, atol=1e-4)  # _scaled_mm == the dequantized product
    assert _rel(out, F.linear(x, w, bias)) < 0.06
    with pytest.raises(ValueError, match="x_scale"):
        scaled_linear(xq, xs[:-1], wq, ws, bias, out_dtype=torch.float32)


@pytest.mark.parametrize("rowwise", [True, False], ids=["scaled_mm", "fp32_product"])
def test_scaled_linear_reference_paths_agree_on_edge_shapes(monkeypatch, rowwise):
    """Both CPU paths of the reference (torch._scaled_mm where it takes row-wise scales, the exact fp32 product
    where it does not, as on torch 2.11): one row, one output, strided size-1 scales, an empty batch."""
    sl = importlib.import_module("vit_fast.ops.scaled_linear")  # the module: vit_fast.ops.scaled_linear is the op

    if rowwise and not sl._CPU_ROWWISE:
        pytest.skip("this torch's CPU _scaled_mm takes per-tensor scales only")
    monkeypatch.setattr(sl, "_CPU_ROWWISE", rowwise)
    for m, n in ((1, 1), (1, 24), (9, 1), (0, 24)):
        xq, xs = quantize_rows_ref(torch.randn(m, 32))
        wq, ws = quantize_rows_ref(torch.randn(n, 32) * 0.1)
        xs, ws = torch.stack([xs, xs], -1).view(-1)[::2], torch.stack([ws, ws], -1).view(-1)[::2]  # stride 2
        out = scaled_linear_ref(xq, xs, wq, ws, None, out_dtype=torch.bfloat16)
        exact = scaled_linear_ref(xq, xs, wq, ws, None, out_dtype=torch.float32, upcast=True)
        assert out.shape == (m, n) and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), exact, rtol=2**-8, atol=1e-6)  # one bf16 rounding of the product


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_scaled_linear_with_a_scale_per_row_and_head(backend):
    """x_scale (M, G): each group of K / G columns has its own scale, as attention_fp8 emits per (token, head)."""
    if backend not in backends.implemented("scaled_linear"):
        pytest.skip(backends.unavailable("triton") or "triton not implemented")
    heads, d = 3, 32
    x = torch.randn(13, heads, d) * torch.tensor([0.01, 1.0, 100.0])[:, None]  # heads far apart in magnitude
    xq, xs = quantize_rows_ref(x.reshape(-1, d))
    xq, xs = xq.view(13, heads * d), xs.view(13, heads)
    w, bias = torch.randn(40, heads * d) * 0.1, torch.randn(40)
    wq, ws = quantize_rows_ref(w)
    with vit_fast.set_backend(backend), backends.trace() as launches:
        out = scaled_linear(xq, xs, wq, ws, bias, out_dtype=torch.float32)
    assert {(r.op, r.backend) for r in launches} == {("scaled_linear", backend)}
    dequantized = (xq.double().view(13, heads, d) * xs.double()[..., None]).view(13, -1)
    close_gemm(out, F.linear(dequantized, wq.double() * ws.double()[:, None], bias.double()), (), "out")
    # one scale per row would have flushed the small head to zero: per head it survives
    assert _rel(out, F.linear(x.reshape(13, -1), w, bias)) < 0.06


def test_the_error_budget_catches_a_wrong_scale():
    """The budget every backend is held to is tight enough to fail a GEMM that applies a scale one group off."""
    xq, xs = quantize_rows_ref(torch.randn(8 * 2, 16))
    xq, xs = xq.view(8, 32), xs.view(8, 2)
    wq, ws = quantize_rows_ref(torch.randn(24, 32))
    exact = scaled_linear_ref(xq, xs, wq, ws, None, out_dtype=torch.float32, upcast=True).double()
    shifted = scaled_linear_ref(xq, xs.roll(1, dims=1), wq, ws, None, out_dtype=torch.float32, upcast=True)
    close_gemm(exact.float(), exact, (), "exact")
    with pytest.raises(AssertionError, match="off the exact product"):
        close_gemm(shifted, exact, (), "shifted")

# ---- the kernel variants (use_variant), through the interpreter --------------------------------------------------


@needs_interpreter
@needs_tma
@pytest.mark.parametrize("groups", [1, 4])
def test_the_fp8_gemm_variants_match_the_scaled_product(groups):
    """One K loop with the scale applied per K block: per-head groups (G = 4 of 32 columns) and row-wise (G = 1)."""
    m, k, n = 50, 128, 72
    x, w = torch.randn(m, k).to(torch.float8_e4m3fn), torch.randn(n, k).to(torch.float8_e4m3fn)
    xs, ws, bias = torch.rand(m, groups) + 0.5, torch.rand(n) + 0.5, torch.randn(n)
    exact = (x.float().view(m, groups, -1) * xs[:, :, None]).view(m, k) @ (w.float() * ws[:, None]).t() + bias
    for variant in ("pointer", "tma"):
        with use_variant("scaled_gemm", variant):
            out = importlib.import_module("vit_fast.kernels.scaled_gemm").scaled_gemm(x, xs, w, ws, bias, torch.float32)
        assert torch.allclose(out, exact, rtol=1e-5, atol=1e-3), (variant, (out - exact).abs().max())
