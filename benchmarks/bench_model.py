"""End to end: images/s and peak memory of inference and of a training step (forward + backward + AdamW,
autocast bf16 on GPU) for vit_fast per backend and under `torch.compile`, against timm's same model, eager
(SDPA) and compiled; compile time reported separately.

    python benchmarks/bench_model.py [vit-fast bench flags]   # the model part of `vit-fast bench`
    pytest benchmarks/bench_model.py --benchmark-only         # the same providers as pytest-benchmark tests
"""

from __future__ import annotations

import sys

import pytest

from vit_fast import bench


@pytest.mark.parametrize("case", bench.pytest_cases("model"), ids=str)
def test_model(benchmark, case: bench.PytestCase) -> None:
    bench.pytest_benchmark(benchmark, case)


if __name__ == "__main__":
    from vit_fast.cli import main

    sys.exit(main(["bench", "--ops", "none", *sys.argv[1:]]))
