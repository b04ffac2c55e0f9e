"""The backend setting: which backend the ops run on, ``auto``, ``reference``, ``triton`` or ``cuda``.

:func:`set_backend` sets the process default (``$VIT_FAST_BACKEND`` before any call, else ``auto``);
:func:`use_backend` a choice local to the current thread or asyncio task (a context variable), which wins over the
default. :func:`get_backend` says which is in force here; the dispatcher (:mod:`vit_fast.backends`) reads it."""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Iterator

import torch

CHOICES: tuple[str, ...] = ("auto", "reference", "triton", "cuda")  # "auto" and vit_fast.backends.BACKENDS


def validate(name: str, source: str = "backend") -> str:
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(CHOICES)}; got {name!r}")
    return name


_ENV_BACKEND = os.environ.get("VIT_FAST_BACKEND", "").strip() or "auto"
_default: str = _ENV_BACKEND  # the process default: set_backend
_local: contextvars.ContextVar[str | None] = contextvars.ContextVar("vit_fast_backend", default=None)  # use_backend
# torch.compile reads a ContextVar, guarded, from torch 2.14 on; before, reading one breaks the graph. There a
# compiled region reads this thread's copy of the choice, which use_backend keeps beside the ContextVar (the
# compiler reads and guards a threading.local): thread-local, but not asyncio-task-local, under compile.
_COMPILER_READS_CONTEXTVARS = torch.__version__ >= "2.14"
_thread = threading.local()


def get_backend() -> str:
    """The backend name in force here: this thread's or task's :func:`use_backend` where one is in force, else the
    process default (:func:`set_backend`, else ``$VIT_FAST_BACKEND``, else ``auto``)."""
    if not _COMPILER_READS_CONTEXTVARS and torch.compiler.is_compiling():
        local = getattr(_thread, "name", None)
    else:
        local = _local.get()
    if local is not None:
        return local
    return validate(_default, "VIT_FAST_BACKEND" if _default == _ENV_BACKEND else "backend")


class set_backend:
    """Set the process default backend for every op: ``auto``, ``reference``, ``triton`` or ``cuda``.

    A plain call stays in force for every thread; as a context manager it restores the previous default on exit
    (still process-wide: another thread sees the change while the block runs). For a choice local to one thread
    or asyncio task, use :func:`use_backend`, which also wins over this default::

        vit_fast.set_backend("triton")
        with vit_fast.set_backend("reference"):
            ...
    """

    def __init__(self, name: str) -> None:
        global _default
        validate(name)
        self.previous = _default
        self.name = name
        _default = name

    def __enter__(self) -> set_backend:
        return self

    def __exit__(self, *exc: object) -> None:
        global _default
        _default = self.previous

    def __repr__(self) -> str:
        return f"set_backend({self.name!r})"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Choose the backend for the ops run inside the block, in this thread or asyncio task only (a context
    variable): two threads serving with different backends never see each other's choice.

    Under ``torch.compile`` the choice is read while tracing and guarded: a compiled function called under a setting
    it has not seen (this one or a :func:`set_backend`) recompiles, and one it has seen reuses its graph; no
    ``torch._dynamo.reset()`` is needed. Before torch 2.14 a compiled region sees its thread's choice: two asyncio
    tasks of one thread that choose differently must not share a compiled function there. The Triton interpreter
    (``TRITON_INTERPRET=1``, on CPU) is taken as one-thread-only: under it, run the ``triton`` backend from one
    thread at a time."""
    token = _local.set(validate(name))
    _thread.name = name
    try:
        yield name
    finally:
        _local.reset(token)
        _thread.name = _local.get()  # this task's outer choice: blocks of interleaved tasks leave no stale copy
