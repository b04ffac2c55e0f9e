"""The fused attention backward: one kernel computes dK, dV and dQ, a candidate beside the deterministic two-kernel
backward of :mod:`vit_fast.kernels.attention` (``use_variant("attention_bwd", "fused")``; the tuner times both).

A small kernel first stores delta = rowsum(dO * O) per query row. Then one program per (b, h, key block) walks
every query block once, as the dK/dV kernel does, and also adds its share of dQ = dS K into an fp32 (B, H, N, D)
buffer with atomics: P and dP are recomputed once per tile instead of twice (the two-kernel version recomputes
them in each kernel), at the price of atomics and a run-to-run order of the fp32 sums (not bitwise
deterministic). The buffer is scaled and cast into dq's view last.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import vit_fast.kernels as kernels
from vit_fast.kernels import empty
from vit_fast.kernels.attention.parts import (
    _DKDV_CONFIGS,
    LOG2E,
    _dkdv_tile,
    _head_consts,
    _launch,
    _program_block,
    _prune,
    _rows_pair,
    _store_pair,
)


@triton.jit
def _attention_bwd_delta_kernel(
    OUT,  # (B, H, N, D), any strides
    DOUT,  # (B, H, N, D), any strides
    DELTA,  # (B, H, N) fp32, contiguous
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D1: tl.constexpr,
):  # fmt: skip
    b, h, bh, start_m = _program_block(N, H, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    o0, o1 = _rows_pair(OUT + b * stride_ob + h * stride_oh, offs_m, stride_on, stride_od, mask_m, True, HEAD_DIM,
                        BLOCK_D, BLOCK_D1)
    do0, do1 = _rows_pair(DOUT + b * stride_dob + h * stride_doh, offs_m, stride_don, stride_dod, mask_m, True,
                          HEAD_DIM, BLOCK_D, BLOCK_D1)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), axis=1)
    if BLOCK_D1 > 0:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), axis=1)
    tl.store(DELTA + bh * N + offs_m, delta, mask=mask_m)


# The signature repeats the dK/dV kernel's plus the dQ buffer: a Triton kernel takes each tensor as a pointer plus
# its strides.
@triton.jit
def _attention_bwd_fused_kernel(
    Q,  # (B, H, N, D), any strides
    K,  # (B, H, N, D), any strides
    V,  # (B, H, N, D), any strides
    DOUT,  # (B, H, N, D), any strides
    LSE,  # (B, H, N) fp32, contiguous
    DELTA,  # (B, H, N) fp32, contiguous: the delta kernel's
    DQ_ACC,  # (B, H, N, D) fp32, contiguous, zeroed: dQ / scale, summed with atomics
    DK,  # (B, H, N, D), any strides
    DV,  # (B, H, N, D), any strides
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N,
    scale,
    qk_scale,  # scale * log2(e)
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D1: tl.constexpr = 0,
):  # fmt: skip
    """One program per (b, h, key block): dK and dV of that block, and its share of every query row's dQ."""
    b, h, bh, start_n = _program_block(N, H, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k0, k1 = _rows_pair(K + b * stride_kb + h * stride_kh, offs_n, stride_kn, stride_kd, mask_n, True, HEAD_DIM,
                        BLOCK_D, BLOCK_D1)
    v0, v1 = _rows_pair(V + b * stride_vb + h * stride_vh, offs_n, stride_vn, stride_vd, mask_n, True, HEAD_DIM,
                        BLOCK_D, BLOCK_D1)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DOUT + b * stride_dob + h * stride_doh
    dq_base = DQ_ACC + bh * N * HEAD_DIM

    dk0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk1 = dk0
    dv1 = dv0
    if BLOCK_D1 > 0:
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk0, dk1, dv0, dv1 = _dkdv_tile(k0, k1, v0, v1, mask_n, q_base, do_base, LSE + bh * N, DELTA + bh * N,
                                        dq_base, start_m, N, stride_qn, stride_qd, stride_don, stride_dod, dk0, dk1,
                                        dv0, dv1, qk_scale, INPUT_PRECISION, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_D1,
                                        False, True)
    for start_m in range(m_full, N, BLOCK_M):  # the partial last tile, if any
        dk0, dk1, dv0, dv1 = _dkdv_tile(k0, k1, v0, v1, mask_n, q_base, do_base, LSE + bh * N, DELTA + bh * N,
                                        dq_base, start_m, N, stride_qn, stride_qd, stride_don, stride_dod, dk0, dk1,
                                        dv0, dv1, qk_scale, INPUT_PRECISION, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_D1,
                                        True, True)

    _store_pair(DK + b * stride_dkb + h * stride_dkh, dk0 * scale, dk1 * scale, offs_n, stride_dkn, stride_dkd,
                mask_n, HEAD_DIM, BLOCK_D, BLOCK_D1)
    _store_pair(DV + b * stride_dvb + h * stride_dvh, dv0, dv1, offs_n, stride_dvn, stride_dvd, mask_n, HEAD_DIM,
                BLOCK_D, BLOCK_D1)


_DELTA_CONFIGS = [triton.Config({"BLOCK_M": 64}, num_warps=4)]
_attention_bwd_delta_tuned = triton.autotune(_DELTA_CONFIGS, key=["HEAD_DIM"])(_attention_bwd_delta_kernel)
_attention_bwd_fused_tuned = triton.autotune(
    _DKDV_CONFIGS, key=["N", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N", 2)}
)(_attention_bwd_fused_kernel)
kernels.use_shortlist(_attention_bwd_delta_tuned, _attention_bwd_fused_tuned)


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, scale: float, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """The delta kernel, then the fused kernel, into the given (B, H, N, D) views; dq gets the fp32 buffer last."""
    B, H, N, D = q.shape
    consts = _head_consts(q)
    delta = empty((B, H, N), dtype=torch.float32, device=q.device)
    _launch(_attention_bwd_delta_tuned, "BLOCK_M", B * H, N, out, dout, delta, *out.stride(), *dout.stride(), H, N,
            HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"], BLOCK_D1=consts["BLOCK_D1"],
            interpret_config=triton.Config({"BLOCK_M": 32}))
    dq_acc = torch.zeros((B, H, N, D), dtype=torch.float32, device=q.device)  # atomics add into it: zeros
    _launch(
        _attention_bwd_fused_tuned, "BLOCK_N", B * H, N,
        q, k, v, dout, lse.contiguous(), delta, dq_acc, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        H, N, scale, scale * LOG2E, **consts,
    )  # fmt: skip
    dq.copy_(dq_acc.mul_(scale))
