"""Triton kernels and their launchers, installed as ``vit_fast.kernels``.

Each module holds, in this order: ``_<op>_fwd_kernel``, ``_<op>_bwd_kernel``, then the launchers ``<op>_fwd``
and ``<op>_bwd``. Kernels know nothing of autograd, modules or dispatch: ``vit_fast.ops`` wraps them.
"""

from __future__ import annotations

import torch

# Tests set this: every output a launcher allocates starts as NaN, so an element a kernel never writes fails.
POISON = False


def empty(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a launcher's output (NaN-filled when :data:`POISON` is set)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan"))
    return out
