"""The FP8 Linear: ``y = (x_q * x_scale) @ (w_q * w_scale)^T + bias`` with e4m3 operands, per-row (token)
activation scales or one per row and group of columns, and per-output-channel weight scales (inference).

The reference is ``torch._scaled_mm`` (cuBLASLt on CUDA; it also runs on CPU, slowly, which is what makes the
FP8 numerics testable without a GPU). cuBLASLt has no scaling mode with one scale per 64-column group (what
:func:`~vit_fast.ops.attention_fp8`'s kernel emits, one per (token, head)): the Triton kernel runs those, and the
reference multiplies the e4m3 operands in fp32."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vit_fast import backends
from vit_fast.backends import Call, Facts, Limits, dtype_name
from vit_fast.ops import _checks
from vit_fast.ops._fp8 import FP8, FP8_CAPABILITY, quantize_rows_ref
from vit_fast.ops._inputs import DTYPES, column_slice, every_other, meta, randn, transposed, widths
from vit_fast.ops.spec import Bench, Cases, Contract, OpSpec, declare, register_backend, triton_kernels

_kernels = triton_kernels("scaled_gemm")


def _fp8_product(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor,
                 weight_scale: torch.Tensor) -> torch.Tensor:
    """``(x_q * x_scale) @ (weight_q * weight_scale)^T`` in fp32, per group of columns: the e4m3 operands go into
    the matmul unscaled, so their products are exact (4 significant bits each, even on TF32 tensor cores) and
    the scales apply to the fp32 partial sums."""
    m, k = x_q.shape
    n = weight_q.shape[0]
    groups = (x_scale.unsqueeze(1) if x_scale.dim() == 1 else x_scale).float()  # (M, G); reshape(m, -1) fails at M = 0
    g = groups.shape[1]
    xg = x_q.float().view(m, g, k // g).transpose(0, 1)  # (G, M, K/G)
    wg = weight_q.float().view(n, g, k // g).permute(1, 2, 0)  # (G, K/G, N)
    return (torch.bmm(xg, wg) * groups.t()[..., None]).sum(0) * weight_scale.float()[None, :]


def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes row-wise scales (torch 2.11's takes per-tensor ones only)."""
    a = torch.zeros(16, 16, dtype=FP8)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


# Probed once at import (a 16 x 16 product, under a millisecond): no release note says which torch added it, and
# a probe inside the op would be traced by torch.compile.
_CPU_ROWWISE = _cpu_rowwise_scaled_mm()


def scaled_linear_ref(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype, *, upcast: bool = False) -> torch.Tensor:
    """The FP8 GEMM through ``torch._scaled_mm``. It takes the fp32 product of the e4m3 operands instead for
    per-group activation scales (x_scale (M, G), G > 1: no cuBLASLt scaling mode has 64-column groups), for an
    output other than bf16 on a GPU (cuBLASLt's row-wise FP8 GEMM writes bf16; fp32 only without a bias, and
    only on some GPUs), on a CPU whose ``_scaled_mm`` takes per-tensor scales only, and with ``upcast=True``."""
    grouped = x_scale.dim() == 2 and x_scale.shape[1] > 1
    if (upcast or grouped or (x_q.device.type == "cuda" and out_dtype != torch.bfloat16)
            or (x_q.device.type == "cpu" and not _CPU_ROWWISE)):
        y = _fp8_product(x_q, x_scale, weight_q, weight_scale)
        return (y if bias is None else y + bias.float()).to(out_dtype)
    # Row-wise scaling: (M, 1) for the activations, (1, N) for the weights; mat2 is column-major (w_q^T).
    return torch._scaled_mm(x_q, weight_q.t(), scale_a=_row_major(x_scale, (x_scale.numel(), 1)),
                            scale_b=_row_major(weight_scale, (1, weight_scale.numel())),
                            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)


def _row_major(scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``scale`` as ``shape`` with row-major strides, copied only when it has others: _scaled_mm checks them even
    on a size-1 dimension, where ``.contiguous()`` keeps whatever stride the view had."""
    scale = scale.reshape(shape)
    return scale if scale.stride() == (shape[1], 1) else scale.clone(memory_format=torch.contiguous_format)


def scaled_linear(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, *, out_dtype: torch.dtype) -> torch.Tensor:
    """FP8 Linear: ``(x_q * x_scale[:, None]) @ (weight_q * weight_scale[:, None])^T + bias``.

    Args:
        x_q: (M, K) float8_e4m3fn; x_scale: (M,) float32, one scale per row, or (M, G), one per row and group
            of K / G consecutive columns (K / G a multiple of 16).
        weight_q: (N, K) float8_e4m3fn (nn.Linear layout); weight_scale: (N,) float32.
        bias: (N,) or None. On CUDA, K and N must be multiples of 16 (cuBLASLt).
        out_dtype: the output's dtype (bfloat16 on CUDA: row-wise scaling gives bf16).

    Returns:
        (M, N) in ``out_dtype``.
    """
    for name, t, dtype in (("x_q", x_q, FP8), ("weight_q", weight_q, FP8), ("x_scale", x_scale, torch.float32),
                           ("weight_scale", weight_scale, torch.float32)):
        if _checks.tensor(name, t).dtype != dtype:  # _scaled_mm's row-wise scaling takes exactly these
            raise TypeError(f"{name} must be {dtype_name(dtype)}; got {_checks.describe(t)}")
    m, k = _checks.tensor("x_q", x_q, ndim=2).shape
    _checks.shape("weight_q", weight_q, (None, k), "(N, K): nn.Linear layout with K = x_q's columns")
    if x_scale.dim() == 2 and x_scale.shape[0] == m and x_scale.shape[1] > 1:
        g = x_scale.shape[1]
        if k % g or (k // g) % 16:
            raise ValueError(f"x_scale (M, G) = {tuple(x_scale.shape)} needs G to divide K = {k} into groups of a "
                             f"multiple of 16 columns")
    else:
        _checks.shape("x_scale", x_scale, (m,), "(M,): one scale per row of x_q, or (M, G): per group of columns")
    _checks.shape("weight_scale", weight_scale, (weight_q.shape[0],), "(N,): one scale per output channel")
    if _checks.optional("bias", bias) is not None:
        _checks.shape("bias", bias, (weight_q.shape[0],), "(N,): one per output channel")
    _checks.same_device(x_q=x_q, x_scale=x_scale, weight_q=weight_q, weight_scale=weight_scale, bias=bias)
    return backends.dispatch("scaled_linear", _call(x_q, x_scale, weight_q, weight_scale, bias, out_dtype=out_dtype))


def _call(x_q, x_scale, weight_q, weight_scale, bias, *, out_dtype) -> Call:  # noqa: ANN001 - the public signature
    return Call((x_q, x_scale, weight_q, weight_scale, bias, out_dtype))


def _facts(call: Call) -> Facts:
    return Facts(gemm_dtype=call.args[0].dtype)


def _groups(x_scale: torch.Tensor) -> int:
    return 1 if x_scale.dim() == 1 else x_scale.shape[1]


def _bucket(call: Call) -> tuple[int, ...]:
    # the activation scales' groups pick the kernel (per-group or row-wise): a policy measures them apart
    x_q, x_scale, weight_q = call.args[:3]
    n, k = weight_q.shape
    return (backends.size_bucket(n), backends.size_bucket(k), _groups(x_scale), backends.size_bucket(x_q.shape[0]))


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    m, c, f32 = 64 * 197, 768, torch.float32  # ViT-B/16's qkv at batch 64
    return ((meta(m, c, dtype=FP8), meta(m, dtype=f32), meta(3 * c, c, dtype=FP8), meta(3 * c, dtype=f32),
             meta(3 * c, dtype=dtype)), {"out_dtype": dtype})


def _fake(x_q, x_scale, weight_q, weight_scale, bias, out_dtype) -> torch.Tensor:  # noqa: ANN001
    return x_q.new_empty((x_q.shape[0], weight_q.shape[0]), dtype=out_dtype)


# ---- cases ------------------------------------------------------------------------------------------------------


def _leaves(dims: Mapping, g: torch.Generator) -> dict[str, torch.Tensor]:
    m, k, n = int(dims["M"]), int(dims["K"]), int(dims["N"])
    leaves = {"x": randn(g, m, k), "weight": randn(g, n, k, std=k**-0.5)}
    if dims.get("bias", True):
        leaves["bias"] = randn(g, n, std=0.5)
    return leaves


def _view(dims: Mapping, t: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    """The e4m3 operands quantized by the reference (one scale per row and ``dims["G"]`` groups of columns; one
    per output channel), in ``dims["layout"]``: contiguous, or strided (x_q a column window of a wider buffer,
    weight_q column-major, both scales every other element). The float side (bias, output) in the leaves' dtype."""
    m, k = int(dims["M"]), int(dims["K"])
    groups = int(dims.get("G", 1))
    x_q, x_scale = quantize_rows_ref(t["x"].detach().reshape(m * groups, k // groups))
    x_q, x_scale = x_q.view(m, k), x_scale.view(m, groups) if groups > 1 else x_scale
    w_q, w_scale = quantize_rows_ref(t["weight"].detach())
    if dims.get("layout") == "strided":
        x_q, x_scale, w_q, w_scale = column_slice(x_q), every_other(x_scale), transposed(w_q), every_other(w_scale)
    return (x_q, x_scale, w_q, w_scale, t.get("bias")), {"out_dtype": t["x"].dtype}


def _oracle(dims: Mapping, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The dequantized operands' product in float64, plus the bias."""
    (x_q, x_scale, w_q, w_scale, bias), _ = _view(dims, t)
    m, k = x_q.shape
    xs = x_scale.double().reshape(m, -1).repeat_interleave(k // x_scale.reshape(m, -1).shape[1], dim=1)
    y = (x_q.double() * xs) @ (w_q.double() * w_scale.double()[:, None]).t()
    return y if bias is None else y + bias.double()


def _nan(leaves: Mapping[str, torch.Tensor]) -> None:
    """A NaN in row 2 of x: its quantized row is all NaN (its scale is), so output row 2 is; the close rule
    compares NaN positions with the exact product's."""
    leaves["x"][2, 7] = float("nan")


def close_gemm(out: torch.Tensor, exact: torch.Tensor, inputs: tuple, name: str) -> None:
    """The FP8 GEMM's error budget: the e4m3 products are exact in fp32, so what remains is the fp32 sums (K
    roundings at the largest partial sum, here 1e-5 of it) and one rounding to the output dtype."""
    assert out.shape == exact.shape, f"{name}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert torch.equal(out.isnan(), exact.isnan()), f"{name}: NaN where the exact product has none (or none where)"
    unit = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[out.dtype]
    ok = ~exact.isnan()
    big = exact[ok].abs().max().item() if ok.any() else 0.0
    err = (out.double() - exact)[ok].abs()
    bound = exact[ok].abs() * unit * 1.01 + 1e-5 * big + 1e-30
    assert (err <= bound).all(), f"{name}: off the exact product by {err.max():.3g} (budget {bound.max():.3g})"


def _bad() -> list:
    g = torch.Generator().manual_seed(0)
    dims = {"M": 3, "K": 16, "N": 16}
    good, kw = _view(dims, {k: v.float() for k, v in _leaves(dims, g).items()})
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


def _strategy(budget: str):
    from hypothesis import strategies as st

    rows, width = {"reference": (600, 1024), "interpreter": (12, 96), "interpreter_slow": (200, 320)}[budget]

    @st.composite
    def draw(d) -> tuple[torch.dtype, dict]:
        groups = d(st.sampled_from((1, 1, 2, 3, 5)))
        k = groups * 16 * d(st.integers(1, max(1, width // (16 * groups))))  # groups of 16 columns
        dims = {"M": d(st.integers(0, rows)), "K": k, "N": d(widths(width)), "G": groups,
                "layout": d(st.sampled_from(("contiguous", "strided"))), "bias": d(st.booleans())}
        return d(st.sampled_from(DTYPES)), dims

    return draw()


CASES = Cases(
    leaves=_leaves, view=_view, oracle=_oracle, reduction=lambda dims: int(dims["K"]),
    small={"M": 5, "K": 32, "N": 16}, empty=({"M": 0, "K": 32, "N": 16},), layouts=("contiguous", "strided"),
    nan=(("x", _nan),), bad=_bad, strategy=_strategy, close=close_gemm,
    # past one 32-row interpreter tile in M and N, five scale groups, every output dtype: in every default run
    examples=((torch.float32, {"M": 5, "K": 64, "N": 16, "G": 4}), (torch.bfloat16, {"M": 0, "K": 32, "N": 16}),
              (torch.float32, {"M": 70, "K": 240, "N": 70, "G": 5, "layout": "strided", "bias": True}),
              (torch.float16, {"M": 45, "K": 96, "N": 33, "G": 2, "bias": True}),
              (torch.bfloat16, {"M": 33, "K": 48, "N": 65, "G": 3, "layout": "strided"})),
)


def _bench_bytes(s: Mapping, mode: str, elem: int) -> int:
    m, k, n = s["B"] * s["N"], s["C"], s["out"]
    return m * k + n * k + 4 * (m + n) + elem * (n + m * n)  # e4m3 operands, fp32 scales, bias and output


# The model's widest FP8 GEMM (fc1, C -> hidden) on tokens already quantized, forward only (inference).
BENCH = Bench(
    "TFLOP/s", ("B", "N", "C", "out"),
    (({"B": 64, "N": 197, "C": 768, "out": 3072},), ({"B": 8, "N": 65, "C": 192, "out": 768},)),
    model_shape=lambda d: {"N": d["N"], "C": d["C"], "out": d["hidden"]},
    flops=lambda s, mode: 2 * s["B"] * s["N"] * s["C"] * s["out"], bytes=_bench_bytes,
    baselines=lambda: [], compiled=None, modes=("fwd",), gpu_only=True,
    # fc1; proj on per-head activation scales (G = 12: the attention's fp8 output); fc2, whose one scale group
    # spans K = 3072 (the fp8 dot's fp32 promotion over a long K loop)
    gpu_check=({"B": 2, "N": 197, "C": 768, "out": 3072}, {"B": 2, "N": 197, "C": 768, "out": 768, "G": 12},
               {"B": 2, "N": 197, "C": 3072, "out": 768}),
    to_dims=lambda s: {"M": s["B"] * s["N"], "K": s["C"], "N": s["out"], **({"G": s["G"]} if "G" in s else {})})

SCALED_LINEAR = declare(OpSpec(
    "scaled_linear", scaled_linear, scaled_linear_ref, _call, _facts, _bucket, _example,
    Contract("(Tensor x_q, Tensor x_scale, Tensor weight_q, Tensor weight_scale, Tensor? bias, "
             "ScalarType out_dtype) -> Tensor", _fake), CASES, BENCH))

if _kernels is not None:

    def _triton(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        unit = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
        return _kernels.scaled_gemm(unit(x_q), x_scale, unit(weight_q), weight_scale, bias, out_dtype)

    # fp32 accumulation: no float64 output or bias
    register_backend(SCALED_LINEAR, "triton", Limits(devices=("cuda", "cpu"),
                                                     dtypes=(FP8, torch.float32, torch.float16, torch.bfloat16),
                                                     min_capability=FP8_CAPABILITY), fwd=_triton)
