"""Test-only corrections of the Triton interpreter's bfloat16 (installed by conftest.py), so that bf16 kernel
numerics on CPU are those of a GPU.

The interpreter keeps bfloat16 values as their uint16 bit patterns, and gets two things wrong:

- ``tl.dot``: its ``create_dot`` hands the bit patterns to ``np.matmul`` as they are, so it multiplies integers
  (triton issue 11584); it already widens fp8 operands before the matmul. The correction widens bfloat16
  operands to float32 the same way (exact: a bfloat16 is the top half of a float32), then lets the original
  compute the product.
- ``tl.dot`` on float8_e4m3fn operands: it widens them through float16 without e4m3fn's NaN (0x7F, 0xFF
  become +-480), so a NaN in an FP8 GEMM's input leaves a finite output. The same correction widens e4m3fn
  operands to float32 exactly, NaN included, through torch's own conversion.
- float32 -> bfloat16 casts (``x.to(tl.bfloat16)``, a store into a bf16 tensor): it drops the low 16 bits,
  rounding toward zero, where a GPU rounds to nearest even. Truncation doubles the rounding error of every cast,
  enough to push an attention gradient with peaked softmax rows past the tolerance rule on CPU alone. The
  correction rounds as torch (and the GPU) does.

Each installs only where the interpreter is wrong, so a Triton release that fixes one makes it a no-op.
"""

from __future__ import annotations

import numpy as np
import torch

ORIGINAL = None  # the interpreter's own create_dot, kept by install() (tests compare against it)
ORIGINAL_CAST = None  # the interpreter's own cast_impl, likewise


def _widen(handle):
    """A bfloat16 or float8_e4m3fn TensorHandle as float32 values; any other handle unchanged."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    if handle.dtype.scalar == tl.bfloat16:
        return TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
    if handle.dtype.scalar == tl.float8e4nv:
        bits = torch.from_numpy(np.ascontiguousarray(handle.data).view(np.uint8))
        return TensorHandle(bits.view(torch.float8_e4m3fn).float().numpy(), tl.float32)
    return handle


def corrected(original):
    """``create_dot`` that widens bfloat16 and float8_e4m3fn operands before calling ``original``."""

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, _widen(a), _widen(b), d, *args, **kwargs)

    create_dot.corrects = original
    return create_dot


def corrected_cast(original):
    """``cast_impl`` that rounds float32 -> bfloat16 to nearest even; every other cast goes to ``original``."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bf16 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return TensorHandle(bf16.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl.corrects = original
    return cast_impl


def cast_rounds(cast_impl=None) -> bool:
    """Whether the interpreter's float32 -> bfloat16 cast rounds to nearest: 1 + 3/512 must become 1 + 1/128."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle, interpreter_builder

    cast = cast_impl or InterpreterBuilder.cast_impl
    x = TensorHandle(np.array([1 + 3 / 512], dtype=np.float32), tl.float32)
    bits = cast(interpreter_builder, x, tl.bfloat16).data
    return int(np.asarray(bits).view(np.uint16)[0]) == 0x3F81


def install() -> bool:
    """Correct the interpreter's bfloat16 dot and cast unless they are right already; returns whether it patched
    either."""
    global ORIGINAL, ORIGINAL_CAST
    import vit_fast.kernels as kernels
    from triton.runtime.interpreter import InterpreterBuilder

    patched = False
    cast = getattr(InterpreterBuilder, "cast_impl", None)  # a release that restructures its casts is left alone
    if cast is not None and getattr(cast, "corrects", None) is None and not cast_rounds():
        ORIGINAL_CAST = InterpreterBuilder.cast_impl
        InterpreterBuilder.cast_impl = corrected_cast(ORIGINAL_CAST)
        patched = True
    kernels.interpreter_bf16_dot_ok.cache_clear()
    if getattr(InterpreterBuilder.create_dot, "corrects", None) is None and not kernels.interpreter_bf16_dot_ok():
        ORIGINAL = InterpreterBuilder.create_dot
        InterpreterBuilder.create_dot = corrected(ORIGINAL)
        patched = True
    kernels.interpreter_bf16_dot_ok.cache_clear()
    return patched
