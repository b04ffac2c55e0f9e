"""FP8 GEMM with block-scaled activations: ``y = (x_q * x_scale) @ (w_q * w_scale)^T + bias``.

x_q (M, K) e4m3 carries one fp32 scale per row and per group of ``K / G`` columns (x_scale (M, G)); w_q (N, K)
e4m3 one scale per output channel. G = 1 is the row-wise scaling cuBLASLt runs; G = H is what the attention
kernel emits for the proj GEMM, one scale per (token, head), since each of its programs sees one head of a
token and cannot know the token's other heads. The kernel walks K in blocks inside one group, so each block's
fp32 partial product takes its row scales once (``acc += dot(a, w) * s``); the weight scales and the bias come
in the epilogue. Operands go from memory straight into ``tl.dot``: Triton may stage them through shared memory
with its pipelined (Hopper) loads.

Inference only: there is no backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vit_fast.kernels import empty, interpreting, launch, on_inputs_device

_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}


@triton.jit(do_not_specialize=["m_bucket"])
def _scaled_gemm_kernel(
    X,  # (M, K) e4m3, unit column stride
    X_SCALE,  # (M, G) fp32, contiguous
    W,  # (N, K) e4m3, unit column stride
    W_SCALE,  # (N,) fp32
    BIAS,  # (N,) any float, or a dummy when not HAS_BIAS
    OUT,  # (M, N), unit column stride
    M, N, K,
    m_bucket,  # next power of two of M: the autotuning key (a new batch size reuses its bucket's config); unused
    stride_xm, stride_wn, stride_om,
    GROUPS: tl.constexpr,  # G: activation scales per row
    GROUP_K: tl.constexpr,  # K / G columns share one scale
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides GROUP_K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped program order: GROUP_M row blocks share each column block while it is in L2.
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * blocks_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rows < M, cols < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + cols[:, None] * stride_wn + offs_k[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(GROUPS):
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kk in range(0, GROUP_K, BLOCK_K):  # K is a multiple of BLOCK_K: no mask along K
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            part = tl.dot(x, tl.trans(w), part)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if GROUPS == 1:
            acc = part
        else:
            acc += part * tl.load(X_SCALE + rows * GROUPS + g, mask=mask_m, other=0.0)[:, None]
    if GROUPS == 1:
        acc = acc * tl.load(X_SCALE + rows, mask=mask_m, other=0.0)[:, None]
    acc = acc * tl.load(W_SCALE + cols, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = OUT + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# (BLOCK_M, BLOCK_N, warps, stages); GROUP_M 8 throughout
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, w, s in ((128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 3))
]

_scaled_gemm_tuned = triton.autotune(CONFIGS, key=["m_bucket", "N", "K", "GROUPS"])(_scaled_gemm_kernel)


def block_k(group_k: int) -> int:
    """The K step: the largest of 64, 32, 16 that divides a scale group (fp8 tl.dot needs K >= 16)."""
    for b in (64, 32, 16):
        if group_k % b == 0:
            return b
    raise ValueError(f"scale groups of {group_k} columns: need a multiple of 16")


@on_inputs_device
def scaled_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``(x_q * x_scale) @ (w_q * w_scale)^T + bias`` in ``out_dtype``.

    Args:
        x_q: (M, K) float8_e4m3fn, unit column stride; x_scale: (M, G) or (M,) fp32, G dividing K with
            K / G a multiple of 16.
        w_q: (N, K) float8_e4m3fn, unit column stride; w_scale: (N,) fp32; bias: (N,) or None.
    """
    m, k = x_q.shape
    n = w_q.shape[0]
    scales = x_scale.reshape(m, -1).contiguous()
    groups = scales.shape[1]
    out = empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    fixed = triton.Config(_INTERPRET_CONFIG) if interpreting() else None
    launch(
        _scaled_gemm_tuned,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        (x_q, scales, w_q, w_scale.contiguous(), w_scale if bias is None else bias.contiguous(), out,
         m, n, k, triton.next_power_of_2(m), x_q.stride(0), w_q.stride(0), out.stride(0)),
        {"GROUPS": groups, "GROUP_K": k // groups, "HAS_BIAS": bias is not None, "BLOCK_K": block_k(k // groups)},
        fixed=fixed,
    )
    return out


__all__ = ["CONFIGS", "block_k", "scaled_gemm"]
