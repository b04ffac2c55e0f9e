"""What the suites and the benchmarks make of the attention ops: inputs in every layout the model and users give,
the float64 oracle by hand, NaN and bad cases, the hypothesis strategies, the GPU check's shapes and the
benchmark (:class:`vit_fast.ops.spec.Cases`, :class:`vit_fast.ops.spec.Bench`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from vit_fast.ops._inputs import BATCHES, DTYPES, assert_fp8_rows, randn, seq_lengths
from vit_fast.ops.spec import Bench, Cases

# The layouts of q, k, v (B, H, N, D): independent tensors, views of the model's packed projection (B, N, 3, H, D)
# (sliced: extra heads and head-dim columns the op must skip), D-major memory (unit stride along N), and a mix:
# q D-major, k in (B, N, H, D) memory, v every other element of a wider buffer.
LAYOUTS = ("separate", "packed", "packed_sliced", "transposed", "mixed")
PACKED_LAYOUTS = ("packed", "packed_sliced")
VIT_HEAD_DIMS = (16, 24, 32, 40, 64, 72, 80, 96, 128)


def _sizes(dims: Mapping) -> tuple[int, int, int, int]:
    return int(dims["B"]), int(dims["H"]), int(dims["N"]), int(dims["D"])


def _leaves(dims: Mapping, g: torch.Generator) -> dict[str, torch.Tensor]:
    B, H, N, D = _sizes(dims)
    layout = dims.get("layout", "separate")
    if layout == "packed":
        return {"qkv": randn(g, B, N, 3, H, D)}
    if layout == "packed_sliced":
        return {"qkv": randn(g, B, N, 3, H + 1, D + 3)}
    if layout == "transposed":
        return {n: randn(g, B, H, D, N) for n in "qkv"}
    if layout == "mixed":
        return {"q": randn(g, B, H, D, N), "k": randn(g, B, N, H, D), "v": randn(g, B, H, N, 2 * D)}
    return {n: randn(g, B, H, N, D) for n in "qkv"}


def _qkv(dims: Mapping, t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, D = _sizes(dims)
    layout = dims.get("layout", "separate")
    if layout in PACKED_LAYOUTS:
        q, k, v = t["qkv"][..., :H, :D].permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
        return q, k, v
    if layout == "transposed":
        return t["q"].transpose(-1, -2), t["k"].transpose(-1, -2), t["v"].transpose(-1, -2)
    if layout == "mixed":
        return t["q"].transpose(-1, -2), t["k"].transpose(1, 2), t["v"][..., ::2]
    return t["q"], t["k"], t["v"]


def _view(dims: Mapping, t: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    return _qkv(dims, t), {"scale": dims.get("scale")}


def _packed_view(dims: Mapping, t: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    H, D = int(dims["H"]), int(dims["D"])
    return (t["qkv"][..., :H, :D],), {"scale": dims.get("scale")}


def _fp8_view(dims: Mapping, t: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    return _qkv(dims, t), {"scale": dims.get("scale")}


def by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """softmax(q k^T * scale) v, written out (no SDPA)."""
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, H, N, N)
    return torch.softmax(s, dim=-1) @ v


def _oracle(dims: Mapping, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return by_hand(*_qkv(dims, t), dims.get("scale"))


def _fp8_oracle(dims: Mapping, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The exact rows the FP8 output quantizes: the attention output, token-major (B * N, H * D)."""
    B, H, N, D = _sizes(dims)
    return _oracle(dims, t).transpose(1, 2).reshape(B * N, H * D)


def _grads(dims: Mapping) -> tuple[str, ...]:
    return ("qkv",) if dims.get("layout", "separate") in PACKED_LAYOUTS else ("q", "k", "v")


def _mask(shape: tuple[int, ...], where: str, device: torch.device) -> torch.Tensor:
    """Where a NaN at (b=1, h=0, n=5, d=3) of q, k or v makes the (B, H, N, D) output NaN: q -> output row 5 of
    (1, 0); k -> every row of (1, 0) (each score row has it); v -> column 3 of every row of (1, 0)."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    if where == "q":
        mask[1, 0, 5] = True
    elif where == "k":
        mask[1, 0] = True
    else:
        mask[1, 0, :, 3] = True
    return mask


def _nan(where: str) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    def poison(leaves: Mapping[str, torch.Tensor]) -> torch.Tensor:
        leaves[where][1, 0, 5, 3] = float("nan")
        return _mask(leaves[where].shape, where, leaves[where].device)

    return poison


def _packed_nan(where: str) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """:func:`_nan` at q, k or v's element (1, 0, 5, 3) in the packed (B, N, 3, H, D) storage."""

    def poison(leaves: Mapping[str, torch.Tensor]) -> torch.Tensor:
        qkv = leaves["qkv"]
        qkv[1, 5, "qkv".index(where), 0, 3] = float("nan")
        B, N, _, H, D = qkv.shape
        return _mask((B, H, N, D), where, qkv.device)

    return poison


def _fp8_nan(leaves: Mapping[str, torch.Tensor]) -> None:
    """A NaN in q at (b=1, h=0, n=5): the close rule (the e4m3 rows' budget) holds that token's head-0 values NaN
    and the scale of the group holding them, a token's row-wise scale or its head-0 one."""
    leaves["q"][1, 0, 5, 3] = float("nan")


def _bad() -> list:
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


def _packed_bad() -> list:
    return [((torch.randn(1, 7, 2, 2, 16),), {}, ValueError, "3, H, D"),
            ((torch.randn(7, 3, 2, 16),), {}, ValueError, "5-D")]


def _fp8_bad() -> list:
    return [case for case in _bad() if "dropout_p" not in case[1]]


# B * H * ceil(N / 32)^2: block pairs of the interpreter's 32 x 32 tiles one example may walk
_TILES = {"reference": 400, "interpreter": 4, "interpreter_slow": 400}


def _strategy(layouts: tuple[str, ...]) -> Callable[[str], object]:
    def strategy(budget: str):
        from hypothesis import strategies as st

        @st.composite
        def draw(d) -> tuple[torch.dtype, dict]:
            kernels = budget != "reference"  # the Triton kernels take head dims 16..128
            D = d(st.one_of(st.sampled_from(VIT_HEAD_DIMS), st.integers(16 if kernels else 1, 128)))
            B, H = d(st.sampled_from(BATCHES)), d(st.integers(1, 4))
            blocks = math.isqrt(_TILES[budget] // (max(B, 1) * H))  # query (= key) blocks of 32 the budget allows
            N = d(seq_lengths(min(600, max(blocks, 1) * 32)))
            scale = d(st.one_of(st.none(), st.floats(0.01, 1.0)))
            dims = {"B": B, "H": H, "N": N, "D": D, "layout": d(st.sampled_from(layouts)), "scale": scale}
            return d(st.sampled_from(DTYPES)), dims

        return draw()

    return strategy


_COMMON = {"oracle": _oracle, "reduction": lambda dims: max(int(dims["N"]), int(dims["D"]))}

ATTENTION = Cases(
    leaves=_leaves, view=_view, grads=_grads, **_COMMON,
    small={"B": 2, "H": 3, "N": 20, "D": 64}, empty=({"B": 0, "H": 2, "N": 7, "D": 64},),
    deterministic={"B": 1, "H": 2, "N": 70, "D": 64}, layouts=LAYOUTS,
    nan=tuple((w, _nan(w)) for w in "qkv"), requested=((("q", "v"), True), (("k",), True)),
    bad=_bad, strategy=_strategy(LAYOUTS),
    examples=((torch.float32, {"B": 0, "H": 2, "N": 7, "D": 64}), (torch.float16, {"B": 0, "H": 2, "N": 7, "D": 64}),
              (torch.float16, {"B": 1, "H": 1, "N": 50, "D": 80, "layout": "packed_sliced"}),
              (torch.bfloat16, {"B": 1, "H": 1, "N": 7, "D": 64}),
              (torch.float32, {"B": 1, "H": 1, "N": 197, "D": 64, "slow": True}),
              (torch.float16, {"B": 1, "H": 1, "N": 257, "D": 80, "slow": True})),
)
ATTENTION_PACKED = Cases(
    leaves=_leaves, view=_packed_view, grads=_grads, **_COMMON,
    small={"B": 2, "H": 3, "N": 20, "D": 64, "layout": "packed"},
    empty=({"B": 0, "H": 2, "N": 7, "D": 32, "layout": "packed"},),
    deterministic={"B": 1, "H": 2, "N": 70, "D": 64, "layout": "packed"}, layouts=PACKED_LAYOUTS,
    nan=tuple((w, _packed_nan(w)) for w in "qkv"), requested=((("qkv",), True),),
    bad=_packed_bad, strategy=_strategy(PACKED_LAYOUTS),
    examples=((torch.float32, {"B": 1, "H": 2, "N": 40, "D": 80, "layout": "packed_sliced"}),),
)


# The attention output's relative error before it is quantized: fp32's sums over N keys (several ulps), or one
# rounding of the half-precision dtype the output or the probabilities pass through.
_UNIT = {torch.float32: 2.0**-19, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _fp8_close(out: tuple, exact: torch.Tensor, inputs: tuple, name: str) -> None:
    """:func:`~vit_fast.ops._inputs.assert_fp8_rows`, the values off by a few roundings of the input dtype: the
    reference quantizes the attention output rounded to it, the kernel its probabilities rounded to it."""
    (q, _, _), _ = inputs
    assert_fp8_rows(*out, exact, name, unit=_UNIT.get(q.dtype, 2.0**-23))


ATTENTION_FP8 = Cases(
    leaves=_leaves, view=_fp8_view, oracle=_fp8_oracle, reduction=lambda dims: max(int(dims["N"]), int(dims["D"])),
    small={"B": 2, "H": 3, "N": 37, "D": 32, "scale": 0.2}, empty=({"B": 0, "H": 3, "N": 7, "D": 32},),
    layouts=tuple(a for a in LAYOUTS if a != "mixed"), nan=(("q", _fp8_nan),), bad=_fp8_bad,
    strategy=_strategy(tuple(a for a in LAYOUTS if a != "mixed")), close=_fp8_close,
    examples=((torch.float32, {"B": 1, "H": 2, "N": 9, "D": 80}),),
)


# ---- the benchmark ----------------------------------------------------------------------------------------------

SEQ_LENS = (65, 197, 257, 577, 1025)  # CIFAR/4, /16 at 224, /14 at 224, /16 at 384, /16 at 512


def _shapes(quick: bool, gpu: bool) -> list[dict]:
    if quick:
        if gpu:  # the shapes of the attention targets: ViT-B heads and ViT-H/14 heads at 197, 257, 577 tokens
            return [{"B": 64, "H": h, "N": n, "D": d} for h, d in ((12, 64), (16, 80)) for n in (197, 257, 577)]
        return [{"B": 4, "H": 3, "N": 65, "D": 64}, {"B": 1, "H": 3, "N": 197, "D": 64}]
    heads = ((12, 64), (16, 80)) if gpu else ((3, 64), (3, 80))  # ViT-B and ViT-H/14 (ViT-Ti heads on CPU)
    return [{"B": b, "H": h, "N": n, "D": d} for h, d in heads for n in (SEQ_LENS if gpu else SEQ_LENS[:3])
            for b in ((8, 64, 256) if gpu else (1, 8))]


def _flops(dims: Mapping, mode: str) -> int:
    # forward: q k^T and p v, 2 * N * N * D each per head; backward: dV = P^T dO, dP = dO V^T, dQ = dS K,
    # dK = dS^T Q, twice the forward. The recomputation of P that FlashAttention-style kernels do is not
    # counted: it is not useful work, and every provider is credited the same.
    B, H, N, D = _sizes(dims)
    fwd = 4 * B * H * N * N * D
    return fwd if mode == "fwd" else 3 * fwd


def _bytes(dims: Mapping, mode: str, elem: int) -> int:
    # forward reads q, k, v and writes o; the backward at least reads q, k, v, dO and writes dq, dk, dv.
    B, H, N, D = _sizes(dims)
    t = B * H * N * D * elem
    return 4 * t if mode == "fwd" else 11 * t


def _note(shapes: list[Mapping]) -> str | None:
    # Tiles cover N in blocks and D in power-of-two parts: the rest of each tile is masked work. 64 x 64 is the
    # smallest forward tile the autotuner tries: the fraction is an upper bound for the configs it picks.
    try:
        from vit_fast.kernels.attention import useful_fraction
    except ImportError:
        return None
    pairs = sorted({(int(s["N"]), int(s["D"])) for s in shapes})
    if not pairs:
        return None
    cells = ", ".join(f"N={n} D={d} {useful_fraction(n, d, 64, 64):.0%}" for n, d in pairs)
    return f"Useful score-matrix work of the Triton kernels (useful / computed entries, 64 x 64 tiles): {cells}."


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _baselines() -> list:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forced(backend: SDPBackend) -> Callable:
        return lambda: sdpa_kernel([backend])

    kinds = (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
             ("math", "MATH"))
    return [(f"sdpa:{short}", _sdpa, forced(getattr(SDPBackend, attr)))
            for short, attr in kinds if hasattr(SDPBackend, attr)]


def _peers() -> list:
    def flash_attn() -> Callable:
        from flash_attn import flash_attn_func

        def fn(q, k, v, *, scale):  # flash_attn takes (B, N, H, D)
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                   softmax_scale=scale).transpose(1, 2)

        return fn

    def xformers() -> Callable:
        from xformers.ops import memory_efficient_attention

        def fn(q, k, v, *, scale):  # xformers takes (B, N, H, D)
            return memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              scale=scale).transpose(1, 2)

        return fn

    return [("peer:flash_attn", "flash_attn", flash_attn), ("peer:xformers", "xformers", xformers)]


def _fp8_bytes(dims: Mapping, mode: str, elem: int) -> int:
    B, H, N, D = _sizes(dims)
    return B * H * N * (3 * D * elem + D + 4)  # q, k, v in; the e4m3 output and a scale per (token, head) out


# The attention of an FP8 model (its output quantized for the proj GEMM), forward only: the model's heads at N.
FP8_BENCH = Bench("TFLOP/s", ("B", "H", "N", "D"),
                  (({"B": 64, "H": 12, "N": 197, "D": 64},), ({"B": 8, "H": 3, "N": 65, "D": 64},)),
                  model_shape=lambda d: {"H": d["H"], "N": d["N"], "D": d["D"]},
                  flops=lambda dims, mode: _flops(dims, "fwd"), bytes=_fp8_bytes, baselines=lambda: [],
                  compiled=None, model_dims={"layout": "packed"}, modes=("fwd",), gpu_only=True,
                  gpu_check=({"B": 2, "H": 2, "N": 197, "D": 64},))

BENCH = Bench("TFLOP/s", ("B", "H", "N", "D"), ((), ()), model_shape=lambda d: {"H": d["H"], "N": d["N"],
                                                                                 "D": d["D"]},
              flops=_flops, bytes=_bytes, baselines=_baselines, compiled=None,
              shapes=_shapes, model_dims={"layout": "packed"}, peers=_peers, note=_note,
              # the head widths of ViT-B (64), ViT-H/14 (80) and 128, at 197, 257 and 577 tokens
              gpu_check=tuple({"B": 2, "H": 2, "N": n, "D": d} for d in (64, 80, 128) for n in (197, 257, 577)))
