"""sm_90's attention forward: :mod:`vit_fast.kernels.attention`'s online softmax with q, k, v and the output moved
by TMA (tensor descriptors) instead of pointer loads.

Each of q, k, v and out is described as the 4-d (B, H, N, D) tensor it is, with its own strides, so the strided
views of a packed (B, N, 3, H, D) projection and the (B, N, H, D) output memory need no copy: a program loads
its (1, 1, BLOCK, D) boxes at (b, h, row, 0). The copy engine zero-fills rows past N, so only the scores of the
last key tile are masked. One head-dim part only (D a power of two, 16 to 128): D = 80's two-part split stays on
the pointer kernel, as do strides that are not 16-byte multiples and the fp8-output forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import vit_fast.kernels as kernels
from vit_fast.kernels.attention.parts import (
    _FWD_CONFIGS,
    LOG2E,
    _launch,
    _precision,
    _program_block,
    _prune,
    head_split,
)


@triton.jit
def _fwd_tile_tma(q, k_desc, v_desc, b, h, start_n, N, m_i, l_i, acc, qk_scale, INPUT_PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr):  # fmt: skip
    """One key tile of the online softmax; MASK_N for the partial last tile only (its padded keys read as 0)."""
    k = k_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    if MASK_N:
        s = tl.where((start_n + tl.arange(0, BLOCK_N) < N)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = v_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attention_fwd_tma_kernel(
    q_desc,  # (B, H, N, D) tensor descriptor, block (1, 1, BLOCK_M, D)
    k_desc,  # (B, H, N, D), block (1, 1, BLOCK_N, D)
    v_desc,  # (B, H, N, D), block (1, 1, BLOCK_N, D)
    o_desc,  # (B, H, N, D) over (B, N, H, D) memory, block (1, 1, BLOCK_M, D)
    LSE,  # (B, H, N) fp32, contiguous
    H, N,
    qk_scale,  # scale * log2(e): scores go through exp2
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One program per (b, h, query block), as :func:`~vit_fast.kernels.attention._attention_fwd_kernel`."""
    b64, h64, bh, start_m = _program_block(N, H, BLOCK_M)
    b, h = b64.to(tl.int32), h64.to(tl.int32)
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _fwd_tile_tma(q, k_desc, v_desc, b, h, start_n, N, m_i, l_i, acc, qk_scale, INPUT_PRECISION,
                                      BLOCK_N, HEAD_DIM, False)
    for start_n in range(n_full, N, BLOCK_N):  # the partial last tile, if any
        m_i, l_i, acc = _fwd_tile_tma(q, k_desc, v_desc, b, h, start_n, N, m_i, l_i, acc, qk_scale, INPUT_PRECISION,
                                      BLOCK_N, HEAD_DIM, True)
    out = (acc / l_i[:, None]).to(o_desc.dtype)
    o_desc.store([b, h, start_m, 0], out.reshape(1, 1, BLOCK_M, HEAD_DIM))  # rows past N are not written
    offs_m = start_m + tl.arange(0, BLOCK_M)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log logsumexp of the scaled scores
    tl.store(LSE + bh * N + offs_m, lse, mask=offs_m < N)


def _blocks(nargs: dict) -> None:
    """A config's pre-hook: the descriptors' boxes are the config's row blocks."""
    bm, bn, d = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
    nargs["q_desc"].block_shape = nargs["o_desc"].block_shape = [1, 1, bm, d]
    nargs["k_desc"].block_shape = nargs["v_desc"].block_shape = [1, 1, bn, d]


CONFIGS = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_blocks)
           for c in _FWD_CONFIGS]
_attention_fwd_tma_tuned = triton.autotune(
    CONFIGS, key=["N", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune("BLOCK_N", "BLOCK_M", 1)}
)(_attention_fwd_tma_kernel)
kernels.use_shortlist(_attention_fwd_tma_tuned)
_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, pre_hook=_blocks)


def head_dim_reason(d: int) -> str | None:
    """Why the TMA forward cannot take head dim ``d``, or None."""
    if head_split(d)[1] or d != triton.next_power_of_2(d):
        return f"head dim {d} is not a power of two (the pointer kernel splits it into parts)"
    return None


def reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> str | None:
    """Why the TMA forward cannot run these (B, H, N, D) tensors, or None."""
    return head_dim_reason(q.shape[-1]) or kernels.tma_reason(q, k, v, out)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
            scale: float) -> None:
    """softmax(q k^T * scale) v into the (B, H, N, D) view ``out`` and the logsumexp into ``lse`` (B, H, N)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, N, D = q.shape
    descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, D]) for t in (q, k, v, out)]
    _launch(_attention_fwd_tma_tuned, "BLOCK_M", B * H, N, *descs, lse, H, N, scale * LOG2E,
            INPUT_PRECISION=_precision(q.dtype), HEAD_DIM=D, interpret_config=_INTERPRET_CONFIG)

