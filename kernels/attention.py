"""Attention kernels: flash-style softmax(q k^T * scale) v, non-causal, no mask, forward and backward.

q, k, v are (B, H, N, D) tensors read through their strides (the model passes views of a packed
(B, N, 3, H, D) projection). No N x N matrix ever reaches memory: the forward keeps a running max and sum per
query row (online softmax) and saves the row logsumexp (natural log, fp32, (B, H, N)); the backward
recomputes the probabilities from it. The head dim is padded to a power of two inside the kernels (masked
loads), never in memory. Accumulation is fp32 throughout; fp32 inputs use IEEE fp32 dot products (no TF32),
so the kernels match an fp32 reference.

The backward is deterministic (no atomics): a preprocess computes delta = rowsum(dO * O); one kernel per key
block loops over every query block to accumulate dK and dV; a separate kernel per query block loops over
every key block to accumulate dQ.

Layouts: the forward output and dq, dk, dv are allocated with (B, N, H, D) memory and returned as
(B, H, N, D) views, so ``o.transpose(1, 2).reshape(B, N, H * D)`` is free and the gradients of a packed
(B, N, 3, H, D) projection are copied back row by row.

Grids are one-dimensional, program id -> (b * H + h, block index), so any B * H fits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vit_fast.kernels import SMEM_WITHOUT_DEVICE, empty, interpreting, launch, on_inputs_device, smem_limit

LOG2E = 1.4426950408889634  # the kernels spell it (and ln 2) as literals: a jit function reads no plain globals

# Under the interpreter kernels run on CPU: one small fixed config keeps tests fast and exercises multi-block
# loops with masked tails at small N.
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}


@triton.jit
def _load_rows(base, rows, stride_n, stride_d, mask_rows, offs_d, mask_d):
    """A (rows, BLOCK_D) tile of a (N, D) matrix at ``base``; padded rows and columns read as 0."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=mask_rows[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _store_rows(base, tile, rows, stride_n, stride_d, mask_rows, offs_d, mask_d):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=mask_rows[:, None] & mask_d[None, :])


@triton.jit
def _program_block(N, H, BLOCK: tl.constexpr):
    """Program id -> (b, h, b * H + h, first row of this program's block); b, h, bh as int64."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(N, BLOCK)
    bh = pid // num_blocks
    start = (pid % num_blocks) * BLOCK
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64), bh.to(tl.int64), start


@triton.jit
def _attention_fwd_kernel(
    Q,  # (B, H, N, D), any strides
    K,  # (B, H, N, D), any strides
    V,  # (B, H, N, D), any strides
    OUT,  # (B, H, N, D) view of (B, N, H, D) memory
    LSE,  # (B, H, N) fp32, contiguous
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
):  # fmt: skip
    """One program per (b, h, query block): online softmax over every key block."""
    b, h, bh, start_m = _program_block(N, H, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM  # a compile-time mask: full-width rows stay vectorized
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, stride_qd, mask_m, offs_d, mask_d)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k = _load_rows(k_base, offs_n, stride_kn, stride_kd, mask_n, offs_d, mask_d)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every key block holds at least one valid key, so m_new is finite for finite inputs.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(v_base, offs_n, stride_vn, stride_vd, mask_n, offs_d, mask_d)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    _store_rows(OUT + b * stride_ob + h * stride_oh, out, offs_m, stride_on, stride_od, mask_m, offs_d, mask_d)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log logsumexp of the scaled scores
    tl.store(LSE + bh * N + offs_m, lse, mask=mask_m)


@triton.jit
def _attention_bwd_preprocess_kernel(
    OUT,  # (B, H, N, D), any strides
    DOUT,  # (B, H, N, D), any strides
    DELTA,  # (B, H, N) fp32, contiguous
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) in fp32: the softmax backward's per-row term."""
    b, h, bh, start_m = _program_block(N, H, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM
    o = _load_rows(OUT + b * stride_ob + h * stride_oh, offs_m, stride_on, stride_od, mask_m, offs_d, mask_d)
    do = _load_rows(DOUT + b * stride_dob + h * stride_doh, offs_m, stride_don, stride_dod, mask_m, offs_d, mask_d)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh * N + offs_m, delta, mask=mask_m)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,  # (B, H, N, D), any strides
    K,  # (B, H, N, D), any strides
    V,  # (B, H, N, D), any strides
    DOUT,  # (B, H, N, D), any strides
    LSE,  # (B, H, N) fp32, contiguous
    DELTA,  # (B, H, N) fp32, contiguous
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
):  # fmt: skip
    """One program per (b, h, key block): dK and dV of that block, summed over every query block."""
    b, h, bh, start_n = _program_block(N, H, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_DIM
    k = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, stride_kn, stride_kd, mask_n, offs_d, mask_d)
    v = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, stride_vn, stride_vd, mask_n, offs_d, mask_d)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DOUT + b * stride_dob + h * stride_doh

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q = _load_rows(q_base, offs_m, stride_qn, stride_qd, mask_m, offs_d, mask_d)  # (BLOCK_M, BLOCK_D)
        do = _load_rows(do_base, offs_m, stride_don, stride_dod, mask_m, offs_d, mask_d)  # (BLOCK_M, BLOCK_D)
        lse2 = tl.load(LSE + bh * N + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * N + offs_m, mask=mask_m, other=0.0)

        st = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        # Padded query rows load q = dO = lse = delta = 0: their pt is 1, but they add nothing to dv or dk.
        pt = tl.exp2(st * qk_scale - lse2[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=INPUT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=INPUT_PRECISION)

    _store_rows(
        DK + b * stride_dkb + h * stride_dkh, dk * scale, offs_n, stride_dkn, stride_dkd, mask_n, offs_d, mask_d
    )
    _store_rows(DV + b * stride_dvb + h * stride_dvh, dv, offs_n, stride_dvn, stride_dvd, mask_n, offs_d, mask_d)


# The signature repeats the dK/dV kernel's: a Triton kernel takes each tensor as a pointer plus its strides. The
# P and dP recompute repeats too: the backward is deterministic by design (no atomics), so each of the two
# kernels recomputes the tile it reduces over (keys for dK/dV, queries for dQ).
@triton.jit
def _attention_bwd_dq_kernel(
    Q,  # (B, H, N, D), any strides
    K,  # (B, H, N, D), any strides
    V,  # (B, H, N, D), any strides
    DOUT,  # (B, H, N, D), any strides
    LSE,  # (B, H, N) fp32, contiguous
    DELTA,  # (B, H, N) fp32, contiguous
    DQ,  # (B, H, N, D), any strides
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
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
):  # fmt: skip
    """One program per (b, h, query block): dQ of that block, summed over every key block."""
    b, h, bh, start_m = _program_block(N, H, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, stride_qd, mask_m, offs_d, mask_d)
    do = _load_rows(DOUT + b * stride_dob + h * stride_doh, offs_m, stride_don, stride_dod, mask_m, offs_d, mask_d)
    lse2 = tl.load(LSE + bh * N + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * N + offs_m, mask=mask_m, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k = _load_rows(k_base, offs_n, stride_kn, stride_kd, mask_n, offs_d, mask_d)  # (BLOCK_N, BLOCK_D)
        v = _load_rows(v_base, offs_n, stride_vn, stride_vd, mask_n, offs_d, mask_d)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)  # a padded key's exp2(-lse2) may overflow, and inf * 0 is NaN
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)

    _store_rows(
        DQ + b * stride_dqb + h * stride_dqh, dq * scale, offs_m, stride_dqn, stride_dqd, mask_m, offs_d, mask_d
    )


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Shared memory a config needs: the streamed tiles (two per step) for each pipeline stage plus the resident tiles,
# each BLOCK x BLOCK_D x itemsize (q, k, v and dout share one dtype: the op checks it). The budget is the device's
# own opt-in limit, read at the first launch on it.
_SMEM_BUDGET = SMEM_WITHOUT_DEVICE  # the budget for tensors on no CUDA device (tests/test_attention.py reads it)


def _prune(streamed: str, resident: str, resident_tiles: int):
    """An early_config_prune: drop configs whose tiles exceed the shared-memory budget for this head dim and
    dtype, and resident blocks larger than a short sequence. ``streamed`` names the block the inner loop walks,
    ``resident`` the block each program owns."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        n, block_d, itemsize = args["N"], triton.next_power_of_2(args["HEAD_DIM"]), args["Q"].element_size()
        budget = smem_limit(args["Q"].device)
        kept = []
        for c in configs:
            bs, br = c.kwargs[streamed], c.kwargs[resident]
            smem = (2 * bs * c.num_stages + resident_tiles * br) * block_d * itemsize
            if smem <= budget and not (br > 64 and n <= 64):
                kept.append(c)
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]

    return prune


_FWD_CONFIGS = [
    _config(64, 64, 4, 2),
    _config(64, 64, 4, 3),
    _config(128, 64, 4, 3),
    _config(128, 64, 8, 3),
    _config(128, 128, 8, 2),
    _config(64, 128, 4, 2),
]
_DKDV_CONFIGS = [
    _config(32, 64, 4, 2),
    _config(32, 128, 8, 2),
    _config(64, 64, 4, 2),
    _config(64, 128, 8, 2),
]
_DQ_CONFIGS = [
    _config(64, 32, 4, 2),
    _config(64, 64, 4, 2),
    _config(128, 32, 8, 2),
    _config(128, 64, 8, 2),
]

_attention_fwd_tuned = triton.autotune(
    _FWD_CONFIGS, key=["N", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_N", "BLOCK_M", 1)}
)(_attention_fwd_kernel)
_attention_bwd_dkdv_tuned = triton.autotune(
    _DKDV_CONFIGS, key=["N", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_M", "BLOCK_N", 2)}
)(_attention_bwd_dkdv_kernel)
_attention_bwd_dq_tuned = triton.autotune(
    _DQ_CONFIGS, key=["N", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_N", "BLOCK_M", 2)}
)(_attention_bwd_dq_kernel)


def _launch(tuned, grid_block: str, bh: int, n: int, *args, **kwargs) -> None:
    """Launch ``tuned`` (autotuned, or its first fitting config when not autotuning), or the small fixed config
    under the interpreter. The grid is one program per (b * H + h, block of ``grid_block`` rows)."""
    fixed = triton.Config(_INTERPRET_CONFIG) if interpreting() else None
    launch(tuned, lambda meta: (bh * triton.cdiv(n, meta[grid_block]),), args, kwargs, fixed=fixed)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the second is ignored for 16-bit operands


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
    _launch(
        _attention_fwd_tuned, "BLOCK_M", B * H, N,
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N, scale * LOG2E,
        INPUT_PRECISION=_precision(q.dtype), HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
    )  # fmt: skip
    return out, lse


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
    block_d = triton.next_power_of_2(D)
    lse = lse.contiguous()
    delta = empty((B, H, N), dtype=torch.float32, device=q.device)
    pre_block = 64
    _attention_bwd_preprocess_kernel[(B * H * triton.cdiv(N, pre_block),)](
        out, dout, delta, *out.stride(), *dout.stride(), H, N, BLOCK_M=pre_block, HEAD_DIM=D, BLOCK_D=block_d
    )
    dq = _bhnd_view_of_bnhd(B, H, N, D, dtype=q.dtype, device=q.device)
    dk = _bhnd_view_of_bnhd(B, H, N, D, dtype=q.dtype, device=q.device)
    dv = _bhnd_view_of_bnhd(B, H, N, D, dtype=q.dtype, device=q.device)
    common = {"INPUT_PRECISION": _precision(q.dtype), "HEAD_DIM": D, "BLOCK_D": block_d}
    _launch(
        _attention_bwd_dkdv_tuned, "BLOCK_N", B * H, N,
        q, k, v, dout, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        H, N, scale, scale * LOG2E, **common,
    )  # fmt: skip
    _launch(
        _attention_bwd_dq_tuned, "BLOCK_M", B * H, N,
        q, k, v, dout, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        H, N, scale, scale * LOG2E, **common,
    )  # fmt: skip
    return dq, dk, dv
