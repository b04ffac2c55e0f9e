"""quantize_rows: dynamic per-row e4m3 quantization (of gelu(x) too), the reference against the format's rounding
written out and the Triton kernel (through the interpreter) against the reference. The contract, the property
tests and the error budget every backend is held to are the op's spec's (vit_fast/ops/quantize_rows.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vit_fast
from vit_fast import backends
from vit_fast.ops import E4M3_MAX, FP8, quantize_rows, quantize_rows_ref


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", [(1, 16), (7, 80), (50, 192)])
def test_quantize_rows_reference_and_triton(shape, gelu):
    x = torch.randn(*shape) * 3
    target = F.gelu(x) if gelu else x
    ref_q, ref_s = quantize_rows_ref(x, gelu=gelu)
    assert ref_q.dtype == FP8 and ref_s.shape == (shape[0],)
    torch.testing.assert_close(ref_s, target.abs().amax(1) / E4M3_MAX)
    deq = ref_q.float() * ref_s[:, None]
    assert ((deq - target).abs() <= target.abs().amax(1, keepdim=True) * 2**-4 + 1e-6).all()  # half an e4m3 ulp
    if "triton" not in backends.implemented("quantize_rows"):
        pytest.skip(backends.unavailable("triton") or "triton not implemented")
    with vit_fast.set_backend("triton"), backends.trace() as launches:
        tq, ts = quantize_rows(x, gelu=gelu)
    assert {(r.op, r.backend) for r in launches} == {("quantize_rows", "triton")}
    torch.testing.assert_close(ts, ref_s, rtol=1e-5, atol=1e-12)
    # ties of the rounding may go the other way: at most one e4m3 step apart, and rarely
    diff = (tq.float() * ts[:, None] - deq).abs()
    assert (diff <= target.abs().amax(1, keepdim=True) * 2**-3 + 1e-6).all()
    assert (tq.float() != ref_q.float()).float().mean() < 0.01
