"""attention: the reference against hand-written softmax math, the public op's validation and dispatch, and the
Triton kernels (forward and dq/dk/dv) against the fp32 oracle, on CPU through the interpreter (fp32, fp16) and on
a GPU (bf16, fp16, ViT sizes, long sequences)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from tolerances import assert_scaled_close

import vit_fast
from vit_fast import backends
from vit_fast.ops import attention, attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = pytest.importorskip("vit_fast.kernels.attention")


def _triton_runs() -> bool:
    return "triton" not in backends._UNAVAILABLE


needs_triton = pytest.mark.skipif(not _triton_runs(), reason=backends._UNAVAILABLE.get("triton", ""))


def _packed(B: int, N: int, H: int, D: int, dtype: torch.dtype, device: str = DEVICE):
    """q, k, v as (B, H, N, D) leaf views of one packed (B, N, 3, H, D) buffer, the model's layout."""
    qkv = torch.randn(B, N, 3, H, D, dtype=dtype, device=device)
    return tuple(t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))  # 3 x (B, H, N, D)


def _leaves(tensors, dtype: torch.dtype | None = None):
    return tuple(t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors)


def _manual_attention(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    p = p / p.sum(dim=-1, keepdim=True)
    return torch.einsum("bhnm,bhmd->bhnd", p, v)


@pytest.fixture
def launches():
    """Wrap the launchers: proves the Triton kernels (not a fallback) produced what the test checks."""
    with (
        mock.patch.object(kernels, "attention_fwd", wraps=kernels.attention_fwd) as fwd,
        mock.patch.object(kernels, "attention_bwd", wraps=kernels.attention_bwd) as bwd,
    ):
        yield fwd, bwd


def _check_against_oracle(q, k, v, *, scale=None, dout=None, launches=None, grads=True):
    """Triton forward and gradients vs attention_ref(upcast=True), with the scale-aware tolerance rule."""
    with vit_fast.set_backend("triton"):
        out = attention(q, k, v, scale=scale)
    ref32 = attention_ref(*_leaves((q, k, v), torch.float32), scale=scale, upcast=True)
    low_in = _leaves((q, k, v))
    low = attention_ref(*low_in, scale=scale)
    assert out.dtype == q.dtype
    assert_scaled_close(out, low, ref32, name="out")
    if launches is not None:
        assert launches[0].call_count == 1
    if not grads:
        return out
    if dout is None:
        dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    ref_leaves = _leaves((q, k, v), torch.float32)
    want = torch.autograd.grad(attention_ref(*ref_leaves, scale=scale, upcast=True), ref_leaves, dout.float())
    low_grads = torch.autograd.grad(low, low_in, dout)
    for name, g, lo, w in zip(("dq", "dk", "dv"), got, low_grads, want, strict=True):
        assert g.dtype == q.dtype
        assert_scaled_close(g, lo, w, name=name)
    if launches is not None:
        assert launches[1].call_count == 1
    return out


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


def _bad_input_cases():
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
    ]


@pytest.mark.parametrize("case", range(len(_bad_input_cases())))
def test_bad_inputs_raise(case):
    args, kwargs, err, match = _bad_input_cases()[case]
    with pytest.raises(err, match=match):
        attention(*args, **kwargs)


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_empty_batch_returns_empty_without_launch(backend, launches):
    q = torch.randn(0, 2, 7, 32, device=DEVICE)
    with vit_fast.set_backend(backend):
        out = attention(q, q, q)
    assert out.shape == (0, 2, 7, 32)
    assert launches[0].call_count == 0


# ---- dispatch to the Triton backend ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, kwargs, reason",
    [
        ((1, 2, 9, 8), {}, "head dim 8 outside 16..128"),
        ((1, 2, 9, 256), {}, "head dim 256 outside 16..128"),
        ((1, 2, 9, 32), {"dropout_p": 0.1}, "dropout_p > 0 not supported"),
    ],
)
def test_triton_rejects_with_reasons_and_auto_falls_back(shape, kwargs, reason, launches):
    q = torch.randn(*shape, device=DEVICE)
    assert reason in backends.reasons("triton", "attention", (q, q, q), {"scale": None, **kwargs})
    with vit_fast.set_backend("triton"), pytest.raises(backends.BackendUnavailableError, match=reason):
        attention(q, q, q, **kwargs)
    out = attention(q, q, q, **kwargs)  # auto
    assert out.shape == q.shape
    assert launches[0].call_count == 0


def test_float64_triton_raises_auto_uses_reference(launches):
    q = torch.randn(1, 2, 9, 32, dtype=torch.float64, device=DEVICE)
    with vit_fast.set_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="float64"):
        attention(q, q, q)
    torch.testing.assert_close(attention(q, q, q), attention_ref(q, q, q))
    assert launches[0].call_count == 0


def test_int_inputs_raise_type_error_before_dispatch():
    q = torch.randint(0, 5, (1, 2, 9, 32))
    with vit_fast.set_backend("triton"), pytest.raises(TypeError, match="q must be a floating-point"):
        attention(q, q, q)


# ---- Triton kernels: numerics ------------------------------------------------------------------------------------

SHAPES = [  # (B, H, N, D): odd B*H, masked tails, ViT sequence length, non-power-of-two head dim
    (3, 5, 1, 32),
    (3, 5, 7, 32),
    (3, 1, 50, 80),
    (1, 3, 65, 64),
    (1, 3, 197, 64),
    (1, 1, 197, 80),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_oracle(shape, dtype, launches):
    B, H, N, D = shape
    q, k, v = _packed(B, N, H, D, dtype)
    _check_against_oracle(q, k, v, launches=launches)


@needs_triton
@pytest.mark.parametrize("D", [16, 96, 128])
def test_triton_head_dim_edges(D, launches):
    q, k, v = _packed(1, 37, 1, D, torch.float32)
    _check_against_oracle(q, k, v, scale=0.2, launches=launches)


@needs_triton
def test_triton_output_memory_is_bnhd(launches):
    B, H, N, D = 2, 3, 10, 32
    q, k, v = _packed(B, N, H, D, torch.float32)
    with vit_fast.set_backend("triton"):
        out = attention(q, k, v)
    assert out.shape == (B, H, N, D)
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, D) memory
    merged = out.transpose(1, 2).reshape(B, N, H * D)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None  # the model's reshape is a view
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for g in (dq, dk, dv):
        assert g.transpose(1, 2).is_contiguous()
    assert launches[0].call_count == 1 and launches[1].call_count == 1


@needs_triton
def test_triton_grads_through_packed_qkv(launches):
    """The model's path: one (B, N, 3, H, D) leaf, q/k/v views of it, one gradient for the buffer."""
    B, N, H, D = 2, 21, 3, 32
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE, requires_grad=True)
    qkv32 = qkv.detach().clone().requires_grad_()
    dout = torch.randn(B, H, N, D, device=DEVICE)
    with vit_fast.set_backend("triton"):
        out = attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0))
    out.backward(dout)
    attention_ref(*qkv32.permute(2, 0, 3, 1, 4).unbind(0), upcast=True).backward(dout)
    assert_scaled_close(qkv.grad, qkv32.grad, qkv32.grad, name="dqkv")
    assert launches[1].call_count == 1


@needs_triton
def test_triton_any_strides():
    """Inner stride != 1 for q, separate buffers for k, v; dO a stride-0 broadcast and a transposed tensor."""
    B, H, N, D = 1, 3, 40, 32
    q = torch.randn(B, H, D, N, device=DEVICE).transpose(-1, -2).detach().requires_grad_()  # stride(-1) == N
    k = torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2).detach().requires_grad_()
    v = torch.randn(B, H, N, 2 * D, device=DEVICE)[..., ::2].detach().requires_grad_()
    assert q.stride(-1) != 1 and v.stride(-1) == 2
    _check_against_oracle(q, k, v, dout=torch.randn(1, 1, 1, 1, device=DEVICE).expand(B, H, N, D))
    _check_against_oracle(q, k, v, dout=torch.randn(B, H, D, N, device=DEVICE).transpose(-1, -2))


@needs_triton
def test_triton_backward_is_deterministic():
    q, k, v = _packed(1, 70, 3, 64, torch.float16)
    dout = torch.randn(1, 3, 70, 64, device=DEVICE, dtype=torch.float16)
    with vit_fast.set_backend("triton"):
        first = torch.autograd.grad(attention(q, k, v), (q, k, v), dout)
        second = torch.autograd.grad(attention(q, k, v), (q, k, v), dout)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@needs_triton
def test_triton_only_requested_gradients():
    q, k, v = _packed(1, 9, 2, 32, torch.float32)
    k.requires_grad_(False)
    with vit_fast.set_backend("triton"):
        out = attention(q, k, v)
    out.sum().backward()
    assert k.grad is None and q.grad is not None and v.grad is not None


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("where", ["q", "k"])
def test_triton_nan_rows_match_reference(where):
    q, k, v = (t.detach() for t in _packed(2, 20, 3, 32, torch.float32))
    (q if where == "q" else k)[1, 2, 5, 3] = float("nan")
    with vit_fast.set_backend("triton"):
        out = attention(q, k, v)
    ref = attention_ref(q, k, v, upcast=True)
    assert torch.isnan(ref).any() and not torch.isnan(ref).all()
    assert_scaled_close(out, ref, ref)


@needs_triton
def test_triton_under_autocast_matches_reference_dtype(launches):
    device = DEVICE
    dtype = torch.float16
    q, k, v = _packed(1, 33, 2, 32, torch.float32)
    with torch.autocast(device, dtype=dtype):
        with vit_fast.set_backend("triton"):
            out = attention(q, k, v)
        low = attention_ref(q, k, v)
    assert out.dtype == low.dtype == dtype
    assert_scaled_close(out, low, attention_ref(q, k, v, upcast=True))
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()
    assert launches[0].call_count == 1


@needs_triton
def test_opcheck_forward_and_backward():
    q, k, v = _packed(1, 19, 3, 32, torch.float32)
    torch.library.opcheck(torch.ops.vit_fast.attention_fwd_triton, (q, k, v, 0.25))
    out, lse = torch.ops.vit_fast.attention_fwd_triton(q.detach(), k.detach(), v.detach(), 0.25)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.vit_fast.attention_bwd_triton, (dout, q.detach(), k.detach(), v.detach(), out, lse, 0.25)
    )


@needs_triton
def test_lse_is_fp32_logsumexp():
    q, k, v = (t.detach() for t in _packed(2, 13, 3, 32, torch.float16))
    out, lse = torch.ops.vit_fast.attention_fwd_triton(q, k, v, 0.3)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 13)
    want = torch.logsumexp(torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * 0.3, dim=-1)
    torch.testing.assert_close(lse, want, atol=1e-3, rtol=1e-3)


@needs_triton
def test_compile_fullgraph_no_graph_break(launches):
    q, k, v = _packed(1, 17, 2, 32, torch.float32)

    def f(q, k, v):
        return attention(q, k, v).transpose(1, 2).reshape(1, 17, 64) * 2

    with vit_fast.set_backend("triton"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = compiled(q, k, v)
        out.sum().backward()
    torch.testing.assert_close(out, f(*_leaves((q, k, v))), atol=1e-5, rtol=1e-5)
    assert launches[0].call_count >= 1 and launches[1].call_count >= 1


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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_vit_sizes(shape, dtype, launches):
    B, H, N, D = shape
    q, k, v = _packed(B, N, H, D, dtype, device="cuda")
    _check_against_oracle(q, k, v, launches=launches)


@pytest.mark.cuda
def test_cuda_fp32_is_ieee(launches):
    q, k, v = _packed(4, 197, 12, 64, torch.float32, device="cuda")
    _check_against_oracle(q, k, v, launches=launches)


@pytest.mark.cuda
def test_cuda_long_sequence_no_quadratic_memory():
    B, H, N, D = 1, 2, 4096, 64
    q, k, v = _packed(B, N, H, D, torch.float16, device="cuda")
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
    assert_scaled_close(out, attention_ref(q, k, v), ref)
    assert all(torch.isfinite(g).all() for g in grads)
