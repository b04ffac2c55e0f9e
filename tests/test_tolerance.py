"""The one tolerance rule (vit_fast.tolerance): the same-dtype yardstick is checked against the oracle before it is
used, a wrong one is reported as PyTorch's and replaced by the declared allowance, never by a NaN bound."""

from __future__ import annotations

import math

import pytest
import torch

from vit_fast.tolerance import ALLOWANCE_DTYPES, allowance, assert_close, excess

BF16 = torch.bfloat16


def _case(n: int = 64, k: int = 196) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 GEMM result and its float64 oracle: (out rounded once, oracle)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, k, generator=g, dtype=torch.float64).to(BF16).double()
    b = (torch.randn(k, 35, generator=g, dtype=torch.float64) * k**-0.5).to(BF16).double()
    oracle = a @ b
    return oracle.to(BF16), oracle


def test_a_right_yardstick_gives_the_plain_rule():
    out, oracle = _case()
    ratio, detail = excess(out, out, oracle, k=196)
    assert ratio <= 1 and "allowance" not in detail and "2 * " in detail


def test_a_nan_yardstick_is_reported_and_replaced_by_the_allowance():
    """The AMX convolution's NaN: once a NaN tolerance (2 * nan) that failed every backend."""
    out, oracle = _case()
    wrong = out.clone()
    wrong[3, 4] = float("nan")
    ratio, detail = excess(out, wrong, oracle, k=196)
    assert math.isfinite(ratio) and ratio <= 1
    assert "PyTorch's bfloat16 path is wrong here: non-finite at 1 positions" in detail
    bad = out.double()
    bad[0, 0] += 2 * allowance(BF16, 196, oracle.abs().max().item())  # a backend off by twice the allowance
    ratio, detail = excess(bad.to(BF16), wrong, oracle, k=196)
    assert ratio > 1 and "wrong here" in detail


def test_a_far_off_yardstick_is_reported_and_the_backend_judged_by_the_same_allowance():
    out, oracle = _case()
    wrong = out.double() + 44.0  # the error measured for oneDNN's bf16 convolution, one patch wide
    ratio, detail = excess(out, wrong.to(BF16), oracle, k=196)
    assert ratio <= 1 and "error 44" in detail and "over its allowance" in detail
    scale = max(1.0, oracle.abs().max().item())
    bound = allowance(BF16, 196, scale)
    for off, passes in ((0.5 * bound, True), (1.2 * bound + 1.6e-2 * scale, False)):
        shifted = (oracle + off).to(torch.float32)  # fp32 output: its own rounding adds nothing that matters
        ratio, _ = excess(shifted, wrong.to(BF16), oracle, k=196, atol=1.6e-2)
        assert (ratio <= 1) is passes, (off, ratio)


def test_without_a_reduction_length_only_finiteness_is_checked():
    out, oracle = _case()
    ratio, detail = excess(out, (out.double() + 44.0).to(BF16), oracle)
    assert "wrong" not in detail and ratio < 0.1  # 2 * 44 of tolerance: only k makes the magnitude checkable


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_yardsticks_are_checked_for_finiteness_only(dtype):
    """A LayerNorm of one column multiplies fp32 rounding by 1/sqrt(eps): correct, yet 100x the allowance."""
    assert dtype not in ALLOWANCE_DTYPES
    oracle = torch.randn(8, 8, dtype=torch.float64)
    same = (oracle + 1e-3).to(dtype)
    _, detail = excess(oracle.to(dtype), same, oracle, k=4)
    assert "wrong" not in detail
    same[0, 0] = float("inf")
    _, detail = excess(oracle.to(dtype), same, oracle, k=4)
    assert "non-finite at 1 positions" in detail


def test_the_allowance_grows_with_rounding_sqrt_k_and_magnitude():
    assert allowance(BF16, 400, 2.0) == pytest.approx(2 * 20 * allowance(BF16, 1, 1.0))
    assert allowance(BF16, 1, 1.0) == pytest.approx(allowance(torch.float16, 1, 1.0) * 8)


def test_an_autocast_yardstick_is_held_to_the_dtype_it_computed_in():
    """An fp32 gradient computed in bf16 (autocast): its allowance is bf16's, not fp32's."""
    out, oracle = _case()
    same = out.float()
    _, detail = excess(same, same, oracle, k=196, dtype=BF16)
    assert "wrong" not in detail
    assert_close(same, same, oracle, k=196, dtype=BF16)


def test_an_independent_yardstick_lets_a_16_bit_result_be_off_by_the_allowance():
    """The reference under test against math written out in its dtype: where the written-out math rounds less
    (a bias gradient summed once in fp32), the reference may still be off by what any correct 16-bit
    computation may: the allowance, not more."""
    out, oracle = _case()
    scale = max(1.0, oracle.abs().max().item())
    bound = allowance(BF16, 196, scale)
    shifted = (oracle + 0.5 * bound).float()
    assert excess(shifted, oracle.float(), oracle, k=196)[0] > 1  # the plain rule: 2 * 0 + atol
    assert excess(shifted, oracle.float(), oracle, k=196, dtype=BF16, independent=True)[0] <= 1
    far = (oracle + 1.5 * bound).float()
    assert excess(far, oracle.float(), oracle, k=196, dtype=BF16, independent=True)[0] > 1
