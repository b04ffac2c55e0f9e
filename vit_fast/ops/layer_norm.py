"""LayerNorm over the last dimension."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.ops import _checks
from vit_fast.ops._checks import upcast_dtype


def layer_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = 1e-6, upcast: bool = False
) -> torch.Tensor:
    """Reference LayerNorm through ``F.layer_norm``; ``upcast=True`` computes (and returns) in float32."""
    if upcast:
        dt = upcast_dtype(x.dtype)
        x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _validate(x: object, weight: object, bias: object, eps: float) -> None:
    _checks.tensor("x", x)
    if x.dim() == 0:
        raise ValueError(f"x must have at least 1 dimension (..., C); got {_checks.describe(x)}")
    c = x.shape[-1]
    _checks.tensor("weight", weight, ndim=1)
    _checks.tensor("bias", bias, ndim=1)
    _checks.shape("weight", weight, (c,), "(the last dimension of x)")
    _checks.shape("bias", bias, (c,), "(the last dimension of x)")
    _checks.same_device(x=x, weight=weight, bias=bias)
    if not eps > 0:
        raise ValueError(f"eps must be positive; got {eps!r}")


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    x = torch.empty(64, 197, 768, device="meta", dtype=dtype)  # ViT-B/16 tokens: (B, N, C)
    w = torch.empty(768, device="meta", dtype=dtype)
    return (x, w, w), {"eps": 1e-6}


backends.declare("layer_norm", _example)
backends.register("layer_norm", "reference")(layer_norm_ref)


# ---- Triton backend -------------------------------------------------------------------------------------------

try:
    from vit_fast.kernels import layer_norm as _kernels
except Exception as e:  # triton missing or failing to initialize: the other backends still work
    _kernels = None
    backends.mark_unavailable("triton", f"vit_fast.kernels.layer_norm failed to import: {e}")

# Device types whose autocast runs layer_norm in float32 (CUDA's autocast policy); CPU autocast leaves it alone.
_AUTOCAST_FP32_DEVICES = ("cuda",)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (M, C) with a unit column stride: a view when the leading dims merge, else a copy."""
    t2 = t.reshape(-1, t.shape[-1])  # (M, C)
    return t2 if t2.shape[1] == 1 or t2.stride(1) == 1 else t2.contiguous()


def _num_rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype


def _backward_for(bwd_op: Callable) -> Callable:
    """The autograd rule for a backend's forward op, given its backward op (same signature in every backend):
    ``bwd_op(grad_out, x, weight, mean, rstd) -> (dx, dweight, dbias)``."""

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


def _fwd_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """Fake of every backend's forward op: y like x (contiguous), fp32 mean and rstd per row."""
    stats = x.new_empty((_num_rows(x),), dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)


def _bwd_fake(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor):
    """Fake of every backend's backward op: dx like x, dweight and dbias like weight."""
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _public_for(fwd_op: Callable) -> Callable:
    """The public op's signature over a backend's forward op."""

    def run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
        if x.device.type in _AUTOCAST_FP32_DEVICES and torch.is_autocast_enabled(x.device.type):
            x, weight, bias = x.float(), weight.float(), bias.float()
        y, _mean, _rstd = fwd_op(x, weight, bias, eps)
        return y

    return run


if _kernels is not None:

    @torch.library.custom_op("vit_fast::layer_norm_fwd_triton", mutates_args=())
    def _layer_norm_fwd_triton(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, mean, rstd = _kernels.layer_norm_fwd(_rows(x), weight.contiguous(), bias.contiguous(), eps)
        return y.view(x.shape), mean, rstd

    _layer_norm_fwd_triton.register_fake(_fwd_fake)

    @torch.library.custom_op("vit_fast::layer_norm_bwd_triton", mutates_args=())
    def _layer_norm_bwd_triton(
        grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dx, dweight, dbias = _kernels.layer_norm_bwd(_rows(grad_out), _rows(x), weight.contiguous(), mean, rstd)
        return dx.view(x.shape), dweight, dbias

    _layer_norm_bwd_triton.register_fake(_bwd_fake)

    torch.library.register_autograd(
        "vit_fast::layer_norm_fwd_triton",
        _backward_for(torch.ops.vit_fast.layer_norm_bwd_triton),
        setup_context=_setup_context,
    )

    def _triton_check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = 1e-6) -> list[str]:
        if x.shape[-1] > _kernels.MAX_C:
            return [f"width C = {x.shape[-1]} > {_kernels.MAX_C} (rows are held in registers)"]
        return []

    _layer_norm_triton = backends.register("layer_norm", "triton", check=_triton_check)(
        _public_for(torch.ops.vit_fast.layer_norm_fwd_triton)
    )


# ---- CUDA C++ backend (vit_fast._C): same fakes and autograd rule as Triton's ----------------------------------

_CUDA_MAX_C = 6144  # the backward keeps per-warp column sums of a row in shared memory

if hasattr(torch.ops.vit_fast, "layer_norm_fwd"):  # the extension loaded and defined the ops
    torch.library.register_fake("vit_fast::layer_norm_fwd", _fwd_fake)
    torch.library.register_fake("vit_fast::layer_norm_bwd", _bwd_fake)
    torch.library.register_autograd(
        "vit_fast::layer_norm_fwd", _backward_for(torch.ops.vit_fast.layer_norm_bwd), setup_context=_setup_context
    )

    def _cuda_check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = 1e-6) -> list[str]:
        if x.shape[-1] > _CUDA_MAX_C:
            return [f"width C = {x.shape[-1]} > {_CUDA_MAX_C}"]
        return []

    _layer_norm_cuda = backends.register("layer_norm", "cuda", check=_cuda_check)(
        _public_for(torch.ops.vit_fast.layer_norm_fwd)
    )


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dimension.

    Args:
        x: (..., C).
        weight, bias: (C,).
        eps: added to the variance.

    Returns:
        (..., C), normalized, scaled by ``weight`` and shifted by ``bias``.
    """
    _validate(x, weight, bias, eps)
    return backends.select("layer_norm", x, weight, bias, eps=eps)(x, weight, bias, eps=eps)
