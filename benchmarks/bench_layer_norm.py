"""LayerNorm: vit_fast's backends vs `F.layer_norm`, eager and under `torch.compile`; Liger-Kernel when
installed.

    python benchmarks/bench_layer_norm.py [vit-fast bench flags]   # this op's part of `vit-fast bench`
    pytest benchmarks/bench_layer_norm.py --benchmark-only         # the same providers as pytest-benchmark tests
"""

from __future__ import annotations

import sys

import pytest

from vit_fast import bench

OP = "layer_norm"


@pytest.mark.parametrize("case", bench.pytest_cases(OP), ids=str)
def test_layer_norm(benchmark, case: bench.PytestCase) -> None:
    bench.pytest_benchmark(benchmark, case)


if __name__ == "__main__":
    from vit_fast.cli import main

    sys.exit(main(["bench", "--ops", OP, "--models", "none", *sys.argv[1:]]))
