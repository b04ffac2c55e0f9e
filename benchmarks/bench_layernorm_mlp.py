"""The fused LayerNorm -> fc1 -> GELU -> fc2 (+ residual) branch: vit_fast's backends vs the same in eager
PyTorch and under `torch.compile`.
A script (this part of `vit-fast bench`) and a pytest-benchmark suite: see suite.py."""

import sys

from suite import benchmark_test, script

test_layernorm_mlp = benchmark_test("layernorm_mlp")

if __name__ == "__main__":
    sys.exit(script("layernorm_mlp"))
