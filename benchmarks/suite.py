"""What the ``bench_<op>.py`` files share: each is one op's (or the model's) part of ``vit-fast bench`` as a
script, and the same providers and quick shapes as a pytest-benchmark suite::

    python benchmarks/bench_attention.py [vit-fast bench flags]   # this op's part of `vit-fast bench`
    pytest benchmarks/bench_attention.py --benchmark-only         # the same providers as pytest-benchmark tests

Each test checks one provider against the reference (skipped with the reason when it cannot run those
inputs), then times it with pytest-benchmark's ``benchmark`` fixture.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from vit_fast.bench.cases import DTYPES, OP_BENCHES
from vit_fast.bench.measure import bench_op_case
from vit_fast.bench.models import MODEL_MODES, bench_model, default_batch, default_models, model_providers
from vit_fast.bench.providers import op_providers
from vit_fast.bench.timing import Timing, sync

MODEL = "model"  # the name that stands for the end-to-end model benchmark beside the ops


@dataclass(frozen=True)
class PytestCase:
    """One pytest-benchmark test: an op (or model), a shape, dtype, mode and provider on the local device."""

    kind: str
    name: str
    shape: tuple[tuple[str, int], ...]
    dtype: str
    mode: str
    provider: str

    def __str__(self) -> str:
        return f"{self.name}-{self.mode}-{self.dtype}-{'-'.join(f'{k}{v}' for k, v in self.shape)}-{self.provider}"


def _local_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_cases(name: str) -> list[PytestCase]:
    """The quick shapes and the quick run's providers of an op, or of the quick model (``name='model'``)."""
    device = _local_device()
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    if name == MODEL:
        provs = model_providers(device, DTYPES[dtype], quick=True)
        return [PytestCase("model", m, (("B", default_batch(m, device, True)),), dtype, mode, p.name)
                for m in default_models(device, True) for mode in MODEL_MODES for p in provs]
    op = OP_BENCHES[name]
    provs = op_providers(op, device, quick=True)
    return [PytestCase("op", name, tuple(s.items()), dtype, mode, p.name)
            for s in op.shapes(True, device.type == "cuda") for mode in op.modes for p in provs]


def check_and_benchmark(benchmark: object, case: PytestCase) -> None:
    """Check ``case``'s provider against the reference (skip with the reason when it cannot run), then time
    it with pytest-benchmark's ``benchmark`` fixture."""
    device, dtype, shape = _local_device(), DTYPES[case.dtype], dict(case.shape)
    timer = _PytestTimer(benchmark, device)
    peaks = {"matmul_tflops": {case.dtype: math.inf}, "bandwidth_gbps": math.inf}  # fractions: vit-fast bench's job
    if case.kind == "model":
        provs = [p for p in model_providers(device, dtype, quick=True) if p.name == case.provider]
        rows = bench_model(case.name, shape["B"], dtype, device, provs, (case.mode,), timer, peaks)
    else:
        op = OP_BENCHES[case.name]
        provs = [p for p in op_providers(op, device, quick=True) if p.name == case.provider]
        rows = bench_op_case(op, shape, dtype, device, provs, (case.mode,), timer, peaks)
    row = rows[0]
    benchmark.group = f"{case.name} {case.mode} {case.dtype} {row['shape_label']}"
    if row["status"] == "skipped":
        pytest.skip(row["reason"])
    assert row["status"] == "ok", f"{case.provider}: {row['reason']}"
    benchmark.extra_info.update({k: row[k] for k in ("flop", "bytes", "agreement") if row.get(k) is not None})


class _PytestTimer:
    """Adapts pytest-benchmark's fixture to the :class:`vit_fast.bench.Timer` interface: it does the timing and
    the stats."""

    quick = True

    def __init__(self, benchmark: object, device: torch.device) -> None:
        self.benchmark, self.device = benchmark, device

    def time(self, fn: Callable[[], object], *, heavy: bool = False) -> Timing:
        def call() -> None:
            fn()
            sync(self.device)

        t0 = time.perf_counter()
        self.benchmark(call)
        stats = getattr(self.benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: one call, timed here
            ms = (time.perf_counter() - t0) * 1e3
            return Timing(ms, ms, ms, ms, repeats=1)
        st = stats.stats
        return Timing(st.min * 1e3, st.q1 * 1e3, st.median * 1e3, st.q3 * 1e3, repeats=st.rounds)


def benchmark_test(name: str) -> Callable[..., None]:
    """The pytest-benchmark test of an op (or of the model, ``name='model'``): one test per quick case."""

    @pytest.mark.parametrize("case", pytest_cases(name), ids=str)
    def test(benchmark: object, case: PytestCase) -> None:
        check_and_benchmark(benchmark, case)

    return test


def script(name: str, argv: list[str] | None = None) -> int:
    """``python benchmarks/bench_<name>.py [flags]``: ``vit-fast bench`` restricted to that op (or the model)."""
    from vit_fast.cli import main

    only = ["--ops", "none"] if name == MODEL else ["--ops", name, "--models", "none"]
    return main(["bench", *only, *(sys.argv[1:] if argv is None else argv)])
