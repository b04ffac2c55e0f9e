"""Patch embedding: vit_fast's backends vs conv + flatten + transpose + cat + add, eager and under
`torch.compile`.

    python benchmarks/bench_patch_embed.py [vit-fast bench flags]   # this op's part of `vit-fast bench`
    pytest benchmarks/bench_patch_embed.py --benchmark-only         # the same providers as pytest-benchmark tests
"""

from __future__ import annotations

import sys

import pytest

from vit_fast import bench

OP = "patch_embed"


@pytest.mark.parametrize("case", bench.pytest_cases(OP), ids=str)
def test_patch_embed(benchmark, case: bench.PytestCase) -> None:
    bench.pytest_benchmark(benchmark, case)


if __name__ == "__main__":
    from vit_fast.cli import main

    sys.exit(main(["bench", "--ops", OP, "--models", "none", *sys.argv[1:]]))
