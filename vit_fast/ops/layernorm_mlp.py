"""The transformer MLP branch in one op: fc2(gelu(fc1(layer_norm(x)))) (+ residual)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.backends import HALF, Facts, Limits, dtype_name
from vit_fast.ops import _checks
from vit_fast.ops._checks import upcast_dtype
from vit_fast.ops._custom_op import KernelOp, register_backend, triton_kernels

_kernels = triton_kernels("layernorm_mlp")  # None when the Triton kernels cannot load: the reason is recorded


def layernorm_mlp_ref(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, fc1_weight: torch.Tensor,
                      fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, *, eps: float = 1e-6,
                      residual: torch.Tensor | None = None, dropout_p: float = 0.0,
                      upcast: bool = False) -> torch.Tensor:
    """Reference through ``F.layer_norm``, ``F.linear`` and exact (erf) ``F.gelu``; differentiable.

    Dropout (``dropout_p``, training only) follows the GELU and fc2, before the residual, as in timm's Mlp.
    ``upcast=True`` computes (and returns) in float32.
    """
    if upcast:
        dt = upcast_dtype(x.dtype)
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias = (
            t.to(dt) for t in (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        )
        residual = None if residual is None else residual.to(dt)
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    h = F.gelu(F.linear(h, fc1_weight, fc1_bias))  # (..., hidden)
    h = F.dropout(h, dropout_p) if dropout_p > 0 else h
    out = F.linear(h, fc2_weight, fc2_bias)  # (..., C_out)
    out = F.dropout(out, dropout_p) if dropout_p > 0 else out
    return out if residual is None else residual + out


def _validate(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, dropout_p) -> None:
    c = _checks.rows_and_affine(x, "ln_weight", ln_weight, "ln_bias", ln_bias, eps)
    _checks.tensor("fc1_weight", fc1_weight, ndim=2)
    _checks.shape("fc1_weight", fc1_weight, (None, c), "(hidden, C): nn.Linear layout with in_features = C")
    hidden = fc1_weight.shape[0]
    _checks.tensor("fc1_bias", fc1_bias, ndim=1)
    _checks.shape("fc1_bias", fc1_bias, (hidden,), "(hidden,)")
    _checks.tensor("fc2_weight", fc2_weight, ndim=2)
    _checks.shape("fc2_weight", fc2_weight, (None, hidden), "(C_out, hidden): nn.Linear layout")
    c_out = fc2_weight.shape[0]
    _checks.tensor("fc2_bias", fc2_bias, ndim=1)
    _checks.shape("fc2_bias", fc2_bias, (c_out,), "(C_out,)")
    if residual is not None:
        _checks.tensor("residual", residual)
        _checks.shape("residual", residual, (*x.shape[:-1], c_out), "(the output's shape (..., C_out))")
    _checks.same_device(
        x=x, ln_weight=ln_weight, ln_bias=ln_bias, fc1_weight=fc1_weight, fc1_bias=fc1_bias,
        fc2_weight=fc2_weight, fc2_bias=fc2_bias, residual=residual,
    )
    _checks.probability("dropout_p", dropout_p)


def _facts(x: torch.Tensor, *params: torch.Tensor, dropout_p: float = 0.0, **_: object) -> Facts:
    # Outside autocast the GEMM operands must share one dtype (autocast casts them to its own).
    gemm = dict(zip(("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"), (x, *params[2:]), strict=True))
    mismatch = ()
    if not torch.is_autocast_enabled(x.device.type) and len({t.dtype for t in gemm.values()}) > 1:
        listing = ", ".join(f"{k} {dtype_name(t.dtype)}" for k, t in gemm.items())
        mismatch = (f"mixed dtypes outside autocast ({listing})",)
    return Facts(gemm_dtype=_checks.matmul_dtype(x), width=x.shape[-1], dropout_p=dropout_p, mismatch=mismatch)


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    def m(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dtype)

    x = m(64, 197, 768)  # ViT-B/16 tokens: (B, N, C), hidden 3072
    return (x, m(768), m(768), m(3072, 768), m(3072), m(768, 3072), m(768)), {
        "eps": 1e-6, "residual": x, "dropout_p": 0.0}


def _bucket(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, fc1_weight: torch.Tensor,
            *args: object, **_: object) -> tuple[int, ...]:
    c = x.shape[-1]
    return c, fc1_weight.shape[0], backends.size_bucket(x.numel() // max(c, 1))  # (C, hidden, rows)


backends.declare("layernorm_mlp", layernorm_mlp_ref, _facts, _example, _bucket)


# ---- the kernel contract ----------------------------------------------------------------------------------------
#
#   forward (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, eps, save_pre)
#     -> (out, mean, rstd, pre)
#   backward (dout, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, mean, rstd, pre, grad_ln, grad_fc1,
#             grad_fc2) -> (dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias)
# mean, rstd (M,) are fp32; pre (M, hidden) is the pre-GELU activation, or (0,) when the forward did not save it
# (the backward then recomputes it). Gradients not asked for come back as empty (0,) tensors.

FWD_SCHEMA = (
    "(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, "
    "Tensor fc2_bias, Tensor? residual, float eps, bool save_pre) -> (Tensor, Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor dout, Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc1_weight, Tensor fc1_bias, "
    "Tensor fc2_weight, Tensor mean, Tensor rstd, Tensor pre, bool grad_ln, bool grad_fc1, bool grad_fc2) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, _fc2_bias, residual, _eps, _save_pre = inputs
    _out, mean, rstd, pre = output
    ctx.save_for_backward(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, mean, rstd, pre)
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.mark_non_differentiable(mean, rstd, pre)


def _backward_for(bwd_op):
    """The autograd backward of a layernorm_mlp forward op, given its backward op (signatures above)."""

    def backward(ctx, dout: torch.Tensor, *_stat_grads: torch.Tensor | None) -> tuple:
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, mean, rstd, pre = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_ln, grad_fc1, grad_fc2 = any(need[0:3]), any(need[3:5]), any(need[5:7])
        grads: list[torch.Tensor | None] = [None] * 7
        if grad_ln or grad_fc1 or grad_fc2:
            dout_c = dout.contiguous()
            computed = bwd_op(dout_c, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, mean, rstd, pre,
                              grad_ln, grad_fc1, grad_fc2)
            grads = [g if n else None for g, n in zip(computed, need[:7], strict=True)]
        dres = dout.to(ctx.residual_dtype) if ctx.residual_dtype is not None and need[7] else None
        return (*grads, dres, None, None)

    return backward


def _public_for(fwd_op):
    """The public op's signature over a backend's forward op (signature above)."""

    def run(x: torch.Tensor, *params: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
            dropout_p: float = 0.0) -> torch.Tensor:
        ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias = params
        # Custom ops do not see autocast: cast the GEMM operands as autocast would for F.linear. The LayerNorm
        # reads x and its parameters as they are and computes in fp32, as autocast's fp32 layer_norm does.
        cdt = _checks.matmul_dtype(x)
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = (t.to(cdt) for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias))
        params = (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        save_pre = torch.is_grad_enabled() and any(t.requires_grad for t in params)
        out, _mean, _rstd, _pre = fwd_op(
            x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, float(eps), save_pre
        )
        return out

    return run


# The fakes take the schemas' arguments (register_fake calls them positionally).
def _fwd_fake(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, eps, save_pre):
    cdt = fc1_weight.dtype
    out_dtype = cdt if residual is None else torch.promote_types(cdt, residual.dtype)
    m = x.numel() // x.shape[-1]
    out = x.new_empty((*x.shape[:-1], fc2_weight.shape[0]), dtype=out_dtype)
    stat = x.new_empty((m,), dtype=torch.float32)
    pre = x.new_empty((m, fc1_weight.shape[0]) if save_pre else (0,), dtype=cdt)
    return out, stat, torch.empty_like(stat), pre


def _bwd_fake(dout, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, mean, rstd, pre, grad_ln, grad_fc1,
              grad_fc2):
    cdt = fc1_weight.dtype

    def grad(wanted: bool, like: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return like.new_empty(shape if wanted else (0,), dtype=dtype)

    return (
        grad(grad_ln, x, x.dtype, tuple(x.shape)),
        grad(grad_ln, x, ln_weight.dtype, tuple(ln_weight.shape)),
        grad(grad_ln, x, ln_bias.dtype, tuple(ln_bias.shape)),
        grad(grad_fc1, x, cdt, tuple(fc1_weight.shape)),
        grad(grad_fc1, x, fc1_bias.dtype, tuple(fc1_bias.shape)),
        grad(grad_fc2, x, cdt, tuple(fc2_weight.shape)),
        grad(grad_fc2, x, cdt, (fc2_weight.shape[0],)),
    )


LAYERNORM_MLP = KernelOp(
    "layernorm_mlp", FWD_SCHEMA, _fwd_fake, _public_for, BWD_SCHEMA, _bwd_fake, _setup_context, _backward_for
)

if _kernels is not None:
    register_backend(LAYERNORM_MLP, "triton", Limits(devices=("cuda", "cpu"), max_width=_kernels.MAX_C,
                                                     width_note="the LayerNorm row kernels hold whole rows",
                                                     auto_gemm_dtypes=HALF),
                     fwd=_kernels.layernorm_mlp_fwd, bwd=_kernels.layernorm_mlp_bwd)
register_backend(LAYERNORM_MLP, "cuda", Limits(max_width=6144, gemm_dtypes=HALF, width_note="the LayerNorm "
                                               "backward keeps a row's column sums in shared memory"))


def layernorm_mlp(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, fc1_weight: torch.Tensor,
                  fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, *, eps: float = 1e-6,
                  residual: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """The MLP branch of a pre-LN transformer block in one call.

    Args:
        x: (..., C).
        ln_weight, ln_bias: (C,), the LayerNorm's affine parameters.
        fc1_weight: (hidden, C), fc1_bias: (hidden,), nn.Linear layout.
        fc2_weight: (C_out, hidden), fc2_bias: (C_out,).
        eps: the LayerNorm's eps.
        residual: optional (..., C_out), added to the result.
        dropout_p: dropout after the GELU and after fc2 (training only; the fused kernels take 0).

    Returns:
        (..., C_out) = fc2(gelu(fc1(layer_norm(x)))) [+ residual], GELU exact (erf). A NaN in a row of x gives
        a NaN row, in every backend.
    """
    _validate(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, dropout_p)
    args = (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    kwargs = {"eps": eps, "residual": residual, "dropout_p": dropout_p}
    return backends.dispatch("layernorm_mlp", *args, **kwargs)
