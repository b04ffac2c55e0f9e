"""LayerNorm writing e4m3 rows and their scales for an FP8 GEMM: vit_fast's backends vs `F.layer_norm`
then one quantizing pass, eager and under `torch.compile`. GPU only by default.
A script (this part of `vit-fast bench`) and a pytest-benchmark suite: see suite.py."""

import sys

from suite import benchmark_test, script

test_layer_norm_fp8 = benchmark_test("layer_norm_fp8")

if __name__ == "__main__":
    sys.exit(script("layer_norm_fp8"))
