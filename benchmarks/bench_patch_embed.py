"""Patch embedding: vit_fast's backends vs conv + flatten + transpose + cat + add, eager and under
`torch.compile`.
A script (this part of `vit-fast bench`) and a pytest-benchmark suite: see suite.py."""

import sys

from suite import benchmark_test, script

test_patch_embed = benchmark_test("patch_embed")

if __name__ == "__main__":
    sys.exit(script("patch_embed"))
