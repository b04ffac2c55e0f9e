"""Triton kernels and their launchers, installed as ``vit_fast.kernels``.

Each module holds, in this order: ``_<op>_fwd_kernel``, ``_<op>_bwd_kernel``, then the launchers ``<op>_fwd``
and ``<op>_bwd``. Kernels know nothing of autograd, modules or dispatch: ``vit_fast.ops`` wraps them. ``gemm`` is
the exception that serves the others: one GEMM with constexpr epilogues, which ``layernorm_mlp``'s launchers chain
with the LayerNorm row kernels instead of holding kernels of their own.

What every launcher shares lives here: the output allocation (:func:`empty`), the device guard
(:func:`on_inputs_device`), the one launch path for autotuned kernels (:func:`launch`: autotuned, or a fixed
config under the interpreter, with ``VIT_FAST_AUTOTUNE=0`` and inside CUDA-graph capture), the shared-memory
budget read from the device (:func:`smem_limit`) and PyTorch's fp32 precision settings (:func:`fp32_tf32`).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

# Tests set this: every output a launcher allocates starts as NaN, so an element a kernel never writes fails.
POISON = False

# The shared-memory budget where no CUDA device holds the tensors (meta tensors in static checks and tests):
# the launch on a GPU reads the device's own opt-in limit instead (H100/H200: 227 KiB, A100: 163 KiB).
SMEM_WITHOUT_DEVICE = 160 * 1024


def empty(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a launcher's output (NaN-filled when :data:`POISON` is set)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan"))
    return out


def interpreting() -> bool:
    """Whether kernels run through the Triton interpreter. Read from the environment, as triton itself reads it
    at import: ``triton.knobs.runtime.interpret`` reads False under TRITON_INTERPRET=1 in triton 3.6."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotuning() -> bool:
    """Whether launches autotune: not under the interpreter (nothing worth timing) and not with
    ``VIT_FAST_AUTOTUNE=0`` (fixed configs: reproducible runs, the GPU correctness checks, the tests)."""
    return not interpreting() and os.environ.get("VIT_FAST_AUTOTUNE", "1").strip() != "0"


def on_inputs_device(launcher: Callable) -> Callable:
    """Run ``launcher`` with its first tensor argument's CUDA device current: Triton launches on the current
    device and stream, so tensors on ``cuda:1`` without ``torch.cuda.set_device(1)`` would otherwise be read by a
    kernel on ``cuda:0``."""

    @functools.wraps(launcher)
    def run(*args: Any, **kwargs: Any) -> Any:
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if device is None or device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    run.on_inputs_device = True  # what tests/test_kernel_launch.py checks on every public launcher
    return run


@functools.cache
def _smem_optin(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def smem_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on ``device``: the device's opt-in limit, asked once per device
    at the first launch on it (never at import); :data:`SMEM_WITHOUT_DEVICE` for a device that is not CUDA."""
    if device.type != "cuda":
        return SMEM_WITHOUT_DEVICE
    return _smem_optin(device.index if device.index is not None else torch.cuda.current_device())


BF16_ONE_AND_HALF = 0x3FC0  # 1.5 as bfloat16 bits: exact, and its raw bits squared are nowhere near 2.25


@functools.cache
def interpreter_bf16_dot_ok() -> bool:
    """Whether the Triton interpreter computes a bfloat16 ``tl.dot`` on the values: releases up to at least 3.8
    multiply the raw uint16 bit patterns that hold them (triton issue 11584). The dispatcher asks it at the first
    bfloat16 call of the triton backend on CPU; the test suite installs a correction first (tests/)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    x = interpreter.TensorHandle(np.full((1, 1), BF16_ONE_AND_HALF, dtype=np.uint16), tl.bfloat16)
    acc = interpreter.TensorHandle(np.zeros((1, 1), dtype=np.float32), tl.float32)
    return float(interpreter.interpreter_builder.create_dot(x, x, acc, "ieee", 0).data[0, 0]) == 2.25


def _tf32(nodes: tuple[Any, ...]) -> bool:
    """The first explicit ``fp32_precision`` from the most specific setting up: "none" defers to the parent, and
    "none" all the way up is IEEE (the legacy ``cudnn`` flag set False leaves exactly that)."""
    for node in nodes:
        value = getattr(node, "fp32_precision", "none")
        if value != "none":
            return value == "tf32"
    return False


def fp32_tf32(kind: str) -> bool:
    """Whether PyTorch runs fp32 ``matmul`` (or ``conv``) on TF32 tensor cores, so a kernel's fp32 dot products
    can follow the same switch. Torch >= 2.9 is asked through its ``fp32_precision`` settings: reading the legacy
    TF32 flags there raises once a program has used the new settings. Older torch has only the flags."""
    backends = torch.backends
    if kind == "matmul":
        if hasattr(backends.cuda.matmul, "fp32_precision"):
            return _tf32((backends.cuda.matmul, backends))
        return backends.cuda.matmul.allow_tf32  # torch < 2.9: no fp32_precision, the flag cannot raise
    if kind == "conv":
        if hasattr(getattr(backends.cudnn, "conv", None), "fp32_precision"):
            return _tf32((backends.cudnn.conv, backends.cudnn, backends))
        return backends.cudnn.allow_tf32  # torch < 2.9, as above
    raise ValueError(f"kind must be 'matmul' or 'conv'; got {kind!r}")


# Tuning keys launched outside CUDA-graph capture: during capture only these may go through the autotuner (it
# reuses its cached best config and times nothing).
_TUNED: set[tuple] = set()
_WARNED_CAPTURE: set[str] = set()


def _tuning_key(tuned: Any, named: dict[str, Any]) -> tuple:
    """At least as fine as the autotuner's own cache key (its key arguments plus every tensor's dtype)."""
    values = tuple(named[k] for k in tuned.keys if k in named)
    dtypes = tuple(str(v.dtype) for v in named.values() if hasattr(v, "dtype"))
    return (id(tuned), values, dtypes)


def _capturing(named: dict[str, Any]) -> bool:
    on_cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for v in named.values())
    return on_cuda and torch.cuda.is_current_stream_capturing()


def fixed_config(tuned: Any, args: tuple, kwargs: dict) -> Any:
    """The config a launch uses when not autotuning: the first of the tuning list that the kernel's pruning keeps
    for these arguments (so it fits the device's shared memory), without timing anything."""
    prune = getattr(tuned, "early_config_prune", None)
    kept = prune(tuned.configs, dict(zip(tuned.arg_names, args, strict=False)), **kwargs) if prune else tuned.configs
    return kept[0]


def launch(tuned: Any, grid: Any, args: tuple, kwargs: dict, *, fixed: Any = None) -> None:
    """Launch ``tuned`` (a ``triton.autotune`` kernel) on ``grid``.

    Autotuned when :func:`autotuning` allows it; otherwise the wrapped kernel runs with ``fixed`` (a
    ``triton.Config``, or a function ``(args, kwargs) -> Config``; default :func:`fixed_config`). Inside
    CUDA-graph capture a key never tuned before runs the fixed config too: timing configs there would
    synchronize the capturing stream. Warm up (one eager call per shape) before capturing to get the tuned one.
    """
    named = {**dict(zip(tuned.arg_names, args, strict=False)), **kwargs}
    if autotuning():
        key = _tuning_key(tuned, named)
        if key in _TUNED or not _capturing(named):
            tuned[grid](*args, **kwargs)
            _TUNED.add(key)
            return
        name = getattr(tuned.fn, "__name__", str(tuned.fn))
        if name not in _WARNED_CAPTURE:
            _WARNED_CAPTURE.add(name)
            warnings.warn(f"vit_fast: {name} is launched inside CUDA-graph capture with a shape it was never tuned "
                          "for; the graph holds its fixed config. Run the model once before capturing to record "
                          "the tuned config.", stacklevel=3)
    if fixed is None:
        config = fixed_config(tuned, args, kwargs)
    else:
        config = fixed(args, kwargs) if callable(fixed) else fixed
    tuned.fn[grid](*args, **kwargs, **config.all_kwargs())
