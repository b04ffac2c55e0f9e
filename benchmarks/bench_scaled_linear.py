"""The FP8 GEMM (e4m3 operands, fp32 row and channel scales): vit_fast's backends vs `torch._scaled_mm`,
eager and under `torch.compile`. GPU only by default (e4m3 math is emulated on CPU).
A script (this part of `vit-fast bench`) and a pytest-benchmark suite: see suite.py."""

import sys

from suite import benchmark_test, script

test_scaled_linear = benchmark_test("scaled_linear")

if __name__ == "__main__":
    sys.exit(script("scaled_linear"))
