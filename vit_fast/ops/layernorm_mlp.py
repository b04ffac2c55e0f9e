"""The transformer MLP branch in one op: fc2(gelu(fc1(layer_norm(x)))) (+ residual)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.ops import _checks
from vit_fast.ops._checks import upcast_dtype


def layernorm_mlp_ref(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    *,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    upcast: bool = False,
) -> torch.Tensor:
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
    _checks.tensor("x", x)
    if x.dim() == 0:
        raise ValueError(f"x must have at least 1 dimension (..., C); got {_checks.describe(x)}")
    c = x.shape[-1]
    _checks.tensor("ln_weight", ln_weight, ndim=1)
    _checks.tensor("ln_bias", ln_bias, ndim=1)
    _checks.shape("ln_weight", ln_weight, (c,), "(the last dimension of x)")
    _checks.shape("ln_bias", ln_bias, (c,), "(the last dimension of x)")
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
    if not eps > 0:
        raise ValueError(f"eps must be positive; got {eps!r}")
    _checks.probability("dropout_p", dropout_p)


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    def m(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dtype)

    x = m(64, 197, 768)  # ViT-B/16 tokens: (B, N, C), hidden 3072
    return (x, m(768), m(768), m(3072, 768), m(3072), m(768, 3072), m(768)), {
        "eps": 1e-6, "residual": x, "dropout_p": 0.0}


backends.declare("layernorm_mlp", _example)
backends.register("layernorm_mlp", "reference")(layernorm_mlp_ref)


def layernorm_mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    *,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
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
        (..., C_out) = fc2(gelu(fc1(layer_norm(x)))) [+ residual], GELU exact (erf).
    """
    _validate(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, dropout_p)
    args = (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    kwargs = {"eps": eps, "residual": residual, "dropout_p": dropout_p}
    return backends.select("layernorm_mlp", *args, **kwargs)(*args, **kwargs)
