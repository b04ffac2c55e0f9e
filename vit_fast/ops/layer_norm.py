"""LayerNorm over the last dimension."""

from __future__ import annotations

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
