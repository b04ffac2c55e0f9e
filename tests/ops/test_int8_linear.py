"""int8_linear: PyTorch's dynamic int8 Linear (fbgemm / x86) as an op: the packed per-channel weight round-trips,
NaN rows follow the float Linear, and the op's error budget (the activations' int8 rounding) is tight enough to fail
a wrong result. Its contract and property tests are the spec's (vit_fast/ops/int8_linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vit_fast import quantization
from vit_fast.ops import int8_linear
from vit_fast.ops.int8_linear import REDUCE_RANGE_ENGINES, close_int8, pack_weight, quantize_weight

pytestmark = pytest.mark.skipif(quantization.supported_formats("cpu")["int8"] is not None,
                                reason=f"int8: {quantization.supported_formats('cpu')['int8']}")


def _case(m: int = 9, k: int = 48, n: int = 20):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * k**-0.5, torch.randn(n, generator=g)
    wq, ws = quantize_weight(w)
    return x, wq, ws, b, pack_weight(wq, ws, b)


def test_the_packed_weight_is_the_quantized_one():
    _, wq, ws, b, packed = _case()
    qweight, bias = torch.ops.quantized.linear_unpack(packed)
    torch.testing.assert_close(qweight.int_repr(), wq)
    torch.testing.assert_close(qweight.q_per_channel_scales().float(), ws)
    torch.testing.assert_close(bias, b)


def test_int8_linear_is_within_its_budget_and_nan_rows_follow_the_float_linear():
    x, wq, ws, b, packed = _case()
    x[4, 7] = float("nan")
    rr = torch.backends.quantized.engine in REDUCE_RANGE_ENGINES
    out = int8_linear(x, packed, reduce_range=rr)
    exact = F.linear(x.double(), wq.double() * ws.double()[:, None], b.double())
    close_int8(out, exact, ((x, packed), {}), "int8_linear")
    assert torch.isnan(out[4]).all() and not torch.isnan(out[[0, 1, 2, 3, 5]]).any()


def test_the_budget_fails_a_result_one_activation_step_off_everywhere():
    x, wq, ws, b, packed = _case()
    exact = F.linear(x.double(), wq.double() * ws.double()[:, None], b.double())
    step = (x.max() - x.min()).item() / 127
    off = exact + step * (wq.double() * ws.double()[:, None]).abs().sum(1)
    with pytest.raises(AssertionError, match="beyond the activations' rounding"):
        close_int8(off.float(), exact, ((x, packed), {}), "off by a step")
