"""Fused LayerNorm + MLP: ``fc2(gelu(fc1(layer_norm(x)))) (+ residual)``, forward and backward, as GEMMs with
fused edges.

The op owns no kernel of its own: it chains the LayerNorm row kernels of :mod:`vit_fast.kernels.layer_norm` and
the one GEMM of :mod:`vit_fast.kernels.gemm`, whose constexpr epilogues carry the elementwise work.

Forward (:func:`layernorm_mlp_fwd`):

1. LayerNorm: y = layer_norm(x) written once in the GEMM dtype (fc1_weight's: bf16/fp16 under autocast, fp32
   for fp32), with the per-row fp32 mean and rstd. LayerNorm used to run inside fc1's A-operand load, redone
   for every column tile and keeping A in registers; as a GEMM input of its own, y goes memory -> shared
   memory -> tensor cores untouched, which is what lets Triton use its Hopper pipeline and large tiles.
2. fc1: ``gelu(y @ fc1_weight^T + fc1_bias)``, exact erf GELU in the epilogue; in training the epilogue also
   stores the pre-activation (the backward needs GELU' of it, which the GELU output cannot give back).
3. fc2: ``h @ fc2_weight^T + fc2_bias (+ residual)``, bias and residual in the epilogue.

Backward (:func:`layernorm_mlp_bwd`):

1. d(pre-activation) = ``(dout @ fc2_weight) * gelu'(pre)``: dGELU in the epilogue, which also recomputes
   ``h = gelu(pre)`` for fc2's weight gradient and sums fc1's bias gradient per 32 rows (column sums).
2. d(LayerNorm output) = ``d(pre-activation) @ fc1_weight``, fp32, then the LayerNorm backward row kernel (dx and
   the LayerNorm's weight and bias gradients).
3. Weight gradients through ``torch.matmul`` (cuBLAS): plain GEMMs with K = the token count and no edge to fuse;
   fc1's needs y again, rebuilt from x and the saved statistics (:func:`layer_norm_apply`, the forward's y bit for
   bit) rather than saved: the op's saved tensors stay x, mean, rstd and the pre-activation.

Memory traffic added over a single fused kernel: one (M, C) write and read of y per pass, small next to the
GEMMs at ViT widths.
"""

from __future__ import annotations

import torch
import triton
from vit_fast.kernels import empty, on_inputs_device
from vit_fast.kernels.gemm import BIAS_GRAD_ROWS, EPI_GELU, EPI_GELU_BWD, gemm
from vit_fast.kernels.layer_norm import MAX_C, layer_norm_apply, layer_norm_bwd, layer_norm_fwd

__all__ = ["MAX_C", "layernorm_mlp_bwd", "layernorm_mlp_fwd"]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (rows, last dim) with a contiguous last dim; a view whenever the strides allow it."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


@on_inputs_device
def layernorm_mlp_fwd(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    residual: torch.Tensor | None,
    eps: float,
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward. x (..., C) with a contiguous last dim (rows may be strided); GEMMs run in fc1_weight's dtype.

    Returns ``(out, mean, rstd, pre)``: out (..., C_out) in the GEMM dtype promoted with the residual's, mean and
    rstd (M,) fp32, and pre (M, hidden) the pre-GELU activation in the GEMM dtype when ``save_pre`` else (0,).
    """
    hidden, c_out = fc1_weight.shape[0], fc2_weight.shape[0]
    cdt = fc1_weight.dtype
    x2 = _rows(x)
    m = x2.shape[0]
    out_dtype = cdt if residual is None else torch.promote_types(cdt, residual.dtype)
    dev = x.device

    y, mean, rstd = layer_norm_fwd(x2, ln_weight, ln_bias, eps, out_dtype=cdt)
    h = empty((m, hidden), dtype=cdt, device=dev)
    pre = empty((m, hidden) if save_pre else (0,), dtype=cdt, device=dev)
    gemm(y, fc1_weight.t(), h, bias=fc1_bias, pre=pre if save_pre else None, epilogue=EPI_GELU,
         store_aux=save_pre)

    out = empty((*x.shape[:-1], c_out), dtype=out_dtype, device=dev)
    gemm(h, fc2_weight.to(cdt).t(), out.view(m, c_out), bias=fc2_bias,
         residual=None if residual is None else _rows(residual))
    return out, mean, rstd, pre


# The parameters repeat layernorm_mlp_fwd's: the custom op's schema passes every tensor explicitly.
@on_inputs_device
def layernorm_mlp_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    pre: torch.Tensor,
    grad_ln: bool,
    grad_fc1: bool,
    grad_fc2: bool,
) -> tuple[torch.Tensor, ...]:
    """Backward. Returns ``(dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias)``.

    ``grad_ln`` (x, ln_weight, ln_bias), ``grad_fc1`` and ``grad_fc2`` say which gradients to compute; the others
    come back as empty (0,) tensors. ``pre`` is the forward's saved pre-activation, or (0,) to recompute it.
    """
    c = x.shape[-1]
    hidden = fc1_weight.shape[0]
    cdt = fc1_weight.dtype
    dev = x.device
    x2 = _rows(x)
    m = x2.shape[0]
    dout2 = _rows(dout)
    dout_c = dout2.to(cdt)  # the GEMM operand: under autocast with an fp32 residual, dout is fp32
    dx = dln_w = dln_b = dw1 = db1 = dw2 = db2 = None

    y = None
    if grad_fc1 or pre.numel() == 0:
        y = layer_norm_apply(x2, ln_weight, ln_bias, mean, rstd, out_dtype=cdt)
    if pre.numel() == 0:  # the forward ran without saving it: recompute fc1 (bias, no GELU)
        pre = empty((m, hidden), dtype=cdt, device=dev)
        gemm(y, fc1_weight.t(), pre, bias=fc1_bias)

    h = None
    if grad_ln or grad_fc1:
        da1 = empty((m, hidden), dtype=cdt, device=dev)
        h = empty((m, hidden), dtype=cdt, device=dev) if grad_fc2 else None
        db1_part = None
        if grad_fc1:
            db1_part = empty((triton.cdiv(m, BIAS_GRAD_ROWS), hidden), dtype=torch.float32, device=dev)
        gemm(dout_c, fc2_weight.to(cdt), da1, pre=pre, h=h, dbias=db1_part, epilogue=EPI_GELU_BWD,
             store_aux=grad_fc2)
        if grad_fc1:
            db1 = db1_part.sum(0).to(fc1_bias.dtype)
            dw1 = torch.matmul(da1.t(), y)  # (hidden, C)
        if grad_ln:
            dy = empty((m, c), dtype=torch.float32, device=dev)
            gemm(da1, fc1_weight, dy)  # d(LayerNorm output), kept in fp32 for the LayerNorm backward
            dx2, dln_w, dln_b = layer_norm_bwd(dy, x2, ln_weight, mean, rstd, bias_dtype=ln_bias.dtype)
            dx = dx2.view(x.shape)
    if grad_fc2:
        if h is None:
            h = torch.nn.functional.gelu(pre.float()).to(cdt)
        dw2 = torch.matmul(dout_c.t(), h)  # (C_out, hidden)
        db2 = dout2.sum(0, dtype=torch.float32).to(cdt)

    # Skipped gradients come back as distinct empty tensors (outputs of a custom op may not alias each other).
    grads = (dx, dln_w, dln_b, dw1, db1, dw2, db2)
    dtypes = (x.dtype, ln_weight.dtype, ln_bias.dtype, cdt, fc1_bias.dtype, cdt, cdt)
    return tuple(
        g if g is not None else torch.empty((0,), dtype=d, device=dev) for g, d in zip(grads, dtypes, strict=True)
    )
