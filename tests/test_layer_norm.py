"""layer_norm: the reference against LayerNorm math written out, the public op's validation and dispatch, and the
Triton kernels (forward, dx, dweight, dbias) against a float64 oracle, on CPU through the interpreter (fp32,
fp16) and on a GPU (bf16, fp16, ViT sizes, 50k rows).

The oracle is ``layer_norm_ref(..., upcast=True)`` on float64 copies of the inputs, so an fp32 kernel is held to
twice the error of PyTorch's own fp32 LayerNorm (the scale-aware rule of tests/tolerances.py)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from sm90 import compile_for_sm90
from tolerances import assert_scaled_close

import vit_fast
from vit_fast import backends
from vit_fast.ops import layer_norm, layer_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = pytest.importorskip("vit_fast.kernels.layer_norm")

needs_triton = pytest.mark.skipif("triton" in backends._UNAVAILABLE, reason=backends._UNAVAILABLE.get("triton", ""))


def _inputs(shape, dtype=torch.float32, param_dtype=None, device=DEVICE):
    """x (shape), weight and bias (C,): fresh random leaves, weight around 1, bias around 0."""
    c = shape[-1]
    x = (torch.randn(*shape, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(c, device=device)).to(param_dtype or dtype).requires_grad_()
    b = (0.5 * torch.randn(c, device=device)).to(param_dtype or dtype).requires_grad_()
    return x, w, b


def _leaves(tensors, dtype=None):
    return tuple(t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors)


def _manual_layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


@pytest.fixture
def launches():
    """Wrap the launchers: proves the Triton kernels (not a fallback) produced what the test checks."""
    with (
        mock.patch.object(kernels, "layer_norm_fwd", wraps=kernels.layer_norm_fwd) as fwd,
        mock.patch.object(kernels, "layer_norm_bwd", wraps=kernels.layer_norm_bwd) as bwd,
    ):
        yield fwd, bwd


def _check_against_oracle(x, w, b, *, eps=1e-6, dy=None, launches=None):
    """Triton forward and the gradients of x, weight and bias vs the float64 oracle (scale-aware rule)."""
    with vit_fast.set_backend("triton"):
        y = layer_norm(x, w, b, eps=eps)
    oracle_in = _leaves((x, w, b), torch.float64)
    oracle = layer_norm_ref(*oracle_in, eps=eps, upcast=True)
    low_in = _leaves((x, w, b))
    low = layer_norm_ref(*low_in, eps=eps)
    assert y.dtype == low.dtype == x.dtype
    assert_scaled_close(y, low, oracle, name="y")
    if launches is not None:
        assert launches[0].call_count == 1
    if dy is None:
        dy = torch.randn(y.shape, device=y.device).to(y.dtype)
    got = torch.autograd.grad(y, (x, w, b), dy)
    want = torch.autograd.grad(oracle, oracle_in, dy.double())
    low_grads = torch.autograd.grad(low, low_in, dy)
    for name, g, lo, o, t in zip(("dx", "dweight", "dbias"), got, low_grads, want, (x, w, b), strict=True):
        assert g.dtype == t.dtype, name
        assert_scaled_close(g, lo, o, name=name)
    if launches is not None:
        assert launches[1].call_count == 1
    return y


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


def _bad_input_cases():
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


@pytest.mark.parametrize("case", range(len(_bad_input_cases())))
def test_bad_inputs_raise(case):
    args, kwargs, err, match = _bad_input_cases()[case]
    with pytest.raises(err, match=match):
        layer_norm(*args, **kwargs)


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_empty_batch_returns_empty_without_launch(backend, launches):
    x, w, b = _inputs((0, 5, 16))
    with vit_fast.set_backend(backend):
        out = layer_norm(x, w, b)
    assert out.shape == (0, 5, 16)
    out.sum().backward()
    assert w.grad.shape == (16,)
    assert launches[0].call_count == 0 and launches[1].call_count == 0


# ---- dispatch to the Triton backend ------------------------------------------------------------------------------


@needs_triton
def test_float64_triton_raises_auto_uses_reference(launches):
    x, w, b = _inputs((3, 16), torch.float64)
    with vit_fast.set_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="float64"):
        layer_norm(x, w, b)
    torch.testing.assert_close(layer_norm(x, w, b), layer_norm_ref(x, w, b))
    assert launches[0].call_count == 0


def test_int_inputs_raise_type_error_before_dispatch():
    x = torch.randint(0, 5, (3, 16))
    w = torch.randn(16)
    with vit_fast.set_backend("triton"), pytest.raises(TypeError, match="x must be a floating-point"):
        layer_norm(x, w, w)


@needs_triton
def test_too_wide_rows_rejected_with_reason(launches):
    c = kernels.MAX_C + 1
    x, w, b = (t.detach() for t in _inputs((2, c)))
    reason = f"width C = {c} > {kernels.MAX_C}"
    assert reason in backends.reasons("triton", "layer_norm", (x, w, b), {"eps": 1e-6})[0]
    with vit_fast.set_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="width C"):
        layer_norm(x, w, b)
    torch.testing.assert_close(layer_norm(x, w, b), layer_norm_ref(x, w, b))  # auto
    assert launches[0].call_count == 0


# ---- Triton kernels: numerics ------------------------------------------------------------------------------------

SHAPES = [(1, 7), (50, 64), (197, 80), (65, 768), (3, 1000)]  # (M, C): tails, ViT widths, non-power-of-two


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_oracle(shape, dtype, launches):
    _check_against_oracle(*_inputs(shape, dtype), launches=launches)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_3d_input(dtype, launches):
    y = _check_against_oracle(*_inputs((2, 37, 80), dtype), eps=1e-5, launches=launches)
    assert y.shape == (2, 37, 80) and y.is_contiguous()


@needs_triton
def test_triton_mixed_half_input_fp32_params(launches):
    x, w, b = _inputs((19, 96), torch.float16, param_dtype=torch.float32)
    _check_against_oracle(x, w, b, launches=launches)


@needs_triton
def test_triton_strided_rows_are_read_in_place(launches):
    """Every other token of (B, N, C): rows 2C apart, a view the kernel reads without a copy."""
    big = torch.randn(2, 40, 48, device=DEVICE)
    x = big[:, ::2].detach().requires_grad_()
    _, w, b = _inputs((48,))
    _check_against_oracle(x, w, b, launches=launches)
    x2d = launches[0].call_args.args[0]
    assert x2d.shape == (40, 48) and x2d.stride() == (96, 1) and x2d.data_ptr() == big.data_ptr()


@needs_triton
def test_triton_non_mergeable_strides_and_odd_grads(launches):
    """x a transposed view (rows not one stride apart); dy a stride-0 broadcast, then a transposed tensor."""
    x = torch.randn(9, 2, 24, device=DEVICE).transpose(0, 1).detach().requires_grad_()  # (2, 9, 24)
    _, w, b = _inputs((24,))
    _check_against_oracle(x, w, b, dy=torch.randn(1, 1, 24, device=DEVICE).expand(2, 9, 24))
    _check_against_oracle(x, w, b, dy=torch.randn(9, 2, 24, device=DEVICE).transpose(0, 1))


@needs_triton
def test_triton_backward_groups_span_many_row_blocks(launches):
    """Few partial-sum groups: each program loops over several row blocks and the last group is partial."""
    with mock.patch.object(kernels, "_MAX_GROUPS", 3):
        _check_against_oracle(*_inputs((197, 40)), launches=launches)


@needs_triton
def test_triton_saves_fp32_statistics():
    x, w, b = (t.detach() for t in _inputs((2, 13, 64), torch.float16))
    y, mean, rstd = torch.ops.vit_fast.layer_norm_fwd_triton(x, w, b, 1e-6)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (26,)
    x32 = x.float().reshape(26, 64)
    torch.testing.assert_close(mean, x32.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(x32.var(-1, unbiased=False) + 1e-6), atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_backward_is_deterministic():
    x, w, b = _inputs((300, 80), torch.float16)
    dy = torch.randn(300, 80, device=DEVICE, dtype=torch.float16)
    with vit_fast.set_backend("triton"):
        first = torch.autograd.grad(layer_norm(x, w, b), (x, w, b), dy)
        second = torch.autograd.grad(layer_norm(x, w, b), (x, w, b), dy)
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)


@needs_triton
def test_triton_only_requested_gradients():
    x, w, b = _inputs((5, 32))
    w.requires_grad_(False)
    with vit_fast.set_backend("triton"):
        layer_norm(x, w, b).sum().backward()
    assert w.grad is None and x.grad is not None and b.grad is not None


@needs_triton
def test_triton_nan_rows_match_reference():
    x, w, b = (t.detach() for t in _inputs((2, 10, 48)))
    x[1, 4, 7] = float("nan")
    with vit_fast.set_backend("triton"):
        y = layer_norm(x, w, b)
    ref = layer_norm_ref(x.double(), w.double(), b.double())
    assert torch.isnan(ref[1, 4]).all() and not torch.isnan(ref[0]).any()
    assert_scaled_close(y, layer_norm_ref(x, w, b), ref)


@needs_triton
def test_triton_under_autocast_matches_reference_dtype(launches):
    """CUDA's autocast runs layer_norm in fp32 (fp32 out for fp16 in); CPU's leaves it alone. Mirror both."""
    x, w, b = _inputs((7, 64), torch.float16, param_dtype=torch.float32)
    with torch.autocast(DEVICE, dtype=torch.float16):
        with vit_fast.set_backend("triton"):
            y = layer_norm(x, w, b)
        low = layer_norm_ref(x, w, b)
    assert y.dtype == low.dtype
    assert_scaled_close(y, low, layer_norm_ref(x.double(), w.double(), b.double()))
    y.float().sum().backward()
    assert x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all()
    assert launches[0].call_count == 1


@needs_triton
def test_opcheck_forward_and_backward():
    x, w, b = (t.detach() for t in _inputs((3, 11, 40)))
    torch.library.opcheck(torch.ops.vit_fast.layer_norm_fwd_triton, (x.requires_grad_(), w, b, 1e-5))
    x = x.detach()
    _, mean, rstd = torch.ops.vit_fast.layer_norm_fwd_triton(x, w, b, 1e-5)
    torch.library.opcheck(torch.ops.vit_fast.layer_norm_bwd_triton, (torch.randn_like(x), x, w, mean, rstd))


@needs_triton
def test_compile_fullgraph_no_graph_break(launches):
    x, w, b = _inputs((2, 9, 32))

    def f(x, w, b):
        return layer_norm(x, w, b) * 2 + 1

    with vit_fast.set_backend("triton"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = compiled(x, w, b)
        out.sum().backward()
    torch.testing.assert_close(out, f(*_leaves((x, w, b))), atol=1e-5, rtol=1e-5)
    assert launches[0].call_count >= 1 and launches[1].call_count >= 1


# ---- GPU only: bf16, ViT sizes, 50k rows -------------------------------------------------------------------------

GPU_SHAPES = [(64, 197, 768), (32, 257, 1024), (8, 577, 1280), (50000, 768), (4, 16384), (3, 4097)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_vit_sizes(shape, dtype, launches):
    _check_against_oracle(*_inputs(shape, dtype, device="cuda"), launches=launches)


@pytest.mark.cuda
def test_cuda_mixed_bf16_input_fp32_params(launches):
    _check_against_oracle(*_inputs((4, 197, 768), torch.bfloat16, torch.float32, device="cuda"), launches=launches)


@pytest.mark.cuda
def test_cuda_autocast_returns_fp32_like_reference(launches):
    x, w, b = _inputs((4, 197, 768), torch.bfloat16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with vit_fast.set_backend("triton"):
            y = layer_norm(x, w, b)
        low = layer_norm_ref(x, w, b)
    assert y.dtype == low.dtype == torch.float32
    assert_scaled_close(y, low, layer_norm_ref(x.double(), w.double(), b.double()))
    assert launches[0].call_count == 1


# ---- GPU code generation without a GPU ---------------------------------------------------------------------------

_COMPILE_SCRIPT = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vit_fast.kernels import layer_norm as k

every = sys.argv[1] == "all"
for dt in ("bf16", "fp16", "fp32") if every else ("bf16",):
    ptrs = {"mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dweight_partial_ptr": "*fp32", "dbias_partial_ptr": "*fp32"}
    for kern, max_tile in ((k._layer_norm_fwd_kernel, 16384), (k._layer_norm_bwd_kernel, 8192)):
        for c in (80, 768, 16384) if every else (768,):
            block_c = triton.next_power_of_2(c)
            configs = k._pruner(max_tile)(k._configs(), {}, BLOCK_C=block_c)
            for cfg in configs if every else configs[:1]:
                consts = {"BLOCK_C": block_c, **cfg.kwargs}
                names = kern.fn.arg_names
                sig = {n: "constexpr" if n in consts else ptrs.get(n, f"*{dt}") if n.endswith("_ptr") else "i32"
                       for n in names}
                sig.update({"eps": "fp32"} if "eps" in names else {})
                src = ASTSource(kern.fn, sig, {(names.index(n),): v for n, v in consts.items()})
                triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
print("compiled")
"""


@needs_triton
def test_kernels_compile_for_sm90():
    compile_for_sm90(_COMPILE_SCRIPT, "one")


@pytest.mark.slow
def test_every_config_compiles_for_sm90():
    compile_for_sm90(_COMPILE_SCRIPT, "all")
