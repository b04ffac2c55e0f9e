"""Triton kernels and their launchers, installed as ``vit_fast.kernels``.

Each module holds, in this order: ``_<op>_fwd_kernel``, ``_<op>_bwd_kernel``, then the launchers ``<op>_fwd``
and ``<op>_bwd``. Kernels know nothing of autograd, modules or dispatch: ``vit_fast.ops`` wraps them. ``gemm`` is
the exception that serves the others: one GEMM with constexpr epilogues, which ``layernorm_mlp``'s launchers chain
with the LayerNorm row kernels instead of holding kernels of their own.

What every launcher shares lives here: the output allocation (:func:`empty`), the device guard
(:func:`on_inputs_device`), the one launch path for autotuned kernels (:func:`launch`: autotuned, or a fixed
config under the interpreter, with ``VIT_FAST_AUTOTUNE=0`` and inside CUDA-graph capture), the shared-memory
budget read from the device (:func:`smem_limit`) and PyTorch's fp32 precision settings (:func:`fp32_tf32`).

A launch outside the autotuner (fixed configs, the interpreter, graph capture) that runs out of a device resource
(Triton's ``OutOfResources``: shared memory, threads) warns and tries the next config the pruning keeps; when none
fits it raises :class:`KernelLaunchError`, which the dispatcher turns into the reference.

Kernel families with more than one implementation (:data:`VARIANTS`: the TMA-descriptor GEMMs and attention
forward of sm_90, the fused attention backward) pick one at launch; :func:`use_variant` (or
``VIT_FAST_KERNEL_VARIANT``) forces one, so that ``vit-fast tune`` can time each and a caller can name the winner.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from collections.abc import Callable, Iterator
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

    run.on_inputs_device = True  # what tests/suites/test_kernel_launch.py checks on every public launcher
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


class KernelLaunchError(RuntimeError):
    """No config of a kernel could launch on this device (each ran out of a resource), or a forced variant cannot
    run these inputs. The dispatcher catches it and runs the reference."""


class KernelFallbackWarning(UserWarning):
    """A kernel config ran out of a device resource and the launch went on with the next one."""


def config_label(config: Any) -> str:
    """``128x256x64 w8 s3``: a config's block sizes, warps and stages (how ``vit-fast kernels`` and the shortlists
    name it)."""
    blocks = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK"))
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def _kernel_name(tuned: Any) -> str:
    fn = getattr(tuned, "fn", tuned)
    return getattr(fn, "__name__", str(fn))


def kept_configs(tuned: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The configs of ``tuned`` that its pruning keeps for these arguments, in list order."""
    prune = getattr(tuned, "early_config_prune", None)
    kept = prune(tuned.configs, dict(zip(tuned.arg_names, args, strict=False)), **kwargs) if prune else tuned.configs
    return list(kept)


def fixed_config(tuned: Any, args: tuple, kwargs: dict) -> Any:
    """The config a launch uses when not autotuning: the first of the tuning list that the kernel's pruning keeps
    for these arguments (so it fits the device's shared memory), without timing anything."""
    return kept_configs(tuned, args, kwargs)[0]


def _out_of_resources() -> type[Exception]:
    from triton.runtime.errors import OutOfResources

    return OutOfResources


def _launch_in_turn(tuned: Any, grid: Any, args: tuple, kwargs: dict, configs: list[Any]) -> None:
    """Launch the first of ``configs`` that fits the device: one that runs out of a resource warns and the next is
    tried; :class:`KernelLaunchError` when none fits."""
    named = {**dict(zip(tuned.arg_names, args, strict=False)), **kwargs}
    tried = []
    for config in configs:
        if getattr(config, "pre_hook", None) is not None:  # the TMA kernels size their descriptors' blocks here
            config.pre_hook({**named, **config.all_kwargs()})
        try:
            tuned.fn[grid](*args, **kwargs, **config.all_kwargs())
            return
        except _out_of_resources() as e:
            tried.append(f"{config_label(config)} ({e})")
            warnings.warn(f"vit_fast: {_kernel_name(tuned)} with config {config_label(config)} does not fit this "
                          f"device ({e}); trying the next config", KernelFallbackWarning, stacklevel=3)
    raise KernelLaunchError(f"vit_fast: no config of {_kernel_name(tuned)} fits this device; tried "
                            f"{'; '.join(tried) or 'none'}")


def launch(tuned: Any, grid: Any, args: tuple, kwargs: dict, *, fixed: Any = None) -> None:
    """Launch ``tuned`` (a ``triton.autotune`` kernel) on ``grid``.

    Autotuned when :func:`autotuning` allows it; otherwise the wrapped kernel runs with ``fixed`` (a
    ``triton.Config``, or a function ``(args, kwargs) -> Config``; default :func:`fixed_config`), and should it run
    out of a device resource, with the configs the pruning keeps after it, in turn (a warning for each that does
    not fit; :class:`KernelLaunchError` when none does). Inside CUDA-graph capture a key never tuned before runs
    the fixed config too: timing configs there would synchronize the capturing stream. Warm up (one eager call per
    shape) before capturing to get the tuned one.
    """
    named = {**dict(zip(tuned.arg_names, args, strict=False)), **kwargs}
    if autotuning():
        key = _tuning_key(tuned, named)
        if key in _TUNED or not _capturing(named):
            try:
                tuned[grid](*args, **kwargs)
            except _out_of_resources() as e:  # the config it tuned (or cached) does not fit: the configs in turn
                warnings.warn(f"vit_fast: {_kernel_name(tuned)}'s tuned config does not fit this device ({e}); "
                              "launching its configs in turn", KernelFallbackWarning, stacklevel=2)
            else:
                _TUNED.add(key)
                return
        else:
            name = _kernel_name(tuned)
            if name not in _WARNED_CAPTURE:
                _WARNED_CAPTURE.add(name)
                warnings.warn(f"vit_fast: {name} is launched inside CUDA-graph capture with a shape it was never "
                              "tuned for; the graph holds its fixed config. Run the model once before capturing to "
                              "record the tuned config.", stacklevel=3)
    kept = kept_configs(tuned, args, kwargs)
    first = kept[0] if fixed is None else fixed(args, kwargs) if callable(fixed) else fixed
    after = kept[kept.index(first) + 1:] if first in kept else [c for c in kept if c is not first]
    _launch_in_turn(tuned, grid, args, kwargs, [first, *after])


def _device_of(named: dict[str, Any]) -> torch.device | None:
    for value in named.values():
        base = getattr(value, "base", value)  # a tensor descriptor's tensor
        if isinstance(base, torch.Tensor):
            return base.device
    return None


def use_shortlist(*tuned: Any) -> None:
    """Cut each autotuned kernel's configs, on a CUDA device, to its architecture's shortlist for it
    (``kernels/shortlist.py``, written by ``vit-fast kernels --shortlist``): the 2-3 configs that compile there with
    no spills. Kept whole where the shortlist names none of the configs its pruning keeps, or lists no kernel of
    that architecture. Elsewhere (meta tensors in static checks, the interpreter) nothing changes."""
    for t in tuned:
        t.early_config_prune = _shortlisted(t.fn.__name__, t.early_config_prune)


def _shortlisted(name: str, prune: Callable | None) -> Callable:
    def run(configs: list[Any], named_args: dict, **kwargs: Any) -> list[Any]:
        kept = list(prune(configs, named_args, **kwargs)) if prune else list(configs)
        device = _device_of(named_args)
        if device is None or device.type != "cuda":
            return kept
        from vit_fast.kernels.shortlist import SHORTLIST

        major, minor = _capability(_index(device))
        allowed = SHORTLIST.get(f"sm_{major}{minor}", {}).get(name)
        return [c for c in kept if allowed is None or config_label(c) in allowed] or kept

    return run


# ---- kernel variants ---------------------------------------------------------------------------------------------

# family -> its implementations, the launchers' default first. "tma": tensor-descriptor (TMA) loads and stores,
# persistent tile loop (sm_90, triton with tensor descriptors, 16-byte aligned strides); "pointer": pointer loads
# (every GPU, the interpreter, any strides). The attention backward: "split", the deterministic dQ and dK/dV
# kernels; "fused", one kernel with dQ summed by fp32 atomics.
VARIANTS: dict[str, tuple[str, ...]] = {
    "gemm": ("tma", "pointer"),
    "scaled_gemm": ("tma", "pointer"),
    "attention_fwd": ("tma", "pointer"),
    "attention_bwd": ("split", "fused"),
}
ENV_VARIANT = "VIT_FAST_KERNEL_VARIANT"  # "attention_bwd=fused,gemm=pointer"
# (family, name) pairs, innermost last: immutable, so a context never sees another's changes
_FORCED: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar("vit_fast_kernel_variants",
                                                                                     default=())


def _check_variant(family: str, name: str, source: str) -> None:
    if family not in VARIANTS or name not in VARIANTS[family]:
        known = "; ".join(f"{f}: {', '.join(v)}" for f, v in VARIANTS.items())
        raise ValueError(f"{source}: unknown kernel variant {family}={name!r} (known: {known})")


def _env_variants() -> dict[str, str]:
    found = {}
    for item in filter(None, (p.strip() for p in os.environ.get(ENV_VARIANT, "").split(","))):
        family, _, name = item.partition("=")
        _check_variant(family.strip(), name.strip(), ENV_VARIANT)
        found[family.strip()] = name.strip()
    return found


def forced_variant(family: str) -> str | None:
    """The variant of ``family`` forced by :func:`use_variant` (innermost first) or ``$VIT_FAST_KERNEL_VARIANT``,
    or None: the launcher's default."""
    return dict(_FORCED.get()).get(family) or _env_variants().get(family)


@contextlib.contextmanager
def use_variant(family: str, name: str) -> Iterator[None]:
    """Launch ``family``'s variant ``name`` inside the block (``vit-fast tune`` times each variant this way). A
    forced variant that cannot run the inputs raises :class:`KernelLaunchError` with the reason."""
    _check_variant(family, name, "use_variant")
    token = _FORCED.set((*_FORCED.get(), (family, name)))
    try:
        yield
    finally:
        _FORCED.reset(token)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_programs(device: torch.device) -> int:
    """How many programs a persistent kernel launches on ``device``: one per SM (4 for CPU tensors under the
    interpreter: enough for each program to walk several tiles)."""
    return _sm_count(_index(device)) if device.type == "cuda" else 4


@functools.cache
def tma_api_missing() -> str | None:
    """Why this triton cannot build TMA kernels (no ``tl.make_tensor_descriptor`` or no host-side
    ``TensorDescriptor``: triton < 3.4), or None. Asked by feature, not by version."""
    import triton
    import triton.language as tl

    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError as e:
        return f"triton {triton.__version__} has no host-side TensorDescriptor ({e})"
    if not hasattr(tl, "make_tensor_descriptor"):
        return f"triton {triton.__version__} has no tl.make_tensor_descriptor"
    return None


def tma_device_reason(device: torch.device) -> str | None:
    """Why the TMA variants cannot run on ``device`` at all (API, GPU generation), or None. CPU tensors run them
    under the interpreter (its descriptor loads and stores are plain gathers)."""
    missing = tma_api_missing()
    if missing:
        return missing
    if device.type == "cuda":
        cap = _capability(_index(device))
        if cap < (9, 0):
            return f"TMA needs sm_90 or newer (this GPU is sm_{cap[0]}{cap[1]})"
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"TMA kernels need a CUDA device (or the interpreter), not {device.type}"


def tma_reason(*tensors: torch.Tensor) -> str | None:
    """Why the TMA variants cannot read or write ``tensors`` (the device, or a layout a tensor descriptor cannot
    describe: a last dim that is not contiguous, strides or a base not 16-byte aligned), or None."""
    why = tma_device_reason(tensors[0].device)
    if why:
        return why
    for t in tensors:
        if t.dim() < 2 or t.stride(-1) != 1:
            return f"a {tuple(t.shape)} tensor with strides {t.stride()}: TMA needs a contiguous last dim"
        if any(s * t.element_size() % 16 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            return (f"a {tuple(t.shape)} {t.dtype} tensor with strides {t.stride()}: TMA needs 16-byte aligned "
                    "strides and base")
    return None


def pick_variant(family: str, default: str, why_not: Callable[[str], str | None]) -> str:
    """The variant of ``family`` a launch runs: the forced one (raising :class:`KernelLaunchError` when
    ``why_not(name)`` gives a reason), else ``default`` when it can run, else the first that can."""
    forced = forced_variant(family)
    if forced is not None:
        why = why_not(forced)
        if why:
            raise KernelLaunchError(f"vit_fast: kernel variant {family}={forced} cannot run these inputs: {why}")
        return forced
    return next((v for v in (default, *VARIANTS[family]) if not why_not(v)), VARIANTS[family][-1])
