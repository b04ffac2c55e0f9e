"""One call registers a kernel backend of an op: its custom ops, their fakes, the autograd rule, and its
limits in the dispatcher.

An op writes its kernel contract once, as a :class:`KernelOp`: the forward and backward schemas (the same
strings as in ``csrc/ops.cpp``), one fake per schema, how autograd saves and differentiates, and the public
signature over a forward op. Every backend of the op then shares all of it; :func:`register_backend` is the
only thing a backend adds::

    register_backend(ATTENTION, "triton", Limits(...), fwd=kernels.attention_fwd, bwd=kernels.attention_bwd)
    register_backend(ATTENTION, "cuda", Limits(...))   # ops defined by vit_fast._C from the same schemas

The custom ops are named ``vit_fast::{op}_fwd_{backend}`` and ``vit_fast::{op}_bwd_{backend}``. An
inference-only op (no ``bwd_schema``) has one, ``vit_fast::{op}_{backend}``, and no autograd formula: a backward
through it raises torch's "no autograd formula was registered".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from vit_fast import backends


@dataclass(frozen=True)
class KernelOp:
    """An op's contract with its kernel backends (see the module docstring)."""

    name: str
    fwd_schema: str
    fwd_fake: Callable
    public: Callable[[Callable], Callable]  # forward op -> the op's public signature
    bwd_schema: str | None = None  # None: inference only, and so are the three below
    bwd_fake: Callable | None = None
    setup_context: Callable | None = None
    backward: Callable[[Callable], Callable] | None = None  # backward op -> autograd backward(ctx, *grads)
    # The dispatcher op this is another entry point of (attention_packed of attention): registered as its
    # variant (backends.register_variant), under the op's limits, and recorded in launches as that op.
    variant_of: str | None = None


def _recorded(fn: Callable, op: str, backend: str, phase: str) -> Callable:
    def run(*args, **kwargs):
        backends.record(op, backend, phase)
        return fn(*args, **kwargs)

    return run


def register_backend(spec: KernelOp, backend: str, limits: backends.Limits, *, fwd: Callable | None = None,
                     bwd: Callable | None = None) -> bool:
    """Register ``backend``'s kernels for ``spec``'s op; returns whether it did.

    With ``fwd`` and ``bwd`` (Python launchers taking the schemas' arguments; ``fwd`` alone for an inference-only
    op) the custom ops are defined here; without, they must have been defined by ``vit_fast._C`` (when they were
    not, only the limits are registered: they still explain what the backend could run).
    """
    fwd_name = f"{spec.name}_{backend}" if spec.bwd_schema is None else f"{spec.name}_fwd_{backend}"
    bwd_name = f"{spec.name}_bwd_{backend}"
    parts = [(fwd_name, spec.fwd_schema, spec.fwd_fake, fwd, "fwd")]
    if spec.bwd_schema is not None:
        parts.append((bwd_name, spec.bwd_schema, spec.bwd_fake, bwd, "bwd"))
    op = spec.variant_of or spec.name
    defined_here = fwd is not None
    if defined_here:
        for name, schema, _, launch, phase in parts:
            torch.library.custom_op(f"vit_fast::{name}", _recorded(launch, op, backend, phase),
                                    mutates_args=(), schema=schema)
    elif not hasattr(torch.ops.vit_fast, fwd_name):
        if spec.variant_of is None:
            backends.register(spec.name, backend, None, limits)
        return False
    for name, _, fake, _, _ in parts:
        # _stacklevel=2: the fakes belong to the op's module (the caller), which csrc/ops.cpp names with
        # set_python_module; torch checks the two agree for ops the extension defines.
        torch.library.register_fake(f"vit_fast::{name}", fake, _stacklevel=2)
    public = spec.public(getattr(torch.ops.vit_fast, fwd_name))
    if not defined_here:  # C++ ops cannot record themselves: record where Python calls them
        public = _recorded(public, op, backend, "fwd")
    if spec.bwd_schema is not None:
        backward = spec.backward(getattr(torch.ops.vit_fast, bwd_name))
        if not defined_here:
            backward = _recorded(backward, op, backend, "bwd")
        torch.library.register_autograd(f"vit_fast::{fwd_name}", backward, setup_context=spec.setup_context)
    if spec.variant_of is None:
        backends.register(spec.name, backend, public, limits)
    else:
        backends.register_variant(spec.variant_of, spec.name, backend, public)
    return True



def triton_kernels(name: str) -> ModuleType | None:
    """``vit_fast.kernels.<name>``, or None after marking the triton backend unavailable with the reason."""
    try:
        return importlib.import_module(f"vit_fast.kernels.{name}")
    except Exception as e:  # noqa: BLE001 - any import failure (no triton, a broken or old install) disables it
        backends.mark_unavailable("triton", f"vit_fast.kernels.{name} failed to import: {e}")
        return None
