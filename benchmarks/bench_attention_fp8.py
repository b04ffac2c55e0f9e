"""Attention with its output quantized to e4m3 for the FP8 proj GEMM: vit_fast's backends vs SDPA then
one quantizing pass, eager and under `torch.compile`. GPU only by default.
A script (this part of `vit-fast bench`) and a pytest-benchmark suite: see suite.py."""

import sys

from suite import benchmark_test, script

test_attention_fp8 = benchmark_test("attention_fp8")

if __name__ == "__main__":
    sys.exit(script("attention_fp8"))
