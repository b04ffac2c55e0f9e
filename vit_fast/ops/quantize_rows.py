"""Dynamic per-row e4m3 quantization, optionally of ``gelu(x)``: the input of an FP8 GEMM (inference)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from vit_fast import backends
from vit_fast.backends import Call, Facts, Limits
from vit_fast.ops import _checks
from vit_fast.ops._fp8 import FP8, FP8_CAPABILITY, quantize_rows_ref, rows_bench
from vit_fast.ops._inputs import DTYPES, close_rows, meta, row_leaf, row_view, widths
from vit_fast.ops.spec import Cases, Contract, OpSpec, declare, register_backend, triton_kernels

_kernels = triton_kernels("quantize_rows")


def quantize_rows(x: torch.Tensor, *, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row e4m3 quantization.

    Args:
        x: (M, C) float.
        gelu: quantize ``gelu(x)`` (exact, erf) instead: the GELU and the quantization are one pass.

    Returns:
        q (M, C) float8_e4m3fn and scale (M,) float32, with ``q * scale[:, None] ~= x``. A NaN in a row makes that
        row's scale and values NaN.
    """
    _checks.tensor("x", x, ndim=2)
    return backends.dispatch("quantize_rows", _call(x, gelu=gelu))


def _call(x: torch.Tensor, *, gelu: bool = False) -> Call:
    return Call((x, bool(gelu)))


def _facts(call: Call) -> Facts:
    return Facts(width=call.args[0].shape[-1])


def _bucket(call: Call) -> tuple[int, ...]:
    x = call.args[0]
    return backends.size_bucket(x.shape[-1]), backends.size_bucket(x.shape[0])


def _fake(x: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Every e4m3-rows producer's fake: e4m3 like ``x`` and one fp32 scale per row."""
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[:1], dtype=torch.float32)


# ---- cases ------------------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "rows_sliced", "cols_sliced", "transposed")


def _leaves(dims: Mapping, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Rows of different magnitudes (so each row gets a scale of its own), in a row layout's storage."""
    m, c = int(dims["M"]), int(dims["C"])
    x = row_leaf(g, dims.get("layout", "contiguous"), 1, m, c)
    row_dim = 2 if dims.get("layout") == "transposed" else 1
    rows = x.shape[row_dim]  # the storage's: 2M for every other row
    magnitudes = torch.logspace(-1, 1, max(rows, 1), dtype=x.dtype, device=x.device)[:rows]
    shape = [1] * x.dim()
    shape[row_dim] = rows
    return {"x": x * magnitudes.view(shape)}


def _view(dims: Mapping, t: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    return (row_view(t["x"], dims.get("layout", "contiguous"), int(dims["C"]))[0],), {"gelu": bool(dims.get("gelu"))}


def _oracle(dims: Mapping, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The exact rows: x, or the erf GELU of x."""
    (x,), kw = _view(dims, t)
    return x * 0.5 * (1 + torch.erf(x / math.sqrt(2))) if kw["gelu"] else x


def _nan(leaves: Mapping[str, torch.Tensor]) -> None:
    """A NaN in row 2 of x: the close rule holds that row's scale NaN, and so its whole e4m3 row."""
    leaves["x"][0, 2, 5] = float("nan")  # (1, M, C) storage


def _bad() -> list:
    x = torch.randn(4, 8)
    return [(([1.0],), {}, TypeError, "x must be a torch.Tensor"),
            ((x.long(),), {}, TypeError, "x must be a floating-point"),
            ((x[0],), {}, ValueError, "x must be 2-D"),
            ((x[None],), {}, ValueError, "x must be 2-D")]


def _strategy(budget: str):
    from hypothesis import strategies as st

    rows, most_c = {"reference": (600, 1024), "interpreter": (12, 96), "interpreter_slow": (200, 320)}[budget]
    # GELU rows at least 8 wide: where every value of a row lies in GELU's far negative tail (x < -2.7), 1 + erf
    # cancels in fp32 and the row's scale is off the exact one by ~1e-4 in the reference and the kernel alike.
    dims = st.fixed_dictionaries({"M": st.integers(0, rows), "C": widths(most_c), "layout": st.sampled_from(LAYOUTS),
                                  "gelu": st.booleans()}).filter(lambda d: d["C"] >= 8 or not d["gelu"])
    return st.tuples(st.sampled_from(DTYPES), dims)


CASES = Cases(leaves=_leaves, view=_view, oracle=_oracle, reduction=lambda dims: int(dims["C"]),
              small={"M": 7, "C": 48, "gelu": True}, empty=({"M": 0, "C": 16, "gelu": True},), layouts=LAYOUTS,
              nan=(("x", _nan),), bad=_bad, strategy=_strategy, close=close_rows,
              examples=((torch.float32, {"M": 0, "C": 16, "gelu": True}),))

# fc1's output, GELU'd and quantized for fc2
BENCH = rows_bench((3072, 768), lambda d: d["hidden"], gpu_check=({"B": 2, "N": 197, "C": 3072},), gelu=True)

QUANTIZE_ROWS = declare(OpSpec(
    "quantize_rows", quantize_rows, quantize_rows_ref, _call, _facts, _bucket,
    lambda dtype: ((meta(64 * 197, 3072, dtype=dtype),), {"gelu": True}),
    Contract("(Tensor x, bool gelu) -> (Tensor, Tensor)", _fake), CASES, BENCH))

if _kernels is not None:

    def _triton(x: torch.Tensor, gelu: bool):
        return _kernels.quantize_rows_fwd(x if x.stride(-1) == 1 else x.contiguous(), gelu)

    register_backend(QUANTIZE_ROWS, "triton", Limits(devices=("cuda", "cpu"), max_width=_kernels.MAX_C,
                                                     width_note="rows are held in registers",
                                                     min_capability=FP8_CAPABILITY), fwd=_triton)
