"""End to end: images/s and peak memory of inference and of a training step (forward + backward + AdamW,
autocast bf16 on GPU) for vit_fast per backend and under `torch.compile`, against timm's same model, eager
(SDPA) and compiled; compile time reported separately.
A script (this part of `vit-fast bench`) and a pytest-benchmark suite: see suite.py."""

import sys

from suite import benchmark_test, script

test_model = benchmark_test("model")

if __name__ == "__main__":
    sys.exit(script("model"))
