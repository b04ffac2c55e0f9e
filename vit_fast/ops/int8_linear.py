"""The CPU int8 Linear: PyTorch's dynamic int8 Linear (fbgemm / x86 engine) on prepacked per-channel int8
weights; activations are quantized per call, one scale per GEMM input (what that kernel supports)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from vit_fast import backends
from vit_fast.backends import Call, Facts
from vit_fast.ops import _checks
from vit_fast.ops._inputs import column_slice, meta, randn, transposed, widths
from vit_fast.ops.spec import Cases, OpSpec, declare

REDUCE_RANGE_ENGINES = ("x86", "fbgemm")  # 7-bit activations there: their kernels would overflow int16 with 8


def int8_linear_ref(x: torch.Tensor, packed: object, reduce_range: bool) -> torch.Tensor:
    """fbgemm's dynamic int8 Linear: ``x`` (M, K) float32 is quantized per call, the int8 GEMM accumulates in
    int32 and the result comes back float32 with the bias added. A row of ``x`` holding a NaN gives a NaN row,
    as the float Linear does (fbgemm's quantizer would read the NaN as a finite int8 value); so does a row holding
    both +inf and -inf, where the float Linear's sums are mostly NaN too."""
    out = torch.ops.quantized.linear_dynamic(x, packed, reduce_range)
    # One summing pass finds the NaN rows (isnan(x).any() writes and rereads an (M, K) mask), and the fresh
    # output is patched in place only when there are some: copying it cost as much as the int8 GEMM.
    nan_rows = torch.isnan(x.sum(-1))
    if nan_rows.any():
        out[nan_rows] = float("nan")
    return out


def int8_linear(x: torch.Tensor, packed: object, *, reduce_range: bool) -> torch.Tensor:
    """Dynamic int8 Linear on CPU.

    Args:
        x: (M, K) float32.
        packed: :func:`pack_weight`'s (``torch.ops.quantized.linear_prepack`` of a per-channel qint8 weight (N, K)
            and a float32 bias (N,)).
        reduce_range: 7-bit activations (what fbgemm's x86 kernels need to avoid int16 overflow).

    Returns:
        (M, N) float32.
    """
    _checks.tensor("x", x, ndim=2)
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"x must be float32 on CPU (int8_linear runs fbgemm's float32-activation kernels); "
                        f"got {_checks.describe(x)}")
    if not isinstance(packed, torch.ScriptObject):
        raise TypeError(f"packed must be torch.ops.quantized.linear_prepack's result; got {type(packed).__name__}")
    return backends.dispatch("int8_linear", _call(x, packed, reduce_range=reduce_range))


def pack_weight(weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor) -> object:
    """fbgemm's prepacked form of an int8 weight (N, K) with one float32 scale per output channel (symmetric) and a
    float32 bias: what :func:`int8_linear` takes."""
    zero = torch.zeros(weight_q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # fbgemm's prepack still takes a quantized tensor, now deprecated
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(weight_q.cpu(), weight_scale.double().cpu(), zero, 0)
        return torch.ops.quantized.linear_prepack(qweight, bias.float().cpu())


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float (N, K) weight as int8 with one symmetric scale per output channel: ``(weight_q, weight_scale)``."""
    scale = weight.detach().float().abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (N,)
    return torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _call(x: torch.Tensor, packed: object, *, reduce_range: bool) -> Call:
    return Call((x, packed, bool(reduce_range)))


def _bucket(call: Call) -> tuple[int, ...]:
    x = call.args[0]
    return backends.size_bucket(x.shape[-1]), backends.size_bucket(x.shape[0])


# ---- cases ------------------------------------------------------------------------------------------------------


def _leaves(dims: Mapping, g: torch.Generator) -> dict[str, torch.Tensor]:
    m, k, n = int(dims["M"]), int(dims["K"]), int(dims["N"])
    return {"x": randn(g, m, k), "weight": randn(g, n, k, std=k**-0.5), "bias": randn(g, n, std=0.5)}


def _view(dims: Mapping, t: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    """x (M, K) float32 on CPU (fbgemm's kernels are CPU only, whatever the suite's device) in ``dims["layout"]``
    (contiguous, a column window of a wider buffer, column-major), and the packed int8 weight and bias."""
    x = t["x"].cpu()
    layout = dims.get("layout", "contiguous")
    if layout == "cols_sliced":
        x = column_slice(x)
    elif layout == "transposed":
        x = transposed(x)
    weight_q, weight_scale = quantize_weight(t["weight"])
    packed = pack_weight(weight_q, weight_scale, t["bias"].detach())
    return (x, packed), {"reduce_range": torch.backends.quantized.engine in REDUCE_RANGE_ENGINES}


def _oracle(dims: Mapping, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """x times the dequantized int8 weight in float64, plus the bias: the activations' own int8 rounding is what
    :func:`close_int8`'s budget allows."""
    weight_q, weight_scale = quantize_weight(t["weight"])
    w = weight_q.double() * weight_scale.double()[:, None]
    return t["x"].double().cpu() @ w.t() + t["bias"].double().cpu()


def close_int8(out: torch.Tensor, exact: torch.Tensor, inputs: tuple, name: str) -> None:
    """The dynamic int8 Linear's error budget: each activation is rounded to a step of its tensor's range / 127
    (7-bit with reduce_range, 8-bit without: 255; 127 bounds both), so a product's sum is off by at most half a step
    times the sum of that output channel's |weights|; plus fp32 rounding. NaN rows where the exact product's."""
    (x, packed), _ = inputs
    assert out.dtype == torch.float32 and out.shape == exact.shape, f"{name}: {out.dtype} {tuple(out.shape)}"
    assert torch.equal(out.isnan(), exact.isnan()), f"{name}: NaN where the exact product has none (or none where)"
    if x.numel() == 0:
        return
    finite = x[torch.isfinite(x)]
    lo, hi = min(finite.min().item(), 0.0), max(finite.max().item(), 0.0)
    qweight, _ = torch.ops.quantized.linear_unpack(packed)
    w_abs = qweight.dequantize().double().abs().sum(dim=1)  # (N,)
    bound = 0.5 * (hi - lo) / 127 * w_abs[None, :] * 1.01 + exact.abs().nan_to_num() * 1e-6 + 1e-6
    ok = exact.isnan() | ((out.double() - exact).abs() <= bound)
    assert ok.all(), f"{name}: {int((~ok).sum())} outputs off the exact product beyond the activations' rounding"


def _bad() -> list:
    g = torch.Generator().manual_seed(0)
    (x, packed), kw = _view({"M": 3, "K": 16, "N": 8}, _leaves({"M": 3, "K": 16, "N": 8}, g))
    x = x.float()
    return [
        (([1.0], packed), kw, TypeError, "x must be a torch.Tensor"),
        ((x.long(), packed), kw, TypeError, "x must be a floating-point"),
        ((x[0], packed), kw, ValueError, "x must be 2-D"),
        ((x.double(), packed), kw, TypeError, "x must be float32 on CPU"),
        ((x.to("meta"), packed), kw, TypeError, "x must be float32 on CPU"),
        ((x, "packed"), kw, TypeError, "packed must be"),
    ]


def _nan(leaves: Mapping[str, torch.Tensor]) -> None:
    """A NaN in row 2 of x: output row 2 is NaN (as the float Linear's), which the close rule compares."""
    leaves["x"][2, 3] = float("nan")


def _strategy(budget: str):
    from hypothesis import strategies as st

    rows, width = {"reference": (600, 1024), "interpreter": (12, 96), "interpreter_slow": (200, 320)}[budget]
    return st.tuples(st.just(torch.float32), st.fixed_dictionaries(
        {"M": st.integers(0, rows), "K": widths(width), "N": widths(width),
         "layout": st.sampled_from(("contiguous", "cols_sliced", "transposed"))}))


CASES = Cases(
    leaves=_leaves, view=_view, oracle=_oracle, reduction=lambda dims: int(dims["K"]), small={"M": 5, "K": 32, "N": 16},
    empty=({"M": 0, "K": 32, "N": 16},), layouts=("contiguous", "cols_sliced", "transposed"), nan=(("x", _nan),),
    bad=_bad, strategy=_strategy, close=close_int8, dtypes=(torch.float32,),
    float64_raises=(TypeError, "x must be float32 on CPU"),  # fbgemm's dynamic Linear takes float32 only
    diverges={("compile", "reference"): "Dynamo cannot put the prepacked weight (a torchbind ScriptObject) in a "
                                        "graph: 'Failed to convert args/kwargs to proxy'"},
)


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    return (meta(64 * 197, 768, dtype=torch.float32), None), {"reduce_range": True}


INT8_LINEAR = declare(OpSpec("int8_linear", int8_linear, int8_linear_ref, _call, lambda call: Facts(), _bucket,
                              _example, None, CASES))  # no kernel backend: fbgemm's is the fast CPU path
