"""The fused LayerNorm -> fc1 -> GELU -> fc2 (+ residual) branch: vit_fast's backends vs the same in eager
PyTorch and under `torch.compile`.

    python benchmarks/bench_layernorm_mlp.py [vit-fast bench flags]   # this op's part of `vit-fast bench`
    pytest benchmarks/bench_layernorm_mlp.py --benchmark-only         # the same providers as pytest-benchmark tests
"""

from __future__ import annotations

import sys

import pytest

from vit_fast import bench

OP = "layernorm_mlp"


@pytest.mark.parametrize("case", bench.pytest_cases(OP), ids=str)
def test_layernorm_mlp(benchmark, case: bench.PytestCase) -> None:
    bench.pytest_benchmark(benchmark, case)


if __name__ == "__main__":
    from vit_fast.cli import main

    sys.exit(main(["bench", "--ops", OP, "--models", "none", *sys.argv[1:]]))
