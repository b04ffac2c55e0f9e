"""Property-based tests (hypothesis): every declared op on every backend that runs on CPU (the reference; Triton
through the interpreter), on random shapes, strides and dtypes drawn by the op's own strategy (its spec's
``Cases.strategy``), forward and every gradient against the float64 oracle by the one tolerance rule, or the op's
error budget (tests/support/numerics.py), with the launch records as proof that the backend under test ran.

The tests are made per (op, backend, run) from the registry below: no op is named here. Each example is drawn
with a seed, so the falsifying example hypothesis prints rebuilds the same tensors. The Triton interpreter is
slow, so the strategies take a budget: the default run keeps every example well under a second; the
``slow``-marked copies (``pytest -m slow``) draw many more and larger ones. Each op's ``examples`` (cases found
once, empty batches) run every time, as hypothesis @examples.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from numerics import check, refused, spec

import vit_fast
from vit_fast import backends

# database=None: the example database would be written into the working tree (.hypothesis/); the printed
# falsifying case (seeded) and print_blob reproduce a failure instead. deadline=None: the interpreter's first
# launch of a kernel variant is much slower than the next ones. The conftest's autouse fixtures (backend reset,
# output poisoning) hold across examples: each example selects its backend in a with block.
_COMMON = {
    "deadline": None,
    "database": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
}
FAST_EXAMPLES, SLOW_EXAMPLES = 10, 40
SEEDS = st.integers(0, 2**31 - 1)


def _triton_cpu_reason() -> str | None:
    why = backends.unavailable("triton")
    if why is None and not backends.triton_interpreter():  # a GPU machine: the GPU tests cover Triton there
        why = "the Triton kernels run on CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
    return why


def run_case(op: str, backend: str, dtype: torch.dtype, dims: dict, seed: int) -> None:
    """``check`` on one drawn case, where ``backend`` runs it. A kernel backend may refuse only bf16 (the
    interpreter's bf16 tl.dot, unless tests/conftest.py installed its correction), and the call must then raise
    naming that reason."""
    cases = spec(op).cases
    inputs, _ = cases.make(dims, dtype, seed=seed, grad=False)
    why = [] if backend == "reference" else refused(op, backend, inputs)
    event(f"{str(dtype)[6:]}, {'refused' if why else 'ran'}")  # what the examples exercised, in the statistics
    if why:
        assert dtype == torch.bfloat16 and any("bfloat16" in w for w in why), f"{backend} refused: {why}"
        with pytest.raises(backends.BackendUnavailableError, match="bfloat16"), vit_fast.set_backend(backend):
            spec(op).public(*inputs[0], **inputs[1])
        return
    check(op, dims, dtype, backend, seed=seed)


def _make_tests() -> dict:
    tests = {}
    for op in backends.ops():
        if spec(op).cases is None:
            continue
        for backend in ("reference", "triton"):
            if backend not in backends.implemented(op) and backends.limits(op, backend) is None:
                continue
            for slow in (False, True):
                test = _build(op, backend, slow)
                tests[test.__name__] = test
    return tests


def _build(op: str, backend: str, slow: bool):
    cases = spec(op).cases
    budget = "reference" if backend == "reference" else ("interpreter_slow" if slow else "interpreter")

    def test(case, seed):
        dtype, dims = case
        run_case(op, backend, dtype, dims, seed)

    test = given(case=cases.strategy(budget), seed=SEEDS)(test)
    for dtype, dims in cases.examples:
        if slow or not dims.get("slow", False):
            test = example(case=(dtype, dims), seed=1)(test)
    test = settings(max_examples=SLOW_EXAMPLES if slow else FAST_EXAMPLES, **_COMMON)(test)
    if slow:
        test = pytest.mark.slow(test)
    if backend == "triton" and (why := _triton_cpu_reason()) is not None:
        test = pytest.mark.skip(reason=f"triton backend on CPU: {why}")(test)
    test.__name__ = test.__qualname__ = f"test_{op}_{backend}{'_slow' if slow else ''}"
    return test


globals().update(_make_tests())


def test_every_declared_op_has_property_tests():
    made = {name for name in globals() if name.startswith("test_") and name.endswith("_reference")}
    assert made == {f"test_{op}_reference" for op in backends.ops()}
