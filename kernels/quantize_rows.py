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
def e4m3_rows(y, mask, row_mask, scale_ptr, rows, ROUND_E4M3: tl.constexpr):
    """Per-row e4m3 quantization of the (BLOCK_M, BLOCK_C) fp32 tile ``y`` (masked-off entries ignored): stores
    ``scale = amax(|row|) / 448`` at ``scale_ptr + rows`` and returns ``y / scale`` clamped to +-448, as e4m3.

    tl.max and tl.maximum drop NaN (maxNum), so a NaN row would leave with a finite scale; the reference's amax
    is NaN there, so the scale and every value of a row holding one are forced to NaN (tl.clamp drops NaN too).
    """
    has_nan = tl.max(tl.where(mask & (y != y), 1, 0), axis=1) > 0
    scale = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1), 1e-12) / 448.0
    scale = tl.where(has_nan, float("nan"), scale)
    q = tl.where(has_nan[:, None], float("nan"), tl.clamp(y / scale[:, None], -448.0, 448.0))
    if ROUND_E4M3:
        # The interpreter also turns a NaN into a finite e4m3 (384): write e4m3fn's NaN bit pattern (0x7F) itself.
        q = e4m3_round(q).to(tl.float8e4nv).to(tl.int8, bitcast=True)
        q = tl.where(has_nan[:, None], 0x7F, q).to(tl.int8).to(tl.float8e4nv, bitcast=True)
    else:
        q = q.to(tl.float8e4nv)
    tl.store(scale_ptr + rows, scale, mask=row_mask)
    return q


def fp8_rows_outputs(x: torch.Tensor, max_c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (M, C) e4m3 output and (M,) fp32 scales of a row-quantizing op over ``x`` (checked: (M, C), C <= max_c,
    unit column stride): what every fp8 row kernel's launcher allocates."""
    m, c = x.shape
    assert c <= max_c and (c == 1 or x.stride(1) == 1), "x must be (M, C) with unit column stride"
    return (empty((m, c), dtype=torch.float8_e4m3fn, device=x.device),
            empty((m,), dtype=torch.float32, device=x.device))


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
    q = e4m3_rows(x, mask, row_mask, scale_ptr, rows, ROUND_E4M3)
    tl.store(q_ptr + rows[:, None] * C + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)


def launch_shape(c: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for rows of width ``c`` (also what vit_fast.kernel_resources compiles)."""
    block_c = triton.next_power_of_2(c)
    block_m = max(1, min(16, 4096 // block_c))  # about 4K elements per program: a memory-bound row pass
    return block_m, block_c, min(max(block_m * block_c // 512, 1), 8)


@on_inputs_device
def quantize_rows_fwd(x: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 rows of ``x`` (of ``gelu(x)`` with ``gelu``) and their fp32 scales.

    Args:
        x: (M, C) with unit column stride (any row stride), any float dtype; C <= MAX_C.

    Returns:
        q (M, C) float8_e4m3fn contiguous, scale (M,) float32, with ``q * scale[:, None]`` ~= the rows.
    """
    q, scale = fp8_rows_outputs(x, MAX_C)
    m, c = x.shape
    if m == 0:
        return q, scale
    block_m, block_c, num_warps = launch_shape(c)
    launch_grid = (triton.cdiv(m, block_m),)
    _quantize_rows_fwd_kernel[launch_grid](x, q, scale, x.stride(0), m, c, GELU=gelu, ROUND_E4M3=interpreting(),
                                           BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)
    return q, scale


__all__ = ["E4M3_MAX", "MAX_C", "e4m3_round", "e4m3_rows", "fp8_rows_outputs", "quantize_rows_fwd"]
