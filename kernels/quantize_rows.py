"""Dynamic per-row FP8 (e4m3) quantization, optionally fused with the exact GELU before it.

One program quantizes BLOCK_M rows of width C (padded to BLOCK_C by masking): ``q = x / scale`` with
``scale = amax(|x|) / 448`` per row, so ``x ~= q * scale``. With ``GELU`` the row is ``gelu(x)`` first: the
fc1 output is read once and its GELU leaves as the fc2 GEMM's e4m3 input, instead of a GELU pass writing bf16
and a quantize pass reading it back.

Inference only: there is no backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vit_fast.kernels import empty, interpreting, on_inputs_device

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
MAX_C = 16384


@triton.jit
def e4m3_round(y):
    """``y`` (fp32, |y| <= 448) rounded onto the e4m3 grid, in fp32.

    The Triton interpreter converts fp32 to fp8 without carrying a mantissa round-up into the exponent
    (125.1 becomes 64, not 128); values already on the grid convert exactly, so interpreted kernels round first.
    The step is 2^(exponent - 3) (3 mantissa bits), at least 2^-9 (e4m3's subnormal spacing); ties go up.
    """
    bits = y.to(tl.int32, bitcast=True)
    exponent = tl.maximum((bits >> 23) & 0xFF, 121)  # 121 = 127 - 6: the smallest normal exponent of e4m3
    step = ((exponent - 3) << 23).to(tl.float32, bitcast=True)
    return tl.floor(y / step + 0.5) * step


@triton.jit
def _quantize_rows_fwd_kernel(
    x_ptr,  # (M, C), row stride stride_xm, unit column stride
    q_ptr,  # (M, C) float8_e4m3fn, contiguous
    scale_ptr,  # (M,) fp32
    stride_xm,
    M,
    C,
    GELU: tl.constexpr,
    ROUND_E4M3: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < C)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GELU:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
    scale = tl.maximum(amax, 1e-12) / 448.0
    q = tl.clamp(x / scale[:, None], -448.0, 448.0)
    if ROUND_E4M3:
        q = e4m3_round(q)
    tl.store(q_ptr + rows[:, None] * C + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_mask)


@on_inputs_device
def quantize_rows_fwd(x: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 rows of ``x`` (of ``gelu(x)`` with ``gelu``) and their fp32 scales.

    Args:
        x: (M, C) with unit column stride (any row stride), any float dtype; C <= MAX_C.

    Returns:
        q (M, C) float8_e4m3fn contiguous, scale (M,) float32, with ``q * scale[:, None]`` ~= the rows.
    """
    m, c = x.shape
    assert c <= MAX_C and (c == 1 or x.stride(1) == 1), "x must be (M, C) with unit column stride"
    q = empty((m, c), dtype=torch.float8_e4m3fn, device=x.device)
    scale = empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block_c = triton.next_power_of_2(c)
    block_m = max(1, min(16, 4096 // block_c))  # about 4K elements per program: a memory-bound row pass
    num_warps = min(max(block_m * block_c // 512, 1), 8)
    launch_grid = (triton.cdiv(m, block_m),)
    _quantize_rows_fwd_kernel[launch_grid](x, q, scale, x.stride(0), m, c, GELU=gelu, ROUND_E4M3=interpreting(),
                                           BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)
    return q, scale


__all__ = ["E4M3_MAX", "MAX_C", "e4m3_round", "quantize_rows_fwd"]
