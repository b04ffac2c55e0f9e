"""Attention: vit_fast's backends vs `F.scaled_dot_product_attention` with each SDPA backend forced
(flash, efficient, cuDNN, math) and the reference under `torch.compile`; flash_attn and xformers when installed.

    python benchmarks/bench_attention.py [vit-fast bench flags]   # this op's part of `vit-fast bench`
    pytest benchmarks/bench_attention.py --benchmark-only         # the same providers as pytest-benchmark tests
"""

from __future__ import annotations

import sys

import pytest

from vit_fast import bench

OP = "attention"


@pytest.mark.parametrize("case", bench.pytest_cases(OP), ids=str)
def test_attention(benchmark, case: bench.PytestCase) -> None:
    bench.pytest_benchmark(benchmark, case)


if __name__ == "__main__":
    from vit_fast.cli import main

    sys.exit(main(["bench", "--ops", OP, "--models", "none", *sys.argv[1:]]))
