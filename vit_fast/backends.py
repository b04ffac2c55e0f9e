"""The one dispatch point: which implementation runs each op.

Backends: ``reference`` (pure PyTorch, runs everywhere), ``triton`` (kernels/), ``cuda`` (vit_fast._C), and
``auto``. Each kernel backend declares, per op, its :class:`Limits` as data; from them and the inputs it
answers a list of reasons why it cannot run them. :func:`pick` is the one function that chooses: on CUDA
``auto`` follows the device's measured policy (:mod:`vit_fast.policy`: per op, dtype, mode and shape bucket, the
backends verified and timed faster than the reference, fastest first) and takes the first with no reason;
unmeasured means the reference, and so does every other device. An explicitly chosen backend that cannot run
raises :class:`BackendUnavailableError` with every reason.
:func:`explain` reports what :func:`pick` chose, for example inputs or for a model on real inputs.

Selection reads only module globals set at import (what is installed and built), the policy read once per
device at its first pick, and the inputs' device, dtype, shapes and whether they need gradients, so under
``torch.compile`` it becomes guards, not graph breaks. Nothing here queries the GPU at import time.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from vit_fast import policy

BACKENDS: tuple[str, ...] = ("reference", "triton", "cuda")
CHOICES: tuple[str, ...] = ("auto", *BACKENDS)
HALF: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
FLOATS: tuple[torch.dtype, ...] = (*HALF, torch.float32)

# auto follows a policy on CUDA only: on CPU the reference (PyTorch's CPU kernels) is the fast path, the Triton
# interpreter a test tool.
POLICY_DEVICES: tuple[str, ...] = ("cuda",)


RAISES = "(raises)"  # what explain() reports as the pick where the backend set explicitly cannot run


class BackendUnavailableError(RuntimeError):
    """An explicitly chosen backend cannot run an op on the given inputs."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``: how messages and result files name a dtype."""
    return str(dtype).replace("torch.", "")


# ---- limits as data -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What an op's inputs tell the limits: read once per call by the op's ``facts`` function."""

    gemm_dtype: torch.dtype | None = None  # the dtype its matmuls run in (autocast's when it is on)
    head_dim: int | None = None
    width: int | None = None  # the row length a row-wise kernel holds (LayerNorm's C)
    dropout_p: float = 0.0
    mismatch: tuple[str, ...] = ()  # the op's own reasons no kernel takes (mixed dtypes outside autocast, ...)


@dataclass(frozen=True)
class Limits:
    """What one backend's kernels for one op can run. The reasons it refuses inputs are made from these."""

    devices: tuple[str, ...] = ("cuda",)
    dtypes: tuple[torch.dtype, ...] = FLOATS  # of every tensor argument
    gemm_dtypes: tuple[torch.dtype, ...] | None = None  # None: the matmuls may run in any of ``dtypes``
    head_dims: Collection[int] | None = None
    max_width: int | None = None
    width_note: str = ""
    dropout: bool = False
    min_capability: tuple[int, int] = (8, 0)
    # None: auto may pick the backend for any GEMM dtype it runs. Else auto passes it over for the others, which
    # an explicit set_backend still runs (the Triton kernels' fp32 tl.dot is IEEE FMA work, off the tensor cores).
    auto_gemm_dtypes: tuple[torch.dtype, ...] | None = None

    def auto_reasons(self, facts: Facts) -> list[str]:
        """Why ``auto`` passes this backend over for inputs it can run."""
        if self.auto_gemm_dtypes is None or facts.gemm_dtype is None or facts.gemm_dtype in self.auto_gemm_dtypes:
            return []
        allowed = ", ".join(map(dtype_name, self.auto_gemm_dtypes))
        return [f"auto: GEMM dtype {dtype_name(facts.gemm_dtype)} is left to the reference (auto picks this "
                f"backend for {allowed}; set_backend runs it)"]

    def reasons(self, facts: Facts, device: torch.device, dtypes: set[torch.dtype]) -> list[str]:
        why = []
        if device.type not in self.devices:
            why.append(f"device {device.type} not supported (needs {' or '.join(self.devices)})")
        elif device.type == "cuda" and torch.cuda.is_available():
            cap = capability(device.index if device.index is not None else torch.cuda.current_device())
            if cap < self.min_capability:
                need = ".".join(map(str, self.min_capability))
                why.append(f"compute capability {cap[0]}.{cap[1]} < {need}")
        bad = sorted(dtype_name(d) for d in dtypes if d not in self.dtypes)
        if bad:
            why.append(f"dtype {', '.join(bad)} not supported ({', '.join(map(dtype_name, self.dtypes))})")
        if self.gemm_dtypes is not None and facts.gemm_dtype is not None and facts.gemm_dtype not in self.gemm_dtypes:
            allowed = ", ".join(map(dtype_name, self.gemm_dtypes))
            why.append(f"GEMM dtype {dtype_name(facts.gemm_dtype)} not supported (tensor-core kernels: {allowed})")
        if self.head_dims is not None and facts.head_dim is not None and facts.head_dim not in self.head_dims:
            if isinstance(self.head_dims, range):
                allowed = f"{self.head_dims.start}..{self.head_dims.stop - 1}"
            else:
                allowed = ", ".join(map(str, self.head_dims))
            why.append(f"head dim {facts.head_dim} not supported ({allowed})")
        if self.max_width is not None and facts.width is not None and facts.width > self.max_width:
            note = f" ({self.width_note})" if self.width_note else ""
            why.append(f"width C = {facts.width} > {self.max_width}{note}")
        if facts.dropout_p > 0 and not self.dropout:
            why.append("dropout_p > 0 not supported")
        return why + list(facts.mismatch)


_CAPABILITY: dict[int, tuple[int, int]] = {}  # asked once per device, at the first pick on it, never at import


def capability(index: int) -> tuple[int, int]:
    """The compute capability of CUDA device ``index``, as the limits read it. Tests replace this function
    (monkeypatch) to fake a GPU's capability without one."""
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


# ---- the registry ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op: the public-signature function and its limits (None for the
    reference, which runs everything)."""

    fn: Callable
    limits: Limits | None = None


@dataclass
class OpInfo:
    """What the dispatcher knows of an op: how to read its inputs' facts, example inputs for :func:`explain`,
    the shape bucket a policy measures it in, and its implementations by backend. ``variants``: other entry points
    of the same computation (attention on a packed qkv tensor), by name then backend; the op's own limits, policy
    and pick choose the backend for them."""

    facts: Callable[..., Facts]
    example: Callable[[torch.dtype], tuple[tuple, dict]]
    bucket: Callable[..., tuple[int, ...]]
    impls: dict[str, Impl] = field(default_factory=dict)
    variants: dict[str, dict[str, Callable]] = field(default_factory=dict)


_OPS: dict[str, OpInfo] = {}
_UNAVAILABLE: dict[str, str] = {}  # backend -> why it cannot run at all in this process


def triton_interpreter() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The oldest triton the kernels are written for: pyproject's ``triton`` extra says the same (tests/test_dispatch.py
# holds them equal). torch >= 2.5 may bring an older one with it (torch 2.5-2.7 pin triton 3.1-3.3), so the extra
# alone does not keep it out: below the floor the backend is a reason, not a launch on a triton never tested.
TRITON_FLOOR: tuple[int, int] = (3, 4)


def triton_too_old() -> str | None:
    """Why the installed triton is below :data:`TRITON_FLOOR`, or None (also when its version is not known: a
    build under another distribution name, such as pytorch-triton, is not second-guessed)."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None
    release = re.match(r"(\d+)\.(\d+)", version)
    if release is None or tuple(map(int, release.groups())) >= TRITON_FLOOR:
        return None
    floor = ".".join(map(str, TRITON_FLOOR))
    return f"triton {version} is older than {floor}, vit_fast's floor for its kernels (pip install 'triton>={floor}')"


def _probe_environment() -> None:
    """Record, once at import, which backends can run at all. Cheap: no GPU query, no heavy import."""
    if importlib.util.find_spec("triton") is None:
        _UNAVAILABLE["triton"] = "triton is not installed (pip install triton)"
    elif (old := triton_too_old()) is not None:
        _UNAVAILABLE["triton"] = old
    try:
        importlib.import_module("vit_fast._C")  # registers torch.ops.vit_fast.* on load
    except ModuleNotFoundError:
        _UNAVAILABLE["cuda"] = "vit_fast._C not built (install with a CUDA toolkit present; see README)"
    except (ImportError, OSError) as e:
        _UNAVAILABLE["cuda"] = f"vit_fast._C failed to load: {e}"


_probe_environment()
_INTERPRET = triton_interpreter()


def declare(op: str, reference: Callable, facts: Callable[..., Facts],
            example: Callable[[torch.dtype], tuple[tuple, dict]], bucket: Callable[..., tuple[int, ...]]) -> None:
    """Declare an op: its reference implementation, how to read the facts the limits look at from its
    arguments, small example inputs (on the meta device) for :func:`explain`, and its policy bucket: from the
    shapes only, the sizes that decide which kernel is fastest, coarsened by :func:`size_bucket`, the
    batch-like size (rows, batch x heads) last."""
    _OPS[op] = OpInfo(facts=facts, example=example, bucket=bucket, impls={"reference": Impl(reference)})


def size_bucket(n: int) -> int:
    """``n`` rounded up to a power of two (int(): a symbolic size under torch.compile specializes: the choice
    depends on it)."""
    return 1 if int(n) <= 1 else 1 << (int(n) - 1).bit_length()


def bucket(op: str, args: Sequence, kwargs: dict) -> tuple[int, ...]:
    """``op``'s shape bucket for these inputs (see :func:`declare`)."""
    return tuple(int(b) for b in _OPS[op].bucket(*args, **kwargs))


def register(op: str, backend: str, fn: Callable | None, limits: Limits) -> None:
    """Register ``fn`` (the op's public signature) as ``backend``'s implementation of ``op``; ``fn`` is None
    for a backend whose kernels are not there (not built): its limits still explain what it could run."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS[1:])}; got {backend!r}")
    _OPS[op].impls[backend] = Impl(fn, limits)


def register_variant(op: str, variant: str, backend: str, fn: Callable) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``'s entry point ``variant`` (``reference`` for the
    reference): called where :func:`dispatch_variant` picks ``backend`` for ``op``."""
    _OPS[op].variants.setdefault(variant, {})[backend] = fn


def mark_unavailable(backend: str, why: str) -> None:
    """Record that ``backend`` cannot run at all here (for example its kernels failed to import)."""
    _UNAVAILABLE.setdefault(backend, why)


def ops() -> tuple[str, ...]:
    """Every declared op, in declaration order."""
    return tuple(_OPS)


def variants(op: str) -> tuple[str, ...]:
    """``op``'s other entry points (:func:`register_variant`), in registration order."""
    return tuple(_OPS[op].variants)


def implemented(op: str) -> tuple[str, ...]:
    """The backends that have an implementation of ``op`` in this process, ``reference`` first."""
    return tuple(b for b in BACKENDS if b in _OPS[op].impls and _OPS[op].impls[b].fn is not None)


def unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run at all in this process (not installed, not built), or None."""
    return _UNAVAILABLE.get(backend)


def example(op: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    """ViT-B-sized example arguments of ``op`` on the meta device (what ``explain()`` shows without a model)."""
    return _OPS[op].example(dtype)


def limits(op: str, backend: str) -> Limits | None:
    """``backend``'s declared limits for ``op`` (None for the reference or an unimplemented backend)."""
    impl = _OPS[op].impls.get(backend)
    return None if impl is None else impl.limits


# ---- the backend setting --------------------------------------------------------------------------------------


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


# ---- reasons and the pick -------------------------------------------------------------------------------------


def _tensors(args: Sequence, kwargs: dict) -> list[torch.Tensor]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


def _interpreter_bf16_dot_ok() -> bool:
    """Whether the interpreter multiplies bf16 ``tl.dot`` operands as numbers (the test suite corrects it)."""
    return importlib.import_module("vit_fast.kernels").interpreter_bf16_dot_ok()


def _backend_reasons(backend: str, device: torch.device, tensors: Sequence[torch.Tensor]) -> list[str]:
    """Reasons that belong to the backend rather than to one op's kernels."""
    why = []
    if backend in ("triton", "cuda") and torch.version.hip:
        why.append(f"ROCm build of torch (HIP {torch.version.hip}): the {backend} kernels are not tested on ROCm yet")
    if backend != "triton" or device.type != "cpu":
        return why
    if not _INTERPRET:
        why.append("CPU tensors run only under the Triton interpreter (set TRITON_INTERPRET=1 before import)")
    amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    bf16 = amp == torch.bfloat16 or any(t.dtype == torch.bfloat16 for t in tensors)
    if bf16 and "triton" not in _UNAVAILABLE and not _interpreter_bf16_dot_ok():
        why.append("bfloat16 on CPU: the Triton interpreter computes bfloat16 tl.dot wrongly (bf16 runs on a GPU)")
    return why


def reasons(backend: str, op: str, args: Sequence, kwargs: dict, device: torch.device | None = None) -> list[str]:
    """Every reason why ``backend`` cannot run ``op`` on these inputs; empty when it can.

    ``device`` overrides the tensors' device (for :func:`explain`).
    """
    tensors = _tensors(args, kwargs)
    dev = device if device is not None else (tensors[0].device if tensors else torch.device("cpu"))
    return _reasons(backend, op, tensors, dev, lambda: _OPS[op].facts(*args, **kwargs))


def _reasons(backend: str, op: str, tensors: Sequence[torch.Tensor], dev: torch.device,
             facts: Callable[[], Facts]) -> list[str]:
    """:func:`reasons` with the op's facts read on demand, so that :func:`pick` reads them once per call."""
    impl = _OPS[op].impls.get(backend)
    if backend == "reference":
        return []
    if impl is None:
        return [f"{op} is not implemented in the {backend} backend"]
    why = [_UNAVAILABLE[backend]] if backend in _UNAVAILABLE else []
    why += _backend_reasons(backend, dev, tensors)
    return why + impl.limits.reasons(facts(), dev, {t.dtype for t in tensors})


@dataclass(frozen=True)
class Pick:
    """What :func:`pick` chose for one call: the backend, its function, and every backend's reasons."""

    op: str
    backend: str
    fn: Callable
    reasons: dict[str, list[str]]
    why: str  # "auto on cuda: policy ...: triton measured 1.31x the reference ...", "set_backend('triton')"
    speedups: dict[str, float] = field(default_factory=dict)  # the policy's measured speedup over the reference


def policy_key(op: str, args: Sequence, kwargs: dict, facts: Facts | None = None) -> tuple[str, str, tuple[int, ...]]:
    """``(dtype, mode, bucket)`` under which a policy records ``op`` on these inputs: the dtype its matmuls run
    in (autocast's when on), ``fwd+bwd`` when a gradient will be wanted, else ``fwd``, and its shape bucket.
    ``facts``: the op's facts for these inputs when the caller has them already."""
    tensors = _tensors(args, kwargs)
    facts = _OPS[op].facts(*args, **kwargs) if facts is None else facts
    dtype = facts.gemm_dtype or tensors[0].dtype
    mode = "fwd+bwd" if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) else "fwd"
    return dtype_name(dtype), mode, bucket(op, args, kwargs)


def _auto(op: str, args: Sequence, kwargs: dict, dev: torch.device, why_not: Callable[[str], list[str]],
          facts: Callable[[], Facts], full: bool) -> tuple[str, str, dict[str, float]]:
    """``(backend, why, speedups)``: on CUDA the first backend of the policy's order that runs; elsewhere the
    reference (explain(), ``full``, also shows a tuned policy's record)."""
    if dev.type not in POLICY_DEVICES:
        if not full or policy.found(dev).policy is None:
            return "reference", f"auto on {dev.type}: the reference", {}
        _, gains, because = policy.choose(dev.type, dev.index, op, *policy_key(op, args, kwargs, facts()))
        return "reference", f"auto on {dev.type}: the reference ({because})", dict(gains)
    order, gains, because = policy.choose(dev.type, dev.index, op, *policy_key(op, args, kwargs, facts()))
    runs = lambda b: b == "reference" or not (why_not(b) or limits(op, b).auto_reasons(facts()))
    chosen = next((b for b in order if runs(b)), "reference")
    if chosen != order[0]:
        because += f"; {', '.join(order[: order.index(chosen)])} passed over for these inputs (see why not): {chosen}"
    return chosen, f"auto on {dev.type}: {because}", dict(gains)


def pick(op: str, args: Sequence, kwargs: dict, *, setting: str | None = None,
         device: torch.device | None = None, full: bool = True) -> Pick:
    """The one choice of implementation for ``op`` on these inputs under ``setting`` (default: the current
    backend). Raises :class:`BackendUnavailableError` with every reason when an explicit choice cannot run.

    ``full=False`` asks only the backends the choice needs (the per-call path); ``Pick.reasons`` then holds
    those alone.
    """
    name = get_backend() if setting is None else _validate(setting)
    info = _OPS[op]
    tensors = _tensors(args, kwargs)
    dev = device if device is not None else (tensors[0].device if tensors else torch.device("cpu"))
    why: dict[str, list[str]] = {}
    known: list[Facts] = []  # the op's facts, read at most once per call (the per-call path runs this)

    def facts() -> Facts:
        if not known:
            known.append(info.facts(*args, **kwargs))
        return known[0]

    def why_not(backend: str) -> list[str]:
        if backend not in why:
            why[backend] = _reasons(backend, op, tensors, dev, facts)
        return why[backend]

    if full:
        for b in BACKENDS:
            why_not(b)
    if any(t.numel() == 0 for t in tensors):  # nothing to launch: the reference returns the empty result
        return Pick(op, "reference", info.impls["reference"].fn, why, "empty input: nothing to compute")
    if name == "auto":
        chosen, because, gains = _auto(op, args, kwargs, dev, why_not, facts, full)
        return Pick(op, chosen, info.impls[chosen].fn, why, because, gains)
    if why_not(name):
        raise BackendUnavailableError(f"backend {name!r} cannot run {op} on these inputs: " + "; ".join(why[name]))
    return Pick(op, name, info.impls[name].fn, why, f"set_backend({name!r})")


# ---- launch records: which backend really ran -----------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """One run of an op's implementation: ``phase`` is ``fwd`` or ``bwd``."""

    op: str
    backend: str
    phase: str


_recorders: list[list[Launch]] = []
_explainers: list[Callable[[Pick], None]] = []


def record(op: str, backend: str, phase: str) -> None:
    """Called by the implementations when they run (kernel ops from inside the custom op, so compiled
    graphs record too)."""
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


def _choose(op: str, args: Sequence, kwargs: dict) -> Pick:
    try:
        chosen = pick(op, args, kwargs, full=bool(_explainers))
    except BackendUnavailableError:
        if not _explainers:
            raise
        # explain(model, images) goes on through the reference to report every layer
        why = {b: reasons(b, op, args, kwargs) for b in BACKENDS}
        chosen = Pick(op, RAISES, _OPS[op].impls["reference"].fn, why, "the backend set cannot run these inputs")
    for observe in _explainers:
        observe(chosen)
    if chosen.backend == "reference":
        record(op, "reference", "fwd")
    return chosen


def dispatch(op: str, *args, **kwargs):
    """Run ``op`` on its chosen implementation: what every public op calls."""
    return _choose(op, args, kwargs).fn(*args, **kwargs)


def dispatch_variant(op: str, variant: str, pick_args: Sequence, pick_kwargs: dict, *args, **kwargs):
    """Run ``op``'s entry point ``variant`` on ``args``: the backend is the one :func:`dispatch` would choose for
    ``op`` on ``pick_args`` and ``pick_kwargs`` (the op's own arguments, the same computation)."""
    chosen = _choose(op, pick_args, pick_kwargs).backend
    return _OPS[op].variants[variant]["reference" if chosen == RAISES else chosen](*args, **kwargs)


@contextlib.contextmanager
def observe(callback: Callable[[Pick], None]) -> Iterator[None]:
    """Call ``callback`` with every :class:`Pick` that :func:`dispatch` makes inside the block (for
    :func:`vit_fast.explain` on a model). While anything observes, an explicit backend that cannot run an
    op is reported as ``RAISES`` and the reference computes it, so every layer can be reported."""
    _explainers.append(callback)
    try:
        yield
    finally:
        _explainers.remove(callback)
