"""The one tolerance rule, used by the tests, ``vit-fast bench``, ``vit-fast tune`` and the GPU check alike.

A result computed in a low-precision dtype may be off the fp32 (or fp64) oracle by at most twice what
PyTorch's own computation in the same dtype (the yardstick) is off, plus a small absolute term scaled by the
result's magnitude::

    max|out - oracle| <= 2 * max|ref_same_dtype - oracle| + atol[dtype] * max(1, max|oracle|)

NaNs must sit exactly where the oracle has them.

The yardstick is checked before it is used: PyTorch's own low-precision path is sometimes wrong (oneDNN's AMX
bf16 convolution returns garbage or NaN for images one patch wide, torch 2.14). It is wrong when it is
non-finite where the oracle is finite, or, in a 16-bit dtype, when its error exceeds :func:`allowance`: a few
units of the dtype's rounding, times sqrt(K) for a reduction of length K, times the result's magnitude. A wrong
yardstick is reported as such, and the result is then judged against the oracle with that same allowance in
place of twice the yardstick's error, never with a looser bound and never with a NaN one.

fp32 and fp64 yardsticks are checked for finiteness only. Where a problem is well conditioned their error is
far below the absolute term; where it is not, a bound in units of their own rounding does not hold for a
correct computation either (a LayerNorm of one column multiplies fp32 rounding by 1/sqrt(eps): 100x the
allowance, measured). 16-bit references compute their reductions in fp32 and round once, so in 16 bits the
allowance holds: the worst correct yardstick over 1200 drawn cases of the four ops was at 0.36 of it.
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

# Unit roundoff (half a unit in the last place) of each dtype's significand.
UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}

ALLOWANCE_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)  # the magnitude check's dtypes

# How many units of rounding, times sqrt(K), a correct same-dtype computation may be off. Rounding errors of a
# K-term sum grow like sqrt(K) units; a chain of rounded intermediates (LayerNorm -> GEMM -> GELU -> GEMM, the
# softmax before P @ V, a backward through them) adds a few more units, and the magnitude is the result's
# largest, not each element's. 16 leaves room for those; a wrong yardstick is off by far more (the AMX
# convolution: 44 against a correct 0.12 at K = 196, an allowance of 4.2 there).
YARDSTICK_UNITS = 16


def allowance(dtype: torch.dtype, k: int, magnitude: float) -> float:
    """The largest error a correct ``dtype`` computation with reductions of length ``k`` may have, for results of
    magnitude ``magnitude`` (max |oracle|, at least 1)."""
    return YARDSTICK_UNITS * UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF[torch.float32]) * math.sqrt(max(k, 1)) * magnitude


def excess(out: torch.Tensor, ref_same_dtype: torch.Tensor, oracle: torch.Tensor, *,
           atol: float | None = None, k: int | None = None, dtype: torch.dtype | None = None,
           independent: bool = False) -> tuple[float, str]:
    """``(err / tol, detail)`` for one tensor by the rule above: at most 1 passes; ``inf`` for a shape
    mismatch or a NaN where the oracle has none (or none where it has one).

    ``k``: the longest reduction behind the tensor (a GEMM's K, a softmax's N, a weight gradient's rows); with it
    a 16-bit yardstick's error is held to :func:`allowance` too. Without it only its finiteness is checked.
    ``dtype``: the dtype the yardstick computed in, when not its own (an fp32 gradient of a bf16 autocast step).
    ``independent``: the yardstick is another computation of the same math, not the path the result should match
    (the reference itself is under test, against math written out in its dtype): a 16-bit result may then be off
    by the allowance too, since either of two correct computations may round less.
    """
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
    # atol scales with the magnitude: fp32 sums of hundreds of terms (weight gradients) differ in their last
    # bits between summation orders, and there the same-dtype reference is the oracle itself (base = 0).
    scale = max(1.0, ref64[finite].abs().max().item())
    small = (ATOL[out.dtype] if atol is None else atol) * scale
    computed = ref_same_dtype.dtype if dtype is None else dtype
    wrong = _wrong_yardstick(low64, ref64, finite, computed, k, scale)
    if wrong is not None:
        bound = allowance(computed, k if k is not None else 1, scale)
        tol = bound + small
        detail = (f"max|out - oracle| = {err:.3g}, tolerance {bound:.3g} (the allowance) + atol = {tol:.3g} "
                  f"({out.dtype}): {wrong}")
        return err / tol, detail
    base = (low64 - ref64)[finite].abs().max().item()
    tol = 2 * base + small
    detail = f"max|out - oracle| = {err:.3g}, tolerance 2 * {base:.3g} + atol = {tol:.3g} ({out.dtype})"
    if independent and k is not None and computed in ALLOWANCE_DTYPES:
        bound = allowance(computed, k, scale)
        if bound + small > tol:
            tol = bound + small
            detail = f"max|out - oracle| = {err:.3g}, tolerance {bound:.3g} (the allowance) + atol = {tol:.3g}"
    return err / tol, detail


def _wrong_yardstick(low64: torch.Tensor, ref64: torch.Tensor, finite: torch.Tensor, dtype: torch.dtype,
                     k: int | None, scale: float) -> str | None:
    """Why the same-dtype yardstick cannot be used (it is itself wrong), or None."""
    name = str(dtype).replace("torch.", "")
    bad = int((~torch.isfinite(low64) & torch.isfinite(ref64)).sum())
    if bad:
        return f"PyTorch's {name} path is wrong here: non-finite at {bad} positions where the oracle is finite"
    if k is None or dtype not in ALLOWANCE_DTYPES:
        return None
    base = (low64 - ref64)[finite].abs().max().item()
    bound = allowance(dtype, k, scale)
    if base > bound:
        return f"PyTorch's {name} path is wrong here: error {base:.3g} vs the oracle, over its allowance {bound:.3g}"
    return None


def worst_excess(outs: Sequence[torch.Tensor], same: Sequence[torch.Tensor], oracle: Sequence[torch.Tensor],
                 names: Sequence[str] | None = None, *, k: int | None = None,
                 dtype: torch.dtype | None = None) -> tuple[float, str]:
    """The worst :func:`excess` over several tensors (an output and its gradients), naming the tensor."""
    worst, where = 0.0, ""
    for i, (o, s, r) in enumerate(zip(outs, same, oracle, strict=True)):
        ratio, detail = excess(o, s, r, k=k, dtype=dtype)
        if ratio > worst or (i == 0 and not where):
            worst, where = ratio, f"{names[i] if names else f'tensor {i}'}: {detail}"
    return worst, where


def assert_close(out: torch.Tensor, ref_same_dtype: torch.Tensor, oracle: torch.Tensor, *, name: str = "out",
                 atol: float | None = None, k: int | None = None, dtype: torch.dtype | None = None) -> None:
    """Assert the rule for one tensor, with a message that names it."""
    ratio, detail = excess(out, ref_same_dtype, oracle, atol=atol, k=k, dtype=dtype)
    assert ratio <= 1, f"{name}: {detail}"
