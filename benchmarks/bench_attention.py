"""Attention: vit_fast's backends vs `F.scaled_dot_product_attention` with each SDPA backend forced
(flash, efficient, cuDNN, math) and the reference under `torch.compile`; flash_attn and xformers when installed.
A script (this part of `vit-fast bench`) and a pytest-benchmark suite: see suite.py."""

import sys

from suite import benchmark_test, script

test_attention = benchmark_test("attention")

if __name__ == "__main__":
    sys.exit(script("attention"))
