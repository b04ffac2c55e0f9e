"""LayerNorm: vit_fast's backends vs `F.layer_norm`, eager and under `torch.compile`; Liger-Kernel when
installed.
A script (this part of `vit-fast bench`) and a pytest-benchmark suite: see suite.py."""

import sys

from suite import benchmark_test, script

test_layer_norm = benchmark_test("layer_norm")

if __name__ == "__main__":
    sys.exit(script("layer_norm"))
