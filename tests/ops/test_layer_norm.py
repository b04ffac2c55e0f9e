"""layer_norm and layer_norm_fp8: the reference against LayerNorm math written out, the Triton backend's width
limit, the Triton kernels (forward, dx, dweight, dbias; the fp8 variant) against the float64 oracle, on CPU through
the interpreter (fp32, fp16) and on a GPU (bf16, fp16, ViT sizes, 50k rows), and the CUDA kernels on a GPU. The
contract every op keeps is tests/suites/test_contract.py."""

from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, check_oracle, launches, layer_norm_inputs, needs_triton

import vit_fast
from vit_fast import backends
from vit_fast.ops import layer_norm, layer_norm_fp8, layer_norm_fp8_ref, layer_norm_ref
from vit_fast.tolerance import assert_close

pytest.importorskip("triton")  # the kernels need Triton; a kernel module that fails to import fails
kernels = importlib.import_module("vit_fast.kernels.layer_norm")


def _inputs(shape, dtype=torch.float32, param_dtype=None, device=DEVICE):
    (x, w, b), _ = layer_norm_inputs(shape, dtype, param_dtype=param_dtype, device=device)
    return x, w, b


def _check(x, w, b, **kwargs):
    return check_oracle("layer_norm", "triton", (x, w, b), kwargs)[0]


def _manual_layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


# ---- the reference -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 7)])
def test_reference_matches_layer_norm_math(shape):
    x, w, b = _inputs(shape, torch.float64, device="cpu")
    out = layer_norm_ref(x, w, b, eps=1e-5)
    want = _manual_layer_norm(x, w, b, 1e-5)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out, F.layer_norm(x, (shape[-1],), w, b, 1e-5))
    dy = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, (x, w, b), dy), torch.autograd.grad(want, (x, w, b), dy), strict=True):
        torch.testing.assert_close(g, e)


def test_reference_upcast_returns_fp32():
    x, w, b = _inputs((4, 24), torch.float16, device="cpu")
    out = layer_norm_ref(x, w, b, upcast=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _manual_layer_norm(x.float(), w.float(), b.float(), 1e-6), atol=1e-5, rtol=1e-5)


def test_reference_gradcheck():
    x, w, b = _inputs((3, 5), torch.float64, device="cpu")
    assert torch.autograd.gradcheck(lambda a, c, d: layer_norm_ref(a, c, d, eps=1e-3), (x, w, b))


# ---- dispatch to the Triton backend ------------------------------------------------------------------------------


@needs_triton
def test_too_wide_rows_rejected_with_reason():
    c = backends.limits("layer_norm", "triton").max_width + 1
    x, w, b = (t.detach() for t in _inputs((2, c)))
    assert any(f"width C = {c} >" in r for r in backends.reasons("triton", "layer_norm", (x, w, b), {"eps": 1e-6}))
    with vit_fast.set_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="width C"):
        layer_norm(x, w, b)
    with launches() as rec:
        torch.testing.assert_close(layer_norm(x, w, b), layer_norm_ref(x, w, b))  # auto
    assert [r.backend for r in rec] == ["reference"]


# ---- Triton kernels: numerics ------------------------------------------------------------------------------------

SHAPES = [(1, 7), (50, 64), (197, 80), (65, 768), (3, 1000)]  # (M, C): tails, ViT widths, non-power-of-two


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_oracle(shape, dtype):
    _check(*_inputs(shape, dtype))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_3d_input(dtype):
    y = _check(*_inputs((2, 37, 80), dtype), eps=1e-5)
    assert y.shape == (2, 37, 80) and y.is_contiguous()


@needs_triton
def test_triton_mixed_half_input_fp32_params():
    _check(*_inputs((19, 96), torch.float16, param_dtype=torch.float32))


@needs_triton
def test_triton_strided_rows_are_read_in_place():
    """Every other token of (B, N, C): rows 2C apart, a view the kernel reads without a copy."""
    big = torch.randn(2, 40, 48, device=DEVICE)
    x = big[:, ::2].detach().requires_grad_()
    _, w, b = _inputs((48,))
    with mock.patch.object(kernels, "layer_norm_fwd", wraps=kernels.layer_norm_fwd) as fwd:
        _check(x, w, b)
    x2d = fwd.call_args.args[0]
    assert x2d.shape == (40, 48) and x2d.stride() == (96, 1) and x2d.data_ptr() == big.data_ptr()


@needs_triton
def test_triton_backward_groups_span_many_row_blocks():
    """Few partial-sum groups: each program loops over several row blocks and the last group is partial."""
    with mock.patch.object(kernels, "_MAX_GROUPS", 3):
        _check(*_inputs((197, 40)))


@needs_triton
def test_triton_saves_fp32_statistics():
    x, w, b = (t.detach() for t in _inputs((2, 13, 64), torch.float16))
    y, mean, rstd = torch.ops.vit_fast.layer_norm_fwd_triton(x, w, b, 1e-6)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (26,)
    same, oracle = (x.to(dt).reshape(26, 64) for dt in (torch.float32, torch.float64))
    assert_close(mean, same.mean(-1), oracle.mean(-1), name="mean")
    assert_close(rstd, torch.rsqrt(same.var(-1, unbiased=False) + 1e-6),
                 torch.rsqrt(oracle.var(-1, unbiased=False) + 1e-6), name="rstd")


@needs_triton
def test_triton_under_autocast_matches_reference_dtype():
    """CUDA's autocast runs layer_norm in fp32 (fp32 out for fp16 in); CPU's leaves it alone. Mirror both."""
    x, w, b = _inputs((7, 64), torch.float16, param_dtype=torch.float32)
    with torch.autocast(DEVICE, dtype=torch.float16):
        with vit_fast.set_backend("triton"), launches() as rec:
            y = layer_norm(x, w, b)
        low = layer_norm_ref(x, w, b)
    assert y.dtype == low.dtype
    assert_close(y, low, layer_norm_ref(x.double(), w.double(), b.double()))
    y.float().sum().backward()
    assert x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all()
    assert [r.backend for r in rec] == ["triton"]


# ---- GPU only: bf16, ViT sizes, 50k rows -------------------------------------------------------------------------

GPU_SHAPES = [(64, 197, 768), (32, 257, 1024), (8, 577, 1280), (50000, 768), (4, 16384), (3, 4097)]


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_vit_sizes(shape, dtype):
    _check(*_inputs(shape, dtype, device="cuda"))


@pytest.mark.cuda
@needs_triton
def test_cuda_mixed_bf16_input_fp32_params():
    _check(*_inputs((4, 197, 768), torch.bfloat16, torch.float32, device="cuda"))


@pytest.mark.cuda
@needs_triton
def test_cuda_autocast_returns_fp32_like_reference():
    x, w, b = _inputs((4, 197, 768), torch.bfloat16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with vit_fast.set_backend("triton"), launches() as rec:
            y = layer_norm(x, w, b)
        low = layer_norm_ref(x, w, b)
    assert y.dtype == low.dtype == torch.float32
    assert_close(y, low, layer_norm_ref(x.double(), w.double(), b.double()))
    assert [r.backend for r in rec] == ["triton"]


# ---- the CUDA backend (vit_fast._C), on a GPU ----------------------------------------------------------------------

CUDA_SHAPES = [(2, 197, 768), (4, 257, 384), (1, 577, 1024), (3, 50, 80), (7, 33), (2, 5, 1280), (1, 3, 6144)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_kernels_match_oracle(shape, dtype):
    check_oracle("layer_norm", "cuda", _inputs(shape, dtype, device="cuda"), {})


@pytest.mark.cuda
def test_cuda_kernels_strided_rows_mixed_params_and_autocast():
    base = torch.randn(4, 197, 2 * 768, device="cuda", dtype=torch.bfloat16)
    x = base[..., :768].detach().requires_grad_()  # rows strided by 1536
    w = (torch.randn(768, device="cuda") * 0.2 + 1).requires_grad_()  # fp32 parameters, bf16 input
    b = (torch.randn(768, device="cuda") * 0.2).requires_grad_()
    check_oracle("layer_norm", "cuda", (x, w, b), {})
    with torch.autocast("cuda", dtype=torch.bfloat16), vit_fast.set_backend("cuda"):
        y = layer_norm(x, w, b)
    assert y.dtype == torch.float32  # CUDA autocast runs layer_norm in fp32


# ---- layer_norm_fp8: the LayerNorm whose output is an FP8 GEMM's e4m3 input --------------------------------------


@pytest.mark.parametrize("shape", [(1, 16), (7, 80), (197, 64)])
def test_layer_norm_fp8_triton_matches_reference(shape):
    m, c = shape
    x, w, b = torch.randn(m, c) * 2 + 1, torch.randn(c), torch.randn(c)
    ref_q, ref_s = layer_norm_fp8_ref(x, w, b, eps=1e-6)
    y = F.layer_norm(x, (c,), w, b, 1e-6)
    assert (ref_q.float() * ref_s[:, None] - y).abs().max() <= y.abs().max() * 2**-4 + 1e-6
    if "triton" not in backends.implemented("layer_norm_fp8"):
        pytest.skip(backends.unavailable("triton") or "triton not implemented")
    with vit_fast.set_backend("triton"):
        tq, ts = layer_norm_fp8(x, w, b, eps=1e-6)
    torch.testing.assert_close(ts, ref_s, rtol=1e-5, atol=1e-12)
    assert ((tq.float() - ref_q.float()).abs() > 0).float().mean() < 0.01


@needs_triton
def test_layer_norm_kernel_keeps_its_plain_variant():
    """The fp8 variant is a constexpr of the same kernel: the plain forward still writes the LayerNorm."""
    x, w, b = torch.randn(9, 48), torch.randn(48), torch.randn(48)
    with vit_fast.set_backend("triton"):
        y = layer_norm(x, w, b, eps=1e-6)
    assert_close(y, F.layer_norm(x, (48,), w, b, 1e-6), F.layer_norm(x.double(), (48,), w.double(), b.double(), 1e-6))


# ---- GPU code generation without a GPU: tests/suites/test_kernel_resources.py compiles each variant for sm_80/90 ----
