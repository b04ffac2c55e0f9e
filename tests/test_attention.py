"""attention: the reference against hand-written softmax math, the Triton backend's reasons, and the Triton kernels
(forward and dq/dk/dv) against the float64 oracle, on CPU through the interpreter (fp32, fp16) and on a GPU (bf16,
fp16, ViT sizes, long sequences). The contract every op keeps (empty inputs, float64, opcheck, compile,
determinism, requested gradients, NaN rows, bad inputs, strides) is tests/test_contract.py."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, check_oracle, launches, needs_triton, packed_qkv

import vit_fast
from vit_fast import backends
from vit_fast.ops import attention, attention_ref
from vit_fast.tolerance import assert_close

kernels = pytest.importorskip("vit_fast.kernels.attention")


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
    want = torch.logsumexp(torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * 0.3, dim=-1)
    torch.testing.assert_close(lse, want, atol=1e-3, rtol=1e-3)


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
        block_d = 1 << (head_dim - 1).bit_length()
        for c in kept:
            smem = (2 * c.kwargs[streamed] * c.num_stages + tiles * c.kwargs[resident]) * block_d * q.element_size()
            assert smem <= kernels._SMEM_BUDGET
            assert n > 64 or c.kwargs[resident] <= 64


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


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_with_a_single_key_follows_the_formula(where, backend):
    """N = 1 is where PyTorch's CPU flash SDPA drops a NaN that its math kernel keeps."""
    q, k, v = (torch.randn(2, 3, 1, 16, device=DEVICE) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][1, 2, 0, 5] = float("nan")
    with vit_fast.set_backend(backend):
        out = attention(q, k, v)
    expected = torch.zeros(out.shape, dtype=torch.bool, device=DEVICE)
    if where == "v":
        expected[1, 2, :, 5] = True
    else:
        expected[1, 2] = True
    assert torch.equal(torch.isnan(out), expected)
