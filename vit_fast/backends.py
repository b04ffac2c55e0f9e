"""The one dispatch point: which implementation runs each op.

Backends: ``reference`` (pure PyTorch, runs everywhere), ``triton`` (kernels/), ``cuda`` (vit_fast._C), and
``auto``. For an op and its inputs every backend answers a list of reasons why it cannot run them; ``auto``
walks a per-device priority list and takes the first backend with none (``reference`` always qualifies). An
explicitly chosen backend that cannot run raises :class:`BackendUnavailableError` with all of its reasons.

Selection reads only module globals set at import (what is installed and built) and the inputs' device,
dtype and shapes, so under ``torch.compile`` it becomes guards, not graph breaks. Nothing here queries the
GPU at import time.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_map_only

BACKENDS: tuple[str, ...] = ("reference", "triton", "cuda")
CHOICES: tuple[str, ...] = ("auto", *BACKENDS)
OPS: tuple[str, ...] = ("attention", "layer_norm", "layernorm_mlp", "patch_embed")
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)

# auto's priority per device type. The CUDA C++ kernels join the CUDA list once they have passed the GPU
# tests on real hardware; on CPU the reference (PyTorch's own CPU kernels) is the fast path, the Triton
# interpreter is for testing only.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "reference"),
    "cpu": ("reference",),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly chosen backend cannot run an op on the given inputs."""


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op.

    ``check(*args, **kwargs)`` returns op-specific reasons (shapes, flags) why it cannot run these inputs;
    generic device/dtype/availability reasons are added by the dispatcher.
    """

    fn: Callable
    check: Callable[..., list[str]] | None = None


@dataclass(frozen=True)
class OpInfo:
    """What the dispatcher knows of an op: how to build example inputs for :func:`explain`."""

    example: Callable[[torch.dtype], tuple[tuple, dict]]
    impls: dict[str, Impl] = field(default_factory=dict)


_OPS: dict[str, OpInfo] = {}
_UNAVAILABLE: dict[str, str] = {}  # backend -> why it cannot run at all in this process


def _probe_environment() -> None:
    """Record, once at import, which backends can run at all. Cheap: no GPU query, no heavy import."""
    if importlib.util.find_spec("triton") is None:
        _UNAVAILABLE["triton"] = "triton is not installed (pip install triton)"
    try:
        importlib.import_module("vit_fast._C")  # registers torch.ops.vit_fast.* on load
    except ModuleNotFoundError:
        _UNAVAILABLE["cuda"] = "vit_fast._C not built (install with a CUDA toolkit present; see README)"
    except (ImportError, OSError) as e:
        _UNAVAILABLE["cuda"] = f"vit_fast._C failed to load: {e}"


def triton_interpreter() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_probe_environment()
_INTERPRET = triton_interpreter()


def _validate(name: str, source: str = "backend") -> str:
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(CHOICES)}; got {name!r}")
    return name


_ENV_BACKEND = os.environ.get("VIT_FAST_BACKEND", "").strip() or "auto"
_current: str = _ENV_BACKEND


def get_backend() -> str:
    """The backend name in force: set by :func:`set_backend`, else ``$VIT_FAST_BACKEND``, else ``auto``."""
    return _validate(_current, "VIT_FAST_BACKEND" if _current == _ENV_BACKEND else "backend")


class set_backend:
    """Choose the backend for every op: ``auto``, ``reference``, ``triton`` or ``cuda``.

    Works as a plain call (stays in force) and as a context manager (restores the previous one on exit)::

        vit_fast.set_backend("triton")
        with vit_fast.set_backend("reference"):
            ...
    """

    def __init__(self, name: str) -> None:
        global _current
        _validate(name)
        self.previous = _current
        self.name = name
        _current = name

    def __enter__(self) -> set_backend:
        return self

    def __exit__(self, *exc: object) -> None:
        global _current
        _current = self.previous

    def __repr__(self) -> str:
        return f"set_backend({self.name!r})"


def declare(op: str, example: Callable[[torch.dtype], tuple[tuple, dict]]) -> None:
    """Declare an op and how to build small example inputs (on the meta device) for :func:`explain`."""
    _OPS.setdefault(op, OpInfo(example=example))


def register(op: str, backend: str, check: Callable[..., list[str]] | None = None) -> Callable:
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")

    def deco(fn: Callable) -> Callable:
        _OPS[op].impls[backend] = Impl(fn, check)
        return fn

    return deco


def mark_unavailable(backend: str, why: str) -> None:
    """Record that ``backend`` cannot run at all here (for example its kernels failed to import)."""
    _UNAVAILABLE.setdefault(backend, why)


def _tensors(args: Sequence, kwargs: dict) -> list[torch.Tensor]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


def availability(backend: str, op: str) -> list[str]:
    """Reasons ``backend`` cannot run ``op`` at all in this process (not installed, not built, not written)."""
    if backend == "reference":
        return []
    if backend in _UNAVAILABLE:
        return [_UNAVAILABLE[backend]]
    if backend not in _OPS[op].impls:
        return [f"{op} is not implemented yet in the {backend} backend"]
    return []


def reasons(backend: str, op: str, args: Sequence, kwargs: dict, device: torch.device | None = None) -> list[str]:
    """Every reason why ``backend`` cannot run ``op`` on these inputs; empty when it can.

    ``device`` overrides the tensors' device (for explain()).
    """
    if backend == "reference":
        return []
    why = availability(backend, op)
    tensors = _tensors(args, kwargs)
    dev = device if device is not None else (tensors[0].device if tensors else torch.device("cpu"))
    if dev.type == "cpu" and backend == "triton":
        if not _INTERPRET:
            why.append("CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1 before import)")
        amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        if amp == torch.bfloat16 or any(t.dtype == torch.bfloat16 for t in tensors):
            why.append("bfloat16 on CPU: the Triton interpreter computes bfloat16 tl.dot wrongly (bf16 runs on a GPU)")
    elif dev.type != "cuda":
        why.append(f"device {dev.type} not supported (needs a CUDA device)")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors if t.dtype not in KERNEL_DTYPES})
    if dtypes:
        why.append(f"dtype {', '.join(dtypes)} not supported (float16, bfloat16, float32)")
    impl = _OPS[op].impls.get(backend)
    if impl is not None and impl.check is not None and not why:
        why.extend(impl.check(*args, **kwargs))
    return why


def select(op: str, *args, **kwargs) -> Callable:
    """The implementation of ``op`` that runs these inputs under the current backend."""
    name = get_backend()
    info = _OPS[op]
    if any(t.numel() == 0 for t in _tensors(args, kwargs)):
        return info.impls["reference"].fn  # empty inputs (B = 0): nothing to launch, the reference returns empty
    if name == "auto":
        dev = next((t.device for t in _tensors(args, kwargs)), torch.device("cpu"))
        for candidate in AUTO_ORDER.get(dev.type, ()):
            if not reasons(candidate, op, args, kwargs):
                return info.impls[candidate].fn
        return info.impls["reference"].fn
    why = reasons(name, op, args, kwargs)
    if why:
        raise BackendUnavailableError(f"backend {name!r} cannot run {op} on these inputs: " + "; ".join(why))
    return info.impls[name].fn


@dataclass
class Explanation:
    """What :func:`explain` found: one row per (op, backend), and ``auto``'s pick per op."""

    device: str
    dtype: str
    backend: str
    rows: list[dict]
    picked: dict[str, str]

    def __str__(self) -> str:
        lines = [f"device {self.device}, dtype {self.dtype}, backend setting {self.backend!r}"]
        w_op = max(len(op) for op in self.picked)
        lines.append(f"{'op':<{w_op}}  {'backend':<9}  {'runs':<4}  why not")
        for r in self.rows:
            mark = "yes" if r["available"] else "no"
            pick = "  <- picked" if self.picked[r["op"]] == r["backend"] else ""
            detail = "; ".join(r["reasons"]) or (f"- ({r['note']})" if r["note"] else "-")
            lines.append(f"{r['op']:<{w_op}}  {r['backend']:<9}  {mark:<4}  {detail}{pick}")
        return "\n".join(lines)

    __repr__ = __str__


def explain(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Explanation:
    """Per op and backend: can it run, why not, and which one the current setting picks.

    ``device`` defaults to ``cuda`` when a GPU is visible, else ``cpu``; ``dtype`` to bfloat16 on CUDA and
    float32 on CPU. The examples are ViT-B/16-sized inputs.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    setting = get_backend()
    usable = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())
    rows, picked = [], {}
    for op, info in _OPS.items():
        args, kwargs = info.example(dtype)
        if usable:  # the op checks see tensors on the real device (uninitialized: nothing is computed)
            args, kwargs = tree_map_only(
                torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device=device), (args, kwargs)
            )
        per_backend = {}
        for backend in BACKENDS:
            if usable or backend == "reference":
                why = reasons(backend, op, args, kwargs, device=device)
            else:
                why = ["no CUDA device visible" if device.type == "cuda" else f"device {device.type} not supported"]
                why += availability(backend, op)
            per_backend[backend] = why
            note = "Triton interpreter: slow, for tests" if backend == "triton" and device.type == "cpu" else ""
            rows.append({"op": op, "backend": backend, "available": not why, "reasons": why, "note": note})
        if setting == "auto":
            order = AUTO_ORDER.get(device.type, ())
            picked[op] = next((b for b in order if not per_backend[b]), "reference")
        else:
            picked[op] = setting if not per_backend[setting] else "(raises)"
    return Explanation(str(device), str(dtype).replace("torch.", ""), setting, rows, picked)
