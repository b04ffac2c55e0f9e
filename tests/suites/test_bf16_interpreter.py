"""bfloat16 Triton numerics on CPU: the interpreter's bf16 ``tl.dot`` and cast corrections
(tests/support/interpreter_bf16.py, installed by conftest.py) is needed, is a no-op once Triton fixes its
interpreter, lifts the dispatcher's "bfloat16 on CPU" reason without letting auto pick Triton on CPU; and every
op's Triton kernels match the float64 oracle in bf16 (forward and every gradient, odd shapes, strided views,
autocast)."""

from __future__ import annotations

import interpreter_bf16
import pytest
import torch
import vit_fast.kernels as kernels
from helpers import (
    attention_inputs,
    check_oracle,
    layer_norm_inputs,
    layernorm_mlp_inputs,
    needs_triton,
    patch_embed_inputs,
)

from vit_fast import backends
from vit_fast.tolerance import ATOL, assert_close

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
interpreter = pytest.importorskip("triton.runtime.interpreter")

pytestmark = [
    needs_triton,
    pytest.mark.skipif(not kernels.interpreting(), reason="the correction concerns the Triton interpreter (CPU)"),
]
BF16 = torch.bfloat16


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    """c = a @ b for one (BLOCK, BLOCK) tile: a bf16 tl.dot with an fp32 accumulator."""
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    acc = tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile))
    tl.store(c_ptr + tile, acc)


def _kernel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    c = torch.full((16, 16), float("nan"))
    _dot_kernel[(1,)](a, b, c, BLOCK=16)
    return c


def _check_dot(a: torch.Tensor, b: torch.Tensor) -> None:
    """The kernel's fp32 dot of bf16 a, b by the tolerance rule: bf16 products are exact in fp32, only the
    summation order differs from torch's."""
    assert_close(_kernel_dot(a, b), a.float() @ b.float(), a.double() @ b.double(), name="tl.dot")


@pytest.fixture
def builder(monkeypatch):
    """Swap the interpreter's create_dot within a test; the dispatcher's cached answer follows both ways."""

    def use(create_dot) -> None:
        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
        kernels.interpreter_bf16_dot_ok.cache_clear()

    yield use
    monkeypatch.undo()
    kernels.interpreter_bf16_dot_ok.cache_clear()


def test_the_correction_is_needed_and_a_fixed_interpreter_makes_it_a_no_op(builder):
    a, b = torch.randn(16, 16).to(BF16), torch.randn(16, 16).to(BF16)
    if interpreter_bf16.ORIGINAL is None:  # this Triton computes bf16 dots right: nothing was installed
        assert kernels.interpreter_bf16_dot_ok() and not hasattr(interpreter.InterpreterBuilder.create_dot, "corrects")
        _check_dot(a, b)
        return
    _check_dot(a, b)
    builder(interpreter_bf16.ORIGINAL)  # the interpreter as released: raw uint16 bit patterns multiplied
    assert not kernels.interpreter_bf16_dot_ok()
    assert (_kernel_dot(a, b) - a.float() @ b.float()).abs().max() > 1e3
    # A release that fixes it (here: one that widens bf16 itself, without the correction's marker)
    fixed = interpreter_bf16.corrected(interpreter_bf16.ORIGINAL)
    del fixed.corrects
    builder(fixed)
    assert interpreter_bf16.install() is False and interpreter.InterpreterBuilder.create_dot is fixed
    _check_dot(a, b)


@triton.jit
def _to_bf16_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


def test_the_cast_correction_rounds_to_nearest_even_as_a_gpu_does(monkeypatch):
    # halfway cases both ways, just above and below halfway, a carry into the exponent, overflow, inf and NaN
    x = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-12, -(1 + 2**-8 - 2**-12), 2 - 2**-9,
                      3.4e38, float("inf"), float("-inf"), float("nan"), 1e-40, 0.0, -0.0, 5.0, -7.25, 1e-3, 65504.0,
                      *torch.randn(48, generator=torch.Generator().manual_seed(0)).tolist()], dtype=torch.float32)
    y = torch.empty(64, dtype=BF16)
    _to_bf16_kernel[(1,)](x, y, BLOCK=64)
    assert torch.equal(y.view(torch.int16), x.to(BF16).view(torch.int16))
    if interpreter_bf16.ORIGINAL_CAST is None:  # this Triton rounds already: nothing was installed
        assert interpreter_bf16.cast_rounds()
        return
    # the interpreter as released truncates: 1 + 3/512 becomes 1, not 1 + 1/128
    assert not interpreter_bf16.cast_rounds(interpreter_bf16.ORIGINAL_CAST)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", interpreter_bf16.ORIGINAL_CAST)
    _to_bf16_kernel[(1,)](x, y, BLOCK=64)
    assert not torch.equal(y.view(torch.int16), x.to(BF16).view(torch.int16))


def test_the_dispatcher_reason_follows_the_interpreter_and_auto_stays_on_the_reference(builder):
    args, kwargs = attention_inputs(1, 2, 9, 32, BF16)
    assert backends.reasons("triton", "attention", args, kwargs) == []
    assert backends.pick("attention", args, kwargs, setting="auto").backend == "reference"
    if interpreter_bf16.ORIGINAL is not None:
        builder(interpreter_bf16.ORIGINAL)
        assert any("bfloat16 tl.dot" in r for r in backends.reasons("triton", "attention", args, kwargs))


# ---- bf16 numerics of every op's Triton kernels, against the float64 oracle --------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 1, 64), (1, 2, 7, 80), (1, 2, 50, 64), (1, 1, 33, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_attention_bf16(shape):
    """q, k, v are strided views of one packed (B, N, 3, H, D) buffer, as in the model."""
    check_oracle("attention", "triton", *attention_inputs(*shape, BF16))


@pytest.mark.parametrize("shape, param_dtype", [((4, 7, 80), BF16), ((9, 48), torch.float32)],
                         ids=["bf16", "bf16-x-fp32-params"])
def test_layer_norm_bf16(shape, param_dtype):
    check_oracle("layer_norm", "triton", *layer_norm_inputs(shape, BF16, param_dtype=param_dtype))


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layernorm_mlp_bf16(residual):
    check_oracle("layernorm_mlp", "triton", *layernorm_mlp_inputs((2, 7, 48), 200, BF16, residual=residual))


def test_layernorm_mlp_under_bf16_autocast():
    """fp32 input and parameters, bf16 GEMMs: the model's mixed-precision path on CPU. The fp32 results come from
    bf16 GEMMs, so bf16's absolute tolerance applies (as test_layernorm_mlp.py does for fp16 autocast)."""
    args, kwargs = layernorm_mlp_inputs((2, 9, 48), 96, torch.float32)
    with torch.autocast("cpu", dtype=BF16):
        check_oracle("layernorm_mlp", "triton", args, kwargs, atol=ATOL[BF16])


@pytest.mark.parametrize("pos", ["1+N", "N"])
def test_patch_embed_bf16(pos):
    check_oracle("patch_embed", "triton", *patch_embed_inputs(2, 3, 16, 12, 4, 40, pos=pos, dtype=BF16))
