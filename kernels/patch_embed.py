"""Patch embedding as GEMMs whose image operand is gathered from NCHW memory while loading (no unfold copy).

Notation: images (B, C, H, W) in PH x PW patches on a GH x GW grid, N = GH * GW patches per image, M = B * N
patch rows, K = C * PH * PW, E output channels. Row m = (b, n) with n = gy * GW + gx; column k = (c, py, px),
the order of ``nn.Conv2d``'s weight (E, C, PH, PW) flattened to (E, K). Element (m, k) of the virtual patch
matrix A is ``images[b, c, gy * PH + py, gx * PW + px]``: its address splits into a row part and a column part,
so a tile of A is one gather ``row_offset[:, None] + col_offset[None, :]``.

- forward: ``out[b, HAS_CLS + n] = A @ W^T + bias + pos[n (+1)]`` written straight into the (B, [1+]N, E)
  sequence; the programs holding patch 0 of an image also write its class-token row ``cls + pos[0]``.
- ``dweight = dY_patches^T @ A``: the same gather; the M reduction is split over SPLIT programs per tile into
  a (SPLIT, E, K) fp32 buffer summed by the launcher (deterministic, no atomics).
- ``dimages = dY_patches @ W`` stored through the gather's addresses into NCHW (patches do not overlap, so
  every element is written exactly once).
- dbias, dcls_token and dpos_embed are sums of dY over the batch (and patches): one torch reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vit_fast.kernels import empty, fp32_tf32, interpreting, launch, on_inputs_device, smem_limit, use_shortlist

_SPLIT_ROWS = 4096  # dweight: patch rows reduced by one program before the M reduction is split
_MAX_SPLIT = 8
_MAX_BLOCK_M = 128


def _gemm_configs(m_name: str, n_name: str, k_name: str) -> list[triton.Config]:
    shapes = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (128, 128, 64, 8, 3)]
    shapes += [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3)]
    return [
        triton.Config({m_name: bm, n_name: bn, k_name: bk}, num_warps=nw, num_stages=ns)
        for bm, bn, bk, nw, ns in shapes
    ]


def _gemm_pruner(m_name: str, n_name: str, k_name: str, m_arg: str, n_arg: str, k_arg: str, a_arg: str, b_arg: str):
    """Drop tiles much larger than the problem and pipelines whose (m x k) tile of ``a_arg`` and (k x n) tile of
    ``b_arg``, each in its own dtype, do not fit in the device's shared memory."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        size = {
            name: max(triton.next_power_of_2(named_args[arg]), 16)
            for name, arg in ((m_name, m_arg), (n_name, n_arg), (k_name, k_arg))
        }
        a, b = named_args[a_arg], named_args[b_arg]
        budget = smem_limit(a.device)
        fits = [
            c for c in configs
            if (c.kwargs[m_name] * a.element_size() + c.kwargs[n_name] * b.element_size()) * c.kwargs[k_name]
            * c.num_stages <= budget
        ]
        kept = [c for c in fits if all(c.kwargs[name] <= max(size[name], 64) for name in size)]
        return kept or fits[:1] or configs[:1]

    return prune


def _interpreter_config(tuned, m_name: str, n_name: str, k_name: str) -> triton.Config | None:
    """The fixed config under the interpreter (no timing there): the 64 x 64 x 32 tile; None elsewhere."""
    if not interpreting():
        return None
    return next(c for c in tuned.configs if (c.kwargs[m_name], c.kwargs[n_name], c.kwargs[k_name]) == (64, 64, 32))


@triton.jit
def _tile_of_program(N, BLOCK_N: tl.constexpr):
    """Program id (axis 0) -> (row tile, column tile) of an output with N columns, column tiles varying fastest:
    the grid order of every kernel here."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    return pid // num_n, pid % num_n


@triton.jit
def _row_offsets(rows, N, GW, stride_b, stride_h, stride_w, PH: tl.constexpr, PW: tl.constexpr):
    """Row part of the address of A[rows, :] in an NCHW tensor with the given strides (int64)."""
    b = rows // N
    n = rows % N
    gy = n // GW
    gx = n % GW
    return b.to(tl.int64) * stride_b + (gy * PH).to(tl.int64) * stride_h + (gx * PW).to(tl.int64) * stride_w


@triton.jit
def _col_offsets(cols, stride_c, stride_h, stride_w, PH: tl.constexpr, PW: tl.constexpr):
    """Column part of the address of A[:, cols] (k = (c, py, px)) in an NCHW tensor (int64)."""
    c = cols // (PH * PW)
    r = cols % (PH * PW)
    return c.to(tl.int64) * stride_c + (r // PW).to(tl.int64) * stride_h + (r % PW).to(tl.int64) * stride_w


@triton.autotune(
    configs=_gemm_configs("BLOCK_M", "BLOCK_E", "BLOCK_K"),
    key=["E", "K"],
    prune_configs_by={"early_config_prune": _gemm_pruner(
        "BLOCK_M", "BLOCK_E", "BLOCK_K", "M", "E", "K", "images_ptr", "weight_ptr"
    )},
)
@triton.jit
def _patch_embed_fwd_kernel(
    images_ptr,  # (B, C, H, W), strides stride_ib, stride_ic, stride_ih, stride_iw
    weight_ptr,  # (E, K) contiguous
    bias_ptr,  # (E,) or unused
    cls_ptr,  # (E,) or unused
    pos_ptr,  # (N + POS_SKIP, E) contiguous, or unused
    out_ptr,  # (B, HAS_CLS + N, E) contiguous
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    M,
    E,
    K,
    N,
    GW,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_CLS: tl.constexpr,  # 0 or 1: the class-token row leads each sequence
    HAS_POS: tl.constexpr,
    POS_SKIP: tl.constexpr,  # 1 when pos_embed has a class-token row first
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Consecutive programs share a block of patches: A is read from memory once.
    pid_m, pid_e = _tile_of_program(E, BLOCK_E)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    row_mask = rows < M
    e_mask = cols_e < E
    offs_k = tl.arange(0, BLOCK_K)

    row_off = _row_offsets(rows, N, GW, stride_ib, stride_ih, stride_iw, PH, PW)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        col_off = _col_offsets(ks, stride_ic, stride_ih, stride_iw, PH, PW)
        a = tl.load(
            images_ptr + row_off[:, None] + col_off[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        w = tl.load(
            weight_ptr + cols_e[None, :].to(tl.int64) * K + ks[:, None],
            mask=k_mask[:, None] & e_mask[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_E) = W^T tile
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_e, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    b = (rows // N).to(tl.int64)
    n = rows % N
    mask = row_mask[:, None] & e_mask[None, :]
    if HAS_POS:
        pos_rows = (n + POS_SKIP).to(tl.int64)
        acc += tl.load(pos_ptr + pos_rows[:, None] * E + cols_e[None, :], mask=mask, other=0.0).to(tl.float32)
    seq = N + HAS_CLS
    out_rows = b * seq + n + HAS_CLS
    tl.store(out_ptr + out_rows[:, None] * E + cols_e[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    if HAS_CLS:
        cls = tl.load(cls_ptr + cols_e, mask=e_mask, other=0.0).to(tl.float32)
        if POS_SKIP:
            cls += tl.load(pos_ptr + cols_e, mask=e_mask, other=0.0).to(tl.float32)
        cls_tile = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32) + cls[None, :]
        first = row_mask & (n == 0)
        tl.store(
            out_ptr + (b * seq)[:, None] * E + cols_e[None, :],
            cls_tile.to(out_ptr.dtype.element_ty),
            mask=first[:, None] & e_mask[None, :],
        )


@triton.autotune(
    configs=_gemm_configs("BLOCK_E", "BLOCK_K", "BLOCK_M"),
    key=["E", "K"],
    prune_configs_by={"early_config_prune": _gemm_pruner(
        "BLOCK_E", "BLOCK_K", "BLOCK_M", "E", "K", "M", "grad_ptr", "images_ptr"
    )},
)
@triton.jit
def _patch_embed_bwd_weight_kernel(
    grad_ptr,  # (B, HAS_CLS + N, E), strides stride_gb, stride_gs, stride_ge
    images_ptr,  # (B, C, H, W), strides stride_ib, stride_ic, stride_ih, stride_iw
    dweight_partial_ptr,  # (SPLIT, E, K) fp32 contiguous
    stride_gb,
    stride_gs,
    stride_ge,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    M,
    E,
    K,
    N,
    GW,
    rows_per_split,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_CLS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    split = tl.program_id(1)
    pid_e, pid_k = _tile_of_program(K, BLOCK_K)
    cols_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    e_mask = cols_e < E
    k_mask = ks < K
    offs_m = tl.arange(0, BLOCK_M)
    col_off = _col_offsets(ks, stride_ic, stride_ih, stride_iw, PH, PW)

    acc = tl.zeros((BLOCK_E, BLOCK_K), dtype=tl.float32)
    first_row = split * rows_per_split
    for m0 in range(0, rows_per_split, BLOCK_M):
        rows = first_row + m0 + offs_m
        row_mask = (rows < M) & (m0 + offs_m < rows_per_split)
        row_off = _row_offsets(rows, N, GW, stride_ib, stride_ih, stride_iw, PH, PW)
        a = tl.load(
            images_ptr + row_off[:, None] + col_off[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        b = (rows // N).to(tl.int64)
        seq_rows = (rows % N + HAS_CLS).to(tl.int64)
        dy_t = tl.load(
            grad_ptr + (b * stride_gb + seq_rows * stride_gs)[None, :] + cols_e[:, None].to(tl.int64) * stride_ge,
            mask=e_mask[:, None] & row_mask[None, :],
            other=0.0,
        )  # (BLOCK_E, BLOCK_M) = dY^T tile, rounded to the compute dtype like the conv's output gradient
        acc = tl.dot(dy_t.to(images_ptr.dtype.element_ty), a, acc, input_precision=DOT_PRECISION)

    out = split.to(tl.int64) * E * K + cols_e[:, None].to(tl.int64) * K + ks[None, :]
    tl.store(dweight_partial_ptr + out, acc, mask=e_mask[:, None] & k_mask[None, :])


# Signatures and the gather/mask set-up repeat the other kernels': a Triton kernel takes each tensor's strides.
@triton.autotune(
    configs=_gemm_configs("BLOCK_M", "BLOCK_K", "BLOCK_E"),
    key=["E", "K"],
    prune_configs_by={"early_config_prune": _gemm_pruner(
        "BLOCK_M", "BLOCK_K", "BLOCK_E", "M", "K", "E", "grad_ptr", "weight_ptr"
    )},
)
@triton.jit
def _patch_embed_bwd_images_kernel(
    grad_ptr,  # (B, HAS_CLS + N, E), strides stride_gb, stride_gs, stride_ge
    weight_ptr,  # (E, K) contiguous
    dimages_ptr,  # (B, C, H, W), strides stride_db, stride_dc, stride_dh, stride_dw
    stride_gb,
    stride_gs,
    stride_ge,
    stride_db,
    stride_dc,
    stride_dh,
    stride_dw,
    M,
    E,
    K,
    N,
    GW,
    PH: tl.constexpr,
    PW: tl.constexpr,
    HAS_CLS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid_m, pid_k = _tile_of_program(K, BLOCK_K)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < M
    k_mask = ks < K
    offs_e = tl.arange(0, BLOCK_E)
    b = (rows // N).to(tl.int64)
    grad_rows = b * stride_gb + (rows % N + HAS_CLS).to(tl.int64) * stride_gs

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        cols_e = e0 + offs_e
        e_mask = cols_e < E
        dy = tl.load(
            grad_ptr + grad_rows[:, None] + cols_e[None, :].to(tl.int64) * stride_ge,
            mask=row_mask[:, None] & e_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + cols_e[:, None].to(tl.int64) * K + ks[None, :],
            mask=e_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(dy.to(w.dtype), w, acc, input_precision=DOT_PRECISION)

    row_off = _row_offsets(rows, N, GW, stride_db, stride_dh, stride_dw, PH, PW)
    col_off = _col_offsets(ks, stride_dc, stride_dh, stride_dw, PH, PW)
    tl.store(
        dimages_ptr + row_off[:, None] + col_off[None, :],
        acc.to(dimages_ptr.dtype.element_ty),
        mask=row_mask[:, None] & k_mask[None, :],
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows the switch PyTorch's own convolutions obey, so the kernel matches F.conv2d's precision.
    return "tf32" if dtype == torch.float32 and fp32_tf32("conv") else "ieee"


def _grid_shape(images: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(M, N, GW, K, E) for images (B, C, H, W) and weight (E, C, PH, PW)."""
    bsz, c, h, w = images.shape
    e, _, ph, pw = weight.shape
    gh, gw = h // ph, w // pw
    return bsz * gh * gw, gh * gw, gw, c * ph * pw, e


use_shortlist(_patch_embed_fwd_kernel, _patch_embed_bwd_weight_kernel, _patch_embed_bwd_images_kernel)


@on_inputs_device
def patch_embed_fwd(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Patch tokens with class token and position embedding, in one kernel.

    Args:
        images: (B, C, H, W), any strides; H, W divisible by the patch.
        weight: (E, C, PH, PW) contiguous, images' dtype; bias: (E,) or None.
        cls_token: (E,) contiguous or None; pos_embed: (N, E) or (1 + N, E) (with cls_token) contiguous, or None.
        out_dtype: dtype of the result.

    Returns:
        (B, N, E), or (B, 1 + N, E) with cls_token, contiguous.
    """
    m, n, gw, k, e = _grid_shape(images, weight)
    has_cls = cls_token is not None
    out = empty((images.shape[0], n + has_cls, e), dtype=out_dtype, device=images.device)
    if m == 0 or e == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(e, meta["BLOCK_E"]),)
    args = (
        images, weight, bias if bias is not None else weight, cls_token if has_cls else weight,
        pos_embed if pos_embed is not None else weight, out, *images.stride(), m, e, k, n, gw,
    )
    flags = {
        "PH": weight.shape[2], "PW": weight.shape[3], "HAS_BIAS": bias is not None, "HAS_CLS": int(has_cls),
        "HAS_POS": pos_embed is not None, "POS_SKIP": int(pos_embed is not None and pos_embed.shape[0] == n + 1),
        "DOT_PRECISION": _dot_precision(images.dtype),
    }
    launch(_patch_embed_fwd_kernel, grid, args, flags,
           fixed=_interpreter_config(_patch_embed_fwd_kernel, "BLOCK_M", "BLOCK_E", "BLOCK_K"))
    return out


def _bwd_weight(grad_out: torch.Tensor, images: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """dweight (E, C, PH, PW) in images' dtype."""
    m, n, gw, k, e = _grid_shape(images, torch.empty(weight_shape, device="meta"))
    if m == 0:
        return torch.zeros(weight_shape, dtype=images.dtype, device=images.device)
    rows_per_split = triton.cdiv(triton.cdiv(m, min(triton.cdiv(m, _SPLIT_ROWS), _MAX_SPLIT)), _MAX_BLOCK_M)
    rows_per_split *= _MAX_BLOCK_M  # a multiple of every BLOCK_M, so no row block straddles two splits
    splits = triton.cdiv(m, rows_per_split)
    partial = empty((splits, e, k), dtype=torch.float32, device=images.device)
    grid = lambda meta: (triton.cdiv(e, meta["BLOCK_E"]) * triton.cdiv(k, meta["BLOCK_K"]), splits)
    args = (grad_out, images, partial, *grad_out.stride(), *images.stride(), m, e, k, n, gw, rows_per_split)
    flags = {"PH": weight_shape[2], "PW": weight_shape[3], "HAS_CLS": int(grad_out.shape[1] == n + 1),
             "DOT_PRECISION": _dot_precision(images.dtype)}
    launch(_patch_embed_bwd_weight_kernel, grid, args, flags,
           fixed=_interpreter_config(_patch_embed_bwd_weight_kernel, "BLOCK_E", "BLOCK_K", "BLOCK_M"))
    dweight = partial[0] if splits == 1 else partial.sum(0)
    return dweight.to(images.dtype).view(weight_shape)


def _bwd_images(grad_out: torch.Tensor, weight: torch.Tensor, images_shape: torch.Size) -> torch.Tensor:
    """dimages (B, C, H, W) contiguous in weight's dtype."""
    dimages = empty(tuple(images_shape), dtype=weight.dtype, device=weight.device)
    m, n, gw, k, e = _grid_shape(dimages, weight)
    if m == 0:
        return dimages
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)
    args = (grad_out, weight, dimages, *grad_out.stride(), *dimages.stride(), m, e, k, n, gw)
    flags = {"PH": weight.shape[2], "PW": weight.shape[3], "HAS_CLS": int(grad_out.shape[1] == n + 1),
             "DOT_PRECISION": _dot_precision(weight.dtype)}
    launch(_patch_embed_bwd_images_kernel, grid, args, flags,
           fixed=_interpreter_config(_patch_embed_bwd_images_kernel, "BLOCK_M", "BLOCK_K", "BLOCK_E"))
    return dimages


@on_inputs_device
def patch_embed_bwd(
    grad_out: torch.Tensor,
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    images_grad: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`patch_embed_fwd`.

    Args:
        grad_out: (B, N, E), or (B, 1 + N, E) with cls_token; any strides.
        images, weight, bias, cls_token, pos_embed: the forward's inputs (same layouts).
        images_grad, weight_grad: whether to compute dimages and dweight (the two GEMMs).

    Returns:
        dimages (B, C, H, W), dweight (E, C, PH, PW), dbias (E,), dcls_token (E,), dpos_embed like pos_embed,
        each in its input's dtype; a gradient not asked for or of an absent input is an empty (0,) tensor.
    """
    n = grad_out.shape[1] - (cls_token is not None)
    nothing = lambda: grad_out.new_empty((0,))
    dimages = _bwd_images(grad_out, weight, images.shape) if images_grad else nothing()
    dweight = _bwd_weight(grad_out, images, weight.shape) if weight_grad else nothing()
    dbias, dcls, dpos = nothing(), nothing(), nothing()
    if bias is not None or cls_token is not None or pos_embed is not None:
        per_token = grad_out.sum(0, dtype=torch.float32)  # (1 + N or N, E): summed over the batch
        patches = per_token[per_token.shape[0] - n :]  # (N, E)
        if bias is not None:
            dbias = patches.sum(0).to(bias.dtype)
        if cls_token is not None:
            dcls = per_token[0].to(cls_token.dtype, copy=True)  # outputs must not alias
        if pos_embed is not None:
            dpos = (per_token if pos_embed.shape[0] == per_token.shape[0] else patches).to(pos_embed.dtype, copy=True)
    return dimages, dweight, dbias, dcls, dpos
