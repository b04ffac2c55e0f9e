"""GELU and row quantization to e4m3 (fc1's output for the FP8 fc2): vit_fast's backends vs PyTorch,
eager and under `torch.compile`. GPU only by default.
A script (this part of `vit-fast bench`) and a pytest-benchmark suite: see suite.py."""

import sys

from suite import benchmark_test, script

test_quantize_rows = benchmark_test("quantize_rows")

if __name__ == "__main__":
    sys.exit(script("quantize_rows"))
