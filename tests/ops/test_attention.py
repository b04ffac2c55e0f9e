"""attention: the reference against hand-written softmax math, the Triton backend's reasons, and the Triton kernels
(forward and dq/dk/dv) against the float64 oracle, on CPU through the interpreter (fp32, fp16) and on a GPU (bf16,
fp16, ViT sizes, long sequences); the CUDA kernels on a GPU; attention_fp8, the route to the FP8 proj GEMM. The
contract every op keeps (empty inputs, float64, opcheck, compile, determinism, requested gradients, NaN rows, bad
inputs, strides), for attention and its packed and fp8 entry points, is tests/suites/test_contract.py."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import (
    DEVICE,
    backend_params,
    check_oracle,
    launches,
    needs_interpreter,
    needs_tma,
    needs_triton,
    packed_qkv,
)
from torch.utils._python_dispatch import TorchDispatchMode
from vit_fast.kernels import use_variant

import vit_fast
from vit_fast import backends
from vit_fast.config import ViTConfig
from vit_fast.model import Attention
from vit_fast.ops import attention, attention_packed, attention_ref
from vit_fast.ops.attention import unpack_qkv
from vit_fast.tolerance import assert_close

pytest.importorskip("triton")  # the kernels need Triton; a kernel module that fails to import fails
kernels = importlib.import_module("vit_fast.kernels.attention")


def _manual_attention(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    p = p / p.sum(dim=-1, keepdim=True)
    return torch.einsum("bhnm,bhmd->bhnd", p, v)


# ---- the reference -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [None, 0.3])
def test_reference_matches_softmax_math(scale):
    q, k, v = (torch.randn(2, 3, 11, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = attention_ref(q, k, v, scale=scale)
    want = _manual_attention(q, k, v, scale)
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    exp = torch.autograd.grad(want, (q, k, v), dout)
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e)


def test_reference_upcast_returns_fp32():
    q = torch.randn(1, 2, 9, 16, dtype=torch.float16)
    out = attention_ref(q, q, q, upcast=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _manual_attention(q.float(), q.float(), q.float()), atol=1e-5, rtol=1e-5)


def test_reference_gradcheck():
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: attention_ref(a, b, c, scale=0.7), (q, k, v))


def test_reference_dropout_runs_and_drops():
    q = torch.randn(1, 2, 64, 16)
    torch.manual_seed(1)
    a = attention(q, q, q, dropout_p=0.5)
    assert a.shape == q.shape
    assert not torch.allclose(a, attention(q, q, q))


# ---- dispatch to the Triton backend ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, kwargs, reason",
    [
        ((1, 2, 9, 8), {}, "head dim 8"),
        ((1, 2, 9, 256), {}, "head dim 256"),
        ((1, 2, 9, 32), {"dropout_p": 0.1}, "dropout_p > 0 not supported"),
    ],
)
def test_triton_rejects_with_reasons_and_auto_falls_back(shape, kwargs, reason):
    q = torch.randn(*shape, device=DEVICE)
    assert any(reason in r for r in backends.reasons("triton", "attention", (q, q, q), {"scale": None, **kwargs}))
    with vit_fast.set_backend("triton"), pytest.raises(backends.BackendUnavailableError, match=reason):
        attention(q, q, q, **kwargs)
    with launches() as rec:
        out = attention(q, q, q, **kwargs)  # auto
    assert out.shape == q.shape
    assert [r.backend for r in rec] == ["reference"]


# ---- Triton kernels: numerics ------------------------------------------------------------------------------------

SHAPES = [  # (B, H, N, D): odd B*H, masked tails, ViT sequence length, non-power-of-two head dim
    (3, 5, 1, 32),
    (3, 5, 7, 32),
    (3, 1, 50, 80),
    (1, 3, 65, 64),
    (1, 1, 197, 64),
    (1, 1, 197, 80),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_oracle(shape, dtype):
    B, H, N, D = shape
    check_oracle("attention", "triton", packed_qkv(B, N, H, D, dtype), {})


@needs_triton
@pytest.mark.parametrize("D", [16, 96, 128])
def test_triton_head_dim_edges(D):
    check_oracle("attention", "triton", packed_qkv(1, 37, 1, D), {"scale": 0.2})


@needs_triton
def test_triton_output_memory_is_bnhd():
    B, H, N, D = 2, 3, 10, 32
    q, k, v = packed_qkv(B, N, H, D)
    with vit_fast.set_backend("triton"), launches() as rec:
        out = attention(q, k, v)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert out.shape == (B, H, N, D)
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, D) memory
    merged = out.transpose(1, 2).reshape(B, N, H * D)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None  # the model's reshape is a view
    for g in (dq, dk, dv):
        assert g.transpose(1, 2).is_contiguous()
    assert [(r.backend, r.phase) for r in rec] == [("triton", "fwd"), ("triton", "bwd")]


@needs_triton
def test_triton_grads_through_packed_qkv():
    """The model's path: one (B, N, 3, H, D) leaf, q/k/v views of it, one gradient for the buffer."""
    B, N, H, D = 2, 21, 3, 32
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE, requires_grad=True)
    qkv64 = qkv.detach().double().requires_grad_()
    dout = torch.randn(B, H, N, D, device=DEVICE)
    with vit_fast.set_backend("triton"), launches() as rec:
        attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0)).backward(dout)
    attention_ref(*qkv64.permute(2, 0, 3, 1, 4).unbind(0), upcast=True).backward(dout.double())
    qkv32 = qkv.detach().clone().requires_grad_()
    attention_ref(*qkv32.permute(2, 0, 3, 1, 4).unbind(0)).backward(dout)
    assert_close(qkv.grad, qkv32.grad, qkv64.grad, name="dqkv")
    assert [(r.backend, r.phase) for r in rec] == [("triton", "fwd"), ("triton", "bwd")]


@needs_triton
def test_triton_under_autocast_matches_reference_dtype():
    q, k, v = packed_qkv(1, 33, 2, 32)
    with torch.autocast(DEVICE, dtype=torch.float16):
        with vit_fast.set_backend("triton"), launches() as rec:
            out = attention(q, k, v)
        low = attention_ref(q, k, v)
    assert out.dtype == low.dtype == torch.float16
    assert_close(out, low, attention_ref(q.double(), k.double(), v.double(), upcast=True))
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()
    assert [r.backend for r in rec] == ["triton"]


@needs_triton
def test_lse_is_fp32_logsumexp():
    q, k, v = (t.detach() for t in packed_qkv(2, 13, 3, 32, torch.float16))
    out, lse = torch.ops.vit_fast.attention_fwd_triton(q, k, v, 0.3)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 13)
    same, oracle = (torch.logsumexp(torch.einsum("bhnd,bhmd->bhnm", q.to(dt), k.to(dt)) * 0.3, dim=-1)
                    for dt in (torch.float32, torch.float64))
    assert_close(lse, same, oracle, name="lse")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [16, 80, 128])
@pytest.mark.parametrize("n", [7, 197, 4096])
def test_autotune_prune_keeps_a_fitting_config(dtype, head_dim, n):
    """The GPU autotuner's config pruning (not run by the interpreter): never empty, within the shared-memory
    budget, no resident block over 64 rows for a short sequence."""
    q = torch.empty(1, 1, n, head_dim, dtype=dtype, device="meta")
    for tuned, resident, tiles in [
        (kernels._attention_fwd_tuned, "BLOCK_M", 1),
        (kernels._attention_bwd_dkdv_tuned, "BLOCK_N", 2),
        (kernels._attention_bwd_dq_tuned, "BLOCK_M", 2),
    ]:
        streamed = "BLOCK_N" if resident == "BLOCK_M" else "BLOCK_M"
        kept = tuned.early_config_prune(tuned.configs, {"Q": q, "N": n}, HEAD_DIM=head_dim)
        assert kept
        block_d = sum(kernels.head_split(head_dim))  # the head-dim parts the kernels stage, not D padded
        for c in kept:
            smem = (2 * c.kwargs[streamed] * c.num_stages + tiles * c.kwargs[resident]) * block_d * q.element_size()
            assert smem <= kernels._SMEM_BUDGET
            assert n > 64 or c.kwargs[resident] <= 64


# ---- the packed entry point: one (B, N, 3, H, D) input, one gradient ----------------------------------------------


def _qkv(B: int, N: int, H: int, D: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # launchers' outputs start as NaN in tests (conftest): a dqkv element the kernels leave unwritten fails
    return torch.randn(B, N, 3, H, D, device=DEVICE).to(dtype).requires_grad_()  # (B, N, 3, H, D)


PACKED_SHAPES = [(1, 197, 1, 64), (1, 50, 2, 80), (2, 7, 3, 48), (1, 1, 2, 16), (1, 37, 1, 96)]  # (B, N, H, D)
PACKED = backend_params(*backends.BACKENDS)


@pytest.mark.parametrize("backend", PACKED)
@pytest.mark.parametrize("shape", PACKED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_packed_matches_oracle(shape, backend):
    """Forward and dqkv against the fp64 oracle: ViT's N = 197 with D = 64, D = 80 (two head-dim parts), odd N."""
    dtype = torch.float16 if backend == "cuda" else torch.float32
    check_oracle("attention_packed", backend, (_qkv(*shape, dtype),), {"scale": 0.3})


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_packed_triton_half_matches_oracle(dtype):
    check_oracle("attention_packed", "triton", (_qkv(1, 50, 2, 80, dtype),), {})


@needs_triton
def test_packed_equals_attention_of_its_views():
    """The same kernels: the packed entry's output and dq, dk, dv slices are bit-identical to attention()'s."""
    qkv = _qkv(2, 45, 2, 80)
    dout = torch.randn(2, 2, 45, 80, device=DEVICE)
    views = [t.detach().requires_grad_() for t in unpack_qkv(qkv.detach())]
    with vit_fast.set_backend("triton"):
        out = attention_packed(qkv)
        (dqkv,) = torch.autograd.grad(out, qkv, dout)
        want = attention(*views)
        grads = torch.autograd.grad(want, views, dout)
    assert torch.equal(out, want)
    for got, g in zip(unpack_qkv(dqkv), grads, strict=True):
        assert torch.equal(got, g)


class _Outputs(TorchDispatchMode):
    """The outputs of the vit_fast custom ops whose name starts with ``prefix``, as the dispatcher returns them."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.outputs = prefix, []

    def __enter__(self):
        super().__enter__()
        return self.outputs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "vit_fast" and func.name().split("::")[-1].startswith(self.prefix):
            self.outputs.append(out)
        return out


def _graph_nodes(fn) -> list[str]:
    seen, todo, names = set(), [fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_model_qkv_gradient_is_the_kernels_buffer(backend):
    """No stack/cat/copy between the kernel's dqkv and the qkv Linear: the packed gradient the backward returns
    is, by address, the gradient of the Linear's output."""
    attn = Attention(ViTConfig(embed_dim=64, num_heads=4)).to(DEVICE)
    x = torch.randn(2, 21, 64, device=DEVICE)
    kept = {}
    lin = attn.qkv

    def keep_grad(module, inputs, y):
        y.register_hook(lambda g: kept.setdefault("linear_out", g))

    lin.register_forward_hook(keep_grad)
    with vit_fast.set_backend(backend), launches() as rec, _Outputs("attention_packed_bwd") as written:
        out = attn(x)
        names = _graph_nodes(out.grad_fn)
        out.backward(torch.randn_like(out))
    copies = [n for n in names if any(w in n for w in ("Stack", "Cat", "Unbind", "Copy", "Clone", "Select", "Index"))]
    assert not copies, names
    assert any("attention_packed_fwd_triton" in n for n in names), names
    g = kept["linear_out"]
    assert g.is_contiguous() and g.shape == (2, 21, 3 * 64)
    assert len(written) == 1 and written[0].shape == (2, 21, 3, 4, 16) and written[0].data_ptr() == g.data_ptr()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    assert [(r.op, r.backend, r.phase) for r in rec] == [("attention_packed", "triton", "fwd"),
                                                            ("attention_packed", "triton", "bwd")]


@pytest.mark.parametrize(("n", "d", "useful"), [(197, 64, 0.592), (197, 80, 0.592), (257, 80, 0.645), (64, 64, 1.0)])
def test_useful_fraction_counts_tile_and_head_dim_padding(n, d, useful):
    assert kernels.useful_fraction(n, d, 64, 64) == pytest.approx(useful, abs=1e-3)
    assert kernels.useful_fraction(64, 80, 64, 64) == 1.0  # 64 + 16 covers D = 80 exactly
    assert kernels.useful_fraction(64, 72, 64, 64) == pytest.approx(72 / 80)


def test_bench_report_notes_the_useful_fraction():
    from vit_fast.bench.cases import OP_BENCHES

    note = OP_BENCHES["attention"].note([{"B": 8, "H": 16, "N": 577, "D": 80}, {"B": 2, "H": 12, "N": 197, "D": 64}])
    assert "N=197 D=64 59%" in note and "N=577 D=80 81%" in note


def test_head_split_never_wider_than_padding():
    for d in range(16, 129):
        low, high = kernels.head_split(d)
        assert low + high >= d and low + high <= 1 << (d - 1).bit_length() and low & (low - 1) == 0
        assert high == 0 or (high >= 16 and high & (high - 1) == 0)
    assert kernels.head_split(80) == (64, 16) and kernels.head_split(64) == (64, 0)


# ---- GPU only: bf16, ViT sizes, long sequences -------------------------------------------------------------------

GPU_SHAPES = [(64, 12, 197, 64), (32, 16, 257, 80), (8, 12, 577, 64), (8, 16, 577, 80)]


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_vit_sizes(shape, dtype):
    B, H, N, D = shape
    check_oracle("attention", "triton", packed_qkv(B, N, H, D, dtype, device="cuda"), {})


@pytest.mark.cuda
@needs_triton
def test_cuda_fp32_is_ieee():
    check_oracle("attention", "triton", packed_qkv(4, 197, 12, 64, device="cuda"), {})


@pytest.mark.cuda
@needs_triton
def test_cuda_long_sequence_no_quadratic_memory():
    B, H, N, D = 1, 2, 4096, 64
    q, k, v = packed_qkv(B, N, H, D, torch.float16, device="cuda")
    dout = torch.randn(B, H, N, D, device="cuda", dtype=torch.float16)
    with vit_fast.set_backend("triton"):
        attention(q, k, v)  # autotune outside the measurement
        torch.autograd.grad(attention(q, k, v), (q, k, v), dout)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = attention(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    nxn = B * H * N * N * 2  # one fp16 score matrix for every head: 64 MiB
    assert extra < nxn // 4, f"peak extra memory {extra / 2**20:.1f} MiB suggests an N x N buffer"
    ref = attention_ref(q.float(), k.float(), v.float())
    assert_close(out, attention_ref(q, k, v), ref)
    assert all(torch.isfinite(g).all() for g in grads)


# PyTorch's CPU flash SDPA drops a NaN of q when the keys fit in its scalar tail (N below the vector width),
# at many lengths in fp16/bf16, and a NaN of q or k at N = 1; its math kernel keeps them all.
_NAN_LENGTHS = (1, 2, 3, 7, 8, 15, 31, 33, 130)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("reference", torch.float32), ("reference", torch.float64), ("reference", torch.bfloat16),
     ("reference", torch.float16), pytest.param("triton", torch.float32, marks=needs_triton)],
)
@pytest.mark.parametrize("poison", [("q", float("nan")), ("q", float("inf")), ("k", float("nan")), ("v", float("nan"))])
def test_nan_follows_the_formula_at_every_length(poison, backend, dtype):
    where, value = poison
    for n in _NAN_LENGTHS[:5] if backend == "triton" else _NAN_LENGTHS:
        q, k, v = (torch.randn(2, 3, n, 16, device=DEVICE, dtype=dtype) for _ in range(3))
        {"q": q, "k": k, "v": v}[where][1, 2, n - 1, 5] = value
        with vit_fast.set_backend(backend):
            out = attention(q, k, v)
        expected = torch.zeros(out.shape, dtype=torch.bool, device=DEVICE)
        if where == "q":
            expected[1, 2, n - 1] = True
        elif where == "k":
            expected[1, 2] = True
        else:
            expected[1, 2, :, 5] = True
        assert torch.equal(torch.isnan(out), expected), f"N={n}: NaN rows {torch.isnan(out).any(-1).nonzero().tolist()}"


# ---- attention_fp8: the attention output as the FP8 proj GEMM's e4m3 input ----------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attention_fp8_emits_e4m3_rows_and_their_scales(backend):
    """The Triton kernel: one scale per (token, head); the reference: one per token (attention, one quantizing
    pass). Each scale is its group's amax / 448, and the values half an e4m3 step from the attention output."""
    if backend not in backends.implemented("attention_fp8"):
        pytest.skip(backends.unavailable("triton") or "triton not implemented")
    from vit_fast.ops import attention_fp8

    B, H, N, D = 2, 3, 37, 64
    q, k, v = torch.randn(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    want = attention_ref(q, k, v).transpose(1, 2).reshape(B * N, H, D)
    with vit_fast.set_backend(backend), backends.trace() as launches_:
        out, scale = attention_fp8(q, k, v)
    assert {(r.op, r.backend) for r in launches_} == {("attention_fp8", backend)}
    groups = H if backend == "triton" else 1
    assert out.shape == (B * N, H * D) and out.dtype == torch.float8_e4m3fn
    assert scale.reshape(B * N, -1).shape == (B * N, groups)
    exact = want.reshape(B * N, groups, -1)
    torch.testing.assert_close(scale.reshape(B * N, groups), exact.abs().amax(-1) / 448, rtol=1e-5, atol=0)
    got = out.float().view(B * N, groups, -1) * scale.reshape(B * N, groups)[..., None]
    assert ((got - exact).abs() <= exact.abs().amax(-1, keepdim=True) * 2**-4).all()  # half an e4m3 step


# ---- the CUDA backend (vit_fast._C), on a GPU ----------------------------------------------------------------------

ATTN_SHAPES = [(2, 197, 3, 64), (2, 257, 2, 64), (1, 577, 2, 64), (2, 197, 2, 80), (1, 577, 1, 80),
               (3, 50, 2, 64), (1, 1, 1, 64), (2, 65, 2, 128), (1, 1025, 1, 64)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_oracle(shape, dtype):
    B, N, H, D = shape
    check_oracle("attention", "cuda", packed_qkv(B, N, H, D, dtype, "cuda"), {})


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attention_contiguous_transposed_and_scaled(dtype):
    q, k, v = (torch.randn(2, 3, 97, 80, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
    check_oracle("attention", "cuda", (q, k, v), {"scale": 0.3})
    base = torch.randn(2, 97, 3, 64, device="cuda", dtype=dtype)  # (B, N, H, D) memory viewed as (B, H, N, D)
    q, k, v = (base.transpose(1, 2).detach().requires_grad_() for _ in range(3))
    check_oracle("attention", "cuda", (q, k, v), {})


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(2, 197, 3, 64), (1, 50, 2, 80), (1, 130, 2, 128), (2, 7, 1, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_attention_packed_matches_oracle_and_the_unpacked_op(shape, dtype):
    """The packed C++ ops: forward and the one dqkv against the fp32 oracle, and bit-identical to attention() of
    the q, k, v views (the same kernels; only the gradient's strides differ)."""
    from vit_fast.ops.attention import unpack_qkv

    B, N, H, D = shape
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype).requires_grad_()
    check_oracle("attention_packed", "cuda", (qkv,), {"scale": 0.3})
    dout = torch.randn(B, H, N, D, device="cuda", dtype=dtype)
    views = [t.detach().requires_grad_() for t in unpack_qkv(qkv.detach())]
    with vit_fast.set_backend("cuda"):
        out = attention_packed(qkv, scale=0.3)
        (dqkv,) = torch.autograd.grad(out, qkv, dout)
        want = attention(*views, scale=0.3)
        grads = torch.autograd.grad(want, views, dout)
    assert dqkv.is_contiguous() and torch.equal(out, want)
    for got, g in zip(unpack_qkv(dqkv), grads, strict=True):
        assert torch.equal(got, g)

# ---- the kernel variants (use_variant), through the interpreter --------------------------------------------------


def _strided_qkv(b: int, n: int, h: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return kernels.unpack_qkv(torch.randn(b, n, 3, h, d).to(dtype))  # strided (B, H, N, D) views


@needs_interpreter
@needs_tma
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_tma_attention_forward_matches_the_reference(dtype):
    q, k, v = _strided_qkv(2, 45, 2, 32, dtype)  # N = 45: one full key tile of 32 and a masked tail
    with use_variant("attention_fwd", "tma"):
        out, lse = kernels.attention_fwd(q, k, v, 32**-0.5)
    oracle = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    same = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert_close(out, same, oracle, name="out")
    scores = (q.float() @ k.float().transpose(-1, -2)) * 32**-0.5
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("d", [32, 80])  # one head-dim part, and D = 80's two parts (64 + 16)
def test_the_fused_backward_matches_the_reference_and_the_two_kernel_one(d):
    q, k, v = _strided_qkv(1, 40, 2, d, torch.bfloat16)
    scale = d**-0.5
    out, lse = kernels.attention_fwd(q, k, v, scale)
    dout = torch.randn_like(q)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*leaves, scale=scale).backward(dout.float())
    same = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*same, scale=scale).backward(dout)
    grads = {}
    for variant in ("split", "fused"):
        with use_variant("attention_bwd", variant):
            grads[variant] = kernels.attention_bwd(dout, q, k, v, out, lse, scale)
    for name, fused, split, s, o in zip("qkv", grads["fused"], grads["split"], same, leaves, strict=True):
        assert_close(fused, s.grad, o.grad, name=f"d{name} (fused)")
        assert (fused.float() - split.float()).abs().max() <= 2 * (s.grad.float() - o.grad).abs().max() + 1e-2
