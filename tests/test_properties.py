"""Property-based tests (hypothesis): every op on every backend that runs on CPU (the reference; Triton through
the interpreter), on random shapes, strides and dtypes, forward and every gradient against the fp64 oracle by
the one tolerance rule (vit_fast.tolerance), with the launch records as proof that the backend under test ran.

Each case is drawn from a seed, so the falsifying example hypothesis prints rebuilds the same tensors. The
Triton interpreter is slow, so the strategies take a cost budget: the default run keeps every example well under
a second; the ``slow``-marked copies (``pytest -m slow``) draw many more examples up to N = 600 tokens.

The same-dtype reference the rule measures against runs on contiguous copies of the inputs: a backend must not
be further off for strided views than PyTorch's own computation on dense tensors.

The forward-only quantized ops (e4m3 and int8 results, no float64 oracle) are compared with the reference on
contiguous copies by the rule their contract case uses (tests/helpers.py); int8_linear runs on the reference only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import (
    attention_fp8_close,
    column_slice,
    every_other,
    fp8_rows_close,
    gemm_close,
    int8_linear_args,
    public,
    reference,
    tensor_close,
    transposed,
)
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_map_only

import vit_fast
from vit_fast import backends
from vit_fast.tolerance import excess

# database=None: the example database would be written into the working tree (.hypothesis/); the printed
# falsifying case (seeded) and print_blob reproduce a failure instead. deadline=None: the interpreter's first
# launch of a kernel variant is much slower than the next ones. The conftest's autouse fixtures (backend reset,
# output poisoning) hold across examples: each example selects its backend in a with block.
_COMMON = {
    "deadline": None,
    "database": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
}


def _fast(n: int) -> settings:
    return settings(max_examples=n, **_COMMON)


SLOW_EXAMPLES = 40
SLOW = settings(max_examples=SLOW_EXAMPLES, **_COMMON)

# Repeats weight the draws (hypothesis draws sampled_from's indices near uniformly, integers near their bounds):
# bf16 one draw in five (on CPU the Triton backend refuses it, or runs it through the test suite's correction of
# the interpreter's bf16 tl.dot); an empty batch one in seven.
DTYPES = (torch.float32, torch.float16, torch.float32, torch.float16, torch.bfloat16)
BATCHES = (1, 2, 3, 1, 2, 3, 0)


def _triton_cpu_mark() -> pytest.MarkDecorator:
    why = backends.unavailable("triton")
    if why is None and not backends.triton_interpreter():  # a GPU machine: the GPU tests cover Triton there
        why = "the Triton kernels run on CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
    return pytest.mark.skipif(why is not None, reason=f"triton backend on CPU: {why}")


needs_triton_cpu = _triton_cpu_mark()


@dataclass(frozen=True)
class Budget:
    """The most work one example may ask of a backend. The Triton interpreter's time grows with the number of
    programs and tile steps, not with the arithmetic, so each op's bound counts tiles of its interpreter config."""

    attention_tiles: int  # B * H * ceil(N / 32) ** 2: block pairs of the interpreter's 32 x 32 tiles
    rows: int  # B * N for layer_norm
    mlp_rows: int  # B * N for layernorm_mlp (its interpreter cost is about 35 ms a row)
    mlp_width: int  # largest C, C_out and hidden for layernorm_mlp
    patch_tiles: int  # 64 x 64 x 32 tiles of each of patch_embed's three GEMMs


# The reference is PyTorch's own CPU path: bounded only where three runs of it (low precision, contiguous, fp64)
# with backward would take over a second (fp16/bf16 CPU matmuls and convolutions are slow).
REFERENCE = Budget(attention_tiles=400, rows=1800, mlp_rows=600, mlp_width=256, patch_tiles=400)
TRITON_FAST = Budget(attention_tiles=4, rows=128, mlp_rows=12, mlp_width=96, patch_tiles=12)
TRITON_SLOW = Budget(attention_tiles=400, rows=1800, mlp_rows=96, mlp_width=320, patch_tiles=300)


# ---- cases: seeded fp64 leaves and the views the op is called on ------------------------------------------------


def _randn(g: torch.Generator, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean


@dataclass(frozen=True)
class Case:
    """One drawn example. ``leaves`` makes the fp64 master tensors from ``seed``; ``inputs`` builds the op's
    ``(args, kwargs)`` from leaves of any dtype, through the drawn layout's views, so gradients land on them."""

    dtype: torch.dtype
    seed: int

    op = ""  # class attributes, not fields: the op's name and, per subclass, its leaves' names

    def leaves(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def inputs(self, leaves: list[torch.Tensor]) -> tuple[tuple, dict]:
        raise NotImplementedError

    @property
    def out_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def entry(self) -> str:
        """The public function under test: the op's own, or another entry point of it."""
        return self.op

    def dispatch_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The op's own (args, kwargs) that the dispatcher picks on for the entry's ``args``."""
        return args, kwargs


# packed_entry: attention_packed on the (B, N, 3, H, D) tensor itself (sliced, as packed_sliced)
ATTENTION_LAYOUTS = ("packed", "packed_sliced", "packed_entry", "separate", "transposed")


@dataclass(frozen=True)
class AttentionCase(Case):
    B: int = 1
    H: int = 1
    N: int = 1
    D: int = 16
    layout: str = "packed"
    scale: float | None = None

    op = "attention"

    @property
    def names(self) -> tuple[str, ...]:
        return ("qkv",) if self.layout.startswith("packed") else ("q", "k", "v")

    def leaves(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        B, H, N, D = self.B, self.H, self.N, self.D
        if self.layout == "packed":  # the model's qkv projection output
            return [_randn(g, B, N, 3, H, D)]
        if self.layout in ("packed_sliced", "packed_entry"):  # extra heads and head-dim columns the op must skip
            return [_randn(g, B, N, 3, H + 1, D + 3)]
        if self.layout == "separate":
            return [_randn(g, B, H, N, D) for _ in range(3)]
        return [_randn(g, B, H, D, N) for _ in range(3)]  # transposed: unit stride along N, not D

    def inputs(self, leaves: list[torch.Tensor]) -> tuple[tuple, dict]:
        kwargs = {"scale": self.scale}
        if self.layout.startswith("packed"):
            qkv = leaves[0][..., : self.H, : self.D]  # (B, N, 3, H, D)
            if self.layout == "packed_entry":
                return (qkv,), kwargs
            return tuple(qkv.permute(2, 0, 3, 1, 4).unbind(0)), kwargs  # 3 x (B, H, N, D)
        if self.layout == "separate":
            return tuple(leaves), kwargs
        return tuple(t.transpose(-1, -2) for t in leaves), kwargs  # (B, H, N, D), stride 1 along N

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.B, self.H, self.N, self.D)

    @property
    def entry(self) -> str:
        return "attention_packed" if self.layout == "packed_entry" else "attention"

    def dispatch_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.layout == "packed_entry":
            return tuple(args[0].permute(2, 0, 3, 1, 4).unbind(0)), kwargs  # 3 x (B, H, N, D)
        return args, kwargs


ROW_LAYOUTS = ("contiguous", "rows_sliced", "cols_sliced", "transposed", "batch_transposed")


def _row_leaf(g: torch.Generator, layout: str, B: int, N: int, C: int) -> torch.Tensor:
    """The storage an (B, N, C) activation is a view of; rows off zero mean and unit variance."""
    shape = {
        "contiguous": (B, N, C),
        "rows_sliced": (B, 2 * N, C),  # every other token
        "cols_sliced": (B, N, C + 5),  # a column window: row stride C + 5, storage offset 2
        "transposed": (B, C, N),  # column stride N
        "batch_transposed": (N, B, C),  # leading dims that do not merge into one row index
    }[layout]
    return _randn(g, *shape, std=2.0, mean=0.5)


def _row_view(leaf: torch.Tensor, layout: str, C: int) -> torch.Tensor:
    if layout == "rows_sliced":
        return leaf[:, ::2]
    if layout == "cols_sliced":
        return leaf[..., 2 : C + 2]
    if layout == "transposed":
        return leaf.transpose(1, 2)
    if layout == "batch_transposed":
        return leaf.transpose(0, 1)
    return leaf


@dataclass(frozen=True)
class LayerNormCase(Case):
    B: int = 1
    N: int = 1
    C: int = 1
    layout: str = "contiguous"
    params_strided: bool = False  # weight and bias as every other element of a longer buffer
    eps: float = 1e-6

    op = "layer_norm"
    names = ("x", "weight", "bias")

    def leaves(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        n_params = 2 * self.C if self.params_strided else self.C
        return [_row_leaf(g, self.layout, self.B, self.N, self.C), _randn(g, n_params, std=0.5, mean=1.0),
                _randn(g, n_params, std=0.5)]

    def inputs(self, leaves: list[torch.Tensor]) -> tuple[tuple, dict]:
        x, w, b = leaves
        step = 2 if self.params_strided else 1
        return (_row_view(x, self.layout, self.C), w[::step], b[::step]), {"eps": self.eps}

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.B, self.N, self.C)


@dataclass(frozen=True)
class LayerNormMlpCase(Case):
    B: int = 1
    N: int = 1
    C: int = 1
    hidden: int = 1
    C_out: int = 1
    layout: str = "contiguous"
    weights_transposed: bool = False  # fc weights as .t() views of (in, out) storage
    residual: bool = False

    op = "layernorm_mlp"

    @property
    def names(self) -> tuple[str, ...]:
        names = ("x", "ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
        return (*names, "residual") if self.residual else names

    def leaves(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        C, hidden, C_out = self.C, self.hidden, self.C_out
        # fc weights scaled by 1/sqrt(fan_in): O(1) activations, so fp16 neither overflows nor flushes
        fc1 = (hidden, C) if not self.weights_transposed else (C, hidden)
        fc2 = (C_out, hidden) if not self.weights_transposed else (hidden, C_out)
        leaves = [
            _row_leaf(g, self.layout, self.B, self.N, C),
            _randn(g, C, std=0.5, mean=1.0),
            _randn(g, C, std=0.5),
            _randn(g, *fc1, std=C**-0.5),
            _randn(g, hidden, std=0.5),
            _randn(g, *fc2, std=hidden**-0.5),
            _randn(g, C_out, std=0.5),
        ]
        return leaves + ([_randn(g, self.B, self.N, C_out)] if self.residual else [])

    def inputs(self, leaves: list[torch.Tensor]) -> tuple[tuple, dict]:
        x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b = leaves[:7]
        if self.weights_transposed:
            fc1_w, fc2_w = fc1_w.t(), fc2_w.t()
        args = (_row_view(x, self.layout, self.C), ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b)
        return args, {"residual": leaves[7] if self.residual else None}

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.B, self.N, self.C_out)


PATCH_SIZES = (2, 4, 7, 8, 14, 16)
IMAGE_LAYOUTS = ("contiguous", "channels_last", "cropped", "channels_sliced")


# Each op's case is a frozen dataclass of the sizes hypothesis draws: the cases share that form, not their fields.
@dataclass(frozen=True)
class PatchEmbedCase(Case):
    B: int = 1
    C: int = 3
    P: int = 16
    grid: tuple[int, int] = (1, 1)  # patches along H and W
    E: int = 1
    layout: str = "contiguous"
    bias: bool = True
    cls_token: bool = False
    pos_embed: int | None = None  # None, N or 1 + N

    op = "patch_embed"

    @property
    def names(self) -> tuple[str, ...]:
        present = (True, True, self.bias, self.cls_token, self.pos_embed is not None)
        all_names = ("images", "weight", "bias", "cls_token", "pos_embed")
        return tuple(n for n, p in zip(all_names, present, strict=True) if p)

    @property
    def N(self) -> int:
        return self.grid[0] * self.grid[1]

    def leaves(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        B, C, P, E = self.B, self.C, self.P, self.E
        H, W = self.grid[0] * P, self.grid[1] * P
        image = {
            "contiguous": (B, C, H, W),
            "channels_last": (B, H, W, C),
            "cropped": (B, C, H + 3, W + 5),
            "channels_sliced": (B, 2 * C, H, W),
        }[self.layout]
        leaves = [_randn(g, *image), _randn(g, E, C, P, P, std=(C * P * P) ** -0.5)]
        if self.bias:
            leaves.append(_randn(g, E, std=0.5))
        if self.cls_token:
            leaves.append(_randn(g, 1, 1, E))
        if self.pos_embed is not None:
            leaves.append(_randn(g, 1, self.pos_embed, E, std=0.5))
        return leaves

    def inputs(self, leaves: list[torch.Tensor]) -> tuple[tuple, dict]:
        named = dict(zip(self.names, leaves, strict=True))
        images = named["images"]
        H, W = self.grid[0] * self.P, self.grid[1] * self.P
        if self.layout == "channels_last":
            images = images.permute(0, 3, 1, 2)  # (B, C, H, W) over NHWC memory
        elif self.layout == "cropped":
            images = images[..., 1 : H + 1, 2 : W + 2]
        elif self.layout == "channels_sliced":
            images = images[:, ::2]
        kwargs = {"cls_token": named.get("cls_token"), "pos_embed": named.get("pos_embed")}
        return (images, named["weight"], named.get("bias")), kwargs

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.B, self.N + (1 if self.cls_token else 0), self.E)


# ---- strategies ---------------------------------------------------------------------------------------------------

VIT_HEAD_DIMS = (16, 24, 32, 40, 64, 72, 80, 96, 128)
VIT_TOKENS = (1, 7, 50, 197, 257, 577)
seeds = st.integers(0, 2**31 - 1)


def _tokens(draw, most: int) -> int:
    """N in 1..most, often one of ViT's sequence lengths (patches + CLS) or an odd one."""
    most = max(1, min(600, most))
    known = [n for n in VIT_TOKENS if n <= most]
    return draw(st.one_of(st.sampled_from(known), st.integers(1, most)))


@st.composite
def attention_cases(draw, budget: Budget, triton: bool) -> AttentionCase:
    dims = st.integers(16, 128) if triton else st.integers(1, 128)  # the Triton kernels take 16..128
    D = draw(st.one_of(st.sampled_from(VIT_HEAD_DIMS), dims))
    B, H = draw(st.sampled_from(BATCHES)), draw(st.integers(1, 4))
    blocks = math.isqrt(budget.attention_tiles // (max(B, 1) * H))  # query (= key) blocks of 32 the budget allows
    N = _tokens(draw, max(blocks, 1) * 32)
    scale = draw(st.one_of(st.none(), st.floats(0.01, 1.0)))
    layout = draw(st.sampled_from(ATTENTION_LAYOUTS))
    return AttentionCase(draw(st.sampled_from(DTYPES)), draw(seeds), B, H, N, D, layout, scale)


def _widths(most: int) -> st.SearchStrategy[int]:
    """Row widths, mostly not powers of two; ViT's where they fit."""
    vit = [c for c in (24, 77, 192, 384, 768, 1000) if c <= most]
    return st.one_of(st.sampled_from(vit), st.integers(1, most)) if vit else st.integers(1, most)


@st.composite
def layer_norm_cases(draw, budget: Budget) -> LayerNormCase:
    B = draw(st.sampled_from(BATCHES))
    N = _tokens(draw, budget.rows // max(B, 1))
    C = draw(_widths(1024))
    layout, strided = draw(st.sampled_from(ROW_LAYOUTS)), draw(st.booleans())
    eps = draw(st.sampled_from((1e-6, 1e-5, 0.1)))
    return LayerNormCase(draw(st.sampled_from(DTYPES)), draw(seeds), B, N, C, layout, strided, eps)


@st.composite
def layernorm_mlp_cases(draw, budget: Budget) -> LayerNormMlpCase:
    B = draw(st.sampled_from(BATCHES))
    N = _tokens(draw, budget.mlp_rows // max(B, 1))
    C = draw(_widths(budget.mlp_width))
    hidden = draw(_widths(budget.mlp_width))
    C_out = draw(st.one_of(st.just(C), _widths(budget.mlp_width)))  # the block's C, or a projection
    layout, transposed, residual = draw(st.sampled_from(ROW_LAYOUTS)), draw(st.booleans()), draw(st.booleans())
    return LayerNormMlpCase(
        draw(st.sampled_from(DTYPES)), draw(seeds), B, N, C, hidden, C_out, layout, transposed, residual
    )


@st.composite
def patch_embed_cases(draw, budget: Budget) -> PatchEmbedCase:
    # Each of the three GEMMs (forward, dweight, dimages) walks (tokens / 64) x (E / 64) x (C P P / 32) tiles.
    P = draw(st.sampled_from(PATCH_SIZES))
    C = draw(st.integers(1, max(1, min(4, budget.patch_tiles * 32 // (P * P)))))
    k_tiles = math.ceil(C * P * P / 32)
    E = draw(_widths(min(192, 64 * max(1, budget.patch_tiles // k_tiles))))
    B = draw(st.sampled_from(BATCHES))
    m_tiles = max(1, budget.patch_tiles // (k_tiles * math.ceil(E / 64)))
    tokens = max(1, min(600, 64 * m_tiles // max(B, 1)))
    gh = draw(st.integers(1, min(tokens, 40)))
    gw = draw(st.integers(1, max(1, min(tokens // gh, 40))))  # independent sides: mostly non-square grids
    cls = draw(st.booleans())
    n = gh * gw
    pos = draw(st.sampled_from((None, n, n + 1) if cls else (None, n)))
    layout, bias = draw(st.sampled_from(IMAGE_LAYOUTS)), draw(st.booleans())
    return PatchEmbedCase(draw(st.sampled_from(DTYPES)), draw(seeds), B, C, P, (gh, gw), E, layout, bias, cls, pos)


# ---- the property ------------------------------------------------------------------------------------------------

def _grads(out: torch.Tensor, leaves: list[torch.Tensor], dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, leaves, dout)


def _runs(backend: str, op: str, dtype: torch.dtype, fn: Callable, args: tuple, kwargs: dict,
          dispatched: tuple[tuple, dict], empty: bool) -> bool:
    """Whether ``backend`` runs these inputs (``dispatched``: the op's own, which the dispatcher picks on). Where
    it refuses them it must be for bf16 (the Triton interpreter's bf16 tl.dot, unless tests/conftest.py installed
    its correction), and the call must raise naming that reason."""
    why = [] if empty else backends.reasons(backend, op, *dispatched)
    # what the examples exercised, in --hypothesis-show-statistics
    event(f"{str(dtype)[6:]}, {'empty batch' if empty else 'refused' if why else 'ran'}")
    if why:
        assert dtype == torch.bfloat16 and any("bfloat16" in w for w in why), f"{backend} refused: {why}"
        with pytest.raises(backends.BackendUnavailableError, match="bfloat16"), vit_fast.set_backend(backend):
            fn(*args, **kwargs)
    return not why


def _assert_ran(launches: list[backends.Launch], op: str, backend: str, empty: bool, phases: tuple[str, ...]) -> None:
    """The launch records show that ``backend``, not a fallback, ran each phase: none at all for an empty batch."""
    ran = {(r.op, r.backend, r.phase) for r in launches}
    if empty:  # nothing to compute: the reference returns the empty result, no kernel is launched
        assert all(r.backend == "reference" for r in launches), f"empty input launched {ran}"
    else:
        assert {r.backend for r in launches} == {backend}, f"{backend} under test, launches {ran}"
        want = {(op, backend, phase) for phase in phases}
        assert want <= ran, f"missing launches {want - ran}; got {ran}"


def check(case: Case, backend: str) -> None:
    """``backend`` runs ``case`` (forward, and backward of a random dout) within the tolerance rule of the fp64
    oracle, and the launch records show that it ran (see :func:`_runs` for the inputs it may refuse)."""
    fn, ref = public(case.entry), reference(case.entry)
    g = torch.Generator().manual_seed(case.seed + 1)
    masters = case.leaves()
    low = [m.to(case.dtype).requires_grad_() for m in masters]
    args, kwargs = case.inputs(low)
    empty = math.prod(case.out_shape) == 0 or any(t.numel() == 0 for t in low)
    if not _runs(backend, case.op, case.dtype, fn, args, kwargs, case.dispatch_inputs(args, kwargs), empty):
        return

    with vit_fast.set_backend(backend), backends.trace() as launches:
        out = fn(*args, **kwargs)
        dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        grads = _grads(out, low, dout)
    _assert_ran(launches, case.op, backend, empty, ("fwd",) if backend == "reference" else ("fwd", "bwd"))
    assert tuple(out.shape) == case.out_shape, f"out shape {tuple(out.shape)} != {case.out_shape}"
    assert out.dtype == case.dtype, f"out dtype {out.dtype} != {case.dtype}"
    assert all(d.dtype == t.dtype for d, t in zip(grads, low, strict=True)), "a gradient's dtype differs from its input"

    same = [t.detach().clone().requires_grad_() for t in low]
    sargs, skwargs = tree_map_only(torch.Tensor, lambda t: t.contiguous(), case.inputs(same))
    same_out = ref(*sargs, **skwargs)
    same_grads = _grads(same_out, same, dout)

    # The oracle sees exactly the low-precision inputs, widened: only the computation differs.
    wide = [t.detach().double().requires_grad_() for t in low]
    oargs, okwargs = case.inputs(wide)
    oracle = ref(*oargs, **okwargs, upcast=True)
    assert oracle.dtype == torch.float64
    oracle_grads = _grads(oracle, wide, dout.double())

    failures = []
    for name, o, s, r in zip(("out", *(f"d{n}" for n in case.names)), (out, *grads), (same_out, *same_grads),
                             (oracle, *oracle_grads), strict=True):
        ratio, detail = excess(o, s, r)
        if not ratio <= 1:
            failures.append(f"{name}: {detail}")
    assert not failures, f"{case} on {backend}:\n  " + "\n  ".join(failures)


# ---- the tests: each property on each backend, a quick default run and a slow-marked long one -------------------
#
# The explicit examples always run: an empty batch, and ViT shapes small enough for the interpreter.
# One function per (op, backend, run): hypothesis binds strategy, settings and @example by decorator, per function.

F32, F16 = torch.float32, torch.float16


@_fast(15)
@given(case=attention_cases(REFERENCE, triton=False))
@example(case=AttentionCase(F32, 0, B=0, H=2, N=7, D=64))
def test_attention_reference(case):
    check(case, "reference")


@pytest.mark.slow
@SLOW
@given(case=attention_cases(REFERENCE, triton=False))
def test_attention_reference_slow(case):
    check(case, "reference")


@needs_triton_cpu
@_fast(12)
@given(case=attention_cases(TRITON_FAST, triton=True))
@example(case=AttentionCase(F16, 1, B=0, H=2, N=7, D=64))
@example(case=AttentionCase(F16, 2, B=1, H=1, N=50, D=80, layout="packed_sliced"))
@example(case=AttentionCase(torch.bfloat16, 3, B=1, H=1, N=7, D=64))
@example(case=AttentionCase(F32, 6, B=1, H=2, N=40, D=80, layout="packed_entry"))
def test_attention_triton(case):
    check(case, "triton")


@needs_triton_cpu
@pytest.mark.slow
@SLOW
@given(case=attention_cases(TRITON_SLOW, triton=True))
@example(case=AttentionCase(F32, 4, B=1, H=1, N=197, D=64))
@example(case=AttentionCase(F16, 5, B=1, H=1, N=257, D=80))
def test_attention_triton_slow(case):
    check(case, "triton")


@_fast(15)
@given(case=layer_norm_cases(REFERENCE))
@example(case=LayerNormCase(F32, 0, B=0, N=5, C=77))
def test_layer_norm_reference(case):
    check(case, "reference")


@pytest.mark.slow
@SLOW
@given(case=layer_norm_cases(REFERENCE))
def test_layer_norm_reference_slow(case):
    check(case, "reference")


@needs_triton_cpu
@_fast(15)
@given(case=layer_norm_cases(TRITON_FAST))
@example(case=LayerNormCase(F16, 1, B=0, N=5, C=77))
@example(case=LayerNormCase(F32, 2, B=2, N=50, C=768, layout="transposed"))
def test_layer_norm_triton(case):
    check(case, "triton")


@needs_triton_cpu
@pytest.mark.slow
@SLOW
@given(case=layer_norm_cases(TRITON_SLOW))
def test_layer_norm_triton_slow(case):
    check(case, "triton")


@_fast(15)
@given(case=layernorm_mlp_cases(REFERENCE))
@example(case=LayerNormMlpCase(F32, 0, B=0, N=3, C=24, hidden=40, C_out=24, residual=True))
def test_layernorm_mlp_reference(case):
    check(case, "reference")


@pytest.mark.slow
@SLOW
@given(case=layernorm_mlp_cases(REFERENCE))
def test_layernorm_mlp_reference_slow(case):
    check(case, "reference")


@needs_triton_cpu
@_fast(10)
@given(case=layernorm_mlp_cases(TRITON_FAST))
@example(case=LayerNormMlpCase(F16, 1, B=0, N=3, C=24, hidden=40, C_out=24, residual=True))
@example(case=LayerNormMlpCase(F32, 2, B=1, N=7, C=77, hidden=96, C_out=77, layout="rows_sliced", residual=True))
def test_layernorm_mlp_triton(case):
    check(case, "triton")


@needs_triton_cpu
@pytest.mark.slow
@SLOW
@given(case=layernorm_mlp_cases(TRITON_SLOW))
def test_layernorm_mlp_triton_slow(case):
    check(case, "triton")


@_fast(15)
@given(case=patch_embed_cases(REFERENCE))
@example(case=PatchEmbedCase(F32, 0, B=0, C=3, P=16, grid=(2, 3), E=40, cls_token=True, pos_embed=7))
def test_patch_embed_reference(case):
    check(case, "reference")


@pytest.mark.slow
@SLOW
@given(case=patch_embed_cases(REFERENCE))
def test_patch_embed_reference_slow(case):
    check(case, "reference")


@needs_triton_cpu
@_fast(12)
@given(case=patch_embed_cases(TRITON_FAST))
@example(case=PatchEmbedCase(F16, 1, B=0, C=3, P=16, grid=(2, 3), E=40, cls_token=True, pos_embed=7))
@example(case=PatchEmbedCase(F32, 2, B=2, C=2, P=14, grid=(2, 3), E=40, layout="channels_last", cls_token=True,
                             pos_embed=7))
def test_patch_embed_triton(case):
    check(case, "triton")


@needs_triton_cpu
@pytest.mark.slow
@SLOW
@given(case=patch_embed_cases(TRITON_SLOW))
def test_patch_embed_triton_slow(case):
    check(case, "triton")


# ---- the quantized-inference ops: forward only ---------------------------------------------------------------------
#
# There is no float64 oracle of a quantized result: a backend's output on the drawn views is compared with the
# reference's on contiguous copies by the rule the op's contract case uses (tests/helpers.py).


@dataclass(frozen=True)
class ForwardOnlyCase:
    """One drawn example of a forward-only op: its sizes, the layout of its inputs and one flag, by op
    (:data:`FORWARD_ONLY`); ``inputs()`` builds them from ``seed``."""

    op: str
    dtype: torch.dtype
    seed: int
    dims: tuple[int, ...]
    layout: str = "contiguous"
    flag: bool = False

    def inputs(self) -> tuple[tuple, dict]:
        return FORWARD_ONLY[self.op].make(self, torch.Generator().manual_seed(self.seed))


def _rows_of(case: ForwardOnlyCase, g: torch.Generator) -> torch.Tensor:
    """(M, C) rows, ``dims[:2]``, through one of :data:`ROW_LAYOUTS`' views."""
    m, c = case.dims[:2]
    return _row_view(_row_leaf(g, case.layout, 1, m, c).to(case.dtype), case.layout, c)[0]


def _quantize_rows_args(case: ForwardOnlyCase, g: torch.Generator) -> tuple[tuple, dict]:
    """flag: gelu."""
    return (_rows_of(case, g),), {"gelu": case.flag}


def _layer_norm_fp8_args(case: ForwardOnlyCase, g: torch.Generator) -> tuple[tuple, dict]:
    """flag: weight and bias as every other element of a longer buffer."""
    x, c = _rows_of(case, g), case.dims[1]
    w, b = (_randn(g, c, std=0.5, mean=mean).to(case.dtype) for mean in (1.0, 0.0))
    return ((x, every_other(w), every_other(b)) if case.flag else (x, w, b)), {"eps": 1e-6}


def _scaled_linear_args(case: ForwardOnlyCase, g: torch.Generator) -> tuple[tuple, dict]:
    """dims (M, K, N, G): G activation scales per row, one per K / G columns. layout "strided": x_q a column
    window of a wider buffer, weight_q column-major, the scales every other element. flag: a bias."""
    m, k, n, groups = case.dims
    quantize = vit_fast.ops.scaled_linear.quantize_rows_ref
    x_q, x_scale = quantize(_randn(g, m * groups, k // groups))
    x_q, x_scale = x_q.view(m, k), x_scale.view(m, groups) if groups > 1 else x_scale
    w_q, w_scale = quantize(_randn(g, n, k, std=k**-0.5))
    if case.layout == "strided":
        x_q, x_scale, w_q, w_scale = column_slice(x_q), every_other(x_scale), transposed(w_q), every_other(w_scale)
    bias = _randn(g, n, std=0.5).to(case.dtype) if case.flag else None
    return (x_q, x_scale, w_q, w_scale, bias), {"out_dtype": case.dtype}


def _attention_fp8_args(case: ForwardOnlyCase, g: torch.Generator) -> tuple[tuple, dict]:
    """dims (B, H, N, D) and the layout of :class:`AttentionCase`'s q, k, v views; flag: the default scale."""
    a = AttentionCase(case.dtype, case.seed, *case.dims, case.layout, None if case.flag else 0.3)
    return a.inputs([t.to(case.dtype) for t in a.leaves()])


def _int8_linear_args(case: ForwardOnlyCase, g: torch.Generator) -> tuple[tuple, dict]:
    """dims (M, K, N): float32 x (M, K) and a Linear (K -> N) of seeded weights."""
    _, k, n = case.dims
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(_randn(g, n, k, std=k**-0.5))
        linear.bias.copy_(_randn(g, n, std=0.5))
    return int8_linear_args(_rows_of(case, g), linear)


@dataclass(frozen=True)
class ForwardOnly:
    """A forward-only op's property data: its inputs, its contract's comparison with the reference, the float
    dtypes it takes and the layouts its inputs are drawn in."""

    make: Callable[[ForwardOnlyCase, torch.Generator], tuple[tuple, dict]]
    close: Callable[[object, object, str], None]
    dtypes: tuple[torch.dtype, ...] = DTYPES
    layouts: tuple[str, ...] = ROW_LAYOUTS[:4]  # the (M, C) ones


FORWARD_ONLY = {
    "quantize_rows": ForwardOnly(_quantize_rows_args, fp8_rows_close),
    "layer_norm_fp8": ForwardOnly(_layer_norm_fp8_args, fp8_rows_close),
    "scaled_linear": ForwardOnly(_scaled_linear_args, gemm_close, layouts=("contiguous", "strided")),
    "attention_fp8": ForwardOnly(_attention_fp8_args, attention_fp8_close,
                                 layouts=tuple(a for a in ATTENTION_LAYOUTS if a != "packed_entry")),
    "int8_linear": ForwardOnly(_int8_linear_args, tensor_close, dtypes=(torch.float32,)),  # fbgemm: float32 only
}


def test_every_declared_op_and_entry_point_has_property_tests():
    model_ops = {case.op for case in (AttentionCase, LayerNormCase, LayerNormMlpCase, PatchEmbedCase)}
    assert model_ops | set(FORWARD_ONLY) == set(backends.ops())
    assert not model_ops & set(FORWARD_ONLY)
    entry_points = {v for op in backends.ops() for v in backends.variants(op)}
    assert entry_points == {AttentionCase(torch.float32, 0, layout="packed_entry").entry}


@dataclass(frozen=True)
class ForwardOnlyBudget:
    rows: int  # M of the row ops and the GEMMs
    width: int  # their C, K and N
    attention: Budget


FORWARD_REFERENCE = ForwardOnlyBudget(rows=600, width=1024, attention=REFERENCE)
FORWARD_TRITON_FAST = ForwardOnlyBudget(rows=12, width=96, attention=TRITON_FAST)
FORWARD_TRITON_SLOW = ForwardOnlyBudget(rows=200, width=320, attention=TRITON_SLOW)


@st.composite
def forward_only_cases(draw, op: str, budget: ForwardOnlyBudget, triton: bool) -> ForwardOnlyCase:
    data = FORWARD_ONLY[op]
    dtype, seed = draw(st.sampled_from(data.dtypes)), draw(seeds)
    flag, layout = draw(st.booleans()), draw(st.sampled_from(data.layouts))
    if op == "attention_fp8":
        a = draw(attention_cases(budget.attention, triton).filter(lambda a: a.layout in data.layouts))
        return ForwardOnlyCase(op, dtype, seed, (a.B, a.H, a.N, a.D), a.layout, flag)
    m = draw(st.integers(0, budget.rows))
    if op == "scaled_linear":
        groups = draw(st.sampled_from((1, 1, 2, 3)))
        k = groups * 16 * draw(st.integers(1, max(1, budget.width // (16 * groups))))  # groups of 16 columns
        n = draw(st.integers(1, budget.width))
        return ForwardOnlyCase(op, dtype, seed, (m, k, n, groups), layout, flag)
    # GELU rows at least 8 wide: where every value of a row lies in GELU's far negative tail (x < -2.7), 1 + erf
    # cancels in fp32 and the row's scale is off the exact one by ~1e-4 in the reference and the kernel alike,
    # beyond the fp32 rounding the contract's rule allows the kernel's scale from the reference's.
    dims = (m, draw(_widths(budget.width).filter(lambda c: c >= 8 or not (op == "quantize_rows" and flag))))
    if op == "int8_linear":
        dims += (draw(_widths(budget.width)),)
    return ForwardOnlyCase(op, dtype, seed, dims, layout, flag)


def check_forward_only(case: ForwardOnlyCase, backend: str) -> None:
    """``backend``'s output on the drawn views against the reference's on contiguous copies by the op's contract
    rule, and the launch records show that it ran (see :func:`_runs` for the inputs it may refuse)."""
    fn, ref = public(case.op), reference(case.op)
    args, kwargs = case.inputs()
    empty = any(isinstance(t, torch.Tensor) and t.numel() == 0 for t in args)
    if not _runs(backend, case.op, case.dtype, fn, args, kwargs, (args, kwargs), empty):
        return
    with vit_fast.set_backend(backend), backends.trace() as launches:
        out = fn(*args, **kwargs)
    _assert_ran(launches, case.op, backend, empty, ("fwd",))
    sargs, skwargs = tree_map_only(torch.Tensor, lambda t: t.contiguous(), (args, kwargs))
    FORWARD_ONLY[case.op].close(out, ref(*sargs, **skwargs), f"{case} on {backend}")


# One function per (backend, run), parametrized over the ops: the op picks the strategy, so cases are drawn with
# st.data() (the falsifying draws are printed).
TRITON_FORWARD_ONLY = [op for op in FORWARD_ONLY if "triton" in backends.implemented(op)]


@pytest.mark.parametrize("op", list(FORWARD_ONLY))
@_fast(8)
@given(data=st.data())
def test_forward_only_reference(op, data):
    check_forward_only(data.draw(forward_only_cases(op, FORWARD_REFERENCE, triton=False)), "reference")


@pytest.mark.slow
@pytest.mark.parametrize("op", list(FORWARD_ONLY))
@SLOW
@given(data=st.data())
def test_forward_only_reference_slow(op, data):
    check_forward_only(data.draw(forward_only_cases(op, FORWARD_REFERENCE, triton=False)), "reference")


@needs_triton_cpu
@pytest.mark.parametrize("op", TRITON_FORWARD_ONLY)
@_fast(10)
@given(data=st.data())
def test_forward_only_triton(op, data):
    check_forward_only(data.draw(forward_only_cases(op, FORWARD_TRITON_FAST, triton=True)), "triton")


@needs_triton_cpu
@pytest.mark.slow
@pytest.mark.parametrize("op", TRITON_FORWARD_ONLY)
@SLOW
@given(data=st.data())
def test_forward_only_triton_slow(op, data):
    check_forward_only(data.draw(forward_only_cases(op, FORWARD_TRITON_SLOW, triton=True)), "triton")
