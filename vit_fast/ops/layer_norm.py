"""LayerNorm over the last dimension."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.backends import Facts, Limits
from vit_fast.ops import _checks
from vit_fast.ops._checks import upcast_dtype
from vit_fast.ops._custom_op import KernelOp, register_backend, triton_kernels

_kernels = triton_kernels("layer_norm")  # None when the Triton kernels cannot load: the reason is recorded


def layer_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = 1e-6, upcast: bool = False
) -> torch.Tensor:
    """Reference LayerNorm through ``F.layer_norm``; ``upcast=True`` computes (and returns) in float32."""
    if upcast:
        dt = upcast_dtype(x.dtype)
        x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _validate(x: object, weight: object, bias: object, eps: float) -> None:
    _checks.rows_and_affine(x, "weight", weight, "bias", bias, eps)
    _checks.same_device(x=x, weight=weight, bias=bias)


def _facts(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = 1e-6) -> Facts:
    return Facts(width=x.shape[-1])


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    x = torch.empty(64, 197, 768, device="meta", dtype=dtype)  # ViT-B/16 tokens: (B, N, C)
    w = torch.empty(768, device="meta", dtype=dtype)
    return (x, w, w), {"eps": 1e-6}


def _bucket(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, **_: object) -> tuple[int, ...]:
    c = x.shape[-1]
    return c, backends.size_bucket(x.numel() // max(c, 1))  # (C, rows)


backends.declare("layer_norm", layer_norm_ref, _facts, _example, _bucket)


# ---- the kernel contract: forward (x, weight, bias, eps) -> (y, mean, rstd), backward -> (dx, dweight, dbias) ----
#
# y is like x (contiguous); mean and rstd (M,) are fp32 per row, saved statistics that are not differentiable.

FWD_SCHEMA = "(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)"
BWD_SCHEMA = "(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)"

# Device types whose autocast runs layer_norm in float32 (CUDA's autocast policy); CPU autocast leaves it alone.
_AUTOCAST_FP32_DEVICES = ("cuda",)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (M, C) with a unit column stride: a view when the leading dims merge, else a copy."""
    t2 = t.reshape(-1, t.shape[-1])  # (M, C)
    return t2 if t2.shape[1] == 1 or t2.stride(1) == 1 else t2.contiguous()


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype


def _backward_for(bwd_op: Callable) -> Callable:
    def backward(ctx, grad_out: torch.Tensor, _grad_mean, _grad_rstd) -> tuple:
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = bwd_op(grad_out, x, weight, mean, rstd)
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dweight if need[1] else None,
            dbias.to(ctx.bias_dtype) if need[2] else None,
            None,
        )

    return backward


def _public_for(fwd_op: Callable) -> Callable:
    def run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
        if x.device.type in _AUTOCAST_FP32_DEVICES and torch.is_autocast_enabled(x.device.type):
            x, weight, bias = x.float(), weight.float(), bias.float()
        y, _mean, _rstd = fwd_op(x, weight, bias, eps)
        return y

    return run


# The fakes take the schemas' arguments (register_fake calls them positionally).
def _fwd_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    stats = x.new_empty((math.prod(x.shape[:-1]),), dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)


def _bwd_fake(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


LAYER_NORM = KernelOp(
    "layer_norm", FWD_SCHEMA, _fwd_fake, _public_for, BWD_SCHEMA, _bwd_fake, _setup_context, _backward_for
)

if _kernels is not None:

    def _triton_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        y, mean, rstd = _kernels.layer_norm_fwd(_rows(x), weight.contiguous(), bias.contiguous(), eps)
        return y.view(x.shape), mean, rstd

    def _triton_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor):
        dx, dweight, dbias = _kernels.layer_norm_bwd(_rows(grad_out), _rows(x), weight.contiguous(), mean, rstd)
        return dx.view(x.shape), dweight, dbias

    register_backend(LAYER_NORM, "triton", Limits(devices=("cuda", "cpu"), max_width=_kernels.MAX_C,
                                                  width_note="rows are held in registers"),
                     fwd=_triton_fwd, bwd=_triton_bwd)
register_backend(LAYER_NORM, "cuda", Limits(max_width=6144, width_note="the backward keeps per-warp column sums of "
                                            "a row in shared memory"))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dimension.

    Args:
        x: (..., C).
        weight, bias: (C,).
        eps: added to the variance.

    Returns:
        (..., C), normalized, scaled by ``weight`` and shifted by ``bias``. A NaN in a row of x gives a NaN
        row, in every backend.
    """
    _validate(x, weight, bias, eps)
    return backends.dispatch("layer_norm", x, weight, bias, eps=eps)
