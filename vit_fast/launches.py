"""Launch records: which backend really ran each op, forward and backward. The implementations record themselves
(Python kernel ops from inside their custom ops, so compiled graphs record too; the dispatcher records the
reference and the C++ ops); :func:`trace` collects the records of a block, for tests and benchmarks that must prove
the backend under test ran, not a fallback.

The records are process-wide, not per thread: the autograd engine runs a CUDA backward on a thread of its own, and
its launches belong to the block that asked for the gradient."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    """One run of an op's implementation: ``phase`` is ``fwd`` or ``bwd``."""

    op: str
    backend: str
    phase: str


_recorders: list[list[Launch]] = []


def record(op: str, backend: str, phase: str) -> None:
    """Called by the implementations when they run."""
    for rec in _recorders:
        rec.append(Launch(op, backend, phase))


@contextlib.contextmanager
def trace() -> Iterator[list[Launch]]:
    """Collect every :class:`Launch` inside the block: proof of which backend ran, forward and backward::

        with backends.trace() as launches:
            out = model(images)
        assert {(r.op, r.backend) for r in launches} == {...}
    """
    launches: list[Launch] = []
    _recorders.append(launches)
    try:
        yield launches
    finally:
        _recorders.remove(launches)
