"""The one dispatch point: which implementation runs each op.

Backends: ``reference`` (pure PyTorch, runs everywhere), ``triton`` (kernels/), ``cuda`` (vit_fast._C), and
``auto``. The dispatcher holds each op's spec (:class:`vit_fast.ops.spec.OpSpec`, declared once in the op's
module) and each kernel backend's forward custom op and :class:`Limits`, declared as data; from the limits and the
inputs a backend answers a list of reasons why it cannot run them. :func:`pick` is the one function that chooses:
on CUDA ``auto`` follows the device's measured policy (:mod:`vit_fast.policy`: per op, dtype, mode and shape
bucket, the backends verified and timed faster than the reference, fastest first) and takes the first with no
reason; unmeasured means the reference, and so does every other device. An explicitly chosen backend that cannot
run raises :class:`BackendUnavailableError` with every reason. :func:`explain` reports what :func:`pick` chose.

The call path is one hop: the op's public function checks its arguments and makes a :class:`Call`,
:func:`dispatch` picks (cached per op, setting, device, dtypes, grad mode, facts, shape bucket, autocast and the
policy in force) and calls the chosen implementation: the reference, or the kernel backend's ``torch.ops``
custom op, whose body is the Triton launcher (or the extension's C++ kernel).

The setting is :func:`set_backend` (the process default), :func:`use_backend` (this thread or asyncio task only,
over the default) and ``$VIT_FAST_BACKEND``. Selection reads only what is installed and built (probed at import),
the policy read once per device at its first pick, the setting, and the inputs' device, dtype, shapes and whether
they need gradients, so under ``torch.compile`` it becomes guards, not graph breaks. Nothing here queries the GPU
at import time.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import torch

from vit_fast import policy
from vit_fast.kernels import KernelFallbackWarning, KernelLaunchError
from vit_fast.launches import Launch, record, trace  # noqa: F401 - part of the dispatcher's interface
from vit_fast.setting import CHOICES, get_backend, set_backend, use_backend, validate  # noqa: F401 - as above

BACKENDS: tuple[str, ...] = ("reference", "triton", "cuda")
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


# ---- the registry ----------------------------------------------------------------------------------------------


class Call(NamedTuple):
    """One call of an op as the dispatcher runs it, made by the op's public function from the user's arguments
    (defaults filled in, autocast's casts applied, the way custom ops need them):

    - ``args``: the kernel forward schema's leading arguments, which the reference takes positionally too;
    - ``kernel``: the schema's trailing arguments that only kernels take (a flag saying the backward will come);
    - ``extras``: keyword arguments only the reference takes (``dropout_p``): every kernel's limits refuse
      anything but their default, so a kernel never needs them.
    """

    args: tuple
    kernel: tuple = ()
    extras: Mapping[str, object] = MappingProxyType({})


@dataclass(frozen=True)
class Impl:
    """One kernel backend's implementation of one op: the forward custom op (None: its kernels are not there, not
    built), its limits, and whether the op records its own launches (Python custom ops do, from inside)."""

    fn: Callable | None
    limits: Limits
    records: bool = True


@dataclass
class OpInfo:
    """What the dispatcher holds of an op: its spec (:class:`vit_fast.ops.spec.OpSpec`: the reference, how to read
    the facts the limits look at, the policy bucket, the kernel contract) and its kernel implementations."""

    spec: object
    impls: dict[str, Impl] = field(default_factory=dict)


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


def declare(spec: object) -> None:
    """Declare an op (its :class:`vit_fast.ops.spec.OpSpec`), under ``spec.name``. Declaring a name again replaces
    the op and its backends (a test's toy op)."""
    _OPS[spec.name] = OpInfo(spec)
    _PICKS.clear()


def size_bucket(n: int) -> int:
    """``n`` rounded up to a power of two (int(): a symbolic size under torch.compile specializes: the choice
    depends on it)."""
    return 1 if int(n) <= 1 else 1 << (int(n) - 1).bit_length()


def call_of(op: str, args: Sequence, kwargs: dict) -> Call:
    """The :class:`Call` the op's public function makes of these (public) arguments."""
    return _OPS[op].spec.call(*args, **kwargs)


def bucket(op: str, args: Sequence, kwargs: dict) -> tuple[int, ...]:
    """``op``'s policy bucket for these (public) arguments: the sizes that decide which kernel is fastest,
    coarsened by :func:`size_bucket`, the batch-like size last."""
    return _bucket_of(_OPS[op].spec, call_of(op, args, kwargs))


def _bucket_of(spec: object, call: Call) -> tuple[int, ...]:
    return tuple(int(b) for b in spec.bucket(call))


def register(op: str, backend: str, fn: Callable | None, limits: Limits, *, records: bool = True) -> None:
    """Register ``fn`` (the forward custom op, taking ``Call.args + Call.kernel``) as ``backend``'s implementation
    of ``op``; ``fn`` is None for a backend whose kernels are not there (not built): its limits still explain
    what it could run. ``records``: whether ``fn`` records its launches itself (see :func:`record`)."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS[1:])}; got {backend!r}")
    _OPS[op].impls[backend] = Impl(fn, limits, records)
    _PICKS.clear()


def mark_unavailable(backend: str, why: str) -> None:
    """Record that ``backend`` cannot run at all here (for example its kernels failed to import)."""
    _UNAVAILABLE.setdefault(backend, why)
    _PICKS.clear()


def ops() -> tuple[str, ...]:
    """Every declared op, in declaration order."""
    return tuple(_OPS)


def spec(op: str) -> object:
    """``op``'s :class:`vit_fast.ops.spec.OpSpec`."""
    return _OPS[op].spec


def implemented(op: str) -> tuple[str, ...]:
    """The backends that have an implementation of ``op`` in this process, ``reference`` first."""
    impls = _OPS[op].impls
    return ("reference", *(b for b in BACKENDS[1:] if b in impls and impls[b].fn is not None))


def unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run at all in this process (not installed, not built), or None."""
    return _UNAVAILABLE.get(backend)


def example(op: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    """ViT-B-sized example (public) arguments of ``op`` on the meta device (what ``explain()`` shows without a
    model)."""
    return _OPS[op].spec.example(dtype)


def limits(op: str, backend: str) -> Limits | None:
    """``backend``'s declared limits for ``op`` (None for the reference or an unimplemented backend)."""
    impl = _OPS[op].impls.get(backend)
    return None if impl is None else impl.limits


# ---- reasons and the pick -------------------------------------------------------------------------------------


def _tensors(args: Sequence, kwargs: Mapping) -> list[torch.Tensor]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


def _call_tensors(call: Call) -> list[torch.Tensor]:
    return [a for a in (*call.args, *call.kernel, *call.extras.values()) if isinstance(a, torch.Tensor)]


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
    bf16 = any(t.dtype == torch.bfloat16 for t in tensors)
    if bf16 and "triton" not in _UNAVAILABLE and not _interpreter_bf16_dot_ok():
        why.append("bfloat16 on CPU: the Triton interpreter computes bfloat16 tl.dot wrongly (bf16 runs on a GPU)")
    return why


def _device_of(tensors: Sequence[torch.Tensor], device: torch.device | None) -> torch.device:
    return device if device is not None else (tensors[0].device if tensors else torch.device("cpu"))


def reasons(backend: str, op: str, args: Sequence, kwargs: dict, device: torch.device | None = None) -> list[str]:
    """Every reason why ``backend`` cannot run ``op`` on these (public) arguments; empty when it can.

    ``device`` overrides the tensors' device (for :func:`explain`).
    """
    call = call_of(op, args, kwargs)
    tensors = _call_tensors(call)
    return _reasons(backend, op, tensors, _device_of(tensors, device), lambda: _OPS[op].spec.facts(call))


def _reasons(backend: str, op: str, tensors: Sequence[torch.Tensor], dev: torch.device,
             facts: Callable[[], Facts]) -> list[str]:
    """:func:`reasons` with the op's facts read on demand, so that a pick reads them once per call."""
    if backend == "reference":
        return []
    impl = _OPS[op].impls.get(backend)
    if impl is None:
        return [f"{op} is not implemented in the {backend} backend"]
    why = [_UNAVAILABLE[backend]] if backend in _UNAVAILABLE else []
    why += _backend_reasons(backend, dev, tensors)
    return why + impl.limits.reasons(facts(), dev, {t.dtype for t in tensors})


@dataclass(frozen=True)
class Pick:
    """What the dispatcher chose for one call: the backend and every backend's reasons."""

    op: str
    backend: str
    reasons: dict[str, list[str]]
    why: str  # "auto on cuda: policy ...: triton measured 1.31x the reference ...", "set_backend('triton')"
    speedups: dict[str, float] = field(default_factory=dict)  # the policy's measured speedup over the reference


def _mode(tensors: Sequence[torch.Tensor]) -> str:
    return "fwd+bwd" if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) else "fwd"


def _policy_key(spec: object, call: Call, tensors: Sequence[torch.Tensor],
                facts: Facts) -> tuple[str, str, tuple[int, ...]]:
    dtype = facts.gemm_dtype or tensors[0].dtype
    return dtype_name(dtype), _mode(tensors), _bucket_of(spec, call)


def policy_key(op: str, args: Sequence, kwargs: dict) -> tuple[str, str, tuple[int, ...]]:
    """``(dtype, mode, bucket)`` under which a policy records ``op`` on these (public) arguments: the dtype its
    matmuls run in (autocast's when on), ``fwd+bwd`` when a gradient will be wanted, else ``fwd``, and its shape
    bucket."""
    info = _OPS[op]
    call = info.spec.call(*args, **kwargs)
    return _policy_key(info.spec, call, _call_tensors(call), info.spec.facts(call))


def _auto(op: str, call: Call, tensors: Sequence[torch.Tensor], dev: torch.device,
          why_not: Callable[[str], list[str]], facts: Callable[[], Facts],
          full: bool) -> tuple[str, str, dict[str, float]]:
    """``(backend, why, speedups)``: on CUDA the first backend of the policy's order that runs; elsewhere the
    reference (explain(), ``full``, also shows a tuned policy's record)."""
    spec = _OPS[op].spec
    measured_as = spec.policy_op or op
    if dev.type not in POLICY_DEVICES:
        if not full or policy.found(dev).policy is None:
            return "reference", f"auto on {dev.type}: the reference", {}
        _, gains, because = policy.choose(dev.type, dev.index, measured_as, *_policy_key(spec, call, tensors, facts()))
        return "reference", f"auto on {dev.type}: the reference ({because})", dict(gains)
    # under torch.compile the policy's compiled verdict: the kernels that beat inductor's code for the op
    order, gains, because = policy.choose(dev.type, dev.index, measured_as, *_policy_key(spec, call, tensors, facts()),
                                          compiled=torch.compiler.is_compiling())
    runs = lambda b: b == "reference" or not (why_not(b) or limits(op, b).auto_reasons(facts()))
    chosen = next((b for b in order if runs(b)), "reference")
    if chosen != order[0]:
        because += f"; {', '.join(order[: order.index(chosen)])} passed over for these inputs (see why not): {chosen}"
    return chosen, f"auto on {dev.type}: {because}", dict(gains)


def _pick(op: str, call: Call, name: str, device: torch.device | None, full: bool) -> Pick:
    info = _OPS[op]
    tensors = _call_tensors(call)
    dev = _device_of(tensors, device)
    why: dict[str, list[str]] = {}
    known: list[Facts] = []  # the op's facts, read at most once per pick

    def facts() -> Facts:
        if not known:
            known.append(info.spec.facts(call))
        return known[0]

    def why_not(backend: str) -> list[str]:
        if backend not in why:
            why[backend] = _reasons(backend, op, tensors, dev, facts)
        return why[backend]

    if full:
        for b in BACKENDS:
            why_not(b)
    if any(t.numel() == 0 for t in tensors):  # nothing to launch: the reference returns the empty result
        return Pick(op, "reference", why, "empty input: nothing to compute")
    if name == "auto":
        chosen, because, gains = _auto(op, call, tensors, dev, why_not, facts, full)
        return Pick(op, chosen, why, because, gains)
    if why_not(name):
        raise BackendUnavailableError(f"backend {name!r} cannot run {op} on these inputs: " + "; ".join(why[name]))
    return Pick(op, name, why, f"set_backend({name!r})")


def pick(op: str, args: Sequence, kwargs: dict, *, setting: str | None = None,
         device: torch.device | None = None, full: bool = True) -> Pick:
    """The one choice of implementation for ``op`` on these (public) arguments under ``setting`` (default: the
    backend in force). Raises :class:`BackendUnavailableError` with every reason when an explicit choice cannot
    run.

    ``full=False`` asks only the backends the choice needs (the per-call path); ``Pick.reasons`` then holds
    those alone.
    """
    name = get_backend() if setting is None else validate(setting)
    return _pick(op, call_of(op, args, kwargs), name, device, full)


# ---- dispatch: the cached pick, then the chosen implementation ------------------------------------------------

# (op, setting, device, dtypes, mode, facts, bucket, policy found) -> the backend picked. Eager calls only: under
# torch.compile the pick is traced once and becomes guards, so the cache would only add dict traffic to the trace.
_PICKS: dict[tuple, str] = {}
_explainers: list[Callable[[Pick], None]] = []
_MAX_PICKS = 4096  # distinct shapes seen by one process; past it the cache starts over


def _policy_in_force(dev: torch.device) -> object:
    """What a pick on ``dev`` reads from the policy: the file found for it (replaced after a ``policy.reset()``)."""
    return policy.found(dev) if dev.type in POLICY_DEVICES else None


def _choose(op: str, call: Call) -> str:
    """The backend that runs this call: the cached pick, or a fresh one (which observers see)."""
    if _explainers:
        return _observed(op, call)
    name = get_backend()
    if torch.compiler.is_compiling():
        return _pick(op, call, name, None, False).backend
    tensors = _call_tensors(call)
    dev = _device_of(tensors, None)
    info = _OPS[op]
    facts = info.spec.facts(call)
    key = (op, name, dev, tuple(t.dtype for t in tensors), _mode(tensors), any(t.numel() == 0 for t in tensors),
           facts, _bucket_of(info.spec, call), dev.type in ("cpu", "cuda") and torch.is_autocast_enabled(dev.type),
           id(_policy_in_force(dev)) if name == "auto" else None)
    chosen = _PICKS.get(key)
    if chosen is None:
        chosen = _pick(op, call, name, dev, False).backend
        if len(_PICKS) >= _MAX_PICKS:
            _PICKS.clear()
        _PICKS[key] = chosen
    return chosen


def _observed(op: str, call: Call) -> str:
    """The pick with every backend's reasons, for the observers (:func:`observe`); an explicit backend that
    cannot run is reported as :data:`RAISES` and the reference computes, so every layer can be reported."""
    try:
        chosen = _pick(op, call, get_backend(), None, True)
    except BackendUnavailableError:
        tensors = _call_tensors(call)
        dev = _device_of(tensors, None)
        facts = lambda: _OPS[op].spec.facts(call)
        why = {b: _reasons(b, op, tensors, dev, facts) for b in BACKENDS}
        chosen = Pick(op, RAISES, why, "the backend set cannot run these inputs")
    for observe_pick in _explainers:
        observe_pick(chosen)
    return "reference" if chosen.backend == RAISES else chosen.backend


def dispatch(op: str, call: Call):
    """Run ``op``'s chosen implementation on ``call``: what every public op calls, once its arguments are checked.
    The reference takes ``call.args`` and ``call.extras``; a kernel backend's forward custom op takes
    ``call.args + call.kernel``, and the op returns the output(s) its spec names."""
    backend = _choose(op, call)
    info = _OPS[op]
    if backend == "reference":
        record(op, "reference", "fwd")
        return info.spec.reference(*call.args, **call.extras)
    impl = info.impls[backend]
    if not impl.records:
        record(op, backend, "fwd")
    try:
        out = impl.fn(*call.args, *call.kernel)
    except KernelLaunchError as e:  # every config ran out of a device resource: auto runs the reference
        if get_backend() != "auto":
            raise BackendUnavailableError(f"backend {backend!r} cannot launch {op} here: {e}") from e
        warnings.warn(f"{op}: the {backend} kernels cannot launch on this device ({e}); auto runs the reference",
                      KernelFallbackWarning, stacklevel=3)
        record(op, "reference", "fwd")
        return info.spec.reference(*call.args, **call.extras)
    result = info.spec.contract.result
    return out if result is None else out[result]


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
