"""The providers: the ways of computing an op or a model that a run sets side by side."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

import vit_fast
from vit_fast import backends
from vit_fast.bench.cases import OpBench


@dataclass
class Provider:
    """One way of computing an op or a model. ``kind``: ``vit_fast`` (ours), ``baseline`` (PyTorch, timm:
    what the speedups are over) or ``peer`` (other libraries, shown beside). ``fn``: for an op, a function
    with the op's signature; for a model, ``(config, base model) -> the module to run``."""

    name: str
    kind: str
    fn: Callable | None = None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    compile: bool = False
    skip: str | None = None
    factory: Callable[[], Callable] | None = None  # peers: built on first use, so a broken install is a skip
    train_skip: str | None = None  # models: why the training step is not measured
    dtype: torch.dtype | None = None  # models: the dtype it runs and is checked in, when not the case's (CPU bf16 rows)


def backend_providers(fn: Callable, device: torch.device) -> list[Provider]:
    """``fn`` under every vit_fast backend; Triton is not timed when it runs through the CPU interpreter."""
    interpreted = device.type == "cpu" and backends.triton_interpreter()
    why = ("Triton on CPU runs through the interpreter (TRITON_INTERPRET=1): a correctness tool, not timed; "
           "the Triton kernels need a GPU")
    return [Provider(f"vit_fast:{b}", "vit_fast", fn, (lambda b=b: vit_fast.set_backend(b)),
                     skip=why if b == "triton" and interpreted else None) for b in backends.BACKENDS]


def compile_skip(device: torch.device, quick: bool, allow: bool) -> str | None:
    if not allow:
        return "torch.compile disabled (--no-compile)"
    if device.type == "cpu" and quick:
        return ("torch.compile skipped on CPU in --quick: its C++ code generation takes ~10 s per graph here; "
                "the full run includes it")
    return None


def op_providers(op: OpBench, device: torch.device, *, quick: bool, allow_compile: bool = True) -> list[Provider]:
    """Every vit_fast backend, each eager PyTorch way, the compiled one, and the peers that are installed."""
    out = backend_providers(op.public(), device)
    out += [Provider(name, "baseline", fn, ctx) for name, fn, ctx in op.baselines()]
    cname, cfn = op.compiled_baseline()
    out.append(Provider(cname, "baseline", cfn, compile=True, skip=compile_skip(device, quick, allow_compile)))
    for name, module, factory in op.peers():
        if importlib.util.find_spec(module) is not None:
            out.append(Provider(name, "peer", factory=factory))
    return out
