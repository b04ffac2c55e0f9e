"""An op, declared once, as data: :class:`OpSpec`.

Each op's module (``vit_fast/ops/<op>.py``) ends with one ``declare(OpSpec(...))``. The spec holds everything that
is particular to the op, and everything else reads it from the registry (:func:`vit_fast.backends.spec`):

- the dispatcher: the reference, how the public function's arguments become a :class:`~vit_fast.backends.Call`,
  the facts the backends' limits look at, the policy bucket, example inputs for ``explain()``;
- the kernel backends: the :class:`Contract` (schemas, fakes, autograd), shared by every backend, which
  :func:`register_backend` turns into custom ops ``vit_fast::{op}_fwd_{backend}`` / ``{op}_bwd_{backend}``
  (``vit_fast::{op}_{backend}`` for an inference-only op). The schemas are written here only: the CUDA
  extension registers its kernels for them (``TORCH_LIBRARY_IMPL``) and defines none;
- the test suites, the benchmarks, the GPU check and the kernel report: the op's :class:`Cases` (input makers,
  layouts, NaN and bad-input cases, the hypothesis strategy, an independent fp64 oracle) and its
  :class:`vit_fast.bench.spec.Bench` (shapes, useful work, PyTorch baselines).

Adding an op is one module under ``vit_fast/ops/`` (plus its kernels and its own numerics tests): the contract,
property and benchmark suites iterate over the registry and find it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType

import torch

from vit_fast import backends
from vit_fast.backends import Call, Facts

Dims = Mapping[str, object]  # an input's sizes and layout: {"B": 2, "N": 197, "C": 768, "layout": "contiguous"}
Inputs = tuple[tuple, dict]  # (args, kwargs) of the public function


@dataclass(frozen=True)
class Contract:
    """An op's contract with its kernel backends, shared by every backend.

    ``fwd_schema`` takes ``Call.args + Call.kernel``; ``result`` is which of its outputs the public function
    returns (None: what it returns, one tensor or all of them; an index where it also returns saved statistics).
    An inference-only op has no ``bwd_schema``: a backward through it
    raises torch's "no autograd formula was registered"."""

    fwd_schema: str
    fwd_fake: Callable
    result: int | None = None
    bwd_schema: str | None = None
    bwd_fake: Callable | None = None
    setup_context: Callable | None = None
    backward: Callable[[Callable], Callable] | None = None  # backward op -> autograd backward(ctx, *grads)


def _no_cases(*_: object) -> list:
    return []


@dataclass(frozen=True)
class Cases:
    """What the suites make of an op, as data. Inputs are built from ``dims`` in two steps, so that a drawn layout
    can be a view and gradients still land on its storage: ``leaves(dims, g)`` makes float64 storage tensors
    (seeded by ``g``), ``view(dims, leaves)`` the public function's ``(args, kwargs)`` from them (in any dtype).

    - ``grads``: the leaves that get gradients (none for an inference-only op);
    - ``small`` / ``empty`` / ``deterministic``: dims of the contract's cases; ``layouts``: the values of
      ``dims["layout"]`` the makers take, the first one the model's own (the others are strided views);
    - ``oracle(dims, leaves)``: the result by hand-written math, independent of the reference, in the leaves'
      dtype: on float64 leaves the suites' oracle, on the inputs' own the reference's same-dtype yardstick;
    - ``reduction(dims)``: the longest sum behind the output or a gradient (the tolerance's allowance);
    - ``nan``: ``(leaf, poison)``: ``poison(leaves)`` puts one NaN into that leaf of the small case (in place)
      and returns the output positions the formula makes NaN; for an op judged by ``close``, that rule holds
      the NaN positions (a NaN value makes its group's scale NaN) and the poison returns None;
    - ``requested``: ``(leaves that require grad, whether the kernel backward runs at all)``;
    - ``bad()``: ``(args, kwargs, error, match)`` the public function must raise before dispatch;
    - ``strategy(budget)``: a hypothesis strategy of dims (``budget``: ``"reference"``, ``"interpreter"`` or
      ``"interpreter_slow"``: how much work one example may ask of the backend under test);
    - ``examples``: dims every property run checks (cases found once; empty batches);
    - ``close(out, exact, inputs, name)``: for ops whose results have no float64 oracle to hold a same-dtype
      yardstick to (quantized ones), the error budget of ``out`` against ``oracle``'s ``exact`` on the call's
      ``inputs``; None for the tolerance rule.
    """

    leaves: Callable[[Dims, torch.Generator], dict[str, torch.Tensor]]
    view: Callable[[Dims, Mapping[str, torch.Tensor]], Inputs]
    small: Dims
    strategy: Callable[[str], object]
    oracle: Callable[[Dims, Mapping[str, torch.Tensor]], object]
    reduction: Callable[[Dims], int]
    grads: Callable[[Dims], tuple[str, ...]] = lambda dims: ()
    empty: tuple[Dims, ...] = ()
    deterministic: Dims | None = None
    layouts: tuple[str, ...] = ("contiguous",)
    nan: tuple[tuple[str, Callable], ...] = ()
    requested: tuple[tuple[tuple[str, ...], bool], ...] = ()
    bad: Callable[[], list] = _no_cases
    examples: tuple[Dims, ...] = ()
    close: Callable | None = None
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    float64_raises: tuple[type[Exception], str] | None = None  # the op takes no float64 at all: what it raises
    # (clause, backend) -> why the op does not keep that contract clause there yet: a strict xfail
    diverges: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def make(self, dims: Dims, dtype: torch.dtype, device: torch.device | str = "cpu", *, seed: int = 0,
             grad: bool = True) -> tuple[Inputs, dict[str, torch.Tensor]]:
        """Fresh inputs for ``dims``: ``((args, kwargs), leaves)``, the leaves in ``dtype`` on ``device``, those in
        :attr:`grads` requiring grad (with ``grad``)."""
        g = torch.Generator().manual_seed(seed)
        wanted = set(self.grads(dims)) if grad else set()
        leaves = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype).requires_grad_(k in wanted)
                  for k, v in self.leaves(dims, g).items()}
        return self.view(dims, leaves), leaves


Baseline = tuple[str, Callable, Callable[[], object]]  # (name, function with the public signature, its context)


@dataclass(frozen=True)
class Bench:
    """What ``vit-fast bench`` and ``vit-fast tune`` measure of an op.

    - ``quick``: ``(gpu shapes, cpu shapes)`` of ``--quick``;
    - ``model_shape(dims)``: the op's shape, less the batch, in a model of
      :func:`vit_fast.bench.cases.preset_dims` ``dims`` (the full runs take it at every preset and batch, and
      tune too); ``shapes(quick, gpu)`` replaces both where an op sweeps its own grid;
    - ``model_dims``: what the model's own inputs add to every shape (their layout, the residual being x);
      ``to_dims``: a shape in the benchmark's terms (the report's columns) as the cases' dims, where they differ;
    - ``flops`` / ``bytes``: the useful work, counted the same for every provider;
    - ``baselines()``: the eager PyTorch ways; ``compiled``: what torch.compile compiles (None: the reference);
    - ``peers()``: ``(name, module, factory)`` of other libraries' kernels; ``note(shapes)``: a report line;
    - ``modes``: what is measured (an inference op: the forward alone); ``gpu_only``: not in a CPU run's defaults;
    - ``gpu_check``: the shapes ``benchmarks/gpu_check.py`` checks on fixed kernel configs, most valuable first (a
      run cut short has the first ones), small batches: the check is of numerics and launches, not of speed."""

    metric: str  # "TFLOP/s" (compute-bound work) or "GB/s" (memory-bound)
    shape_keys: tuple[str, ...]
    quick: tuple[tuple[Dims, ...], tuple[Dims, ...]]
    model_shape: Callable[[Mapping[str, int]], Dims]
    flops: Callable[[Dims, str], int]
    bytes: Callable[[Dims, str, int], int]
    baselines: Callable[[], list[Baseline]]
    compiled: tuple[str, Callable] | None  # None: the op's reference, as "compiled:reference"
    shapes: Callable[[bool, bool], list[Dims]] | None = None
    model_dims: Mapping[str, object] = field(default_factory=dict)  # what the model's own inputs add to every shape
    to_dims: Callable[[Mapping], Mapping] | None = None  # a shape -> the cases' dims (None: the shape is the dims)
    tokens: Callable[[Dims], int] = lambda dims: int(dims["N"])
    peers: Callable[[], list[tuple[str, str, Callable[[], Callable]]]] = _no_cases
    note: Callable[[list[Dims]], str | None] = lambda shapes: None
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    gpu_only: bool = False  # left out of a CPU run unless named (e4m3 math is emulated there: its timings say nothing)
    gpu_check: tuple[Dims, ...] = ()


@dataclass(frozen=True)
class OpSpec:
    """One op (see the module docstring).

    ``call(*args, **kwargs) -> Call``: the public function's arguments as the dispatcher runs them;
    ``facts(call)`` / ``bucket(call)``: what the limits look at and the policy bucket;
    ``example(dtype)``: ViT-B-sized public arguments on the meta device; ``policy_op``: the op whose policy rows
    this one follows (an entry point of the same computation: attention_packed follows attention)."""

    name: str
    public: Callable
    reference: Callable
    call: Callable[..., Call]
    facts: Callable[[Call], Facts]
    bucket: Callable[[Call], tuple[int, ...]]
    example: Callable[[torch.dtype], Inputs]
    contract: Contract | None  # None: no kernel backend can exist (int8_linear runs fbgemm's kernels itself)
    cases: Cases | None = None
    bench: Bench | None = None
    policy_op: str | None = None


def declare(spec: OpSpec) -> OpSpec:
    """Make ``spec`` known to the dispatcher and every suite."""
    backends.declare(spec)
    return spec


def _recorded(fn: Callable, op: str, backend: str, phase: str) -> Callable:
    def run(*args, **kwargs):
        backends.record(op, backend, phase)
        return fn(*args, **kwargs)

    return run


_LIB = torch.library.Library("vit_fast", "FRAGMENT")  # the schemas of the CUDA extension's ops


def custom_op_names(spec: OpSpec, backend: str) -> tuple[str, str | None]:
    """``(forward, backward)`` custom-op names of ``spec``'s ``backend`` (backward None: inference only)."""
    if spec.contract.bwd_schema is None:
        return f"{spec.name}_{backend}", None
    return f"{spec.name}_fwd_{backend}", f"{spec.name}_bwd_{backend}"


def register_backend(spec: OpSpec, backend: str, limits: backends.Limits, *, fwd: Callable | None = None,
                     bwd: Callable | None = None) -> bool:
    """Register ``backend``'s kernels for ``spec``'s op; returns whether it did.

    With ``fwd`` (and ``bwd``, unless the op is inference only), Python launchers taking the schemas' arguments,
    the custom ops are defined here. Without, they are the CUDA extension's: the schemas are defined here and
    ``vit_fast._C`` registers its kernels for them; where it is not built, only the limits are registered (they
    still explain what the backend could run).
    """
    c = spec.contract
    fwd_name, bwd_name = custom_op_names(spec, backend)
    parts = [(fwd_name, c.fwd_schema, c.fwd_fake, fwd, "fwd")]
    if bwd_name is not None:
        parts.append((bwd_name, c.bwd_schema, c.bwd_fake, bwd, "bwd"))
    python = fwd is not None
    if not python and backends.unavailable(backend) is not None:
        backends.register(spec.name, backend, None, limits)
        return False
    for name, schema, fake, launch, phase in parts:
        if python:
            torch.library.custom_op(f"vit_fast::{name}", _recorded(launch, spec.name, backend, phase),
                                    mutates_args=(), schema=schema)
        else:
            _LIB.define(name + schema)
        torch.library.register_fake(f"vit_fast::{name}", fake)
    if bwd_name is not None:
        backward = c.backward(getattr(torch.ops.vit_fast, bwd_name))
        if not python:  # C++ ops cannot record themselves: the autograd rule records their backward
            backward = _recorded(backward, spec.name, backend, "bwd")
        torch.library.register_autograd(f"vit_fast::{fwd_name}", backward, setup_context=c.setup_context)
    backends.register(spec.name, backend, getattr(torch.ops.vit_fast, fwd_name), limits, records=python)
    return True


def triton_kernels(name: str) -> ModuleType | None:
    """``vit_fast.kernels.<name>``, or None after marking the triton backend unavailable with the reason."""
    try:
        return importlib.import_module(f"vit_fast.kernels.{name}")
    except Exception as e:  # noqa: BLE001 - any import failure (no triton, a broken or old install) disables it
        backends.mark_unavailable("triton", f"vit_fast.kernels.{name} failed to import: {e}")
        return None
