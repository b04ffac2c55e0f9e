"""The contract every declared op keeps in every backend, one test per clause, parametrized over the registry of
op specs x backends. No op is named here: an op's data (inputs, layouts, NaN and bad cases, its error budget) is its
spec's (:class:`vit_fast.ops.spec.Cases`).

Clauses: empty inputs, float64 (raise when chosen, fall back in auto), torch.library.opcheck of the custom ops the
op calls, torch.compile(fullgraph=True), deterministic backward, only the requested gradients, NaN rows, bad inputs
(raised before dispatch), any strides. Inference-only ops keep them forward only. Where an op does not keep a
clause yet, its spec says so (``diverges``: strict xfails, so a fix shows up as XPASS).

The reference and Triton (through the interpreter on CPU) run everywhere; the cuda backend's cases carry the
``cuda`` marker. Op-specific numerics live in tests/ops/test_<op>.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_BACKENDS, backend_params, count, custom_op_calls, launches
from numerics import DEVICE, check, outputs, public, reference, run, spec, tensors
from torch.utils._pytree import tree_map_only

import vit_fast
from vit_fast import backends
from vit_fast.tolerance import assert_close

OPS = [op for op in backends.ops() if backends.spec(op).cases is not None]
BACKENDS = backend_params(*backends.BACKENDS)
KERNELS = backend_params(*KERNEL_BACKENDS)
_FIRST = (torch.float32, torch.float16, torch.bfloat16)


def _cases(op: str):
    return spec(op).cases


def _make(op: str, dims, dtype: torch.dtype, *, grad: bool = True, seed: int = 0):
    return _cases(op).make(dims, dtype, DEVICE, seed=seed, grad=grad)


def _backward(op: str) -> bool:
    return spec(op).contract is not None and spec(op).contract.bwd_schema is not None


def _dtype_for(op: str, backend: str, prefer: tuple[torch.dtype, ...] = _FIRST) -> torch.dtype:
    """The first dtype ``backend`` runs ``op``'s small case in (the cuda kernels take no fp32 GEMMs; the
    interpreter no bf16 without the suite's correction)."""
    if backend not in backends.implemented(op):
        pytest.skip(f"{op} has no {backend} implementation")
    taken = [d for d in prefer if d in _cases(op).dtypes]
    if not taken:
        pytest.skip(f"{op} takes none of {prefer} (only {_cases(op).dtypes})")
    for dtype in taken:
        why = backends.reasons(backend, op, *_make(op, _cases(op).small, dtype, grad=False)[0])
        if not why:
            return dtype
    pytest.skip(f"{backend} runs none of {taken} for {op} here: {why}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t  # no torch.equal on fp8


def _equal(a, b) -> bool:
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(outputs(a), outputs(b), strict=True))


def _no_backward(op: str) -> None:
    if not _backward(op):
        pytest.skip(f"{op} is inference only: no backward")


def _diverges(request: pytest.FixtureRequest, op: str, clause: str, backend: str) -> None:
    why = _cases(op).diverges.get((clause, backend))
    if why is not None:
        request.applymarker(pytest.mark.xfail(reason=why, strict=True))


def test_every_declared_op_has_cases():
    assert OPS == list(backends.ops()), "an op without Cases escapes every suite"


# ---- 1. empty inputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [pytest.param("auto"), *BACKENDS])
@pytest.mark.parametrize("op", OPS)
def test_empty_input_returns_empty_without_a_launch(op, backend):
    dtype = torch.float32 if backend in ("auto", "reference") else _dtype_for(op, backend)
    assert _cases(op).empty, f"{op} declares no empty case"
    for dims in _cases(op).empty:
        (args, kwargs), leaves = _make(op, dims, dtype, grad=_backward(op))
        with launches() as rec:
            out = run(op, backend, args, kwargs)
            if _backward(op):
                out.sum().backward()
        want = reference(op)(*args, **kwargs)
        for o, w in zip(outputs(out), outputs(want), strict=True):
            assert o.shape == w.shape and o.dtype == w.dtype and o.numel() == 0
        for name, t in leaves.items():
            if t.requires_grad:
                assert t.grad is not None and t.grad.shape == t.shape, name
        assert not [r for r in rec if r.backend in KERNEL_BACKENDS], rec


# ---- 2. float64 --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_float64_raises_when_chosen_and_auto_uses_the_reference(op, backend):
    """Or, where the op takes no float64 at all (its cases' ``float64_raises``), every backend raises that
    before dispatch."""
    (args, kwargs), _ = _make(op, _cases(op).small, torch.float64)
    if _cases(op).float64_raises is not None:
        err, match = _cases(op).float64_raises
        with pytest.raises(err, match=match):
            run(op, backend, args, kwargs)
        return
    want = reference(op)(*args, **kwargs)
    if backend == "reference":
        assert _equal(run(op, "reference", args, kwargs), want)
        return
    if backend not in backends.implemented(op):
        pytest.skip(f"{op} has no {backend} implementation")
    assert any("float64" in r for r in backends.reasons(backend, op, args, kwargs))
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        run(op, backend, args, kwargs)
    with launches() as rec:
        out = run(op, "auto", args, kwargs)
    assert _equal(out, want)
    assert [(r.op, r.backend) for r in rec] == [(op, "reference")]


# ---- 3. opcheck of every custom op the op calls, forward and backward ---------------------------------------------

ALL_TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
_GRAD_SAFE_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _captured_calls(op: str, backend: str, dtype: torch.dtype) -> list[tuple[str, tuple]]:
    """``(custom op, args)`` of every vit_fast custom op the public op calls on its small case, forward and
    backward, once with every gradient and once per requested subset (whose flags reach the backward op): the
    real calls, not a hand-kept list of them."""
    cases, calls = _cases(op), []
    subsets = [None, *(names for names, _ in cases.requested)] if _backward(op) else [()]
    for wanted in subsets:
        (args, kwargs), leaves = _make(op, cases.small, dtype)
        for n, t in leaves.items():
            t.requires_grad_(t.requires_grad and (wanted is None or n in wanted))
        with vit_fast.set_backend(backend), custom_op_calls() as seen:
            out = public(op)(*args, **kwargs)
            if any(t.requires_grad for t in leaves.values()):
                outputs(out)[0].float().sum().backward()
        calls += seen
    return calls


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck_custom_ops(op, backend):
    dtype = _dtype_for(op, backend)
    calls = _captured_calls(op, backend, dtype)
    fwd = f"{op}_fwd_{backend}" if _backward(op) else f"{op}_{backend}"
    assert fwd in {name for name, _ in calls}, f"{backend} did not call its custom op {fwd}: {calls}"
    checked: set[tuple] = set()
    for name, args in calls:
        flags = tuple(a for a in args if isinstance(a, bool))
        if (name, flags) in checked:
            continue
        checked.add((name, flags))
        custom = getattr(torch.ops.vit_fast, name).default
        grad = name == fwd and _backward(op)  # the forward op's inputs require grad: its autograd rule is checked
        args = tree_map_only(torch.Tensor, lambda t, grad=grad: t.detach().requires_grad_(
            grad and t.is_floating_point() and t.dtype.itemsize > 1), args)
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args):
            # opcheck's schema check multiplies the inputs to detect mutation, and e4m3 has no arithmetic on CPU
            torch.library.opcheck(custom, args, test_utils=[u for u in ALL_TEST_UTILS if u != "test_schema"])
        elif grad and dtype != torch.float32:
            # aot_dispatch compares gradients across two traced runs at fp32 tolerances: half-precision
            # gradients are checked through autograd's registration here and numerically by the oracle suites
            torch.library.opcheck(custom, args, test_utils=_GRAD_SAFE_UTILS)
        else:
            torch.library.opcheck(custom, args)


# ---- 4. torch.compile(fullgraph=True) ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph_forward_and_backward(op, backend, request):
    """Forward only for the inference-only ops."""
    dtype = _dtype_for(op, backend)
    _diverges(request, op, "compile", backend)
    (args, kwargs), leaves = _make(op, _cases(op).small, dtype, grad=_backward(op))
    fn = public(op)

    def f(*a, **k):
        out = fn(*a, **k)
        # e4m3 has no arithmetic: (q, scale) go on through the graph as float
        return out * 2 if isinstance(out, torch.Tensor) else tuple(t.float() * 2 for t in out)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    names = [n for n, t in leaves.items() if t.requires_grad]
    with vit_fast.set_backend(backend):
        with launches() as rec:
            out = compiled(*args, **kwargs)
            got = torch.autograd.grad(out.sum(), [leaves[n] for n in names]) if names else ()
        eager = f(*args, **kwargs)
        want = torch.autograd.grad(eager.sum(), [leaves[n] for n in names]) if names else ()
    for i, (o, e) in enumerate(zip(outputs(out), outputs(eager), strict=True)):
        if o.is_floating_point():
            assert_close(o, e, e, name=f"out {i}")
    for name, g, w in zip(names, got, want, strict=True):
        assert_close(g, w, w, name=f"d{name}")
    if backend != "reference":
        assert count(rec, backend, "fwd", op) >= 1, rec
        assert not names or count(rec, backend, "bwd", op) >= 1, rec


# ---- 5. deterministic backward -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_backward_is_deterministic(op, backend):
    _no_backward(op)
    if backend == "reference" and DEVICE == "cuda":
        pytest.skip("the reference on a GPU runs PyTorch's CUDA kernels (flash SDPA, cuDNN): not deterministic")
    dtype = _dtype_for(op, backend, prefer=(torch.float16, torch.bfloat16, torch.float32))
    (args, kwargs), leaves = _make(op, _cases(op).deterministic or _cases(op).small, dtype)
    wanted = [t for t in leaves.values() if t.requires_grad]
    runs = []
    for _ in range(2):
        out = run(op, backend, args, kwargs)
        runs.append(torch.autograd.grad(out, wanted, torch.ones_like(out)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ---- 6. only the requested gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_only_requested_gradients(op, backend):
    _no_backward(op)
    dtype = _dtype_for(op, backend)
    assert _cases(op).requested, f"{op} declares no requested-gradient cases"
    for trainable, backward_runs in _cases(op).requested:
        result = check(op, _cases(op).small, dtype, backend, requested=trainable, bwd_launch=backward_runs)
        assert set(result["grads"]) == set(trainable)


# ---- 7. NaN rows -------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_nan_in_an_input_row_gives_nan_in_that_output_row(op, backend, request):
    """As the formula does, in every backend; nothing else turns NaN (PyTorch's CPU flash SDPA returns finite
    values for such rows, its math path NaN: the reference must follow the formula). For the quantizing ops
    their close rule holds the NaN groups: a NaN value's row (or group) scale is NaN, and so are its values."""
    dtype = _dtype_for(op, backend)
    _diverges(request, op, "nan", backend)
    cases = _cases(op)
    assert cases.nan, f"{op} declares no NaN case"
    for where, poison in cases.nan:
        (args, kwargs), leaves = _make(op, cases.small, dtype, grad=False)
        expected = poison(leaves)
        args, kwargs = cases.view(cases.small, leaves)
        out = run(op, backend, args, kwargs)
        oracle = cases.oracle(cases.small, {n: t.double() for n, t in leaves.items()})
        if cases.close is not None:
            cases.close(out, oracle, (args, kwargs), f"{op} on {backend}, NaN in {where}")
            continue
        for name, t in (("oracle", oracle), (backend, out)):
            got = torch.isnan(t)
            assert torch.equal(got, expected.expand_as(got)), f"{name}, NaN in {where}: {int(got.sum())} NaNs"
        assert_close(out, reference(op)(*args, **kwargs), oracle, name=f"out (NaN in {where})",
                     k=cases.reduction(cases.small))


# ---- 8. bad inputs -----------------------------------------------------------------------------------------------


def _bad_params() -> list:
    return [pytest.param(op, i, id=f"{op}-{i}") for op in OPS for i in range(len(_cases(op).bad()))]


# Validation precedes dispatch, so every setting raises the argument's error (not BackendUnavailableError) and
# the cuda setting needs no GPU to show it.
@pytest.mark.parametrize("backend", backends.CHOICES)
@pytest.mark.parametrize("op, index", _bad_params())
def test_bad_inputs_raise_before_dispatch(op, index, backend):
    args, kwargs, err, match = _cases(op).bad()[index]
    with vit_fast.set_backend(backend), pytest.raises(err, match=match):
        public(op)(*args, **kwargs)


def test_every_op_declares_bad_inputs():
    assert all(_cases(op).bad() for op in OPS)


# ---- 9. any strides ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [pytest.param(False, id="first"),
                                  pytest.param(True, id="half", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_any_strides_in_inputs_and_output_gradients(op, backend, half):
    """Every layout the op's cases draw (the first is contiguous, the others strided views), and output gradients
    that are a stride-0 broadcast and transposed in memory; in the first dtype the backend runs (fp32 for the
    reference and Triton) and, under -m slow, in half precision."""
    dtype = _dtype_for(op, backend, prefer=(torch.float16, torch.bfloat16) if half else _FIRST)
    cases = _cases(op)
    assert len(cases.layouts) > 1, f"{op} declares no strided layout"
    for layout in cases.layouts:
        check(op, {**cases.small, "layout": layout}, dtype, backend)
    if _backward(op):
        for dout in ("broadcast", "transposed"):
            check(op, {**cases.small, "layout": cases.layouts[1]}, dtype, backend, dout=dout)


def test_strided_views_are_strided():
    """Among the layouts the clause above draws, every op has views that are not contiguous."""
    for op in OPS:
        cases = _cases(op)
        strided = [layout for layout in cases.layouts
                   if not all(t.is_contiguous() for t in tensors(cases.make({**cases.small, "layout": layout},
                                                                            torch.float32)[0]))]
        assert strided, f"{op}: no layout of {cases.layouts} is strided"
