"""Benchmarks: vit_fast's backends side by side with PyTorch SDPA (each SDPA backend forced), eager PyTorch,
``torch.compile`` and timm, with the peaks of the same machine measured at the start of the same run.

``vit-fast bench`` runs it (:mod:`vit_fast.bench.cli`); ``benchmarks/bench_<op>.py`` runs one op's part, and
under ``pytest benchmarks/ --benchmark-only`` the same providers and shapes as a pytest-benchmark suite.

How the numbers are made trustworthy:

- Correct first: every provider's output (and, for forward+backward, every gradient) is compared with an
  oracle (the reference in float64 for float32 inputs, in float32 otherwise) on fresh random inputs before
  it is timed, by :mod:`vit_fast.tolerance`'s rule ``max|out - oracle| <= 2 * max|ref_same_dtype - oracle| +
  atol``. A provider that disagrees is reported as failed and not timed (:mod:`~vit_fast.bench.measure`).
- One timing helper (:class:`Timer`, :mod:`~vit_fast.bench.timing`): on CUDA ``triton.testing.do_bench`` (CUDA
  events, warm-up, the L2 cache flushed before every repeat, median and quantiles); on CPU
  ``torch.utils.benchmark`` with the inputs rotated through a working set of ``CPU_WORKING_SET`` bytes, the
  one the bandwidth peak is measured on.
- FLOP and byte counts are analytic (each op's ``flops``/``bytes`` in :mod:`~vit_fast.bench.cases`, the
  models' in :func:`model_flops`: the useful work, counted the same for every provider), and every derived
  figure is checked against the peaks measured in the same run (:mod:`~vit_fast.bench.peaks`: a large matmul
  and a large copy); a figure above a peak is flagged as a violation.
"""

from vit_fast.bench.analysis import add_speedups, case_key, compare_results, format_comparison, row_key
from vit_fast.bench.cases import DTYPES, OP_BENCHES, OP_MODES, OPS, Inputs, OpBench
from vit_fast.bench.cli import add_bench_arguments, main
from vit_fast.bench.measure import Budget, bench_op_case
from vit_fast.bench.models import MODEL_MODES, bench_model, default_batch, default_models, model_flops, model_providers
from vit_fast.bench.peaks import measure_peaks
from vit_fast.bench.providers import Provider, op_providers
from vit_fast.bench.report import render_report, summary_table
from vit_fast.bench.runner import SCHEMA, BenchConfig, run
from vit_fast.bench.targets import TARGETS, OpShape, OpTarget, Target, target_status
from vit_fast.bench.timing import Timer, Timing, device_info

__all__ = [
    "DTYPES", "MODEL_MODES", "OPS", "OP_BENCHES", "OP_MODES", "SCHEMA", "TARGETS", "BenchConfig", "Budget",
    "Inputs", "OpBench", "OpShape", "OpTarget", "Provider", "Target", "Timer", "Timing", "add_bench_arguments",
    "add_speedups", "bench_model", "bench_op_case", "case_key", "compare_results", "default_batch",
    "default_models", "device_info", "format_comparison", "main", "measure_peaks", "model_flops",
    "model_providers", "op_providers", "render_report", "row_key", "run", "summary_table", "target_status",
]
