"""layernorm_mlp: the reference against hand-written LayerNorm/GELU/linear math, the public op's validation and
dispatch, and the fused Triton kernels (output and all gradients) against the fp32 oracle, on CPU through the
interpreter (fp32, fp16) and on a GPU (bf16, fp16, ViT-S/B sizes, autocast)."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from tolerances import ATOL, assert_scaled_close

import vit_fast
from vit_fast import backends
from vit_fast.backends import BackendUnavailableError
from vit_fast.ops import layernorm_mlp, layernorm_mlp_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = pytest.importorskip("vit_fast.kernels.layernorm_mlp")
needs_triton = pytest.mark.skipif(
    "triton" in backends._UNAVAILABLE, reason=backends._UNAVAILABLE.get("triton", "")
)

PARAM_NAMES = ("ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
GRAD_NAMES = ("dx", *(f"d{n}" for n in PARAM_NAMES), "dresidual")


def _make(
    shape: tuple[int, ...],
    hidden: int,
    dtype: torch.dtype,
    *,
    c_out: int | None = None,
    residual: bool = False,
    param_dtype: torch.dtype | None = None,
    device: str = DEVICE,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """x of ``shape`` (..., C), the six parameters (O(1) activations throughout) and an optional residual."""
    c = shape[-1]
    c_out = c if c_out is None else c_out
    pdt = dtype if param_dtype is None else param_dtype

    def p(*s: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*s, device=device) * scale + shift).to(pdt).requires_grad_()

    x = torch.randn(*shape, device=device).to(dtype).requires_grad_()
    params = [
        p(c, scale=0.2, shift=1.0), p(c, scale=0.2),
        p(hidden, c, scale=c**-0.5), p(hidden, scale=0.2),
        p(c_out, hidden, scale=hidden**-0.5), p(c_out, scale=0.2),
    ]
    res = torch.randn(*shape[:-1], c_out, device=device).to(dtype).requires_grad_() if residual else None
    return x, params, res


def _leaves(tensors, dtype: torch.dtype | None = None) -> list:
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


@pytest.fixture
def launches():
    """Wrap the launchers and the GEMM helper: proves the Triton kernels produced what the test checks."""
    with (
        mock.patch.object(kernels, "layernorm_mlp_fwd", wraps=kernels.layernorm_mlp_fwd) as fwd,
        mock.patch.object(kernels, "layernorm_mlp_bwd", wraps=kernels.layernorm_mlp_bwd) as bwd,
        mock.patch.object(kernels, "_gemm", wraps=kernels._gemm) as gemm,
    ):
        yield fwd, bwd, gemm


def _check_against_oracle(x, params, residual, *, launches=None, eps: float = 1e-6):
    """Triton output and every gradient vs layernorm_mlp_ref(upcast=True) with the scale-aware rule."""
    inputs = [x, *params] + ([residual] if residual is not None else [])
    with vit_fast.set_backend("triton"):
        out = layernorm_mlp(x, *params, eps=eps, residual=residual)
    assert out.dtype == x.dtype
    ref_in = _leaves(inputs, torch.float32)
    ref32 = layernorm_mlp_ref(*ref_in[:7], eps=eps, residual=ref_in[7] if residual is not None else None, upcast=True)
    low_in = _leaves(inputs)
    low = layernorm_mlp_ref(*low_in[:7], eps=eps, residual=low_in[7] if residual is not None else None)
    assert_scaled_close(out, low, ref32, name="out")

    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(ref32, ref_in, dout.float())
    low_grads = torch.autograd.grad(low, low_in, dout)
    for name, g, lo, w, t in zip(GRAD_NAMES, got, low_grads, want, inputs, strict=False):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_scaled_close(g, lo, w, name=name)
    if launches is not None:
        fwd, bwd, gemm = launches
        assert fwd.call_count == 1 and bwd.call_count == 1
        assert gemm.call_count == 4  # fc1 and fc2 forward, dH and d(LayerNorm output) backward
    return out, got


# ---------------------------------------------------------------------------------------------------------------
# The reference (the trunk's part): against PyTorch built-ins and hand-written math.


def _manual(x, ln_w, ln_b, w1, b1, w2, b2, eps=1e-6, residual=None):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    h = (x - mean) / torch.sqrt(var + eps) * ln_w + ln_b
    a = h @ w1.t() + b1
    g = 0.5 * a * (1.0 + torch.erf(a / math.sqrt(2.0)))
    out = g @ w2.t() + b2
    return out if residual is None else residual + out


@pytest.mark.parametrize("residual", [False, True])
def test_reference_matches_hand_written_math_forward_and_backward(residual):
    x, params, res = _make((2, 7, 24), 40, torch.float32, c_out=16, residual=residual, device="cpu")
    inputs = [x, *params] + ([res] if residual else [])
    out = layernorm_mlp_ref(x, *params, eps=1e-5, residual=res)
    man_in = _leaves(inputs)
    man = _manual(*man_in[:7], eps=1e-5, residual=man_in[7] if residual else None)
    torch.testing.assert_close(out, man)
    dout = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, inputs, dout), torch.autograd.grad(man, man_in, dout), strict=True):
        torch.testing.assert_close(g, w)


def test_reference_upcast_computes_in_float32():
    x, params, res = _make((5, 16), 32, torch.float16, residual=True, device="cpu")
    out = layernorm_mlp_ref(x, *params, residual=res, upcast=True)
    assert out.dtype == torch.float32
    want = _manual(*(t.detach().float() for t in (x, *params)), residual=res.detach().float())
    torch.testing.assert_close(out, want)
    assert layernorm_mlp_ref(x, *params, residual=res).dtype == torch.float16


def test_reference_gradcheck_float64():
    x, params, res = _make((3, 6), 10, torch.float64, c_out=5, residual=True, device="cpu")
    assert torch.autograd.gradcheck(lambda *t: layernorm_mlp_ref(*t[:7], residual=t[7]), (x, *params, res))


def test_reference_dropout_is_applied_and_seeded():
    x, params, _ = _make((4, 16), 64, torch.float32, device="cpu")
    torch.manual_seed(1)
    a = layernorm_mlp_ref(x, *params, dropout_p=0.5)
    torch.manual_seed(1)
    b = layernorm_mlp_ref(x, *params, dropout_p=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, layernorm_mlp_ref(x, *params))


def test_public_op_runs_the_reference_on_cpu_in_auto():
    x, params, res = _make((2, 5, 16), 32, torch.float32, residual=True, device="cpu")
    with mock.patch.object(kernels, "layernorm_mlp_fwd") as fwd:
        out = layernorm_mlp(x, *params, residual=res)
    fwd.assert_not_called()
    torch.testing.assert_close(out, layernorm_mlp_ref(x, *params, residual=res))


def _good(device="cpu"):
    x, params, res = _make((2, 3, 8), 12, torch.float32, c_out=6, residual=True, device=device)
    return [t.detach() for t in (x, *params)], res.detach()


@pytest.mark.parametrize(
    "index, bad, error, match",
    [
        (0, "not a tensor", TypeError, "x must be a torch.Tensor"),
        (0, torch.ones(2, 3, 8, dtype=torch.int64), TypeError, "x must be a floating-point tensor"),
        (0, torch.tensor(1.0), ValueError, "x must have at least 1 dimension"),
        (1, torch.ones(7), ValueError, "ln_weight must have shape"),
        (1, torch.ones(8, 1), ValueError, "ln_weight must be 1-D"),
        (2, torch.ones(9), ValueError, "ln_bias must have shape"),
        (2, torch.ones(8, dtype=torch.int32), TypeError, "ln_bias must be a floating-point tensor"),
        (3, torch.ones(12, 9), ValueError, "fc1_weight must have shape"),
        (3, torch.ones(12), ValueError, "fc1_weight must be 2-D"),
        (4, torch.ones(11), ValueError, "fc1_bias must have shape"),
        (5, torch.ones(6, 11), ValueError, "fc2_weight must have shape"),
        (6, torch.ones(5), ValueError, "fc2_bias must have shape"),
        (6, torch.ones(6, dtype=torch.int64), TypeError, "fc2_bias must be a floating-point tensor"),
    ],
)
def test_public_op_rejects_bad_inputs_naming_the_argument(index, bad, error, match):
    args, res = _good()
    args[index] = bad
    with pytest.raises(error, match=match):
        layernorm_mlp(*args, residual=res)


def test_public_op_rejects_bad_residual_devices_eps_and_dropout():
    args, res = _good()
    with pytest.raises(ValueError, match="residual must have shape"):
        layernorm_mlp(*args, residual=res[..., :5])
    with pytest.raises(TypeError, match="residual must be a floating-point tensor"):
        layernorm_mlp(*args, residual=res.long())
    with pytest.raises(ValueError, match="all tensors must be on one device.*fc1_weight on meta"):
        layernorm_mlp(*args[:3], args[3].to("meta"), *args[4:], residual=res)
    with pytest.raises(ValueError, match="all tensors must be on one device.*residual on meta"):
        layernorm_mlp(*args, residual=res.to("meta"))
    with pytest.raises(ValueError, match="eps must be positive"):
        layernorm_mlp(*args, residual=res, eps=0.0)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        layernorm_mlp(*args, residual=res, dropout_p=1.0)


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
@pytest.mark.parametrize("shape", [(0, 16), (0, 197, 16), (2, 0, 16)])
def test_empty_input_returns_empty_without_a_launch(backend, shape):
    x, params, res = _make(shape, 32, torch.float32, c_out=8, residual=True)
    with vit_fast.set_backend(backend), mock.patch.object(kernels, "layernorm_mlp_fwd") as fwd:
        out = layernorm_mlp(x, *params, residual=res)
    fwd.assert_not_called()
    assert out.shape == (*shape[:-1], 8)


# ---------------------------------------------------------------------------------------------------------------
# The Triton kernels (interpreter on CPU).

SHAPES = [(1, 16, 32), (7, 48, 200), (50, 64, 256), (197, 80, 320)]


def _x_shape(m: int, c: int, ndim: int) -> tuple[int, ...]:
    if ndim == 2:
        return (m, c)
    return (2, m // 2, c) if m % 2 == 0 else (1, m, c)


def _grid() -> list:
    """Every shape x dtype x (2-D/3-D, residual or not); the largest shape's cross terms only under -m slow."""
    cases = []
    for m, c, hidden in SHAPES:
        for dtype in (torch.float32, torch.float16):
            for ndim, residual in [(2, False), (3, True), (2, True), (3, False)]:
                slow = m > 100 and (ndim == 2) == residual
                marks = [pytest.mark.slow] if slow else []
                name = f"{m}x{c}x{hidden}-{str(dtype)[6:]}-{ndim}d-{'residual' if residual else 'plain'}"
                cases.append(pytest.param(m, c, hidden, dtype, ndim, residual, marks=marks, id=name))
    return cases


@needs_triton
@pytest.mark.parametrize("m, c, hidden, dtype, ndim, residual", _grid())
def test_triton_matches_oracle(m, c, hidden, dtype, ndim, residual, launches):
    x, params, res = _make(_x_shape(m, c, ndim), hidden, dtype, residual=residual)
    _check_against_oracle(x, params, res, launches=launches)


@needs_triton
def test_triton_c_out_differs_from_c_and_other_eps(launches):
    x, params, res = _make((2, 7, 48), 200, torch.float32, c_out=24, residual=True)
    _check_against_oracle(x, params, res, launches=launches, eps=1e-3)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_row_strided_and_non_contiguous_x(dtype, launches):
    c = 48
    base = torch.randn(37, c + 13, device=DEVICE).to(dtype)
    x = base[:, 5 : 5 + c].detach().requires_grad_()  # rows strided by C + 13, last dim contiguous
    assert not x.is_contiguous() and x.stride() == (c + 13, 1)
    _, params, res = _make((37, c), 200, dtype, residual=True)
    _check_against_oracle(x, params, res, launches=launches)
    # 3-D with permuted batch dims: (N, B, C) seen as (B, N, C)
    x3 = torch.randn(9, 2, c, device=DEVICE).to(dtype).transpose(0, 1).detach().requires_grad_()
    _check_against_oracle(x3, params, None)


@needs_triton
def test_triton_nan_row_stays_in_its_row():
    x, params, res = _make((9, 48), 200, torch.float32, residual=True)
    x = x.detach().clone()
    x[3, 7] = float("nan")
    with vit_fast.set_backend("triton"):
        out = layernorm_mlp(x, *params, residual=res)
    ref = layernorm_mlp_ref(x, *params, residual=res)
    assert torch.isnan(out[3]).all() and not torch.isnan(out[torch.arange(9) != 3]).any()
    assert_scaled_close(out, ref, ref, name="out", atol=1e-5)


@needs_triton
def test_triton_backward_is_deterministic():
    x, params, res = _make((50, 64), 256, torch.float32, residual=True)
    inputs = [x, *params, res]
    dout = torch.randn(50, 64, device=DEVICE)
    runs = []
    for _ in range(2):
        with vit_fast.set_backend("triton"):
            out = layernorm_mlp(x, *params, residual=res)
        runs.append(torch.autograd.grad(out, inputs, dout))
    for name, a, b in zip(GRAD_NAMES, *runs, strict=True):
        assert torch.equal(a, b), name


@needs_triton
def test_triton_bias_gradient_does_not_depend_on_the_tile_shape():
    """fc1's bias gradient is summed per 32 rows whatever BLOCK_M the autotuner picks: bitwise the same result."""
    x, params, _ = _make((50, 64), 256, torch.float32)
    dout = torch.randn(50, 64, device=DEVICE)
    runs = []
    for block_m in (32, 64):
        config = {**kernels._INTERPRETER_CONFIG, "BLOCK_M": block_m}
        with vit_fast.set_backend("triton"), mock.patch.object(kernels, "_INTERPRETER_CONFIG", config):
            out = layernorm_mlp(x, *params)
            runs.append(torch.autograd.grad(out, [x, *params], dout))
    for name, a, b in zip(GRAD_NAMES, *runs, strict=False):
        assert_scaled_close(b, a, a, name=name)
    assert torch.equal(runs[0][4], runs[1][4])  # dfc1_bias
    ref_in = _leaves([x, *params])
    want = torch.autograd.grad(layernorm_mlp_ref(*ref_in), ref_in, dout)
    assert_scaled_close(runs[1][4], want[4], want[4], name="dfc1_bias")


@needs_triton
@pytest.mark.parametrize("trainable", ["x", "ln", "fc1", "fc2", "residual"])
def test_triton_computes_only_the_gradients_asked_for(trainable):
    x, params, res = _make((7, 48), 200, torch.float32, residual=True)
    inputs = [x, *params, res]
    groups = {"x": [0], "ln": [1, 2], "fc1": [3, 4], "fc2": [5, 6], "residual": [7]}
    wanted = [inputs[i] for i in groups[trainable]]
    for i, t in enumerate(inputs):
        t.requires_grad_(i in groups[trainable])
    with vit_fast.set_backend("triton"), mock.patch.object(
        kernels, "layernorm_mlp_bwd", wraps=kernels.layernorm_mlp_bwd
    ) as bwd:
        out = layernorm_mlp(x, *params, residual=res)
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, wanted, dout)
    ref_in = _leaves(inputs)
    want = torch.autograd.grad(layernorm_mlp_ref(*ref_in[:7], residual=ref_in[7]),
                               [ref_in[i] for i in groups[trainable]], dout)
    for g, w in zip(got, want, strict=True):
        assert_scaled_close(g, w, w)
    assert bwd.call_count == (0 if trainable == "residual" else 1)
    if bwd.call_count:
        flags = bwd.call_args.args[-3:]
        assert list(flags) == [trainable in ("x", "ln"), trainable == "fc1", trainable == "fc2"]


@needs_triton
def test_triton_no_grad_forward_does_not_save_the_pre_activation():
    x, params, res = _make((7, 48), 200, torch.float32, residual=True)
    with vit_fast.set_backend("triton"), torch.no_grad():
        with mock.patch.object(kernels, "layernorm_mlp_fwd", wraps=kernels.layernorm_mlp_fwd) as fwd:
            out = layernorm_mlp(x, *params, residual=res)
    assert fwd.call_args.args[-1] is False
    ref = layernorm_mlp_ref(x, *params, residual=res)
    assert_scaled_close(out, ref, ref)


@needs_triton
def test_triton_backward_recomputes_the_pre_activation_when_not_saved():
    x, params, res = _make((7, 48), 200, torch.float32, residual=True)
    inputs = [x, *params, res]
    out, *_ = torch.ops.vit_fast.layernorm_mlp_fwd_triton(*inputs, 1e-6, False)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, dout)
    ref_in = _leaves(inputs)
    want = torch.autograd.grad(layernorm_mlp_ref(*ref_in[:7], residual=ref_in[7]), ref_in, dout)
    for name, g, w in zip(GRAD_NAMES, got, want, strict=True):
        assert_scaled_close(g, w, w, name=name)


@needs_triton
@pytest.mark.parametrize("residual_dtype", [None, torch.float32])
def test_triton_under_autocast_matches_the_reference_dtypes(residual_dtype):
    """fp32 parameters and input under fp16 autocast (bf16 numerics need a GPU: the interpreter's bf16 dot)."""
    device = DEVICE
    x, params, _ = _make((2, 9, 48), 200, torch.float32)
    res = None if residual_dtype is None else torch.randn(2, 9, 48, device=device).requires_grad_()
    inputs = [x, *params] + ([res] if res is not None else [])
    with torch.autocast(device, dtype=torch.float16):
        with vit_fast.set_backend("triton"):
            out = layernorm_mlp(x, *params, residual=res)
        ref_in = _leaves(inputs)
        ref = layernorm_mlp_ref(*ref_in[:7], residual=ref_in[7] if res is not None else None)
    assert out.dtype == ref.dtype == (torch.float16 if res is None else torch.float32)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(ref, ref_in, dout)
    ref32_in = _leaves(inputs)
    ref32 = layernorm_mlp_ref(*ref32_in[:7], residual=ref32_in[7] if res is not None else None)
    want32 = torch.autograd.grad(ref32, ref32_in, dout.float())
    assert_scaled_close(out.float(), ref.float(), ref32, name="out", atol=ATOL[torch.float16])
    for name, g, lo, w in zip(GRAD_NAMES, got, want, want32, strict=False):
        assert g.dtype == torch.float32, name
        assert_scaled_close(g, lo, w, name=name, atol=ATOL[torch.float16])


def test_triton_check_reasons():
    x, params, res = _make((3, 16), 32, torch.float32, residual=True)
    with vit_fast.set_backend("triton"), pytest.raises(BackendUnavailableError, match="dropout_p > 0 not supported"):
        layernorm_mlp(x, *params, residual=res, dropout_p=0.1)
    mixed = [params[0], params[1], params[2].half(), *params[3:]]
    with vit_fast.set_backend("triton"), pytest.raises(BackendUnavailableError, match="mixed dtypes outside autocast"):
        layernorm_mlp(x, *mixed)


def test_float64_with_triton_raises_and_auto_falls_back_to_the_reference():
    x, params, res = _make((3, 16), 32, torch.float64, residual=True)
    with vit_fast.set_backend("triton"), pytest.raises(BackendUnavailableError, match="dtype float64 not supported"):
        layernorm_mlp(x, *params, residual=res)
    with mock.patch.object(kernels, "layernorm_mlp_fwd") as fwd:
        out = layernorm_mlp(x, *params, residual=res)
    fwd.assert_not_called()
    torch.testing.assert_close(out, layernorm_mlp_ref(x, *params, residual=res))


@needs_triton
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck_custom_ops(residual):
    x, params, res = _make((2, 5, 16), 32, torch.float32, c_out=8, residual=residual)
    # save_pre follows residual: one case each way keeps the interpreter time down
    torch.library.opcheck(torch.ops.vit_fast.layernorm_mlp_fwd_triton.default, (x, *params, res, 1e-6, residual))
    out, mean, rstd, pre = torch.ops.vit_fast.layernorm_mlp_fwd_triton(*(t.detach() for t in (x, *params)),
                                                                       res, 1e-6, True)
    dout = torch.randn_like(out)
    detached = [t.detach() for t in (x, *params[:5])]
    for flags in [(True, True, True), (False, True, False)] if residual else [(False, False, True)]:
        torch.library.opcheck(torch.ops.vit_fast.layernorm_mlp_bwd_triton.default,
                              (dout, *detached, mean, rstd, pre, *flags))


@needs_triton
def test_compiles_fullgraph_forward_and_backward():
    x, params, res = _make((2, 5, 16), 32, torch.float32, residual=True)
    fn = torch.compile(lambda *a: layernorm_mlp(*a[:7], residual=a[7]), fullgraph=True, backend="aot_eager")
    with vit_fast.set_backend("triton"):
        out = fn(x, *params, res)
        got = torch.autograd.grad(out.sum(), [x, *params, res])
    ref = layernorm_mlp_ref(x, *params, residual=res)
    want = torch.autograd.grad(ref.sum(), [x, *params, res])
    assert_scaled_close(out, ref, ref)
    for name, g, w in zip(GRAD_NAMES, got, want, strict=True):
        assert_scaled_close(g, w, w, name=name)


# ---------------------------------------------------------------------------------------------------------------
# GPU: ViT sizes, bf16, autocast.

VIT = {"vit_small": (384, 1536), "vit_base": (768, 3072)}


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("model", list(VIT))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_vit_sizes(model, dtype, launches):
    c, hidden = VIT[model]
    x, params, res = _make((64, 197, c), hidden, dtype, residual=True, device="cuda")
    _check_against_oracle(x, params, res, launches=launches)


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("m, c, hidden", SHAPES + [(577, 80, 320)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_odd_shapes(m, c, hidden, dtype):
    x, params, res = _make((m, c), hidden, dtype, residual=True, device="cuda")
    _check_against_oracle(x, params, res)


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("residual", [False, True])
def test_cuda_autocast_bf16_with_fp32_params(residual):
    x, params, _ = _make((8, 197, 768), 3072, torch.float32, device="cuda")
    res = torch.randn(8, 197, 768, device="cuda").requires_grad_() if residual else None
    inputs = [x, *params] + ([res] if residual else [])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with vit_fast.set_backend("triton"):
            out = layernorm_mlp(x, *params, residual=res)
        ref_in = _leaves(inputs)
        ref = layernorm_mlp_ref(*ref_in[:7], residual=ref_in[7] if residual else None)
    assert out.dtype == ref.dtype == (torch.float32 if residual else torch.bfloat16)
    ref32_in = _leaves(inputs)
    ref32 = layernorm_mlp_ref(*ref32_in[:7], residual=ref32_in[7] if residual else None)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(ref, ref_in, dout)
    want32 = torch.autograd.grad(ref32, ref32_in, dout.float())
    assert_scaled_close(out.float(), ref.float(), ref32, name="out", atol=ATOL[torch.bfloat16])
    for name, g, lo, w in zip(GRAD_NAMES, got, want, want32, strict=False):
        assert g.dtype == torch.float32, name
        assert_scaled_close(g, lo, w, name=name, atol=ATOL[torch.bfloat16])
