"""Tolerances in one place.

Attention, fused ops and whole models use the scale-aware rule: a low-precision result may be off the fp32
oracle by at most twice what PyTorch's own computation in the same dtype is off, plus a small atol:
``max|out - ref_fp32| <= 2 * max|ref_same_dtype - ref_fp32| + atol``.
"""

from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_scaled_close(
    out: torch.Tensor,
    ref_same_dtype: torch.Tensor,
    ref_fp32: torch.Tensor,
    *,
    name: str = "out",
    atol: float | None = None,
) -> None:
    """The scale-aware rule; NaNs must sit exactly where the oracle has them."""
    assert out.shape == ref_fp32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}"
    out32, low32, ref32 = out.double(), ref_same_dtype.double(), ref_fp32.double()
    nan_out, nan_ref = torch.isnan(out32), torch.isnan(ref32)
    where = int((nan_out ^ nan_ref).sum())
    assert torch.equal(nan_out, nan_ref), f"{name}: NaN at {where} positions where the oracle differs"
    finite = ~nan_ref
    if not finite.any():
        return
    err = (out32 - ref32)[finite].abs().max().item()
    base = (low32 - ref32)[finite].abs().max().item()
    # atol scales with the result's magnitude: fp32 sums of hundreds of terms (weight gradients) differ in
    # their last bits between summation orders, and there the same-dtype reference is the oracle (base = 0).
    scale = max(1.0, ref32[finite].abs().max().item())
    tol = 2 * base + (ATOL[out.dtype] if atol is None else atol) * scale
    assert err <= tol, f"{name}: max|out - ref_fp32| = {err:.3g} > 2 * {base:.3g} + atol (= {tol:.3g}), {out.dtype}"
