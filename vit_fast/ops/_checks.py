"""Input validation shared by the ops: clear exceptions that name the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vit_fast.backends import dtype_name


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {dtype_name(t.dtype)}, device {t.device}"


def tensor(name: str, t: object, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """``t`` is a floating-point tensor of the given rank(s); raises TypeError/ValueError naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {describe(t)}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ranks:
            want = " or ".join(f"{r}-D" for r in ranks)
            raise ValueError(f"{name} must be {want}; got {describe(t)}")
    return t


def optional(name: str, t: object, ndim: int | Sequence[int] | None = None) -> torch.Tensor | None:
    return None if t is None else tensor(name, t, ndim)


def shape(name: str, t: torch.Tensor, expected: Sequence[int | None], what: str = "") -> None:
    """``t.shape`` matches ``expected`` (None = any size)."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected, strict=True))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {want}{' ' + what if what else ''}; got {describe(t)}")


def same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")


def same_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {v.dtype for v in tensors.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{k} {dtype_name(v.dtype)}" for k, v in tensors.items())
        raise TypeError(f"{', '.join(tensors)} must share one dtype; got {listing}")


def probability(name: str, p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1); got {p}")
    return p


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references compute in with ``upcast=True``: float64 stays, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


AUTOCAST_DEVICES = ("cpu", "cuda")  # the device types autocast is asked about (meta and fake-free ones have none)


def autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (never for a type autocast does not know, such as meta)."""
    return device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type)


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``t`` runs in: autocast's when autocast is on for t's device, else t's own.

    Custom ops do not see autocast, so the backends' wrappers cast their GEMM operands to this themselves.
    """
    device = t.device.type
    return torch.get_autocast_dtype(device) if autocast_on(t.device) else t.dtype



def rows_and_affine(x: object, weight_name: str, weight: object, bias_name: str, bias: object, eps: float) -> int:
    """``x`` (..., C) with a LayerNorm's (C,) weight and bias and a positive eps; returns C."""
    tensor("x", x)
    if x.dim() == 0:
        raise ValueError(f"x must have at least 1 dimension (..., C); got {describe(x)}")
    c = x.shape[-1]
    for name, t in ((weight_name, weight), (bias_name, bias)):
        tensor(name, t, ndim=1)
        shape(name, t, (c,), "(the last dimension of x)")
    if not eps > 0:
        raise ValueError(f"eps must be positive; got {eps!r}")
    return c
