"""LayerNorm over the last dimension: Triton forward and backward kernels and their launchers.

Rows live in registers: one program normalizes a block of BLOCK_M rows of width C (padded to BLOCK_C, the
next power of two, by masking). Rows are addressed through the input's row stride, so a (M, C) view with a
unit column stride is read in place. The forward saves the fp32 mean and rstd per row and writes y in x's dtype
or another one (``out_dtype``: the next GEMM's input dtype, for layernorm_mlp); its ``QUANT_FP8`` variant
(:func:`layer_norm_fwd_fp8`) writes e4m3 plus one fp32 scale per row instead: an FP8 GEMM's input. Its
``STATS_IN`` variant (:func:`layer_norm_apply`) reads saved statistics instead of computing them: a backward
that needs y again gets the forward's y bit for bit without saving it.

The backward computes dx and, in the same pass, per-program partial sums of dweight and dbias over a group of
rows, written to row ``pid`` of (G, C) fp32 buffers; the launcher sums those over G. No atomics: the result is
deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vit_fast.kernels import empty, interpreting, launch, on_inputs_device, use_shortlist
from vit_fast.kernels.quantize_rows import e4m3_rows, fp8_rows_outputs

MAX_C = 16384  # widest row kept in registers
_MAX_GROUPS = 512  # backward: programs (partial-sum rows) at most
_MAX_BLOCK_M = 16


def _configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=nw) for bm in (1, 2, 4, 8, _MAX_BLOCK_M) for nw in (1, 2, 4, 8, 16)
    ]


def _pruner(max_tile: int):
    """Keep row blocks of at least 1024 elements (or 16 rows) and at most ``max_tile`` (or one row), with warps
    giving about 8 elements per thread."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        block_c = kwargs["BLOCK_C"]
        kept = []
        for cfg in configs:
            bm, nw = cfg.kwargs["BLOCK_M"], cfg.num_warps
            tile = bm * block_c
            if (tile > max_tile and bm > 1) or (tile < 1024 and bm < _MAX_BLOCK_M):
                continue
            target = min(max(triton.next_power_of_2(tile) // 256, 1), 16)
            if target // 2 <= nw <= target * 2:
                kept.append(cfg)
        return kept

    return prune


def _largest_block(tuned):
    """The fixed config (no autotuning: the interpreter, VIT_FAST_AUTOTUNE=0): the largest row block the pruning
    keeps, the first of its warp counts; under the interpreter the fewest programs run fastest."""

    def fixed(args: tuple, kwargs: dict) -> triton.Config:
        kept = tuned.early_config_prune(tuned.configs, dict(zip(tuned.arg_names, args, strict=False)), **kwargs)
        biggest = max(c.kwargs["BLOCK_M"] for c in kept)
        return next(c for c in kept if c.kwargs["BLOCK_M"] == biggest)

    return fixed


@triton.jit
def load_row_vector(ptr, C, BLOCK_C: tl.constexpr):
    """(cols, cols < C, ptr[cols] in fp32, 0 past C): a (C,) LayerNorm parameter, as every row kernel loads it."""
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    return cols, mask, tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def layer_norm_dx(xhat, wdy, rstd, C, AXIS: tl.constexpr):
    """dx of LayerNorm rows along ``AXIS`` from xhat, weight * dy and rstd (broadcastable to them)."""
    c1 = tl.sum(xhat * wdy, axis=AXIS, keep_dims=True) / C
    c2 = tl.sum(wdy, axis=AXIS, keep_dims=True) / C
    return (wdy - (xhat * c1 + c2)) * rstd


@triton.autotune(configs=_configs(), key=["C"], prune_configs_by={"early_config_prune": _pruner(16384)})
@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,  # (M, C), row stride stride_xm, unit column stride
    weight_ptr,  # (C,)
    bias_ptr,  # (C,)
    y_ptr,  # (M, C) contiguous
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    stride_xm,
    M,
    C,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    scale_ptr=None,  # (M,) fp32, with QUANT_FP8
    QUANT_FP8: tl.constexpr = False,
    ROUND_E4M3: tl.constexpr = False,
    STATS_IN: tl.constexpr = False,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < M
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]

    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if STATS_IN:
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        xc = tl.where(mask, x - mean[:, None], 0.0)
    else:
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / C
        rstd = 1.0 / tl.sqrt(var + eps)

    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    if QUANT_FP8:  # y leaves as the next GEMM's e4m3 input with one fp32 scale per row: no quantize pass re-reads it
        y = e4m3_rows(y, mask, row_mask, scale_ptr, rows, ROUND_E4M3)
    tl.store(y_ptr + rows[:, None] * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if not STATS_IN:
        tl.store(mean_ptr + rows, mean, mask=row_mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.autotune(configs=_configs(), key=["C"], prune_configs_by={"early_config_prune": _pruner(8192)})
@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr,  # (M, C), row stride stride_dym, unit column stride
    x_ptr,  # (M, C), row stride stride_xm, unit column stride
    weight_ptr,  # (C,)
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    dx_ptr,  # (M, C) contiguous
    dweight_partial_ptr,  # (G, C) fp32
    dbias_partial_ptr,  # (G, C) fp32
    stride_dym,
    stride_xm,
    M,
    C,
    rows_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols, col_mask, w = load_row_vector(weight_ptr, C, BLOCK_C)
    dweight_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)

    first_row = pid.to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, BLOCK_M):
        offs = start + tl.arange(0, BLOCK_M)
        rows = first_row + offs
        row_mask = (rows < M) & (offs < rows_per_program)
        mask = row_mask[:, None] & col_mask[None, :]

        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)

        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dx = layer_norm_dx(xhat, w[None, :] * dy, rstd[:, None], C, 1)
        tl.store(dx_ptr + rows[:, None] * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)

        dweight_acc += tl.sum(dy * xhat, axis=0)
        dbias_acc += tl.sum(dy, axis=0)

    partial = pid.to(tl.int64) * C + cols
    tl.store(dweight_partial_ptr + partial, dweight_acc, mask=col_mask)
    tl.store(dbias_partial_ptr + partial, dbias_acc, mask=col_mask)


use_shortlist(_layer_norm_fwd_kernel, _layer_norm_bwd_kernel)


@on_inputs_device
def layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm of the rows of ``x``.

    Args:
        x: (M, C) with unit column stride (any row stride); C <= MAX_C.
        weight, bias: (C,) contiguous, any float dtype.
        out_dtype: y's dtype; x's by default.

    Returns:
        y (M, C) contiguous in ``out_dtype``, mean (M,) and rstd (M,) in float32.
    """
    m, c = x.shape
    assert c <= MAX_C and (c == 1 or x.stride(1) == 1), "x must be (M, C) with unit column stride"
    y = empty((m, c), dtype=out_dtype or x.dtype, device=x.device)
    mean = empty((m,), dtype=torch.float32, device=x.device)
    rstd = empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return y, mean, rstd
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
    launch(_layer_norm_fwd_kernel, grid, (x, weight, bias, y, mean, rstd, x.stride(0), m, c, eps),
           {"BLOCK_C": triton.next_power_of_2(c)}, fixed=_largest_block(_layer_norm_fwd_kernel))
    return y, mean, rstd


@on_inputs_device
def layer_norm_apply(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, *,
    out_dtype: torch.dtype
) -> torch.Tensor:
    """y of :func:`layer_norm_fwd` from its saved ``mean`` and ``rstd`` (M,) fp32: the same values, bit for bit.

    Args:
        x, weight, bias: as :func:`layer_norm_fwd`.

    Returns:
        y (M, C) contiguous in ``out_dtype``.
    """
    m, c = x.shape
    assert c <= MAX_C and (c == 1 or x.stride(1) == 1), "x must be (M, C) with unit column stride"
    y = empty((m, c), dtype=out_dtype, device=x.device)
    if m == 0:
        return y
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
    launch(_layer_norm_fwd_kernel, grid, (x, weight, bias, y, mean, rstd, x.stride(0), m, c, 0.0),
           {"BLOCK_C": triton.next_power_of_2(c), "STATS_IN": True}, fixed=_largest_block(_layer_norm_fwd_kernel))
    return y


@on_inputs_device
def layer_norm_fwd_fp8(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of the rows of ``x``, written as e4m3 with a per-row scale (the input of an FP8 GEMM).

    Args:
        x, weight, bias: as :func:`layer_norm_fwd`.

    Returns:
        q (M, C) float8_e4m3fn contiguous and scale (M,) float32, with ``q * scale[:, None]`` ~= the LayerNorm.
    """
    q, scale = fp8_rows_outputs(x, MAX_C)
    m, c = x.shape
    if m == 0:
        return q, scale
    stats = torch.empty((2, m), dtype=torch.float32, device=x.device)  # mean and rstd: written, not needed
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
    launch(_layer_norm_fwd_kernel, grid, (x, weight, bias, q, stats[0], stats[1], x.stride(0), m, c, eps),
           {"BLOCK_C": triton.next_power_of_2(c), "scale_ptr": scale, "QUANT_FP8": True,
            "ROUND_E4M3": interpreting()}, fixed=_largest_block(_layer_norm_fwd_kernel))
    return q, scale


@on_inputs_device
def layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, *,
    bias_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`layer_norm_fwd`.

    Args:
        dy, x: (M, C) with unit column stride (any row stride).
        weight: (C,) contiguous; mean, rstd: (M,) float32 from the forward.
        bias_dtype: dbias's dtype; weight's by default.

    Returns:
        dx (M, C) contiguous in x's dtype; dweight (C,) in weight's dtype, dbias (C,) in ``bias_dtype``.
    """
    bias_dtype = bias_dtype or weight.dtype
    m, c = x.shape
    assert dy.shape == x.shape and (c == 1 or (x.stride(1) == 1 and dy.stride(1) == 1))
    dx = empty((m, c), dtype=x.dtype, device=x.device)
    if m == 0:
        return dx, torch.zeros(c, dtype=weight.dtype, device=x.device), torch.zeros(c, dtype=bias_dtype,
                                                                                     device=x.device)
    # Rows per program: a multiple of every BLOCK_M, so no row block straddles two programs.
    rows_per_program = triton.cdiv(triton.cdiv(m, _MAX_GROUPS), _MAX_BLOCK_M) * _MAX_BLOCK_M
    groups = triton.cdiv(m, rows_per_program)
    dweight_partial = empty((groups, c), dtype=torch.float32, device=x.device)
    dbias_partial = empty((groups, c), dtype=torch.float32, device=x.device)
    args = (dy, x, weight, mean, rstd, dx, dweight_partial, dbias_partial, dy.stride(0), x.stride(0), m, c,
            rows_per_program)
    launch(_layer_norm_bwd_kernel, (groups,), args, {"BLOCK_C": triton.next_power_of_2(c)},
           fixed=_largest_block(_layer_norm_bwd_kernel))
    return dx, dweight_partial.sum(0).to(weight.dtype), dbias_partial.sum(0).to(bias_dtype)
