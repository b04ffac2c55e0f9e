"""LayerNorm over the last dimension, and its FP8 form: a LayerNorm whose output leaves as the e4m3 input of an
FP8 GEMM (one fp32 scale per row)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.backends import Call, Facts, Limits
from vit_fast.ops import _checks
from vit_fast.ops._checks import upcast_dtype
from vit_fast.ops._fp8 import FP8, FP8_CAPABILITY, quantize_rows_ref, rows_bench
from vit_fast.ops._inputs import (
    BATCHES,
    DTYPES,
    REFERENCE_MIN_WIDTH,
    ROW_LAYOUTS,
    close_rows,
    layer_norm_by_hand,
    meta,
    randn,
    row_leaf,
    row_nan,
    row_view,
    rows_of,
    seq_lengths,
    widths,
)
from vit_fast.ops.spec import Bench, Cases, Contract, OpSpec, declare, register_backend, triton_kernels

_kernels = triton_kernels("layer_norm")  # None when the Triton kernels cannot load: the reason is recorded
_qr = triton_kernels("quantize_rows")


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, *,
                   upcast: bool = False) -> torch.Tensor:
    """Reference LayerNorm through ``F.layer_norm``; ``upcast=True`` computes (and returns) in float32."""
    if upcast:
        dt = upcast_dtype(x.dtype)
        x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm_fp8_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of the (M, C) rows in fp32, then :func:`~vit_fast.ops.quantize_rows_ref`."""
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return quantize_rows_ref(y)


# Device types whose autocast runs layer_norm in float32 (CUDA's autocast policy); CPU autocast leaves it alone.
_AUTOCAST_FP32_DEVICES = ("cuda",)


def _call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = 1e-6) -> Call:
    if x.device.type in _AUTOCAST_FP32_DEVICES and _checks.autocast_on(x.device):
        x, weight, bias = x.float(), weight.float(), bias.float()
    return Call((x, weight, bias, float(eps)))


def _fp8_call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = 1e-6) -> Call:
    return Call((x, weight, bias, float(eps)))


def _facts(call: Call) -> Facts:
    return Facts(width=call.args[0].shape[-1])


def _bucket(call: Call) -> tuple[int, ...]:
    x = call.args[0]
    c = x.shape[-1]
    return c, backends.size_bucket(x.numel() // max(c, 1))  # (C, rows)


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    w = meta(768, dtype=dtype)  # ViT-B/16 tokens at batch 64: (B, N, C)
    return (meta(64, 197, 768, dtype=dtype), w, w), {"eps": 1e-6}


def _fp8_example(dtype: torch.dtype) -> tuple[tuple, dict]:
    w = meta(768, dtype=dtype)
    return (meta(64 * 197, 768, dtype=dtype), w, w), {"eps": 1e-6}


# ---- the kernel contract: forward (x, weight, bias, eps) -> (y, mean, rstd), backward -> (dx, dweight, dbias) ----
#
# y is like x (contiguous); mean and rstd (M,) are fp32 per row, saved statistics that are not differentiable.


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (M, C) with a unit column stride: a view when the leading dims merge, else a copy."""
    t2 = t.reshape(-1, t.shape[-1])  # (M, C)
    return t2 if t2.shape[1] == 1 or t2.stride(1) == 1 else t2.contiguous()


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype


def _backward_for(bwd_op: Callable) -> Callable:
    def backward(ctx, grad_out: torch.Tensor, _grad_mean, _grad_rstd) -> tuple:
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = bwd_op(grad_out, x, weight, mean, rstd)
        need = ctx.needs_input_grad
        dbias = dbias.to(ctx.bias_dtype) if need[2] else None
        return dx if need[0] else None, dweight if need[1] else None, dbias, None

    return backward


# The fakes take the schemas' arguments (register_fake calls them positionally).
def _fwd_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    stats = x.new_empty((math.prod(x.shape[:-1]),), dtype=torch.float32)
    return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)


def _bwd_fake(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _fp8_fake(x: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[:1], dtype=torch.float32)


CONTRACT = Contract("(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)", _fwd_fake,
                    result=0,
                    bwd_schema="(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd) "
                               "-> (Tensor, Tensor, Tensor)",
                    bwd_fake=_bwd_fake, setup_context=_setup_context, backward=_backward_for)
FP8_CONTRACT = Contract("(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor)", _fp8_fake)


# ---- public functions -----------------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dimension.

    Args:
        x: (..., C).
        weight, bias: (C,).
        eps: added to the variance.

    Returns:
        (..., C), normalized, scaled by ``weight`` and shifted by ``bias``. A NaN in a row of x gives a NaN
        row, in every backend.
    """
    _checks.rows_and_affine(x, "weight", weight, "bias", bias, eps)
    _checks.same_device(x=x, weight=weight, bias=bias)
    return backends.dispatch("layer_norm", _call(x, weight, bias, eps=eps))


def layer_norm_fp8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm whose output is the e4m3 input of an FP8 GEMM (inference).

    Args:
        x: (M, C) float; weight, bias: (C,).

    Returns:
        q (M, C) float8_e4m3fn and scale (M,) float32: ``q * scale[:, None] ~= layer_norm(x)``. A NaN in a row of x
        makes that row's scale and values NaN.
    """
    _checks.tensor("x", x, ndim=2)
    _checks.rows_and_affine(x, "weight", weight, "bias", bias, eps)
    _checks.same_device(x=x, weight=weight, bias=bias)
    return backends.dispatch("layer_norm_fp8", _fp8_call(x, weight, bias, eps=eps))


# ---- the kernel backends --------------------------------------------------------------------------------------

def _triton_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    y, mean, rstd = _kernels.layer_norm_fwd(_rows(x), weight.contiguous(), bias.contiguous(), eps)
    return y.view(x.shape), mean, rstd


def _triton_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                rstd: torch.Tensor):
    dx, dweight, dbias = _kernels.layer_norm_bwd(_rows(grad_out), _rows(x), weight.contiguous(), mean, rstd)
    return dx.view(x.shape), dweight, dbias


def _triton_fp8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    return _kernels.layer_norm_fwd_fp8(_rows(x), weight.contiguous(), bias.contiguous(), eps)


# ---- cases: what the suites and the benchmarks make of the ops --------------------------------------------------


def _leaves(dims: Mapping, g: torch.Generator) -> dict[str, torch.Tensor]:
    c = int(dims["C"])
    n_params = 2 * c if dims.get("params_strided") else c
    return {"x": row_leaf(g, dims.get("layout", "contiguous"), int(dims["B"]), int(dims["N"]), c),
            "weight": randn(g, n_params, std=0.5, mean=1.0), "bias": randn(g, n_params, std=0.5)}


def _view(dims: Mapping, t: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    step = 2 if dims.get("params_strided") else 1
    x = row_view(t["x"], dims.get("layout", "contiguous"), int(dims["C"]))
    return (x, t["weight"][::step], t["bias"][::step]), {"eps": dims.get("eps", 1e-6)}


def _oracle(dims: Mapping, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    (x, w, b), kw = _view(dims, t)
    return layer_norm_by_hand(x, w, b, kw["eps"])


def _bad() -> list:
    x, w = torch.randn(4, 8), torch.randn(8)
    return [
        ((torch.tensor(1.0), w, w), {}, ValueError, "x must have at least 1 dimension"),
        (([1.0], w, w), {}, TypeError, "x must be a torch.Tensor"),
        ((x.long(), w, w), {}, TypeError, "x must be a floating-point"),
        ((x, w[None], w), {}, ValueError, "weight must be 1-D"),
        ((x, torch.randn(7), w), {}, ValueError, "weight must have shape"),
        ((x, w, torch.randn(9)), {}, ValueError, "bias must have shape"),
        ((x, w, w.int()), {}, TypeError, "bias must be a floating-point"),
        ((x, w.to("meta"), w), {}, ValueError, "one device"),
        ((x, w, w), {"eps": 0.0}, ValueError, "eps must be positive"),
    ]


_BUDGETS = {"reference": (1800, 1024), "interpreter": (128, 1024), "interpreter_slow": (1800, 2048)}  # rows, C


def _strategy(budget: str):
    from hypothesis import strategies as st

    rows, most_c = _BUDGETS[budget]

    @st.composite
    def draw(d) -> tuple[torch.dtype, dict]:
        b = d(st.sampled_from(BATCHES))
        n = d(seq_lengths(max(1, rows // max(b, 1))))
        least = REFERENCE_MIN_WIDTH if budget == "reference" else 1
        dims = {"B": b, "N": n, "C": d(widths(most_c, least)), "layout": d(st.sampled_from(ROW_LAYOUTS)),
                "params_strided": d(st.booleans()), "eps": d(st.sampled_from((1e-6, 1e-5, 0.1)))}
        return d(st.sampled_from(DTYPES)), dims

    return draw()


def _layer_norm_bench() -> Bench:
    def eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def flops(dims: Mapping, mode: str) -> int:  # about 8 per element forward and 12 backward; memory-bound
        m = rows_of(dims) * int(dims["C"])
        return 8 * m if mode == "fwd" else 20 * m

    def nbytes(dims: Mapping, mode: str, elem: int) -> int:
        # forward reads x, weight, bias and writes y; the backward reads x, dy, weight and writes dx, dweight,
        # dbias (the per-row statistics left out: a kernel may recompute them)
        mc, c = rows_of(dims) * int(dims["C"]), int(dims["C"])
        fwd = (2 * mc + 2 * c) * elem
        return fwd if mode == "fwd" else fwd + (3 * mc + 3 * c) * elem

    def liger() -> Callable:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return lambda x, w, b, *, eps: LigerLayerNormFunction.apply(x, w, b, eps)

    return Bench("GB/s", ("B", "N", "C"), (({"B": 256, "N": 197, "C": 768},),
                                            ({"B": 8, "N": 65, "C": 192}, {"B": 2, "N": 197, "C": 384})),
                 model_shape=lambda d: {"N": d["N"], "C": d["C"]}, flops=flops, bytes=nbytes,
                 baselines=lambda: [("eager:F.layer_norm", eager, contextlib.nullcontext)],
                 compiled=("compiled:F.layer_norm", eager), peers=lambda: [("peer:liger", "liger_kernel", liger)],
                 gpu_check=({"B": 2, "N": 197, "C": 768}, {"B": 1, "N": 7, "C": 1280}))  # ViT-B; odd rows at ViT-H


def _fp8_leaves(dims: Mapping, g: torch.Generator) -> dict[str, torch.Tensor]:
    """(M, C) rows: a row layout's storage (B = 1), or contiguous rows with every-other-element parameters."""
    layout, c = dims.get("layout", "contiguous"), int(dims["C"])
    strided = layout == "params_strided"
    return {"x": row_leaf(g, "contiguous" if strided else layout, 1, int(dims["M"]), c),
            "weight": randn(g, 2 * c if strided else c, std=0.5, mean=1.0),
            "bias": randn(g, 2 * c if strided else c, std=0.5)}


def _fp8_view(dims: Mapping, t: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    layout = dims.get("layout", "contiguous")
    step = 2 if layout == "params_strided" else 1
    x = row_view(t["x"], "contiguous" if step == 2 else layout, int(dims["C"]))[0]  # (M, C)
    return (x, t["weight"][::step], t["bias"][::step]), {"eps": 1e-6}


def _fp8_oracle(dims: Mapping, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    (x, w, b), kw = _fp8_view(dims, t)
    return layer_norm_by_hand(x, w, b, kw["eps"])


def _fp8_nan(leaves: Mapping[str, torch.Tensor]) -> None:
    """A NaN in row 3 of x: the close rule holds that row's scale NaN, and so its whole e4m3 row."""
    leaves["x"][0, 3, 0] = float("nan")  # (1, M, C) storage


def _fp8_bad() -> list:
    w = torch.randn(8)
    x = torch.randn(4, 8)
    return [(([1.0], w, w), {}, TypeError, "x must be a torch.Tensor"),
            ((x.long(), w, w), {}, TypeError, "x must be a floating-point"),
            ((x[0], w, w), {}, ValueError, "x must be 2-D"),
            ((x[None], w, w), {}, ValueError, "x must be 2-D"),
            *_bad()[3:]]


_FP8_LAYOUTS = ("contiguous", "rows_sliced", "cols_sliced", "params_strided", "transposed")


def _fp8_strategy(budget: str):
    from hypothesis import strategies as st

    rows, most_c = {"reference": (600, 1024), "interpreter": (12, 96), "interpreter_slow": (200, 320)}[budget]
    # from REFERENCE_MIN_WIDTH: the exact rows are float64 math, the results' fp32 LayerNorm of a row of one to three
    # columns can be off it by 1/sqrt(eps) roundings (see REFERENCE_MIN_WIDTH), more than an e4m3 step
    return st.tuples(st.sampled_from(DTYPES), st.fixed_dictionaries(
        {"M": st.integers(0, rows), "C": widths(most_c, REFERENCE_MIN_WIDTH), "layout": st.sampled_from(_FP8_LAYOUTS)}))


CASES = Cases(
    leaves=_leaves, view=_view, oracle=_oracle, grads=lambda dims: ("x", "weight", "bias"),
    reduction=lambda dims: max(int(dims["C"]), rows_of(dims)),  # a row's statistics; the parameter gradients
    small={"B": 2, "N": 9, "C": 48}, empty=({"B": 0, "N": 5, "C": 16},), deterministic={"B": 1, "N": 300, "C": 80},
    layouts=ROW_LAYOUTS, nan=(("x", row_nan(1, 4, 7)),), requested=((("x", "bias"), True), (("weight",), True)),
    bad=_bad, strategy=_strategy,
    examples=((torch.float32, {"B": 0, "N": 5, "C": 77}), (torch.float16, {"B": 0, "N": 5, "C": 77}),
              (torch.float32, {"B": 2, "N": 50, "C": 768, "layout": "transposed"})),
)
FP8_CASES = Cases(
    leaves=_fp8_leaves, view=_fp8_view, oracle=_fp8_oracle, reduction=lambda dims: int(dims["C"]),
    small={"M": 7, "C": 48}, empty=({"M": 0, "C": 16},), layouts=_FP8_LAYOUTS, nan=(("x", _fp8_nan),),
    bad=_fp8_bad, strategy=_fp8_strategy, close=close_rows, examples=((torch.float32, {"M": 0, "C": 16}),),
)

LAYER_NORM = declare(OpSpec("layer_norm", layer_norm, layer_norm_ref, _call, _facts, _bucket, _example, CONTRACT,
                            CASES, _layer_norm_bench()))
# The LayerNorm before an FP8 GEMM (it also reads its weight and bias)
FP8_BENCH = rows_bench((768, 192), lambda d: d["C"], params=2, gpu_check=({"B": 2, "N": 197, "C": 768},))
LAYER_NORM_FP8 = declare(OpSpec("layer_norm_fp8", layer_norm_fp8, layer_norm_fp8_ref, _fp8_call, _facts, _bucket,
                                _fp8_example, FP8_CONTRACT, FP8_CASES, FP8_BENCH))

if _kernels is not None:
    register_backend(LAYER_NORM, "triton", Limits(devices=("cuda", "cpu"), max_width=_kernels.MAX_C,
                                                  width_note="rows are held in registers"),
                     fwd=_triton_fwd, bwd=_triton_bwd)
    if _qr is not None:
        register_backend(LAYER_NORM_FP8, "triton", Limits(devices=("cuda", "cpu"), max_width=_qr.MAX_C,
                                                          width_note="rows are held in registers",
                                                          min_capability=FP8_CAPABILITY), fwd=_triton_fp8)
register_backend(LAYER_NORM, "cuda", Limits(max_width=6144, width_note="the backward keeps per-warp column sums of "
                                            "a row in shared memory"))
