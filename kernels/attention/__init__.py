"""Attention kernels: flash-style softmax(q k^T * scale) v, non-causal, no mask, forward and backward.

q, k, v are (B, H, N, D) tensors read through their strides (the model passes views of a packed
(B, N, 3, H, D) projection). No N x N matrix ever reaches memory: the forward keeps a running max and sum per
query row (online softmax) and saves the row logsumexp (natural log, fp32, (B, H, N)); the backward
recomputes the probabilities from it. Accumulation is fp32 throughout; fp32 inputs use IEEE fp32 dot products
(no TF32), so the kernels match an fp32 reference.

Head dims: the head dim is covered by one power-of-two part (BLOCK_D) and, where that saves work, a second one
(BLOCK_D1, 0 for none): D = 80 runs as 64 + 16 (two dot products and two accumulators) instead of padding to
128, which would waste 37.5% of every GEMM. Padding inside a part is masked, never in memory.

Masks only where needed: each inner loop runs the full tiles with unmasked row loads and no score masking,
then at most one masked tail tile (ViT's N = 197, 257, 577 leave one partial tile).

The backward is deterministic (no atomics): the dQ kernel runs first, one program per query block looping over
every key block; its prologue computes delta = rowsum(dO * O) of its block and stores it for the dK/dV kernel,
one program per key block looping over every query block.

Variants (:func:`vit_fast.kernels.use_variant`): on sm_90 the forward takes its TMA-descriptor kernel where the
layout allows (:mod:`vit_fast.kernels.attention.tma`), and the backward can run as one fused dK/dV/dQ kernel with
fp32 atomics for dQ (:mod:`vit_fast.kernels.attention.fused`), a candidate the tuner times beside this one. What
they share (the head-dim split, row-tile loads, the config pruning) is :mod:`vit_fast.kernels.attention.parts`.

Layouts: the forward output is allocated with (B, N, H, D) memory and returned as a (B, H, N, D) view, so
``o.transpose(1, 2).reshape(B, N, H * D)`` is free. The gradients go wherever the caller's views point: three
(B, N, H, D) buffers, or the three slices of one (B, N, 3, H, D) buffer (:func:`attention_bwd_packed`), which is
then the gradient of the model's packed qkv projection with no copy.

Grids are one-dimensional, program id -> (b * H + h, block index), so any B * H fits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import vit_fast.kernels as kernels
from vit_fast.kernels import empty, interpreting, on_inputs_device
from vit_fast.kernels.attention import fused, tma
from vit_fast.kernels.attention.parts import (  # noqa: F401 - _SMEM_BUDGET, head_split: this module's names too
    _DKDV_CONFIGS,
    _DQ_CONFIGS,
    _FWD_CONFIGS,
    _SMEM_BUDGET,
    LOG2E,
    _config,
    _dkdv_tile,
    _dot_pair,
    _head_consts,
    _launch,
    _part,
    _program_block,
    _prune,
    _rows_pair,
    _store_pair,
    _store_rows,
    head_split,
)
from vit_fast.kernels.quantize_rows import e4m3_rows


@triton.jit
def _fwd_tile(q0, q1, k_base, v_base, start_n, N, stride_kn, stride_kd, stride_vn, stride_vd, m_i, l_i, acc0, acc1,
              qk_scale, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr, MASK_N: tl.constexpr):  # fmt: skip
    """One key tile of the online softmax; MASK_N for the partial last tile only."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k0, k1 = _rows_pair(k_base, offs_n, stride_kn, stride_kd, mask_n, MASK_N, HEAD_DIM, BLOCK_D, BLOCK_D1)
    s = _dot_pair(q0, q1, k0, k1, INPUT_PRECISION, BLOCK_D1) * qk_scale  # (BLOCK_M, BLOCK_N)
    if MASK_N:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    # Every key tile holds at least one valid key, so m_new is finite for finite inputs.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v0, v1 = _rows_pair(v_base, offs_n, stride_vn, stride_vd, mask_n, MASK_N, HEAD_DIM, BLOCK_D, BLOCK_D1)
    acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=INPUT_PRECISION)
    if BLOCK_D1 > 0:
        acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=INPUT_PRECISION)
    return m_new, l_i, acc0, acc1


@triton.jit
def _attention_fwd_kernel(
    Q,  # (B, H, N, D), any strides
    K,  # (B, H, N, D), any strides
    V,  # (B, H, N, D), any strides
    OUT,  # (B, H, N, D) view of (B, N, H, D) memory; e4m3 with OUT_FP8
    LSE,  # (B, H, N) fp32, contiguous; unused with OUT_FP8
    OUT_SCALE,  # (B, N, H) fp32, contiguous: one e4m3 scale per (token, head); unused without OUT_FP8
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N,
    qk_scale,  # scale * log2(e): scores go through exp2
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_D1: tl.constexpr = 0,
    OUT_FP8: tl.constexpr = False,
    ROUND_E4M3: tl.constexpr = False,
):  # fmt: skip
    """One program per (b, h, query block): online softmax over every key block.

    With OUT_FP8 (inference) the output leaves as the proj GEMM's e4m3 input: each (token, head) row of D values
    gets its own scale, computed here from the fp32 row, so nothing reads the attention output back to quantize
    it. No logsumexp is stored: there is no backward. The row scale needs the whole row in one tile: OUT_FP8 takes
    one head-dim part (BLOCK_D1 = 0)."""
    b, h, bh, start_m = _program_block(N, H, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    q_base = Q + b * stride_qb + h * stride_qh
    q0, q1 = _rows_pair(q_base, offs_m, stride_qn, stride_qd, mask_m, True, HEAD_DIM, BLOCK_D, BLOCK_D1)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc1 = acc0
    if BLOCK_D1 > 0:
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc0, acc1 = _fwd_tile(q0, q1, k_base, v_base, start_n, N, stride_kn, stride_kd, stride_vn,
                                         stride_vd, m_i, l_i, acc0, acc1, qk_scale, INPUT_PRECISION, BLOCK_N,
                                         HEAD_DIM, BLOCK_D, BLOCK_D1, False)
    for start_n in range(n_full, N, BLOCK_N):  # the partial last tile, if any
        m_i, l_i, acc0, acc1 = _fwd_tile(q0, q1, k_base, v_base, start_n, N, stride_kn, stride_kd, stride_vn,
                                         stride_vd, m_i, l_i, acc0, acc1, qk_scale, INPUT_PRECISION, BLOCK_N,
                                         HEAD_DIM, BLOCK_D, BLOCK_D1, True)

    o_base = OUT + b * stride_ob + h * stride_oh
    out0 = acc0 / l_i[:, None]
    if OUT_FP8:
        offs_d, mask_d = _part(HEAD_DIM, BLOCK_D, BLOCK_D1, False)
        rows_scale = (b * N + offs_m) * H + h  # OUT_SCALE[b, n, h]
        out0 = e4m3_rows(out0, mask_m[:, None] & mask_d[None, :], mask_m, OUT_SCALE, rows_scale, ROUND_E4M3)
        _store_rows(o_base, out0, offs_m, stride_on, stride_od, mask_m, offs_d, mask_d)
    else:
        _store_pair(o_base, out0, acc1 / l_i[:, None], offs_m, stride_on, stride_od, mask_m, HEAD_DIM, BLOCK_D,
                    BLOCK_D1)
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log logsumexp of the scaled scores
        tl.store(LSE + bh * N + offs_m, lse, mask=mask_m)


@triton.jit
def _dq_tile(q0, q1, do0, do1, lse2, delta, k_base, v_base, start_n, N, stride_kn, stride_kd, stride_vn, stride_vd,
             dq0, dq1, qk_scale, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr, MASK_N: tl.constexpr):  # fmt: skip
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k0, k1 = _rows_pair(k_base, offs_n, stride_kn, stride_kd, mask_n, MASK_N, HEAD_DIM, BLOCK_D, BLOCK_D1)
    v0, v1 = _rows_pair(v_base, offs_n, stride_vn, stride_vd, mask_n, MASK_N, HEAD_DIM, BLOCK_D, BLOCK_D1)
    s = _dot_pair(q0, q1, k0, k1, INPUT_PRECISION, BLOCK_D1)  # (BLOCK_M, BLOCK_N)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASK_N:
        p = tl.where(mask_n[None, :], p, 0.0)  # a padded key's exp2(-lse2) may overflow, and inf * 0 is NaN
    dp = _dot_pair(do0, do1, v0, v1, INPUT_PRECISION, BLOCK_D1)  # (BLOCK_M, BLOCK_N)
    ds = p * (dp - delta[:, None])
    dq0 = tl.dot(ds.to(k0.dtype), k0, dq0, input_precision=INPUT_PRECISION)
    if BLOCK_D1 > 0:
        dq1 = tl.dot(ds.to(k1.dtype), k1, dq1, input_precision=INPUT_PRECISION)
    return dq0, dq1


@triton.jit
def _attention_bwd_dq_kernel(
    Q,  # (B, H, N, D), any strides
    K,  # (B, H, N, D), any strides
    V,  # (B, H, N, D), any strides
    OUT,  # (B, H, N, D), any strides
    DOUT,  # (B, H, N, D), any strides
    LSE,  # (B, H, N) fp32, contiguous
    DELTA,  # (B, H, N) fp32, contiguous: written here, read by the dK/dV kernel
    DQ,  # (B, H, N, D), any strides
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
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
    """One program per (b, h, query block): delta = rowsum(dO * O) of that block (stored for the dK/dV kernel: it
    saves a launch and a pass over dO), then dQ of the block, summed over every key block."""
    b, h, bh, start_m = _program_block(N, H, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    q0, q1 = _rows_pair(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, stride_qd, mask_m, True, HEAD_DIM,
                        BLOCK_D, BLOCK_D1)
    do0, do1 = _rows_pair(DOUT + b * stride_dob + h * stride_doh, offs_m, stride_don, stride_dod, mask_m, True,
                          HEAD_DIM, BLOCK_D, BLOCK_D1)
    o0, o1 = _rows_pair(OUT + b * stride_ob + h * stride_oh, offs_m, stride_on, stride_od, mask_m, True, HEAD_DIM,
                        BLOCK_D, BLOCK_D1)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), axis=1)
    if BLOCK_D1 > 0:
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), axis=1)
    tl.store(DELTA + bh * N + offs_m, delta, mask=mask_m)
    lse2 = tl.load(LSE + bh * N + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq1 = dq0
    if BLOCK_D1 > 0:
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq0, dq1 = _dq_tile(q0, q1, do0, do1, lse2, delta, k_base, v_base, start_n, N, stride_kn, stride_kd,
                            stride_vn, stride_vd, dq0, dq1, qk_scale, INPUT_PRECISION, BLOCK_N, HEAD_DIM, BLOCK_D,
                            BLOCK_D1, False)
    for start_n in range(n_full, N, BLOCK_N):  # the partial last tile, if any
        dq0, dq1 = _dq_tile(q0, q1, do0, do1, lse2, delta, k_base, v_base, start_n, N, stride_kn, stride_kd,
                            stride_vn, stride_vd, dq0, dq1, qk_scale, INPUT_PRECISION, BLOCK_N, HEAD_DIM, BLOCK_D,
                            BLOCK_D1, True)

    _store_pair(DQ + b * stride_dqb + h * stride_dqh, dq0 * scale, dq1 * scale, offs_m, stride_dqn, stride_dqd,
                mask_m, HEAD_DIM, BLOCK_D, BLOCK_D1)


# The signature repeats the dQ kernel's: a Triton kernel takes each tensor as a pointer plus its strides. The P and
# dP recompute repeats too: the backward is deterministic by design (no atomics), so each of the two kernels
# recomputes the tile it reduces over (keys for dQ, queries for dK/dV).
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,  # (B, H, N, D), any strides
    K,  # (B, H, N, D), any strides
    V,  # (B, H, N, D), any strides
    DOUT,  # (B, H, N, D), any strides
    LSE,  # (B, H, N) fp32, contiguous
    DELTA,  # (B, H, N) fp32, contiguous: the dQ kernel's
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
    """One program per (b, h, key block): dK and dV of that block, summed over every query block."""
    b, h, bh, start_n = _program_block(N, H, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k0, k1 = _rows_pair(K + b * stride_kb + h * stride_kh, offs_n, stride_kn, stride_kd, mask_n, True, HEAD_DIM,
                        BLOCK_D, BLOCK_D1)
    v0, v1 = _rows_pair(V + b * stride_vb + h * stride_vh, offs_n, stride_vn, stride_vd, mask_n, True, HEAD_DIM,
                        BLOCK_D, BLOCK_D1)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DOUT + b * stride_dob + h * stride_doh

    dk0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk1 = dk0
    dv1 = dv0
    if BLOCK_D1 > 0:
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk0, dk1, dv0, dv1 = _dkdv_tile(k0, k1, v0, v1, mask_n, q_base, do_base, LSE + bh * N, DELTA + bh * N, DK,
                                        start_m, N, stride_qn, stride_qd, stride_don, stride_dod, dk0, dk1, dv0, dv1,
                                        qk_scale, INPUT_PRECISION, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_D1, False, False)
    for start_m in range(m_full, N, BLOCK_M):  # the partial last tile, if any
        dk0, dk1, dv0, dv1 = _dkdv_tile(k0, k1, v0, v1, mask_n, q_base, do_base, LSE + bh * N, DELTA + bh * N, DK,
                                        start_m, N, stride_qn, stride_qd, stride_don, stride_dod, dk0, dk1, dv0, dv1,
                                        qk_scale, INPUT_PRECISION, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_D1, True, False)

    _store_pair(DK + b * stride_dkb + h * stride_dkh, dk0 * scale, dk1 * scale, offs_n, stride_dkn, stride_dkd,
                mask_n, HEAD_DIM, BLOCK_D, BLOCK_D1)
    _store_pair(DV + b * stride_dvb + h * stride_dvh, dv0, dv1, offs_n, stride_dvn, stride_dvd, mask_n, HEAD_DIM,
                BLOCK_D, BLOCK_D1)


_attention_fwd_tuned = triton.autotune(
    _FWD_CONFIGS, key=["N", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_N", "BLOCK_M", 1)}
)(_attention_fwd_kernel)
_attention_bwd_dkdv_tuned = triton.autotune(
    _DKDV_CONFIGS, key=["N", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N", 2)}
)(_attention_bwd_dkdv_kernel)
_attention_bwd_dq_tuned = triton.autotune(
    _DQ_CONFIGS, key=["N", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_N", "BLOCK_M", 2)}
)(_attention_bwd_dq_kernel)
kernels.use_shortlist(_attention_fwd_tuned, _attention_bwd_dkdv_tuned, _attention_bwd_dq_tuned)



def useful_fraction(n: int, d: int, block_m: int, block_n: int) -> float:
    """Useful score entries (N x N x D) over those a forward with these tiles computes (every tile whole, the head
    dim covered by :func:`head_split`'s parts): what masking and padding cost at a ViT shape."""
    computed = triton.cdiv(n, block_m) * block_m * triton.cdiv(n, block_n) * block_n * sum(head_split(d))
    return n * n * d / computed


def unpack_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (B, H, N, D) views of a packed (B, N, 3, H, D) tensor."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
    return q, k, v


def _bhnd_view_of_bnhd(b: int, h: int, n: int, d: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return empty((b, n, h, d), dtype=dtype, device=device).transpose(1, 2)  # (B, H, N, D) over (B, N, H, D)


@on_inputs_device
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v for (B, H, N, D) q, k, v of one dtype (any strides, 16 <= D <= 128).

    Returns ``(out, lse)``: out (B, H, N, D) in q's dtype, a view of (B, N, H, D) memory; lse (B, H, N) fp32,
    the natural-log logsumexp of each row of scaled scores.
    """
    B, H, N, D = q.shape
    out = _bhnd_view_of_bnhd(B, H, N, D, dtype=q.dtype, device=q.device)
    lse = empty((B, H, N), dtype=torch.float32, device=q.device)
    variant = kernels.pick_variant("attention_fwd", "tma" if q.is_cuda else "pointer",
                                   lambda v_: None if v_ == "pointer" else tma.reason(q, k, v, out))
    if variant == "tma":
        tma.forward(q, k, v, out, lse, scale)
    else:
        _forward(q, k, v, out, lse, scale, **_head_consts(q))
    return out, lse


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, stats: torch.Tensor,
             scale: float, **consts: object) -> None:
    """Launch the forward into the (B, H, N, D) view ``out``; ``stats`` is the logsumexp, or with OUT_FP8 the
    per-(token, head) scales (the kernel takes both pointers and writes one)."""
    B, H, N, _ = q.shape
    _launch(
        _attention_fwd_tuned, "BLOCK_M", B * H, N,
        q, k, v, out, stats, stats,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N, scale * LOG2E, **consts,
    )  # fmt: skip


@on_inputs_device
def attention_fwd_packed(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_fwd` of the q, k, v views of one packed (B, N, 3, H, D) tensor (any strides)."""
    return attention_fwd(*unpack_qkv(qkv), scale)


@on_inputs_device
def attention_fwd_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of :func:`attention_fwd` leaving as the next GEMM's e4m3 input (inference: no logsumexp).

    Returns ``(out, out_scale)``: out (B * N, H * D) float8_e4m3fn, the token-major rows the proj GEMM reads;
    out_scale (B * N, H) fp32, one scale per (token, head), with ``out[t, h*D:(h+1)*D] * out_scale[t, h]`` ~= the
    attention output of head h at token t.
    """
    B, H, N, D = q.shape
    out = empty((B * N, H * D), dtype=torch.float8_e4m3fn, device=q.device)
    out_scale = empty((B * N, H), dtype=torch.float32, device=q.device)
    o = out.view(B, N, H, D).transpose(1, 2)  # (B, H, N, D) view the kernel writes through
    # one head-dim part: the row scale needs the whole row in one tile
    _forward(q, k, v, o, out_scale, scale, **{**_head_consts(q), "BLOCK_D": triton.next_power_of_2(D), "BLOCK_D1": 0},
             OUT_FP8=True, ROUND_E4M3=interpreting())
    return out, out_scale


def _backward(dout, q, k, v, out, lse, scale, dq, dk, dv) -> None:
    """Launch the dQ kernel (which also writes delta), then the dK/dV kernel that reads it, into the given views;
    or, as the variant chosen, the fused backward (:mod:`vit_fast.kernels.attention.fused`)."""
    if kernels.pick_variant("attention_bwd", "split", lambda v_: None) == "fused":
        fused.backward(dout, q, k, v, out, lse, scale, dq, dk, dv)
        return
    B, H, N, D = q.shape
    lse = lse.contiguous()
    delta = empty((B, H, N), dtype=torch.float32, device=q.device)
    common = _head_consts(q)
    _launch(
        _attention_bwd_dq_tuned, "BLOCK_M", B * H, N,
        q, k, v, out, dout, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *dq.stride(),
        H, N, scale, scale * LOG2E, **common,
    )  # fmt: skip
    _launch(
        _attention_bwd_dkdv_tuned, "BLOCK_N", B * H, N,
        q, k, v, dout, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        H, N, scale, scale * LOG2E, **common,
    )  # fmt: skip


@on_inputs_device
def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention_fwd` given dout (B, H, N, D, any strides) and the forward's out and lse.

    Returns ``(dq, dk, dv)``, each (B, H, N, D) in q's dtype, a view of (B, N, H, D) memory.
    """
    B, H, N, D = q.shape
    dq, dk, dv = (_bhnd_view_of_bnhd(B, H, N, D, dtype=q.dtype, device=q.device) for _ in range(3))
    _backward(dout, q, k, v, out, lse, scale, dq, dk, dv)
    return dq, dk, dv


@on_inputs_device
def attention_bwd_packed(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Gradient of :func:`attention_fwd_packed`: one (B, N, 3, H, D) tensor in qkv's dtype, contiguous, that the
    kernels write in place (dq, dk, dv are its three slices): the packed projection's gradient with no copy."""
    B, N, _, H, D = qkv.shape
    dqkv = empty((B, N, 3, H, D), dtype=qkv.dtype, device=qkv.device)
    _backward(dout, *unpack_qkv(qkv), out, lse, scale, *unpack_qkv(dqkv))
    return dqkv
