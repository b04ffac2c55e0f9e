"""Test-only correction of the Triton interpreter's bfloat16 ``tl.dot`` (installed by conftest.py).

The interpreter keeps bfloat16 values as their uint16 bit patterns and its ``create_dot`` hands those to
``np.matmul`` as they are, so it multiplies integers (triton issue 11584); it already widens fp8 operands before
the matmul. The correction widens bfloat16 operands to float32 the same way (exact: a bfloat16 is the top half
of a float32), then lets the original compute the product. It installs only where the interpreter is wrong, so
a Triton release that fixes it makes :func:`install` a no-op.
"""

from __future__ import annotations

import numpy as np

ORIGINAL = None  # the interpreter's own create_dot, kept by install() (tests compare against it)


def _widen(handle):
    """A bfloat16 TensorHandle as float32 values (bits << 16); any other handle unchanged."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    if handle.dtype.scalar != tl.bfloat16:
        return handle
    return TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def corrected(original):
    """``create_dot`` that widens bfloat16 operands before calling ``original``."""

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, _widen(a), _widen(b), d, *args, **kwargs)

    create_dot.corrects = original
    return create_dot


def install() -> bool:
    """Correct the interpreter's bfloat16 dot unless it is right already; returns whether it patched."""
    global ORIGINAL
    import vit_fast.kernels as kernels
    from triton.runtime.interpreter import InterpreterBuilder

    kernels.interpreter_bf16_dot_ok.cache_clear()
    if getattr(InterpreterBuilder.create_dot, "corrects", None) is not None or kernels.interpreter_bf16_dot_ok():
        return False
    ORIGINAL = InterpreterBuilder.create_dot
    InterpreterBuilder.create_dot = corrected(ORIGINAL)
    kernels.interpreter_bf16_dot_ok.cache_clear()
    return True
