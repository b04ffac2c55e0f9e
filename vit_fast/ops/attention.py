"""Attention: softmax(q k^T * scale) v over (B, H, N, D) tensors, non-causal, no mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.ops import _checks
from vit_fast.ops._checks import upcast_dtype


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference attention through ``F.scaled_dot_product_attention``; differentiable, any device.

    With ``upcast=True`` the math runs in float32 (float64 stays float64) and the result keeps that dtype:
    it is the test oracle.
    """
    if upcast:
        dt = upcast_dtype(q.dtype)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def _validate(q: object, k: object, v: object, scale: float | None, dropout_p: float) -> None:
    _checks.tensor("q", q, ndim=4)
    _checks.tensor("k", k, ndim=4)
    _checks.tensor("v", v, ndim=4)
    _checks.same_device(q=q, k=k, v=v)
    _checks.same_dtype(q=q, k=k, v=v)
    _checks.shape("k", k, tuple(q.shape), "(the shape of q, (B, H, N, D))")
    _checks.shape("v", v, tuple(q.shape), "(the shape of q, (B, H, N, D))")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None; got {scale!r}")
    _checks.probability("dropout_p", dropout_p)


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    q = torch.empty(2, 12, 197, 64, device="meta", dtype=dtype)  # ViT-B/16: (B, H, N, D)
    return (q, q, q), {"scale": None, "dropout_p": 0.0}


backends.declare("attention", _example)
backends.register("attention", "reference")(attention_ref)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Scaled dot-product attention, non-causal, no mask.

    Args:
        q, k, v: (B, H, N, D), one dtype and device, any strides (views of a packed qkv projection
            output are read in place).
        scale: multiplies q k^T; defaults to D ** -0.5.
        dropout_p: attention-probability dropout (training only; the fused kernels take 0).

    Returns:
        (B, H, N, D) = softmax(q k^T * scale) v, in q's dtype.
    """
    _validate(q, k, v, scale, dropout_p)
    return backends.select("attention", q, k, v, scale=scale, dropout_p=dropout_p)(
        q, k, v, scale=scale, dropout_p=dropout_p
    )
