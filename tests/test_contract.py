"""The contract every op keeps in every backend, one test per clause, parametrized over ops x backends (and over
an op's other entry points, such as attention_packed: the dispatcher picks for them as for the op itself):

empty inputs, float64 (raise when chosen, fall back in auto), torch.library.opcheck of the custom ops,
torch.compile(fullgraph=True), deterministic backward, only the requested gradients, NaN rows, bad inputs
(raised before dispatch), any strides.

The quantized-inference ops (quantize_rows, layer_norm_fp8, scaled_linear, int8_linear) keep the same contract
forward only: their cases say so as data (``no_backward``), and say how their e4m3 / int8 outputs are compared
(``close``: there is no float64 oracle of a quantized result) and where an op does not keep a clause yet
(``diverges``: strict xfails, so a fix shows up as XPASS).

The reference and Triton (through the interpreter on CPU) run everywhere; the cuda backend's cases carry the
``cuda`` marker. Op-specific numerics live in tests/test_<op>.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from helpers import (
    DEVICE,
    KERNEL_BACKENDS,
    RECORDED_AS,
    attention_fp8_close,
    attention_inputs,
    backend_params,
    check_oracle,
    column_slice,
    count,
    every_other,
    fp8_rows_close,
    gemm_close,
    int8_linear_inputs,
    launches,
    layer_norm_fp8_inputs,
    layer_norm_inputs,
    layernorm_mlp_inputs,
    leaves,
    named_inputs,
    patch_embed_inputs,
    public,
    quantize_rows_inputs,
    reference,
    run,
    scaled_linear_inputs,
    tensor_close,
    transposed,
)
from torch.utils._pytree import tree_map_only

import vit_fast
from vit_fast import backends
from vit_fast.ops.attention import unpack_qkv
from vit_fast.tolerance import assert_close

Inputs = tuple[tuple, dict]


@dataclass(frozen=True)
class Case:
    """An op's contract data: input makers (dtype, device) -> (args, kwargs), and the op-specific facts."""

    small: Callable[[torch.dtype, str], Inputs]
    empty: tuple[Callable[[torch.dtype, str], Inputs], ...]
    strided: tuple[Callable[[torch.dtype, str], Inputs], ...]
    deterministic: Callable[[torch.dtype, str], Inputs]
    # poisons one element of (args, kwargs) in place and returns the output positions the formula makes NaN
    # (a mask, or one per output for ops that return several)
    nan: tuple[tuple[str, Callable[[tuple, dict], torch.Tensor | tuple[torch.Tensor, ...]]], ...]
    # (inputs that require grad, whether the backend's backward runs at all)
    requested: tuple[tuple[tuple[str, ...], bool], ...]
    # (backend, dtype, device) -> [(custom op name under torch.ops.vit_fast, args)]; None: no kernel backend
    opcheck: Callable[[str, torch.dtype, str], list[tuple[str, tuple]]] | None
    bad: Callable[[], list[tuple[tuple, dict, type, str]]]
    # None: the op has an autograd rule. Else why the gradient clauses do not apply: they skip with this reason.
    no_backward: str | None = None
    # None: float64 is what the kernels refuse and the reference runs. Else (error, match) that every backend
    # raises before dispatch: the op's documented dtype rule.
    float64_raises: tuple[type[Exception], str] | None = None
    # None: outputs are checked against the float64 oracle (<op>_ref(upcast=True)) by the one tolerance rule.
    # Else close(out, want, name) against the reference in the same dtypes: quantized outputs have no oracle.
    close: Callable[[object, object, str], None] | None = None
    # the input dtypes the op takes at all (the float side: int8_linear's activations are float32 only)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    # (clause, backend) -> why the op does not keep that clause yet there: a strict xfail
    diverges: dict[tuple[str, str], str] = field(default_factory=dict)
    # For an entry point of another op (attention_packed of attention): its (args, kwargs) -> that op's own, on
    # which the dispatcher picks the backend.
    dispatched_as: Callable[[tuple, dict], Inputs] | None = None


# ---- attention ---------------------------------------------------------------------------------------------------


def _attention_nan(where: str) -> Callable[[tuple, dict], torch.Tensor]:
    """q[b, h, i] NaN -> output row i of (b, h); k[b, h, j] NaN -> every row of (b, h) (each score row has it);
    v[b, h, j, d] NaN -> column d of every row of (b, h)."""

    def poison(args: tuple, kwargs: dict) -> torch.Tensor:
        q, k, v = args
        mask = torch.zeros(q.shape, dtype=torch.bool, device=q.device)
        {"q": q, "k": k, "v": v}[where][1, 0, 5, 3] = float("nan")
        if where == "q":
            mask[1, 0, 5] = True
        elif where == "k":
            mask[1, 0] = True
        else:
            mask[1, 0, :, 3] = True
        return mask

    return poison


def _attention_strided(dtype: torch.dtype, device: str) -> Inputs:
    """Inner stride != 1 for q, (B, N, H, D) memory for k, every other element of a wider buffer for v."""
    B, H, N, D = 1, 2, 40, 64
    q = torch.randn(B, H, D, N, device=device).to(dtype).transpose(-1, -2).detach().requires_grad_()
    k = torch.randn(B, N, H, D, device=device).to(dtype).transpose(1, 2).detach().requires_grad_()
    v = torch.randn(B, H, N, 2 * D, device=device).to(dtype)[..., ::2].detach().requires_grad_()
    assert q.stride(-1) != 1 and v.stride(-1) == 2
    return (q, k, v), {}


def _attention_opcheck(backend: str, dtype: torch.dtype, device: str) -> list[tuple[str, tuple]]:
    (q, k, v), _ = attention_inputs(1, 1, 19, 64, dtype, device)
    out, lse = getattr(torch.ops.vit_fast, f"attention_fwd_{backend}")(q.detach(), k.detach(), v.detach(), 0.25)
    return [(f"attention_fwd_{backend}", (q, k, v, 0.25)),
            (f"attention_bwd_{backend}", (torch.randn_like(out), *leaves((q, k, v), grad=False), out, lse, 0.25))]


def _attention_bad() -> list:
    q = torch.randn(1, 2, 5, 16)
    return [
        ((q[0], q, q), {}, ValueError, "q must be 4-D"),
        ((q, q[0], q), {}, ValueError, "k must be 4-D"),
        ((q, q, q[..., :8]), {}, ValueError, "v must have shape"),
        ((q, q[:, :, :4], q), {}, ValueError, "k must have shape"),
        ((q.long(), q, q), {}, TypeError, "q must be a floating-point"),
        (([1.0], q, q), {}, TypeError, "q must be a torch.Tensor"),
        ((q, q.double(), q), {}, TypeError, "q, k, v must share one dtype"),
        ((q, q, q.to("meta")), {}, ValueError, "one device"),
        ((q, q, q), {"scale": -1.0}, ValueError, "scale"),
        ((q, q, q), {"dropout_p": 1.0}, ValueError, "dropout_p"),
        ((torch.randint(0, 5, (1, 2, 9, 32)),) * 3, {}, TypeError, "q must be a floating-point"),
    ]


ATTENTION = Case(
    small=lambda dt, dev: attention_inputs(2, 3, 20, 64, dt, dev),
    empty=(lambda dt, dev: attention_inputs(0, 2, 7, 64, dt, dev),),
    strided=(_attention_strided,),
    deterministic=lambda dt, dev: attention_inputs(1, 2, 70, 64, dt, dev),
    nan=tuple((w, _attention_nan(w)) for w in ("q", "k", "v")),
    requested=((("q", "v"), True), (("k",), True)),
    opcheck=_attention_opcheck,
    bad=_attention_bad,
)


# ---- attention_packed: attention's entry point on the model's packed (B, N, 3, H, D) projection -------------------


def _packed_inputs(B: int, N: int, H: int, D: int, dtype: torch.dtype, device: str) -> Inputs:
    return (torch.randn(B, N, 3, H, D, device=device).to(dtype).requires_grad_(),), {}


def _packed_nan(where: str) -> Callable[[tuple, dict], torch.Tensor]:
    """:func:`_attention_nan` through the q, k, v views of the packed input."""
    return lambda args, kwargs: _attention_nan(where)(unpack_qkv(args[0]), kwargs)


def _packed_strided(dtype: torch.dtype, device: str) -> Inputs:
    """qkv as a slice of a wider buffer: heads and head-dim columns the kernels must skip."""
    return (torch.randn(1, 40, 3, 3, 96, device=device).to(dtype)[..., :2, :64].detach().requires_grad_(),), {}


def _packed_opcheck(backend: str, dtype: torch.dtype, device: str) -> list[tuple[str, tuple]]:
    """D = 80: two head-dim parts."""
    (qkv,), _ = _packed_inputs(1, 19, 1, 80, dtype, device)
    out, lse = getattr(torch.ops.vit_fast, f"attention_packed_fwd_{backend}")(qkv.detach(), 0.25)
    return [(f"attention_packed_fwd_{backend}", (qkv, 0.25)),
            (f"attention_packed_bwd_{backend}", (torch.randn_like(out), qkv.detach(), out, lse, 0.25))]


def _packed_bad() -> list:
    return [((torch.randn(1, 7, 2, 2, 16),), {}, ValueError, "3, H, D"),
            ((torch.randn(7, 3, 2, 16),), {}, ValueError, "5-D")]


# Each op's Case fills the same fields (the suite reads them as data), so the declarations look alike.
ATTENTION_PACKED = Case(
    small=lambda dt, dev: _packed_inputs(2, 20, 3, 64, dt, dev),
    empty=(lambda dt, dev: _packed_inputs(0, 7, 2, 32, dt, dev),),
    strided=(_packed_strided,),
    deterministic=lambda dt, dev: _packed_inputs(1, 70, 2, 64, dt, dev),
    nan=tuple((w, _packed_nan(w)) for w in ("q", "k", "v")),
    requested=((("qkv",), True),),
    opcheck=_packed_opcheck,
    bad=_packed_bad,
    dispatched_as=lambda args, kwargs: (unpack_qkv(args[0]), kwargs),
)


# ---- layer_norm --------------------------------------------------------------------------------------------------


def _row_nan(name: str, index: tuple[int, ...]) -> Callable[[tuple, dict], torch.Tensor]:
    """One NaN in row ``index[:-1]`` of the row-wise op's input ``name`` -> that whole output row."""

    def poison(args: tuple, kwargs: dict) -> torch.Tensor:
        x = args[0] if name == "x" else kwargs[name]
        x[index] = float("nan")
        mask = torch.zeros(*x.shape[:-1], 1, dtype=torch.bool, device=x.device)
        mask[index[:-1]] = True
        return mask

    return poison


def _layer_norm_opcheck(backend: str, dtype: torch.dtype, device: str) -> list[tuple[str, tuple]]:
    (x, w, b), _ = layer_norm_inputs((3, 11, 40), dtype, device=device)
    w, b = w.detach(), b.detach()
    _, mean, rstd = getattr(torch.ops.vit_fast, f"layer_norm_fwd_{backend}")(x.detach(), w, b, 1e-5)
    return [(f"layer_norm_fwd_{backend}", (x, w, b, 1e-5)),
            (f"layer_norm_bwd_{backend}", (torch.randn_like(x), x.detach(), w, mean, rstd))]


def _layer_norm_bad() -> list:
    x = torch.randn(4, 8)
    w = torch.randn(8)
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


def _layer_norm_strided_rows(dtype: torch.dtype, device: str) -> Inputs:
    """Every other token of (B, N, C): rows 2C apart."""
    (_, w, b), _ = layer_norm_inputs((48,), dtype, device=device)
    return (torch.randn(2, 40, 48, device=device).to(dtype)[:, ::2].detach().requires_grad_(), w, b), {}


def _layer_norm_transposed(dtype: torch.dtype, device: str) -> Inputs:
    """A transposed view: rows not one stride apart."""
    (_, w, b), _ = layer_norm_inputs((24,), dtype, device=device)
    return (torch.randn(9, 2, 24, device=device).to(dtype).transpose(0, 1).detach().requires_grad_(), w, b), {}


LAYER_NORM = Case(
    small=lambda dt, dev: layer_norm_inputs((2, 9, 48), dt, device=dev),
    empty=(lambda dt, dev: layer_norm_inputs((0, 5, 16), dt, device=dev),),
    strided=(_layer_norm_strided_rows, _layer_norm_transposed),
    deterministic=lambda dt, dev: layer_norm_inputs((300, 80), dt, device=dev),
    nan=(("x", _row_nan("x", (1, 4, 7))),),
    requested=((("x", "bias"), True), (("weight",), True)),
    opcheck=_layer_norm_opcheck,
    bad=_layer_norm_bad,
)


# ---- layernorm_mlp -----------------------------------------------------------------------------------------------


def _mlp_opcheck(backend: str, dtype: torch.dtype, device: str) -> list[tuple[str, tuple]]:
    fwd = getattr(torch.ops.vit_fast, f"layernorm_mlp_fwd_{backend}")
    cases = []
    for residual in (False, True):  # save_pre follows residual: one case each way keeps the interpreter time down
        (x, *params), kw = layernorm_mlp_inputs((2, 5, 16), 32, dtype, c_out=8, residual=residual, device=device)
        res = kw["residual"]
        cases.append((f"layernorm_mlp_fwd_{backend}", (x, *params, res, 1e-6, residual)))
        detached = leaves([x, *params], grad=False)
        out, mean, rstd, pre = fwd(*detached, None if res is None else res.detach(), 1e-6, True)
        dout = torch.randn_like(out)
        for flags in [(True, True, True), (False, True, False)] if residual else [(False, False, True)]:
            cases.append((f"layernorm_mlp_bwd_{backend}", (dout, *detached[:6], mean, rstd, pre, *flags)))
    return cases


def _mlp_bad() -> list:
    (x, *params), kw = layernorm_mlp_inputs((2, 3, 8), 12, c_out=6, residual=True, device="cpu")
    good = leaves([x, *params], grad=False)
    res = kw["residual"].detach()
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


def _mlp_row_strided(dtype: torch.dtype, device: str) -> Inputs:
    """Rows strided by C + 13, last dim contiguous."""
    c = 48
    (_, *params), kw = layernorm_mlp_inputs((37, c), 96, dtype, residual=True, device=device)
    x = torch.randn(37, c + 13, device=device).to(dtype)[:, 5:5 + c].detach().requires_grad_()
    assert not x.is_contiguous() and x.stride() == (c + 13, 1)
    return (x, *params), kw


def _mlp_permuted(dtype: torch.dtype, device: str) -> Inputs:
    """(N, B, C) memory seen as (B, N, C)."""
    (_, *params), kw = layernorm_mlp_inputs((48,), 96, dtype, device=device)
    return (torch.randn(9, 2, 48, device=device).to(dtype).transpose(0, 1).detach().requires_grad_(), *params), kw


_MLP_GROUPS = {"x": ("x",), "ln": ("ln_weight", "ln_bias"), "fc1": ("fc1_weight", "fc1_bias"),
               "fc2": ("fc2_weight", "fc2_bias"), "residual": ("residual",)}

LAYERNORM_MLP = Case(
    small=lambda dt, dev: layernorm_mlp_inputs((9, 48), 96, dt, residual=True, device=dev),
    empty=tuple((lambda dt, dev, s=s: layernorm_mlp_inputs(s, 32, dt, c_out=8, residual=True, device=dev))
                for s in [(0, 16), (0, 197, 16), (2, 0, 16)]),
    strided=(_mlp_row_strided, _mlp_permuted),
    deterministic=lambda dt, dev: layernorm_mlp_inputs((40, 32), 96, dt, residual=True, device=dev),
    nan=(("x", _row_nan("x", (3, 7))),),
    # the residual's gradient is the output's: no backward kernel runs for it alone
    requested=tuple((names, group != "residual") for group, names in _MLP_GROUPS.items()),
    opcheck=_mlp_opcheck,
    bad=_mlp_bad,
)


# ---- patch_embed -------------------------------------------------------------------------------------------------


def _patch_nan(args: tuple, kwargs: dict) -> torch.Tensor:
    """A pixel of patch (1, 2) of image 1 (4x4 patches of 16x16 images): token 1 + 1 * 4 + 2 after the class
    token."""
    images, weight = args[:2]
    images[1, 2, 5, 9] = float("nan")
    n = (images.shape[2] // 4) * (images.shape[3] // 4)
    mask = torch.zeros(images.shape[0], 1 + n, 1, dtype=torch.bool, device=images.device)
    mask[1, 7] = True
    return mask


def _patch_opcheck(backend: str, dtype: torch.dtype, device: str) -> list[tuple[str, tuple]]:
    fwd = getattr(torch.ops.vit_fast, f"patch_embed_fwd_{backend}")
    cases = []
    for cls, pos, bias in [(True, "1+N", True), (True, "N", False), (False, None, False)]:
        (images, weight, b), kw = patch_embed_inputs(2, 3, 8, 12, 4, 16, cls=cls, pos=pos, bias=bias, dtype=dtype,
                                                     device=device)
        args = (images, weight, b, kw["cls_token"], kw["pos_embed"])
        cases.append((f"patch_embed_fwd_{backend}", args))
        detached = leaves(args, grad=False)
        out = fwd(*detached)
        cases += [(f"patch_embed_bwd_{backend}", (torch.randn_like(out), *detached, *flags))
                  for flags in ((True, True), (False, True), (True, False))]
    return cases


def _patch_bad() -> list:
    img = torch.randn(2, 3, 8, 8)
    w = torch.randn(6, 3, 4, 4)
    b = torch.randn(6)
    cls = torch.randn(1, 1, 6)
    return [
        ((img[0], w, b), {}, ValueError, "images must be 4-D"),
        (([1.0], w, b), {}, TypeError, "images must be a torch.Tensor"),
        ((img.long(), w, b), {}, TypeError, "images must be a floating-point"),
        ((img, w[0], b), {}, ValueError, "weight must be 4-D"),
        ((img, torch.randn(6, 1, 4, 4), b), {}, ValueError, "weight must have shape"),
        ((img[..., :6], w, b), {}, ValueError, "divisible by the patch size"),
        ((img, w, torch.randn(5)), {}, ValueError, "bias must have shape"),
        ((img, w, b.int()), {}, TypeError, "bias must be a floating-point"),
        ((img, w, b), {"cls_token": torch.randn(1, 6)}, ValueError, "cls_token must be 3-D"),
        ((img, w, b), {"cls_token": torch.randn(1, 1, 5)}, ValueError, "cls_token must have shape"),
        ((img, w, b), {"pos_embed": torch.randn(1, 5, 6)}, ValueError, "pos_embed must have shape"),
        ((img, w, b), {"cls_token": cls, "pos_embed": torch.randn(1, 6, 6)}, ValueError, "pos_embed must have shape"),
        ((img, w, b), {"pos_embed": torch.randn(2, 4, 6)}, ValueError, "pos_embed must have shape"),
        ((img, w, b.to("meta")), {}, ValueError, "one device"),
        ((img, w, b), {"cls_token": cls.to("meta")}, ValueError, "one device"),
        # a position embedding covering a class token needs the class token
        ((img[:1], w, None), {"pos_embed": torch.randn(1, 5, 6)}, ValueError, r"pos_embed must have shape \(1, 4, 6\)"),
    ]


def _patch_channels_last(dtype: torch.dtype, device: str) -> Inputs:
    (images, w, b), kw = patch_embed_inputs(2, 3, 16, 16, 4, 32, dtype=dtype, device=device)
    images = images.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert not images.is_contiguous()
    return (images, w, b), kw


def _patch_cropped(dtype: torch.dtype, device: str) -> Inputs:
    (_, w, b), kw = patch_embed_inputs(2, 3, 16, 16, 4, 32, dtype=dtype, device=device)
    return (torch.randn(2, 4, 20, 18, device=device).to(dtype)[:, 1:, 2:18, 1:17].detach().requires_grad_(), w, b), kw


PATCH_EMBED = Case(
    small=lambda dt, dev: patch_embed_inputs(2, 3, 16, 16, 4, 24, dtype=dt, device=dev),
    empty=(lambda dt, dev: patch_embed_inputs(0, 3, 8, 8, 4, 6, dtype=dt, device=dev),),
    strided=(_patch_channels_last, _patch_cropped),
    deterministic=lambda dt, dev: patch_embed_inputs(3, 3, 32, 32, 4, 40, dtype=dt, device=dev),
    nan=(("images", _patch_nan),),
    requested=((("weight", "bias", "cls_token", "pos_embed"), True), (("images", "bias", "cls_token"), True)),
    opcheck=_patch_opcheck,
    bad=_patch_bad,
)

# ---- the quantized-inference ops: forward only ---------------------------------------------------------------------

_INFERENCE_ONLY = "no backward: inference-only op"


def _nan_row(name: str, row: int, col: int) -> Callable[[tuple, dict], tuple[torch.Tensor, torch.Tensor]]:
    """A NaN in row ``row`` of x: that row's scale is NaN (the row's amax is) and so is its whole e4m3 row
    (x / NaN): the masks of (q, scale)."""

    def poison(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x = args[0]
        x[row, col] = float("nan")
        rows = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        rows[row] = True
        return rows[:, None], rows

    return poison


def _fp8_opcheck(custom: str, make: Callable[[torch.dtype, str], Inputs]) -> Callable:
    """The one custom op of a forward-only kernel, on the case's inputs (its keywords are the schema's last)."""

    def cases(backend: str, dtype: torch.dtype, device: str) -> list[tuple[str, tuple]]:
        args, kwargs = make(dtype, device)
        return [(f"{custom}_{backend}", (*args, *kwargs.values()))]

    return cases


def _rows_bad(*extra: torch.Tensor) -> list:
    x = torch.randn(4, 8)
    return [
        (([1.0], *extra), {}, TypeError, "x must be a torch.Tensor"),
        ((x.long(), *extra), {}, TypeError, "x must be a floating-point"),
        ((x[0], *extra), {}, ValueError, "x must be 2-D"),
        ((x[None], *extra), {}, ValueError, "x must be 2-D"),
    ]


_QR_SMALL = (lambda dt, dev: quantize_rows_inputs((7, 48), dt, device=dev, gelu=True))
# The Triton kernel's row max and tl.maximum are IEEE maxNum (NaN-dropping) on the GPU and in the interpreter.
def _fp8_rows_case(op: str, small, empty, strided, nan_row: tuple[int, int], bad) -> Case:
    """An inference-only op writing e4m3 rows and their scales (what the fp8 Triton kernels share)."""
    return Case(small=small, empty=empty, strided=strided, deterministic=small, nan=(("x", _nan_row("x", *nan_row)),),
                requested=(), opcheck=_fp8_opcheck(op, small), bad=bad, no_backward=_INFERENCE_ONLY,
                close=fp8_rows_close)


QUANTIZE_ROWS = _fp8_rows_case(
    "quantize_rows", _QR_SMALL,
    (lambda dt, dev: quantize_rows_inputs((0, 16), dt, device=dev, gelu=True),),
    (lambda dt, dev: ((column_slice(_QR_SMALL(dt, dev)[0][0]),), {"gelu": False}),
     lambda dt, dev: ((transposed(_QR_SMALL(dt, dev)[0][0]),), {"gelu": True})),
    (2, 5), _rows_bad,
)


_LNF_SMALL = (lambda dt, dev: layer_norm_fp8_inputs((7, 48), dt, device=dev, eps=1e-6))


def _layer_norm_fp8_strided(dtype: torch.dtype, device: str) -> Inputs:
    (x, w, b), kw = _LNF_SMALL(dtype, device)
    return (column_slice(x), every_other(w), b), kw


def _layer_norm_fp8_bad() -> list:
    """layer_norm's cases (the same argument checks) plus the row checks of the fp8 kernels."""
    w = torch.randn(8)
    return [*_rows_bad(w, w), *_layer_norm_bad()[3:]]


LAYER_NORM_FP8 = _fp8_rows_case(
    "layer_norm_fp8", _LNF_SMALL,
    (lambda dt, dev: layer_norm_fp8_inputs((0, 16), dt, device=dev, eps=1e-6),),
    (_layer_norm_fp8_strided,
     lambda dt, dev: ((transposed(_LNF_SMALL(dt, dev)[0][0]), *_LNF_SMALL(dt, dev)[0][1:]), {"eps": 1e-6})),
    (3, 0), _layer_norm_fp8_bad,
)


_SL_SMALL = (lambda dt, dev: scaled_linear_inputs(5, 32, 16, dt, device=dev))


def _scaled_linear_nan(where: str) -> Callable[[tuple, dict], torch.Tensor]:
    """x_q[2, k] NaN -> output row 2; weight_scale[3] NaN -> output column 3 (every row's dot with it)."""

    def poison(args: tuple, kwargs: dict) -> torch.Tensor:
        x_q, _, weight_q, weight_scale, _ = args
        mask = torch.zeros(x_q.shape[0], weight_q.shape[0], dtype=torch.bool, device=x_q.device)
        if where == "x_q":
            x_q[2, 7] = float("nan")
            mask[2] = True
        else:
            weight_scale[3] = float("nan")
            mask[:, 3] = True
        return mask

    return poison


def _scaled_linear_strided(dtype: torch.dtype, device: str) -> Inputs:
    """x_q rows apart in a wider buffer, weight_q column-major, both scales every other element."""
    (x_q, x_scale, weight_q, weight_scale, bias), kw = _SL_SMALL(dtype, device)
    return (column_slice(x_q), every_other(x_scale), transposed(weight_q), every_other(weight_scale), bias), kw


def _scaled_linear_grouped(dtype: torch.dtype, device: str) -> Inputs:
    """One activation scale per row and group of 16 columns, as attention_fp8 emits one per (token, head)."""
    (x_q, _, weight_q, weight_scale, bias), kw = scaled_linear_inputs(5, 64, 16, dtype, device=device)
    return (x_q, torch.rand(5, 4, device=device) + 0.5, weight_q, weight_scale, bias), kw


def _scaled_linear_bad() -> list:
    good, kw = scaled_linear_inputs(3, 16, 16, device="cpu")
    x_q, x_scale, w_q, w_scale, b = good
    table = [
        (0, [1.0], TypeError, "x_q must be a torch.Tensor"),
        (0, x_q.float(), TypeError, "x_q must be float8_e4m3fn"),
        (0, x_q[0], ValueError, "x_q must be 2-D"),
        (1, x_scale[:-1], ValueError, "x_scale must have shape"),
        (1, x_scale.double(), TypeError, "x_scale must be float32"),
        (1, x_scale[:, None].expand(3, 3).contiguous(), ValueError, "groups of a multiple of 16 columns"),
        (2, w_q.view(torch.int8), TypeError, "weight_q must be a floating-point"),
        (2, w_q[:, :8], ValueError, "weight_q must have shape"),
        (3, w_scale[:-1], ValueError, "weight_scale must have shape"),
        (3, w_scale.half(), TypeError, "weight_scale must be float32"),
        (4, b[:-1], ValueError, "bias must have shape"),
        (4, b.long(), TypeError, "bias must be a floating-point"),
        (4, b.to("meta"), ValueError, "one device.*bias on meta"),
    ]
    return [((*good[:i], bad, *good[i + 1:]), kw, err, m) for i, bad, err, m in table]


SCALED_LINEAR = Case(
    small=_SL_SMALL,
    empty=(lambda dt, dev: scaled_linear_inputs(0, 32, 16, dt, device=dev),),
    strided=(_scaled_linear_strided, _scaled_linear_grouped),
    deterministic=_SL_SMALL,
    nan=tuple((w, _scaled_linear_nan(w)) for w in ("x_q", "weight_scale")),
    requested=(),
    opcheck=_fp8_opcheck("scaled_linear", _SL_SMALL),
    bad=_scaled_linear_bad,
    no_backward=_INFERENCE_ONLY,
    close=gemm_close,
)


def _attention_fp8_inputs(B: int, H: int, N: int, D: int, dtype: torch.dtype, device: str, **kwargs) -> Inputs:
    """q, k, v views of one packed qkv, as attention's, but not requiring grad: the op is inference only."""
    return leaves(attention_inputs(B, H, N, D, dtype, device, **kwargs), grad=False)


_AF_SMALL = (lambda dt, dev: _attention_fp8_inputs(2, 3, 37, 32, dt, dev, scale=0.2))


def _attention_fp8_nan(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN in q at (b=1, h=2, n=5): that token's head-2 row and its scale are NaN, nothing else."""
    q = args[0]
    B, H, N, D = q.shape
    q[1, 2, 5, 3] = float("nan")
    rows = torch.zeros(B * N, H, dtype=torch.bool, device=q.device)
    rows[1 * N + 5, 2] = True
    return rows.repeat_interleave(D, dim=1), rows


def _attention_fp8_bad() -> list:
    return [case for case in _attention_bad() if "dropout_p" not in case[1]]


ATTENTION_FP8 = Case(
    small=_AF_SMALL,
    empty=(lambda dt, dev: _attention_fp8_inputs(0, 3, 7, 32, dt, dev, scale=0.2),),
    strided=(lambda dt, dev: (tuple(t.transpose(-1, -2).contiguous().transpose(-1, -2)
                                    for t in _AF_SMALL(dt, dev)[0]), {"scale": 0.2}),
             lambda dt, dev: _attention_fp8_inputs(1, 2, 9, 80, dt, dev, scale=None)),
    deterministic=_AF_SMALL,
    nan=(("q", _attention_fp8_nan),),
    requested=(),
    opcheck=_fp8_opcheck("attention_fp8", _AF_SMALL),
    bad=_attention_fp8_bad,
    no_backward=_INFERENCE_ONLY,
    close=attention_fp8_close,
)


_I8_SMALL = (lambda dt, dev: int8_linear_inputs(5, 32, 16, dt))


def _int8_linear_bad() -> list:
    (x, packed), kw = int8_linear_inputs(3, 16, 8)
    return [
        (([1.0], packed), kw, TypeError, "x must be a torch.Tensor"),
        ((x.long(), packed), kw, TypeError, "x must be a floating-point"),
        ((x[0], packed), kw, ValueError, "x must be 2-D"),
        ((x.double(), packed), kw, TypeError, "x must be float32 on CPU"),
        ((x.to("meta"), packed), kw, TypeError, "x must be float32 on CPU"),
        ((x, "packed"), kw, TypeError, "packed must be"),
    ]


INT8_LINEAR = Case(
    small=_I8_SMALL,
    empty=(lambda dt, dev: int8_linear_inputs(0, 32, 16, dt),),
    strided=(lambda dt, dev: ((column_slice(_I8_SMALL(dt, dev)[0][0]), *_I8_SMALL(dt, dev)[0][1:]),
                              _I8_SMALL(dt, dev)[1]),
             lambda dt, dev: ((transposed(_I8_SMALL(dt, dev)[0][0]), *_I8_SMALL(dt, dev)[0][1:]),
                              _I8_SMALL(dt, dev)[1])),
    deterministic=_I8_SMALL,
    nan=(("x", lambda args, kwargs: _nan_row("x", 2, 3)(args, kwargs)[0]),),
    requested=(),
    opcheck=None,
    bad=_int8_linear_bad,
    no_backward=_INFERENCE_ONLY,
    float64_raises=(TypeError, "x must be float32 on CPU"),  # fbgemm's dynamic Linear takes float32 only
    close=tensor_close,
    dtypes=(torch.float32,),
    diverges={
        ("compile", "reference"): "Dynamo cannot put the prepacked weight (a torchbind ScriptObject) in a graph: "
                                  "'Failed to convert args/kwargs to proxy'",
    },
)

CASES = {"attention": ATTENTION, "attention_packed": ATTENTION_PACKED, "layer_norm": LAYER_NORM,
         "layernorm_mlp": LAYERNORM_MLP, "patch_embed": PATCH_EMBED, "quantize_rows": QUANTIZE_ROWS,
         "layer_norm_fp8": LAYER_NORM_FP8, "scaled_linear": SCALED_LINEAR, "int8_linear": INT8_LINEAR,
         "attention_fp8": ATTENTION_FP8}
OPS = list(CASES)
BACKENDS = backend_params(*backends.BACKENDS)
KERNELS = backend_params(*KERNEL_BACKENDS)


_FIRST = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_for(op: str, backend: str, prefer: tuple[torch.dtype, ...] = _FIRST) -> torch.dtype:
    """The first dtype ``backend`` runs ``op``'s contract inputs in (the cuda kernels take no fp32 GEMMs; the
    interpreter no bf16)."""
    if backend not in backends.implemented(_recorded(op)):
        pytest.skip(f"{op} has no {backend} implementation")
    taken = [d for d in prefer if d in CASES[op].dtypes]
    if not taken:
        pytest.skip(f"{op} takes none of {prefer} (only {CASES[op].dtypes})")
    for dtype in taken:
        why = backends.reasons(backend, *_dispatched(op, *CASES[op].small(dtype, DEVICE)))
        if not why:
            return dtype
    pytest.skip(f"{backend} runs none of {taken} for {op} here: {why}")


def _outs(out: torch.Tensor | tuple) -> tuple[torch.Tensor, ...]:
    """An op's outputs as a tuple: the fp8 producers return (q, scale)."""
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t  # no torch.equal on fp8


def _equal(a: torch.Tensor | tuple, b: torch.Tensor | tuple) -> bool:
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(_outs(a), _outs(b), strict=True))


def _contiguous(inputs: Inputs) -> Inputs:
    return tree_map_only(torch.Tensor, lambda t: t.contiguous(), inputs)


def _no_backward(op: str) -> None:
    if CASES[op].no_backward is not None:
        pytest.skip(CASES[op].no_backward)


def _diverges(request: pytest.FixtureRequest, op: str, clause: str, backend: str) -> None:
    """A strict xfail where the case records that ``op`` does not keep ``clause`` in ``backend`` yet."""
    why = CASES[op].diverges.get((clause, backend))
    if why is not None:
        request.applymarker(pytest.mark.xfail(reason=why, strict=True))


def _odd_douts(shape: torch.Size, dtype: torch.dtype) -> list[torch.Tensor]:
    """An output gradient that is a stride-0 broadcast, and one that is transposed in memory."""
    broadcast = torch.randn(*(1,) * (len(shape) - 1), shape[-1], device=DEVICE).to(dtype).expand(shape)
    transposed = torch.randn(*shape[:-2], shape[-1], shape[-2], device=DEVICE).to(dtype).transpose(-1, -2)
    return [broadcast, transposed]


def _dispatched(op: str, args: tuple, kwargs: dict) -> tuple[str, tuple, dict]:
    """``op``'s call as the dispatcher picks for it: an entry point as the op it is a variant of, on that op's own
    arguments."""
    if op not in RECORDED_AS:
        return op, args, kwargs
    return RECORDED_AS[op], *CASES[op].dispatched_as(args, kwargs)


def _recorded(op: str) -> str:
    """The op name ``op``'s launches are recorded under."""
    return RECORDED_AS.get(op, op)


def test_every_declared_op_and_entry_point_has_a_contract_case():
    assert set(CASES) == set(backends.ops()) | set(RECORDED_AS)
    assert all((CASES[op].dispatched_as is None) == (op not in RECORDED_AS) for op in CASES)


# ---- 1. empty inputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [pytest.param("auto"), *BACKENDS])
@pytest.mark.parametrize("op", OPS)
def test_empty_input_returns_empty_without_a_launch(op, backend):
    dtype = torch.float32 if backend in ("auto", "reference") else _dtype_for(op, backend)
    backward = CASES[op].no_backward is None
    for make in CASES[op].empty:
        args, kwargs = make(dtype, DEVICE)
        with launches() as rec:
            out = run(op, backend, args, kwargs)
            if backward:
                out.sum().backward()
        want = reference(op)(*args, **kwargs)
        for o, w in zip(_outs(out), _outs(want), strict=True):
            assert o.shape == w.shape and o.dtype == w.dtype and o.numel() == 0
        if backward:
            for name, t in named_inputs(op, args, kwargs).items():
                assert t.grad is not None and t.grad.shape == t.shape, name
        assert not [r for r in rec if r.backend in KERNEL_BACKENDS], rec


# ---- 2. float64 --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_float64_raises_when_chosen_and_auto_uses_the_reference(op, backend):
    """Or, where the op takes no float64 at all (its case's ``float64_raises``), every backend raises that
    before dispatch."""
    args, kwargs = CASES[op].small(torch.float64, DEVICE)
    if CASES[op].float64_raises is not None:
        err, match = CASES[op].float64_raises
        with pytest.raises(err, match=match):
            run(op, backend, args, kwargs)
        return
    want = reference(op)(*args, **kwargs)
    if backend == "reference":
        assert _equal(run(op, "reference", args, kwargs), want)
        return
    if backend not in backends.implemented(_recorded(op)):
        pytest.skip(f"{op} has no {backend} implementation")
    assert any("float64" in r for r in backends.reasons(backend, *_dispatched(op, args, kwargs)))
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        run(op, backend, args, kwargs)
    with launches() as rec:
        out = run(op, "auto", args, kwargs)
    assert _equal(out, want)
    assert [(r.op, r.backend) for r in rec] == [(_recorded(op), "reference")]


# ---- 3. opcheck --------------------------------------------------------------------------------------------------

ALL_TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
_GRAD_SAFE_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck_custom_ops(op, backend):
    dtype = _dtype_for(op, backend)
    for name, args in CASES[op].opcheck(backend, dtype, DEVICE):
        custom = getattr(torch.ops.vit_fast, name).default
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args):
            # opcheck's schema check multiplies the inputs to detect mutation, and e4m3 has no arithmetic on CPU
            torch.library.opcheck(custom, args, test_utils=[u for u in ALL_TEST_UTILS if u != "test_schema"])
        elif f"{op}_bwd_" not in name and dtype != torch.float32:
            # aot_dispatch compares gradients across two traced runs at fp32 tolerances: half-precision
            # gradients are checked through autograd's registration here and numerically by check_oracle
            torch.library.opcheck(custom, args, test_utils=_GRAD_SAFE_UTILS)
            torch.library.opcheck(custom, leaves(args, grad=False))
        else:
            torch.library.opcheck(custom, args)


# ---- 4. torch.compile(fullgraph=True) ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph_forward_and_backward(op, backend, request):
    """Forward only for the inference-only ops."""
    dtype = _dtype_for(op, backend)
    _diverges(request, op, "compile", backend)
    args, kwargs = CASES[op].small(dtype, DEVICE)
    fn = public(op)

    def f(*a, **k):
        out = fn(*a, **k)
        # e4m3 has no arithmetic: (q, scale) go on through the graph as float
        return out * 2 if isinstance(out, torch.Tensor) else tuple(t.float() * 2 for t in out)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    if CASES[op].no_backward is not None:
        with vit_fast.set_backend(backend), launches() as rec:
            out = compiled(*args, **kwargs)
            eager = f(*args, **kwargs)
        for i, (o, e) in enumerate(zip(_outs(out), _outs(eager), strict=True)):
            tensor_close(o, e, f"out {i}")
        assert backend == "reference" or count(rec, backend, "fwd", _recorded(op)) >= 1, rec
        return
    inputs = named_inputs(op, args, kwargs)
    with vit_fast.set_backend(backend):
        with launches() as rec:
            out = compiled(*args, **kwargs)
            got = torch.autograd.grad(out.sum(), list(inputs.values()))
        eager_args, eager_kwargs = leaves((args, kwargs))
        eager = f(*eager_args, **eager_kwargs)
        want = torch.autograd.grad(eager.sum(), list(named_inputs(op, eager_args, eager_kwargs).values()))
    assert_close(out, eager, eager, name="out")
    for name, g, w in zip(inputs, got, want, strict=True):
        assert_close(g, w, w, name=f"d{name}")
    if backend != "reference":
        assert count(rec, backend, "fwd", _recorded(op)) >= 1 and count(rec, backend, "bwd", _recorded(op)) >= 1, rec


# ---- 5. deterministic backward -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_backward_is_deterministic(op, backend):
    _no_backward(op)
    if backend == "reference" and DEVICE == "cuda":
        pytest.skip("the reference on a GPU runs PyTorch's CUDA kernels (flash SDPA, cuDNN): not deterministic")
    dtype = _dtype_for(op, backend, prefer=(torch.float16, torch.bfloat16, torch.float32))
    args, kwargs = CASES[op].deterministic(dtype, DEVICE)
    inputs = list(named_inputs(op, args, kwargs).values())
    runs = []
    for _ in range(2):
        out = run(op, backend, args, kwargs)
        runs.append(torch.autograd.grad(out, inputs, torch.ones_like(out)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ---- 6. only the requested gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_only_requested_gradients(op, backend):
    _no_backward(op)
    dtype = _dtype_for(op, backend)
    for trainable, backward_runs in CASES[op].requested:
        args, kwargs = CASES[op].small(dtype, DEVICE)
        for name, t in named_inputs(op, args, kwargs).items():
            t.requires_grad_(name in trainable)
        _, grads = check_oracle(op, backend, args, kwargs, bwd_launch=backward_runs)
        assert set(grads) == set(trainable)


# ---- 7. NaN rows -------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_nan_in_an_input_row_gives_nan_in_that_output_row(op, backend, request):
    """As the formula does, in every backend; nothing else turns NaN (PyTorch's CPU flash SDPA returns finite
    values for such rows, its math path NaN: the reference must follow the formula). The quantizing ops: a NaN
    row's scale is NaN, and so is its whole e4m3 row; their oracle is the reference itself."""
    dtype = _dtype_for(op, backend)
    _diverges(request, op, "nan", backend)
    case = CASES[op]
    for where, poison in case.nan:
        args, kwargs = leaves(case.small(dtype, DEVICE), grad=False)
        expected = _outs(poison(args, kwargs))
        out = run(op, backend, args, kwargs)
        if case.close is None:
            oracle = reference(op)(*leaves(args, torch.float64), **leaves(kwargs, torch.float64), upcast=True)
        else:
            oracle = reference(op)(*args, **kwargs)
        for name, t in (("oracle", oracle), (backend, out)):
            for i, (o, e) in enumerate(zip(_outs(t), expected, strict=True)):
                got = torch.isnan(o.float())
                assert torch.equal(got, e.expand_as(got)), f"{name} out {i}, NaN in {where}: {int(got.sum())} NaNs"
        if case.close is None:
            assert_close(out, reference(op)(*args, **kwargs), oracle, name=f"out (NaN in {where})")
        else:
            case.close(out, oracle, f"out (NaN in {where})")


# ---- 8. bad inputs -----------------------------------------------------------------------------------------------


def _bad_params() -> list:
    return [pytest.param(op, i, id=f"{op}-{i}") for op, case in CASES.items() for i in range(len(case.bad()))]


# Validation precedes dispatch, so every setting raises the argument's error (not BackendUnavailableError) and
# the cuda setting needs no GPU to show it.
@pytest.mark.parametrize("backend", backends.CHOICES)
@pytest.mark.parametrize("op, index", _bad_params())
def test_bad_inputs_raise_before_dispatch(op, index, backend):
    args, kwargs, err, match = CASES[op].bad()[index]
    with vit_fast.set_backend(backend), pytest.raises(err, match=match):
        public(op)(*args, **kwargs)


# ---- 9. any strides ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [pytest.param(False, id="first"),
                                  pytest.param(True, id="half", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_any_strides_in_inputs_and_output_gradients(op, backend, half):
    """In the first dtype the backend runs (fp32 for the reference and Triton) and, under -m slow, in half
    precision."""
    dtype = _dtype_for(op, backend, prefer=(torch.float16, torch.bfloat16) if half else _FIRST)
    if CASES[op].close is not None:  # forward only: the same result as on contiguous copies, from this backend
        for make in CASES[op].strided:
            args, kwargs = make(dtype, DEVICE)
            with launches() as rec:
                out = run(op, backend, args, kwargs)
            CASES[op].close(out, reference(op)(*_contiguous((args, kwargs))[0], **kwargs), "out")
            assert count(rec, backend, "fwd", _recorded(op)) >= 1, rec
        return
    first, *others = CASES[op].strided
    args, kwargs = first(dtype, DEVICE)
    out, _ = check_oracle(op, backend, args, kwargs)
    for dout in _odd_douts(out.shape, out.dtype):
        check_oracle(op, backend, args, kwargs, dout=dout)
    for make in others:
        check_oracle(op, backend, *make(dtype, DEVICE))
