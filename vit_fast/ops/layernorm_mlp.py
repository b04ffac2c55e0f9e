"""The transformer MLP branch in one op: fc2(gelu(fc1(layer_norm(x)))) (+ residual)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.backends import HALF, Call, Facts, Limits, dtype_name
from vit_fast.ops import _checks
from vit_fast.ops._checks import upcast_dtype
from vit_fast.ops._inputs import (
    BATCHES,
    DTYPES,
    REFERENCE_MIN_WIDTH,
    ROW_LAYOUTS,
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

_kernels = triton_kernels("layernorm_mlp")  # None when the Triton kernels cannot load: the reason is recorded


def layernorm_mlp_ref(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, fc1_weight: torch.Tensor,
                      fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor,
                      residual: torch.Tensor | None = None, eps: float = 1e-6, dropout_p: float = 0.0, *,
                      upcast: bool = False) -> torch.Tensor:
    """Reference through ``F.layer_norm``, ``F.linear`` and exact (erf) ``F.gelu``; differentiable.

    Dropout (``dropout_p``, training only) follows the GELU and fc2, before the residual, as in timm's Mlp.
    ``upcast=True`` computes (and returns) in float32.
    """
    if upcast:
        dt = upcast_dtype(x.dtype)
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias = (
            t.to(dt) for t in (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        )
        residual = None if residual is None else residual.to(dt)
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    h = F.gelu(F.linear(h, fc1_weight, fc1_bias))  # (..., hidden)
    h = F.dropout(h, dropout_p) if dropout_p > 0 else h
    out = F.linear(h, fc2_weight, fc2_bias)  # (..., C_out)
    out = F.dropout(out, dropout_p) if dropout_p > 0 else out
    return out if residual is None else residual + out


def _validate(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, dropout_p) -> None:
    c = _checks.rows_and_affine(x, "ln_weight", ln_weight, "ln_bias", ln_bias, eps)
    _checks.tensor("fc1_weight", fc1_weight, ndim=2)
    _checks.shape("fc1_weight", fc1_weight, (None, c), "(hidden, C): nn.Linear layout with in_features = C")
    hidden = fc1_weight.shape[0]
    _checks.tensor("fc1_bias", fc1_bias, ndim=1)
    _checks.shape("fc1_bias", fc1_bias, (hidden,), "(hidden,)")
    _checks.tensor("fc2_weight", fc2_weight, ndim=2)
    _checks.shape("fc2_weight", fc2_weight, (None, hidden), "(C_out, hidden): nn.Linear layout")
    c_out = fc2_weight.shape[0]
    _checks.tensor("fc2_bias", fc2_bias, ndim=1)
    _checks.shape("fc2_bias", fc2_bias, (c_out,), "(C_out,)")
    if residual is not None:
        _checks.tensor("residual", residual)
        _checks.shape("residual", residual, (*x.shape[:-1], c_out), "(the output's shape (..., C_out))")
    _checks.same_device(x=x, ln_weight=ln_weight, ln_bias=ln_bias, fc1_weight=fc1_weight, fc1_bias=fc1_bias,
                        fc2_weight=fc2_weight, fc2_bias=fc2_bias, residual=residual)
    _checks.probability("dropout_p", dropout_p)


def _call(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, fc1_weight: torch.Tensor,
          fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, *, eps: float = 1e-6,
          residual: torch.Tensor | None = None, dropout_p: float = 0.0) -> Call:
    # Custom ops do not see autocast: cast the GEMM operands as autocast would for F.linear. The LayerNorm reads x
    # and its parameters as they are and computes in fp32, as autocast's fp32 layer_norm does.
    if _checks.autocast_on(x.device):  # outside autocast mixed dtypes stay mixed: the limits refuse them
        cdt = _checks.matmul_dtype(x)
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = (t.to(cdt) for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias))
    args = (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    save_pre = torch.is_grad_enabled() and any(t.requires_grad for t in args)  # the backward will need gelu's input
    return Call((*args, residual, float(eps)), (save_pre,), {"dropout_p": dropout_p})


def _facts(call: Call) -> Facts:
    x, _, _, fc1_weight, fc1_bias, fc2_weight, fc2_bias = call.args[:7]
    # Outside autocast the GEMM operands must share one dtype (autocast's casts were applied by the call).
    gemm = {"x": x, "fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "fc2_weight": fc2_weight, "fc2_bias": fc2_bias}
    mismatch = ()
    if not _checks.autocast_on(x.device) and len({t.dtype for t in gemm.values()}) > 1:
        listing = ", ".join(f"{k} {dtype_name(t.dtype)}" for k, t in gemm.items())
        mismatch = (f"mixed dtypes outside autocast ({listing})",)
    return Facts(gemm_dtype=fc1_weight.dtype, width=x.shape[-1], dropout_p=call.extras.get("dropout_p", 0.0),
                 mismatch=mismatch)


def _bucket(call: Call) -> tuple[int, ...]:
    x, fc1_weight = call.args[0], call.args[3]
    c = x.shape[-1]
    return c, fc1_weight.shape[0], backends.size_bucket(x.numel() // max(c, 1))  # (C, hidden, rows)


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    x = meta(64, 197, 768, dtype=dtype)  # ViT-B/16 tokens: (B, N, C), hidden 3072
    params = (meta(768, dtype=dtype), meta(768, dtype=dtype), meta(3072, 768, dtype=dtype), meta(3072, dtype=dtype),
              meta(768, 3072, dtype=dtype), meta(768, dtype=dtype))
    return (x, *params), {"eps": 1e-6, "residual": x, "dropout_p": 0.0}


# ---- the kernel contract ----------------------------------------------------------------------------------------
#
#   forward (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, eps, save_pre)
#     -> (out, mean, rstd, pre)
#   backward (dout, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, mean, rstd, pre, grad_ln, grad_fc1,
#             grad_fc2) -> (dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias)
# mean, rstd (M,) are fp32; pre (M, hidden) is the pre-GELU activation, or (0,) when the forward did not save it
# (the backward then recomputes it). Gradients not asked for come back as empty (0,) tensors.


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, _fc2_bias, residual, _eps, _save_pre = inputs
    _out, mean, rstd, pre = output
    ctx.save_for_backward(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, mean, rstd, pre)
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.mark_non_differentiable(mean, rstd, pre)


def _backward_for(bwd_op):
    """The autograd backward of a layernorm_mlp forward op, given its backward op (signatures above)."""

    def backward(ctx, dout: torch.Tensor, *_stat_grads: torch.Tensor | None) -> tuple:
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, mean, rstd, pre = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_ln, grad_fc1, grad_fc2 = any(need[0:3]), any(need[3:5]), any(need[5:7])
        grads: list[torch.Tensor | None] = [None] * 7
        if grad_ln or grad_fc1 or grad_fc2:
            computed = bwd_op(dout.contiguous(), x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, mean, rstd,
                              pre, grad_ln, grad_fc1, grad_fc2)
            grads = [g if n else None for g, n in zip(computed, need[:7], strict=True)]
        dres = dout.to(ctx.residual_dtype) if ctx.residual_dtype is not None and need[7] else None
        return (*grads, dres, None, None)

    return backward


# The fakes take the schemas' arguments (register_fake calls them positionally).
def _fwd_fake(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, eps, save_pre):
    cdt = fc1_weight.dtype
    out_dtype = cdt if residual is None else torch.promote_types(cdt, residual.dtype)
    m = x.numel() // x.shape[-1]
    out = x.new_empty((*x.shape[:-1], fc2_weight.shape[0]), dtype=out_dtype)
    stat = x.new_empty((m,), dtype=torch.float32)
    pre = x.new_empty((m, fc1_weight.shape[0]) if save_pre else (0,), dtype=cdt)
    return out, stat, torch.empty_like(stat), pre


def _bwd_fake(dout, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, mean, rstd, pre, grad_ln, grad_fc1,
              grad_fc2):
    cdt = fc1_weight.dtype

    def grad(wanted: bool, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return x.new_empty(shape if wanted else (0,), dtype=dtype)

    return (grad(grad_ln, x.dtype, tuple(x.shape)), grad(grad_ln, ln_weight.dtype, tuple(ln_weight.shape)),
            grad(grad_ln, ln_bias.dtype, tuple(ln_bias.shape)), grad(grad_fc1, cdt, tuple(fc1_weight.shape)),
            grad(grad_fc1, fc1_bias.dtype, tuple(fc1_bias.shape)), grad(grad_fc2, cdt, tuple(fc2_weight.shape)),
            grad(grad_fc2, cdt, (fc2_weight.shape[0],)))


CONTRACT = Contract(
    "(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, "
    "Tensor fc2_bias, Tensor? residual, float eps, bool save_pre) -> (Tensor, Tensor, Tensor, Tensor)", _fwd_fake,
    result=0,
    bwd_schema="(Tensor dout, Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc1_weight, Tensor fc1_bias, "
               "Tensor fc2_weight, Tensor mean, Tensor rstd, Tensor pre, bool grad_ln, bool grad_fc1, bool grad_fc2) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    bwd_fake=_bwd_fake, setup_context=_setup_context, backward=_backward_for)


def layernorm_mlp(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, fc1_weight: torch.Tensor,
                  fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, *, eps: float = 1e-6,
                  residual: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """The MLP branch of a pre-LN transformer block in one call.

    Args:
        x: (..., C).
        ln_weight, ln_bias: (C,), the LayerNorm's affine parameters.
        fc1_weight: (hidden, C), fc1_bias: (hidden,), nn.Linear layout.
        fc2_weight: (C_out, hidden), fc2_bias: (C_out,).
        eps: the LayerNorm's eps.
        residual: optional (..., C_out), added to the result.
        dropout_p: dropout after the GELU and after fc2 (training only; the fused kernels take 0).

    Returns:
        (..., C_out) = fc2(gelu(fc1(layer_norm(x)))) [+ residual], GELU exact (erf). A NaN in a row of x gives
        a NaN row, in every backend.
    """
    _validate(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, dropout_p)
    return backends.dispatch("layernorm_mlp", _call(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight,
                                                     fc2_bias, eps=eps, residual=residual, dropout_p=dropout_p))


# ---- cases ------------------------------------------------------------------------------------------------------

LAYOUTS = (*ROW_LAYOUTS, "flat")  # flat: x as (B * N, C) rows, 2-D
_PARAMS = ("ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def _leaves(dims: Mapping, g: torch.Generator) -> dict[str, torch.Tensor]:
    b, n, c, hidden = (int(dims[k]) for k in ("B", "N", "C", "hidden"))
    c_out = int(dims.get("C_out", c))
    t = dims.get("weights_transposed", False)  # fc weights as .t() views of (in, out) storage
    layout = dims.get("layout", "contiguous")
    # fc weights scaled by 1/sqrt(fan_in): O(1) activations, so fp16 neither overflows nor flushes
    leaves = {"x": row_leaf(g, "contiguous" if layout == "flat" else layout, b, n, c),
              "ln_weight": randn(g, c, std=0.5, mean=1.0), "ln_bias": randn(g, c, std=0.5),
              "fc1_weight": randn(g, *((c, hidden) if t else (hidden, c)), std=c**-0.5),
              "fc1_bias": randn(g, hidden, std=0.5),
              "fc2_weight": randn(g, *((hidden, c_out) if t else (c_out, hidden)), std=hidden**-0.5),
              "fc2_bias": randn(g, c_out, std=0.5)}
    if dims.get("residual") is True:
        leaves["residual"] = randn(g, b, n, c_out)
    return leaves


def _view(dims: Mapping, t: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    layout = dims.get("layout", "contiguous")
    x = row_view(t["x"], "contiguous" if layout == "flat" else layout, int(dims["C"]))
    res = x if dims.get("residual") == "x" else t.get("residual")  # "x": the block's own input, as in the model
    if layout == "flat":
        x = x.reshape(-1, x.shape[-1])  # (B * N, C)
        res = None if res is None else res.reshape(-1, res.shape[-1])  # (B * N, C_out)
    fc1, fc2 = t["fc1_weight"], t["fc2_weight"]
    if dims.get("weights_transposed"):
        fc1, fc2 = fc1.t(), fc2.t()
    return ((x, t["ln_weight"], t["ln_bias"], fc1, t["fc1_bias"], fc2, t["fc2_bias"]),
            {"residual": res, "eps": dims.get("eps", 1e-6)})


def _oracle(dims: Mapping, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """By hand: LayerNorm, x W1^T + b1, the erf GELU, h W2^T + b2, the residual."""
    (x, ln_w, ln_b, w1, b1, w2, b2), kw = _view(dims, t)
    h = layer_norm_by_hand(x, ln_w, ln_b, kw["eps"]) @ w1.t() + b1
    out = (h * 0.5 * (1 + torch.erf(h / math.sqrt(2)))) @ w2.t() + b2
    return out if kw["residual"] is None else kw["residual"] + out


def _grads(dims: Mapping) -> tuple[str, ...]:
    return ("x", *_PARAMS, *(("residual",) if dims.get("residual") is True else ()))


def _bad() -> list:
    g = torch.Generator().manual_seed(0)
    dims = {"B": 2, "N": 3, "C": 8, "hidden": 12, "C_out": 6, "residual": True}
    (good, kw) = _view(dims, {k: v.float() for k, v in _leaves(dims, g).items()})
    res = kw["residual"]
    table = [
        (0, "not a tensor", TypeError, "x must be a torch.Tensor"),
        (0, torch.ones(2, 3, 8, dtype=torch.int64), TypeError, "x must be a floating-point tensor"),
        (0, torch.tensor(1.0), ValueError, "x must have at least 1 dimension"),
        (1, torch.ones(7), ValueError, "ln_weight must have shape"),
        (1, torch.ones(8, 1), ValueError, "ln_weight must be 1-D"),
        (2, torch.ones(9), ValueError, "ln_bias must have shape"),
        (2, torch.ones(8, dtype=torch.int32), TypeError, "ln_bias must be a floating-point tensor"),
        (3, torch.ones(12, 9), ValueError, "fc1_weight must have shape"),
        (3, torch.ones(12), ValueError, "fc1_weight must be 2-D"),
        (4, torch.ones(11), ValueError, "fc1_bias must have shape"),
        (5, torch.ones(6, 11), ValueError, "fc2_weight must have shape"),
        (6, torch.ones(5), ValueError, "fc2_bias must have shape"),
        (6, torch.ones(6, dtype=torch.int64), TypeError, "fc2_bias must be a floating-point tensor"),
    ]
    cases = [((*good[:i], bad, *good[i + 1:]), {"residual": res}, err, m) for i, bad, err, m in table]
    meta_fc1 = (*good[:3], good[3].to("meta"), *good[4:])
    return cases + [
        (good, {"residual": res[..., :5]}, ValueError, "residual must have shape"),
        (good, {"residual": res.long()}, TypeError, "residual must be a floating-point tensor"),
        (meta_fc1, {"residual": res}, ValueError, "all tensors must be on one device.*fc1_weight on meta"),
        (good, {"residual": res.to("meta")}, ValueError, "all tensors must be on one device.*residual on meta"),
        (good, {"residual": res, "eps": 0.0}, ValueError, "eps must be positive"),
        (good, {"residual": res, "dropout_p": 1.0}, ValueError, "dropout_p must be in"),
    ]


# rows B * N (the interpreter's cost is about 35 ms a row) and the widest C, C_out, hidden
_BUDGETS = {"reference": (600, 256), "interpreter": (12, 96), "interpreter_slow": (96, 320)}


def _strategy(budget: str):
    from hypothesis import strategies as st

    rows, most = _BUDGETS[budget]

    @st.composite
    def draw(d) -> tuple[torch.dtype, dict]:
        b = d(st.sampled_from(BATCHES))
        c = d(widths(most, REFERENCE_MIN_WIDTH if budget == "reference" else 1))
        dims = {"B": b, "N": d(seq_lengths(max(1, rows // max(b, 1)))), "C": c, "hidden": d(widths(most)),
                "C_out": d(st.one_of(st.just(c), widths(most))),  # the block's C, or a projection
                "layout": d(st.sampled_from(LAYOUTS)), "weights_transposed": d(st.booleans()),
                "residual": d(st.booleans())}
        return d(st.sampled_from(DTYPES)), dims

    return draw()


def _mlp_eager(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, fc1_weight: torch.Tensor,
               fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, *, eps: float,
               residual: torch.Tensor) -> torch.Tensor:
    """What a PyTorch ViT block does: LayerNorm -> Linear -> GELU -> Linear, plus the residual."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    return residual + F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def _flops(dims: Mapping, mode: str) -> int:
    # forward: fc1 and fc2, 2 * M * C * hidden each; backward: input and weight gradients of both, twice the
    # forward. LayerNorm, GELU, bias and residual (O(M * hidden)) are left out.
    fwd = 4 * rows_of(dims) * int(dims["C"]) * int(dims["hidden"])
    return fwd if mode == "fwd" else 3 * fwd


def _bytes(dims: Mapping, mode: str, elem: int) -> int:
    # forward reads x (also the residual) and the parameters, writes the output; the hidden activation need not
    # leave the chip. The backward reads dout, x and the weights, writes dx and the parameter gradients.
    mc, c, hd = rows_of(dims) * int(dims["C"]), int(dims["C"]), int(dims["hidden"])
    params = 2 * c * hd + hd + 3 * c
    fwd = (2 * mc + params) * elem
    return fwd if mode == "fwd" else fwd + (3 * mc + 2 * c * hd + params) * elem


CASES = Cases(
    leaves=_leaves, view=_view, oracle=_oracle, grads=_grads,
    reduction=lambda dims: max(int(dims["C"]), int(dims["hidden"]), int(dims.get("C_out", dims["C"])), rows_of(dims)),
    small={"B": 3, "N": 3, "C": 48, "hidden": 96, "C_out": 48, "residual": True},
    empty=tuple({"B": b, "N": n, "C": 16, "hidden": 32, "C_out": 8, "residual": True, "layout": layout}
                for b, n, layout in ((0, 1, "flat"), (0, 197, "contiguous"), (2, 0, "contiguous"))),
    deterministic={"B": 1, "N": 40, "C": 32, "hidden": 96, "C_out": 32, "residual": True, "layout": "flat"},
    layouts=LAYOUTS, nan=(("x", row_nan(1, 2, 7)),),
    # the residual's gradient is the output's: no backward kernel runs for it alone
    requested=((("x",), True), (("ln_weight", "ln_bias"), True), (("fc1_weight", "fc1_bias"), True),
               (("fc2_weight", "fc2_bias"), True), (("residual",), False)),
    bad=_bad, strategy=_strategy,
    examples=((torch.float32, {"B": 0, "N": 3, "C": 24, "hidden": 40, "C_out": 24, "residual": True}),
              (torch.float16, {"B": 0, "N": 3, "C": 24, "hidden": 40, "C_out": 24, "residual": True}),
              (torch.float32, {"B": 1, "N": 7, "C": 77, "hidden": 96, "C_out": 77, "layout": "rows_sliced",
                               "residual": True})),
)
BENCH = Bench(
    "TFLOP/s", ("B", "N", "C", "hidden"),
    (({"B": 64, "N": 197, "C": 768, "hidden": 3072},),
     ({"B": 8, "N": 65, "C": 192, "hidden": 384}, {"B": 2, "N": 197, "C": 192, "hidden": 768})),
    model_shape=lambda d: {"N": d["N"], "C": d["C"], "hidden": d["hidden"]}, flops=_flops, bytes=_bytes,
    baselines=lambda: [("eager", _mlp_eager, contextlib.nullcontext)], compiled=("compiled", _mlp_eager),
    model_dims={"residual": "x"},
    gpu_check=({"B": 2, "N": 197, "C": 768, "hidden": 3072}, {"B": 2, "N": 197, "C": 1024, "hidden": 4096}))

LAYERNORM_MLP = declare(OpSpec("layernorm_mlp", layernorm_mlp, layernorm_mlp_ref, _call, _facts, _bucket, _example,
                               CONTRACT, CASES, BENCH))

if _kernels is not None:
    register_backend(LAYERNORM_MLP, "triton", Limits(devices=("cuda", "cpu"), max_width=_kernels.MAX_C,
                                                     width_note="the LayerNorm row kernels hold whole rows",
                                                     auto_gemm_dtypes=HALF),
                     fwd=_kernels.layernorm_mlp_fwd, bwd=_kernels.layernorm_mlp_bwd)
register_backend(LAYERNORM_MLP, "cuda", Limits(max_width=6144, gemm_dtypes=HALF, width_note="the LayerNorm "
                                               "backward keeps a row's column sums in shared memory"))
