"""The one numerics check every suite runs, from an op's spec (:class:`vit_fast.ops.spec.Cases`): a backend's
forward and every gradient on the spec's inputs, against the float64 oracle by the one tolerance rule
(:mod:`vit_fast.tolerance`), with the launch records as proof that the backend under test ran.

The yardstick is never the result under test: for a kernel backend it is the reference (PyTorch's own
computation) in the inputs' dtype, on contiguous copies (a kernel must not be further off for strided views than
PyTorch is on dense tensors); for the reference itself it is the spec's hand-written math in that dtype, an
independent path. Ops whose results have no float64 oracle to hold a yardstick to (quantized ones) are held to
the error budget of their ``close`` rule against the exact result instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch.utils._pytree import tree_map_only

import vit_fast
from vit_fast import backends
from vit_fast.tolerance import excess

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def spec(op: str):
    return backends.spec(op)


def public(op: str):
    return backends.spec(op).public


def reference(op: str):
    return backends.spec(op).reference


def run(op: str, backend: str, args: tuple, kwargs: dict):
    with vit_fast.set_backend(backend):
        return public(op)(*args, **kwargs)


def outputs(out: torch.Tensor | tuple) -> tuple[torch.Tensor, ...]:
    """An op's outputs as a tuple: the fp8 producers return (q, scale)."""
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def tensors(inputs: tuple[tuple, dict]) -> list[torch.Tensor]:
    args, kwargs = inputs
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


def is_empty(inputs: tuple[tuple, dict], out_shape: tuple[int, ...] | None = None) -> bool:
    return any(t.numel() == 0 for t in tensors(inputs)) or (out_shape is not None and math.prod(out_shape) == 0)


def _grads(out: torch.Tensor, leaves: Mapping[str, torch.Tensor], names: list[str],
           dout: torch.Tensor) -> list[torch.Tensor]:
    if not names:
        return []
    return list(torch.autograd.grad(out, [leaves[n] for n in names], dout))


def odd_dout(out: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """An output gradient: ``random``, a stride-0 ``broadcast`` of one row, or ``transposed`` in memory."""
    shape = out.shape
    if kind == "broadcast":
        row = torch.randn(shape[-1], generator=g, dtype=torch.float64)
        return row.to(out.device, out.dtype).expand(shape)
    if kind == "transposed" and out.dim() >= 2:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g, dtype=torch.float64)
        return t.to(out.device, out.dtype).transpose(-1, -2)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)


def assert_ran(launches: list[backends.Launch], op: str, backend: str, empty: bool, backward: bool) -> None:
    """The launch records show that ``backend``, not a fallback, ran the forward (and the backward when
    ``backward``): none at all for an empty input."""
    ran = {(r.op, r.backend, r.phase) for r in launches}
    if empty:  # nothing to compute: the reference returns the empty result, no kernel is launched
        assert all(r.backend == "reference" for r in launches), f"empty input launched {ran}"
        return
    assert {r.backend for r in launches} == {backend}, f"{backend} under test, launches {ran}"
    phases = ("fwd", "bwd") if backward and backend != "reference" else ("fwd",)
    want = {(op, backend, phase) for phase in phases}
    assert want <= ran, f"missing launches {want - ran}; got {ran}"


def check(op: str, dims: Mapping, dtype: torch.dtype, backend: str, *, seed: int = 0,
          requested: tuple[str, ...] | None = None, dout: str = "random", bwd_launch: bool = True,
          device: str = DEVICE) -> dict:
    """``backend`` runs ``op`` on the spec's inputs for ``dims`` (leaves in ``dtype``, those in ``requested``, by
    default the spec's ``grads``, requiring grad), forward and backward of a ``dout``-kind output gradient, within
    the tolerance rule of the float64 oracle (or the op's ``close`` budget); the launch records show that it ran,
    and its backward unless ``bwd_launch`` is False (gradients that need no kernel). Returns
    ``{"out": ..., "grads": {leaf: gradient}}``."""
    cases = spec(op).cases
    (args, kwargs), low = cases.make(dims, dtype, device, seed=seed)
    names = [n for n in low if low[n].requires_grad and (requested is None or n in requested)]
    for n, t in low.items():
        t.requires_grad_(n in names)
    g = torch.Generator().manual_seed(seed + 1)
    with vit_fast.set_backend(backend), backends.trace() as launches:
        out = public(op)(*args, **kwargs)
        grad_out = odd_dout(out, dout, g) if cases.close is None else None
        got = _grads(out, low, names, grad_out) if names else []
    empty = is_empty((args, kwargs), tuple(outputs(out)[0].shape))
    assert_ran(launches, op, backend, empty, bool(names) and bwd_launch)
    if names and backend != "reference" and not bwd_launch:
        assert not any(r.phase == "bwd" and r.backend == backend for r in launches), launches
    if empty:  # nothing computed: the reference's empty result, gradients of the inputs' shapes
        for o, w in zip(outputs(out), outputs(reference(op)(*args, **kwargs)), strict=True):
            assert (o.shape, o.dtype) == (w.shape, w.dtype), f"{op} {dims}: {o.shape} {o.dtype}, not {w.shape}"
        assert all(g.shape == low[n].shape and g.dtype == low[n].dtype for n, g in zip(names, got, strict=True))
        return {"out": out, "grads": dict(zip(names, got, strict=True))}
    wide = {n: t.detach().double().requires_grad_(n in names) for n, t in low.items()}
    oracle = cases.oracle(dims, wide)
    if cases.close is not None:
        cases.close(out, oracle.detach(), (args, kwargs), f"{op} on {backend}, {dims}")
        return {"out": out, "grads": {}}
    assert out.dtype == dtype or not out.is_floating_point() or reference(op)(*args, **kwargs).dtype == out.dtype
    oracle_grads = _grads(oracle, wide, names, grad_out.double()) if names else []
    same = {n: t.detach().clone().requires_grad_(n in names) for n, t in low.items()}
    if backend == "reference":  # the yardstick: the spec's hand-written math in the inputs' dtype
        yard = cases.oracle(dims, same)
    else:  # the reference on contiguous copies of the views
        sargs, skwargs = tree_map_only(torch.Tensor, lambda t: t.contiguous(), cases.view(dims, same))
        yard = reference(op)(*sargs, **skwargs)
    yard_grads = _grads(yard, same, names, grad_out) if names else []
    assert out.dtype == yard.dtype, f"out dtype {out.dtype}, the reference's {yard.dtype}"
    k = cases.reduction(dims)
    failures = []
    for name, o, s, r in zip(("out", *(f"d{n}" for n in names)), (out, *got), (yard, *yard_grads),
                             (oracle, *oracle_grads), strict=True):
        if name != "out":
            assert o.dtype == low[name[1:]].dtype and o.shape == low[name[1:]].shape, f"{name}: {o.dtype} {o.shape}"
        ratio, detail = excess(o, s, r, k=k, independent=backend == "reference")
        if not ratio <= 1:
            failures.append(f"{name}: {detail}")
    assert not failures, f"{op} {dims} {dtype} on {backend}:\n  " + "\n  ".join(failures)
    return {"out": out, "grads": dict(zip(names, got, strict=True))}


def refused(op: str, backend: str, inputs: tuple[tuple, dict]) -> list[str]:
    """Why ``backend`` refuses these inputs (empty: it runs them); an empty input is never refused."""
    return [] if is_empty(inputs) else backends.reasons(backend, op, *inputs)
