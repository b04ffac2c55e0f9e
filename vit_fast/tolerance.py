"""The one tolerance rule, used by the tests and by ``vit-fast bench`` alike.

A result computed in a low-precision dtype may be off the fp32 (or fp64) oracle by at most twice what
PyTorch's own computation in the same dtype is off, plus a small absolute term scaled by the result's
magnitude::

    max|out - oracle| <= 2 * max|ref_same_dtype - oracle| + atol[dtype] * max(1, max|oracle|)

NaNs must sit exactly where the oracle has them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

ATOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def excess(out: torch.Tensor, ref_same_dtype: torch.Tensor, oracle: torch.Tensor, *,
           atol: float | None = None) -> tuple[float, str]:
    """``(err / tol, detail)`` for one tensor by the rule above: at most 1 passes; ``inf`` for a shape
    mismatch or a NaN where the oracle has none (or none where it has one)."""
    if tuple(out.shape) != tuple(oracle.shape):
        return math.inf, f"shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    out64, low64, ref64 = out.detach().double(), ref_same_dtype.detach().double(), oracle.detach().double()
    nan_out, nan_ref = torch.isnan(out64), torch.isnan(ref64)
    if not torch.equal(nan_out, nan_ref):
        return math.inf, f"NaN at {int((nan_out ^ nan_ref).sum())} positions where the oracle differs"
    finite = ~nan_ref
    if not finite.any():
        return 0.0, "all NaN, as the oracle"
    err = (out64 - ref64)[finite].abs().max().item()
    base = (low64 - ref64)[finite].abs().max().item()
    # atol scales with the magnitude: fp32 sums of hundreds of terms (weight gradients) differ in their last
    # bits between summation orders, and there the same-dtype reference is the oracle itself (base = 0).
    scale = max(1.0, ref64[finite].abs().max().item())
    tol = 2 * base + (ATOL[out.dtype] if atol is None else atol) * scale
    detail = f"max|out - oracle| = {err:.3g}, tolerance 2 * {base:.3g} + atol = {tol:.3g} ({out.dtype})"
    return err / tol, detail


def worst_excess(outs: Sequence[torch.Tensor], same: Sequence[torch.Tensor], oracle: Sequence[torch.Tensor],
                 names: Sequence[str] | None = None) -> tuple[float, str]:
    """The worst :func:`excess` over several tensors (an output and its gradients), naming the tensor."""
    worst, where = 0.0, ""
    for i, (o, s, r) in enumerate(zip(outs, same, oracle, strict=True)):
        ratio, detail = excess(o, s, r)
        if ratio > worst or (i == 0 and not where):
            worst, where = ratio, f"{names[i] if names else f'tensor {i}'}: {detail}"
    return worst, where


def assert_close(out: torch.Tensor, ref_same_dtype: torch.Tensor, oracle: torch.Tensor, *, name: str = "out",
                 atol: float | None = None) -> None:
    """Assert the rule for one tensor, with a message that names it."""
    ratio, detail = excess(out, ref_same_dtype, oracle, atol=atol)
    assert ratio <= 1, f"{name}: {detail}"
