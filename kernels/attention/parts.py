"""What the attention kernels share (:mod:`vit_fast.kernels.attention` and its variants
:mod:`~vit_fast.kernels.attention.tma` and :mod:`~vit_fast.kernels.attention.fused`): the head-dim split, the
masked row-tile loads and stores, the grid mapping, the config pruning and the launch with its interpreter config.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vit_fast.kernels import SMEM_WITHOUT_DEVICE, interpreting, launch, smem_limit

LOG2E = 1.4426950408889634  # the kernels spell it (and ln 2) as literals: a jit function reads no plain globals

# Under the interpreter kernels run on CPU: one small fixed config keeps tests fast and exercises multi-block
# loops with masked tails at small N.
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}


def head_split(d: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_D1)``: the power-of-two parts the kernels cover head dim ``d`` with; BLOCK_D1 = 0 for one
    part. Two parts only where they are narrower than one padded part (tl.dot takes K >= 16)."""
    full = triton.next_power_of_2(d)
    low = 1 << (d.bit_length() - 1)
    if low == d:
        return d, 0
    high = max(16, triton.next_power_of_2(d - low))
    return (low, high) if low + high < full else (full, 0)


@triton.jit
def _load_rows(base, rows, stride_n, stride_d, mask_rows, offs_d, mask_d, MASK_ROWS: tl.constexpr,
               MASK_D: tl.constexpr):  # fmt: skip
    """A (rows, len(offs_d)) tile of a (N, D) matrix at ``base``; masked-off rows and columns read as 0."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d
    if MASK_ROWS:
        if MASK_D:
            tile = tl.load(ptrs, mask=mask_rows[:, None] & mask_d[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=mask_rows[:, None], other=0.0)
    else:
        if MASK_D:
            tile = tl.load(ptrs, mask=mask_d[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_rows(base, tile, rows, stride_n, stride_d, mask_rows, offs_d, mask_d):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=mask_rows[:, None] & mask_d[None, :])


@triton.jit
def _part(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr, SECOND: tl.constexpr):
    """Column offsets and mask of head-dim part 0 ([0, BLOCK_D)) or, with SECOND, part 1."""
    if SECOND:
        offs = BLOCK_D + tl.arange(0, BLOCK_D1)
    else:
        offs = tl.arange(0, BLOCK_D)
    return offs, offs < HEAD_DIM


@triton.jit
def _rows_pair(base, rows, stride_n, stride_d, mask_rows, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr):  # fmt: skip
    """The head-dim parts of a row tile: (part 0, part 1), part 1 = part 0 (unused) without a second part."""
    offs0, mask0 = _part(HEAD_DIM, BLOCK_D, BLOCK_D1, False)
    t0 = _load_rows(base, rows, stride_n, stride_d, mask_rows, offs0, mask0, MASK_ROWS, BLOCK_D > HEAD_DIM)
    t1 = t0
    if BLOCK_D1 > 0:
        offs1, mask1 = _part(HEAD_DIM, BLOCK_D, BLOCK_D1, True)
        t1 = _load_rows(base, rows, stride_n, stride_d, mask_rows, offs1, mask1, MASK_ROWS,
                        BLOCK_D + BLOCK_D1 > HEAD_DIM)
    return t0, t1


@triton.jit
def _store_pair(base, t0, t1, rows, stride_n, stride_d, mask_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_D1: tl.constexpr):  # fmt: skip
    offs0, mask0 = _part(HEAD_DIM, BLOCK_D, BLOCK_D1, False)
    _store_rows(base, t0, rows, stride_n, stride_d, mask_rows, offs0, mask0)
    if BLOCK_D1 > 0:
        offs1, mask1 = _part(HEAD_DIM, BLOCK_D, BLOCK_D1, True)
        _store_rows(base, t1, rows, stride_n, stride_d, mask_rows, offs1, mask1)


@triton.jit
def _dot_pair(a0, a1, b0, b1, INPUT_PRECISION: tl.constexpr, BLOCK_D1: tl.constexpr):
    """a b^T over both head-dim parts: (rows of a, rows of b) in fp32."""
    acc = tl.dot(a0, tl.trans(b0), input_precision=INPUT_PRECISION)
    if BLOCK_D1 > 0:
        acc = tl.dot(a1, tl.trans(b1), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _program_block(N, H, BLOCK: tl.constexpr):
    """Program id -> (b, h, b * H + h, first row of this program's block); b, h, bh as int64."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(N, BLOCK)
    bh = pid // num_blocks
    start = (pid % num_blocks) * BLOCK
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64), bh.to(tl.int64), start


@triton.jit
def _add_dq(dq_base, ds, k, offs_m, mask_m, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
            SECOND: tl.constexpr, INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """dQ[rows] += dS k for one head-dim part, into the contiguous fp32 (N, D) buffer at dq_base."""
    offs_d, mask_d = _part(HEAD_DIM, BLOCK_D, BLOCK_D1, SECOND)
    part = tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)  # (BLOCK_M, part width)
    ptrs = dq_base + offs_m.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.atomic_add(ptrs, part, mask=mask_m[:, None] & mask_d[None, :], sem="relaxed")


@triton.jit
def _dkdv_tile(k0, k1, v0, v1, mask_n, q_base, do_base, lse_base, delta_base, dq_base, start_m, N, stride_qn,
               stride_qd, stride_don, stride_dod, dk0, dk1, dv0, dv1, qk_scale, INPUT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D1: tl.constexpr,
               MASK_M: tl.constexpr, ADD_DQ: tl.constexpr):  # fmt: skip
    """One query tile's share of a key block's dK and dV; with ADD_DQ (the fused backward) also the key block's share
    of those queries' dQ, added into the fp32 buffer at dq_base."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    q0, q1 = _rows_pair(q_base, offs_m, stride_qn, stride_qd, mask_m, MASK_M, HEAD_DIM, BLOCK_D, BLOCK_D1)
    do0, do1 = _rows_pair(do_base, offs_m, stride_don, stride_dod, mask_m, MASK_M, HEAD_DIM, BLOCK_D, BLOCK_D1)
    if MASK_M:
        lse2 = tl.load(lse_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
    else:
        lse2 = tl.load(lse_base + offs_m) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m)
    st = _dot_pair(k0, k1, q0, q1, INPUT_PRECISION, BLOCK_D1)  # (BLOCK_N, BLOCK_M)
    # Padded query rows load q = dO = lse = delta = 0: their pt is 1, but they add nothing to dv or dk (and their
    # dQ rows are masked).
    pt = tl.exp2(st * qk_scale - lse2[None, :])
    if ADD_DQ:  # padded keys (k = 0) would get exp2(-lse2), which may overflow and turn dQ's 0 * inf into NaN
        pt = tl.where(mask_n[:, None], pt, 0.0)
    dv0 = tl.dot(pt.to(do0.dtype), do0, dv0, input_precision=INPUT_PRECISION)
    if BLOCK_D1 > 0:
        dv1 = tl.dot(pt.to(do1.dtype), do1, dv1, input_precision=INPUT_PRECISION)
    dpt = _dot_pair(v0, v1, do0, do1, INPUT_PRECISION, BLOCK_D1)  # (BLOCK_N, BLOCK_M)
    dst = pt * (dpt - delta[None, :])
    dk0 = tl.dot(dst.to(q0.dtype), q0, dk0, input_precision=INPUT_PRECISION)
    if BLOCK_D1 > 0:
        dk1 = tl.dot(dst.to(q1.dtype), q1, dk1, input_precision=INPUT_PRECISION)
    if ADD_DQ:
        ds = tl.trans(dst)  # (BLOCK_M, BLOCK_N)
        _add_dq(dq_base, ds, k0, offs_m, mask_m, HEAD_DIM, BLOCK_D, BLOCK_D1, False, INPUT_PRECISION)
        if BLOCK_D1 > 0:
            _add_dq(dq_base, ds, k1, offs_m, mask_m, HEAD_DIM, BLOCK_D, BLOCK_D1, True, INPUT_PRECISION)
    return dk0, dk1, dv0, dv1


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Shared memory a config needs: the streamed tiles (two per step) for each pipeline stage plus the resident tiles,
# each BLOCK x (the head-dim parts' width) x itemsize (q, k, v and dout share one dtype: the op checks it). The
# budget is the device's own opt-in limit, read at the first launch on it.
_SMEM_BUDGET = SMEM_WITHOUT_DEVICE  # the budget for tensors on no CUDA device (tests/ops/test_attention.py reads it)


def _prune(streamed: str, resident: str, resident_tiles: int):
    """An early_config_prune: drop configs whose tiles exceed the shared-memory budget for this head dim and
    dtype, and resident blocks larger than a short sequence. ``streamed`` names the block the inner loop walks,
    ``resident`` the block each program owns."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        q = args["Q"] if "Q" in args else args["q_desc"].base  # the TMA kernels take descriptors
        n, width, itemsize = args["N"], sum(head_split(args["HEAD_DIM"])), q.element_size()
        budget = smem_limit(q.device)
        kept = []
        for c in configs:
            bs, br = c.kwargs[streamed], c.kwargs[resident]
            smem = (2 * bs * c.num_stages + resident_tiles * br) * width * itemsize
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


def _launch(tuned, grid_block: str, bh: int, n: int, *args, interpret_config: triton.Config | None = None,
            **kwargs) -> None:
    """Launch ``tuned`` (autotuned, or its first fitting config when not autotuning), or the small fixed config
    under the interpreter (``interpret_config`` for kernels whose configs carry a pre-hook). The grid is one program
    per (b * H + h, block of ``grid_block`` rows)."""
    fixed = (interpret_config or triton.Config(_INTERPRET_CONFIG)) if interpreting() else None
    launch(tuned, lambda meta: (bh * triton.cdiv(n, meta[grid_block]),), args, kwargs, fixed=fixed)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the second is ignored for 16-bit operands


def _head_consts(q: torch.Tensor) -> dict:
    block_d, block_d1 = head_split(q.shape[-1])
    return {"INPUT_PRECISION": _precision(q.dtype), "HEAD_DIM": q.shape[-1], "BLOCK_D": block_d, "BLOCK_D1": block_d1}

