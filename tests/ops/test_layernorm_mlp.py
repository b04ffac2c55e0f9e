"""layernorm_mlp: the reference against hand-written LayerNorm/GELU/linear math, the Triton backend's reasons, and
the fused Triton kernels (output and all gradients) against the float64 oracle, on CPU through the interpreter
(fp32, fp16) and on a GPU (bf16, fp16, ViT-S/B sizes, autocast), and the CUDA kernels on a GPU. The contract every
op keeps is tests/suites/test_contract.py."""

from __future__ import annotations

import importlib
import math
from unittest import mock

import pytest
import torch
import triton
from helpers import (
    DEVICE,
    check_oracle,
    count,
    custom_op_calls,
    launches,
    layernorm_mlp_inputs,
    leaves,
    needs_interpreter,
    needs_tma,
    needs_triton,
)
from vit_fast.kernels import use_variant

import vit_fast
from vit_fast.backends import BackendUnavailableError
from vit_fast.ops import layernorm_mlp, layernorm_mlp_ref
from vit_fast.tolerance import ATOL, assert_close

kernels = importlib.import_module("vit_fast.kernels.layernorm_mlp")
gemm_kernels = importlib.import_module("vit_fast.kernels.gemm")

PARAM_NAMES = ("ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
GRAD_NAMES = ("dx", *(f"d{n}" for n in PARAM_NAMES), "dresidual")


def _make(shape, hidden, dtype, *, c_out=None, residual=False, param_dtype=None, device=DEVICE):
    """x of ``shape`` (..., C), the six parameters as a list and the residual (or None)."""
    (x, *params), kw = layernorm_mlp_inputs(shape, hidden, dtype, c_out=c_out, residual=residual,
                                            param_dtype=param_dtype, device=device)
    return x, params, kw["residual"]


def _leaves(tensors, dtype=None) -> list:
    return leaves(list(tensors), dtype, grad=True)


def _check(x, params, residual, **kwargs):
    """Triton output and every gradient vs the float64 oracle by the tolerance rule."""
    return check_oracle("layernorm_mlp", "triton", (x, *params), {"residual": residual, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# The reference: against PyTorch built-ins and hand-written math.


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
    with launches() as rec:
        out = layernorm_mlp(x, *params, residual=res)
    assert [r.backend for r in rec] == ["reference"]
    torch.testing.assert_close(out, layernorm_mlp_ref(x, *params, residual=res))


# ---------------------------------------------------------------------------------------------------------------
# The Triton kernels (interpreter on CPU).

SHAPES = [(1, 16, 32), (7, 48, 200), (50, 64, 256), (197, 80, 320)]


def _x_shape(m: int, c: int, ndim: int) -> tuple[int, ...]:
    if ndim == 2:
        return (m, c)
    return (2, m // 2, c) if m % 2 == 0 else (1, m, c)


def _grid() -> list:
    """Every shape x dtype x (2-D/3-D, residual or not) for the small shapes; for the ViT-sized ones the model's
    path (3-D with a residual) in one dtype each, their cross terms under -m slow."""
    cases = []
    for m, c, hidden in SHAPES:
        for dtype in (torch.float32, torch.float16):
            for ndim, residual in [(2, False), (3, True), (2, True), (3, False)]:
                kept = m < 50 or ((ndim, residual) == (3, True) and (dtype == torch.float16) == (m < 100))
                name = f"{m}x{c}x{hidden}-{str(dtype)[6:]}-{ndim}d-{'residual' if residual else 'plain'}"
                cases.append(pytest.param(m, c, hidden, dtype, ndim, residual,
                                          marks=[] if kept else [pytest.mark.slow], id=name))
    return cases


@needs_triton
@pytest.mark.parametrize("m, c, hidden, dtype, ndim, residual", _grid())
def test_triton_matches_oracle(m, c, hidden, dtype, ndim, residual):
    x, params, res = _make(_x_shape(m, c, ndim), hidden, dtype, residual=residual)
    _check(x, params, res)


@needs_triton
def test_triton_c_out_differs_from_c_and_other_eps():
    """Also: one forward and one backward launch, four GEMMs (fc1 and fc2 forward, dH and d(LayerNorm output))."""
    x, params, res = _make((2, 7, 48), 200, torch.float32, c_out=24, residual=True)
    with launches() as rec, mock.patch.object(kernels, "gemm", wraps=kernels.gemm) as gemm:
        _check(x, params, res, eps=1e-3)
    assert count(rec, "triton", "fwd") == 1 and count(rec, "triton", "bwd") == 1 and gemm.call_count == 4


@needs_triton
def test_triton_bias_gradient_does_not_depend_on_the_tile_shape():
    """fc1's bias gradient is summed per 32 rows whatever BLOCK_M the autotuner picks: bitwise the same result.
    The GEMM's operands are small integers, so the products are exact and only the epilogue's sums could differ
    (the interpreter's numpy matmul is not bitwise independent of the tile shape; the kernel's own sums are)."""
    m, k, n = 100, 48, 40
    a = torch.randint(-3, 4, (m, k), device=DEVICE).float()
    b = torch.randint(-3, 4, (k, n), device=DEVICE).float()
    pre = torch.randn(m, n, device=DEVICE)
    runs = []
    for block_m in (32, 64):
        config = {**gemm_kernels._INTERPRETER_CONFIG, "BLOCK_M": block_m}
        da = torch.empty(m, n, device=DEVICE)
        dbias = torch.empty(math.ceil(m / gemm_kernels.BIAS_GRAD_ROWS), n, device=DEVICE)
        with mock.patch.object(gemm_kernels, "_INTERPRETER_CONFIG", config):
            gemm_kernels.gemm(a, b, da, pre=pre, dbias=dbias, epilogue=gemm_kernels.EPI_GELU_BWD)
        runs.append((da, dbias.sum(0)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    pre.requires_grad_()
    want = torch.autograd.grad(torch.nn.functional.gelu(pre), pre, a @ b)[0]
    torch.testing.assert_close(runs[0][0], want)
    torch.testing.assert_close(runs[0][1], want.sum(0))


@needs_triton
@pytest.mark.parametrize("trainable", ["x", "ln", "fc1", "fc2", "residual"])
def test_triton_backward_computes_only_the_gradients_asked_for(trainable):
    """The backward kernel's flags (d(LayerNorm input and parameters), dfc1, dfc2) follow the requested
    gradients; the gradients themselves are checked in test_contract's test_only_requested_gradients."""
    x, params, res = _make((7, 48), 200, torch.float32, residual=True)
    inputs = [x, *params, res]
    groups = {"x": [0], "ln": [1, 2], "fc1": [3, 4], "fc2": [5, 6], "residual": [7]}
    for i, t in enumerate(inputs):
        t.requires_grad_(i in groups[trainable])
    with vit_fast.set_backend("triton"), custom_op_calls() as calls:
        out = layernorm_mlp(x, *params, residual=res)
        out.backward(torch.randn_like(out))
    bwd = [args for name, args in calls if name == "layernorm_mlp_bwd_triton"]
    assert len(bwd) == (0 if trainable == "residual" else 1)
    if bwd:
        assert list(bwd[0][-3:]) == [trainable in ("x", "ln"), trainable == "fc1", trainable == "fc2"]


@needs_triton
def test_triton_no_grad_forward_does_not_save_the_pre_activation():
    x, params, res = _make((7, 48), 200, torch.float32, residual=True)
    with vit_fast.set_backend("triton"), torch.no_grad(), custom_op_calls() as calls:
        out = layernorm_mlp(x, *params, residual=res)
    (fwd,) = [args for name, args in calls if name == "layernorm_mlp_fwd_triton"]
    assert fwd[-1] is False  # save_pre
    ref = layernorm_mlp_ref(x, *params, residual=res)
    assert_close(out, ref, ref)


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
        assert_close(g, w, w, name=name)


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
    assert_close(out.float(), ref.float(), ref32, name="out", atol=ATOL[torch.float16])
    for name, g, lo, w in zip(GRAD_NAMES, got, want, want32, strict=False):
        assert g.dtype == torch.float32, name
        assert_close(g, lo, w, name=name, atol=ATOL[torch.float16])


# ---------------------------------------------------------------------------------------------------------------
# The edges of the new structure: the GEMM's epilogues on their own, and the LayerNorm that feeds fc1.


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _gemm_case(m, k, n, dtype, *, transposed_b):
    a = torch.randn(m, k, device=DEVICE).to(dtype)
    b = (torch.randn(n, k, device=DEVICE).t() if transposed_b else torch.randn(k, n, device=DEVICE)) / math.sqrt(k)
    return a, b.to(dtype)


def _epilogues(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, res: torch.Tensor,
               pre: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each GEMM epilogue writes, computed by torch in the operands' dtype (the fp32 outputs in fp32 at least,
    as the kernel writes them); on float64 copies, the oracle. ``pre``: the pre-activation the backward reads."""
    wide = torch.promote_types(a.dtype, torch.float32)
    acc = a @ b
    pre_out = acc + bias
    pre = pre.detach().requires_grad_()
    gelu = torch.nn.functional.gelu(pre)
    (da,) = torch.autograd.grad(gelu, pre, acc)
    plain = a.to(wide) @ b.to(wide)
    return {"pre": pre_out, "h": torch.nn.functional.gelu(pre_out), "out": plain + bias.to(wide) + res.to(wide),
            "da": da, "gelu_out": gelu.detach(), "dbias": da.to(wide).sum(0), "plain": plain}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, k, n", [(1, 7, 5), (45, 70, 33), (33, 64, 96)])  # none a multiple of every tile
def test_gemm_epilogues_match_torch(m, k, n, dtype):
    """Each epilogue of the one GEMM (bias + GELU storing the pre-activation; bias + residual into an fp32 output;
    dGELU with h and the bias gradient; plain), against the float64 oracle by the tolerance rule, at sizes that cut
    tiles in all three dimensions and with B both as a transposed nn.Linear weight and row-major."""
    g = gemm_kernels
    for transposed_b in (True, False):
        a, b = _gemm_case(m, k, n, dtype, transposed_b=transposed_b)
        bias = torch.randn(n, device=DEVICE).to(dtype)
        res = torch.randn(m, n, device=DEVICE)
        got = {"pre": _nan(m, n, dtype=dtype), "h": _nan(m, n, dtype=dtype), "out": _nan(m, n),
               "da": _nan(m, n, dtype=dtype), "gelu_out": _nan(m, n, dtype=dtype), "plain": _nan(m, n)}
        g.gemm(a, b, got["h"], bias=bias, pre=got["pre"], epilogue=g.EPI_GELU, store_aux=True)
        g.gemm(a, b, got["out"], bias=bias, residual=res)
        dbias = _nan(math.ceil(m / g.BIAS_GRAD_ROWS), n)
        g.gemm(a, b, got["da"], pre=got["pre"], h=got["gelu_out"], dbias=dbias, epilogue=g.EPI_GELU_BWD,
               store_aux=True)
        got["dbias"] = dbias.sum(0)
        g.gemm(a, b, got["plain"])
        same = _epilogues(a, b, bias, res, got["pre"])
        oracle = _epilogues(*leaves((a, b, bias, res, got["pre"]), torch.float64))
        for name, t in got.items():
            assert_close(t, same[name], oracle[name], name=f"{name} (B transposed: {transposed_b})")


@needs_triton
def test_gemm_rejects_mixed_operand_dtypes():
    """The kernel never converts an operand between its load and the dot (it would keep Triton off its Hopper
    path): the launcher takes one dtype for A and B."""
    with pytest.raises(AssertionError, match="gemm"):
        gemm_kernels.gemm(torch.randn(4, 8, device=DEVICE), torch.randn(8, 4, device=DEVICE).half(), _nan(4, 4))


@needs_triton
def test_fc1_reads_the_layer_norm_output_in_the_gemm_dtype():
    """Under fp16 autocast with fp32 x the LayerNorm writes fc1's input in fp16 once; the backward rebuilds it from
    the saved statistics bit for bit."""
    from vit_fast.kernels import layer_norm

    x, params, _ = _make((2, 9, 48), 200, torch.float32)
    seen = []

    def spy(a, b, c, **kw):
        seen.append((a, b))
        return gemm_kernels.gemm(a, b, c, **kw)

    with torch.autocast(DEVICE, dtype=torch.float16), vit_fast.set_backend("triton"), \
            mock.patch.object(kernels, "gemm", spy):
        out = layernorm_mlp(x, *params)
    y, b = seen[0]
    assert y.dtype == b.dtype == torch.float16 and y.shape == (18, 48)
    x2 = x.detach().reshape(18, 48)
    _, mean, rstd = layer_norm.layer_norm_fwd(x2, params[0].detach(), params[1].detach(), 1e-6)
    again = layer_norm.layer_norm_apply(x2, params[0].detach(), params[1].detach(), mean, rstd,
                                        out_dtype=torch.float16)
    assert torch.equal(again, y)
    ref = torch.nn.functional.layer_norm(x2, (48,), params[0].detach(), params[1].detach(), 1e-6)
    x64, w64, b64 = leaves((x2, params[0], params[1]), torch.float64)
    oracle = torch.nn.functional.layer_norm(x64, (48,), w64, b64, 1e-6)
    assert_close(y, ref.to(y.dtype), oracle)
    assert out.dtype == torch.float16


def test_triton_check_reasons():
    x, params, res = _make((3, 16), 32, torch.float32, residual=True)
    with vit_fast.set_backend("triton"), pytest.raises(BackendUnavailableError, match="dropout_p > 0 not supported"):
        layernorm_mlp(x, *params, residual=res, dropout_p=0.1)
    mixed = [params[0], params[1], params[2].half(), *params[3:]]
    with vit_fast.set_backend("triton"), pytest.raises(BackendUnavailableError, match="mixed dtypes outside autocast"):
        layernorm_mlp(x, *mixed)


# ---------------------------------------------------------------------------------------------------------------
# GPU: ViT sizes, bf16, autocast.

VIT = {"vit_small": (384, 1536), "vit_base": (768, 3072)}


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("model", list(VIT))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_vit_sizes(model, dtype):
    c, hidden = VIT[model]
    x, params, res = _make((64, 197, c), hidden, dtype, residual=True, device="cuda")
    _check(x, params, res)


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("m, c, hidden", SHAPES + [(577, 80, 320)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_odd_shapes(m, c, hidden, dtype):
    x, params, res = _make((m, c), hidden, dtype, residual=True, device="cuda")
    _check(x, params, res)


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
    assert_close(out.float(), ref.float(), ref32, name="out", atol=ATOL[torch.bfloat16])
    for name, g, lo, w in zip(GRAD_NAMES, got, want, want32, strict=False):
        assert g.dtype == torch.float32, name
        assert_close(g, lo, w, name=name, atol=ATOL[torch.bfloat16])


# ---- the CUDA backend (vit_fast._C), on a GPU ----------------------------------------------------------------------


def _mlp_inputs(shape, hidden, dtype, *, residual=True, param_dtype=None, res_dtype=None):
    c = shape[-1]
    pdt = param_dtype or dtype

    def p(*s, scale=1.0, shift=0.0, dt=pdt):
        return (torch.randn(*s, device="cuda") * scale + shift).to(dt).requires_grad_()

    x = torch.randn(*shape, device="cuda").to(dtype).requires_grad_()
    params = [p(c, scale=0.2, shift=1.0), p(c, scale=0.2), p(hidden, c, scale=c**-0.5), p(hidden, scale=0.2),
              p(c, hidden, scale=hidden**-0.5), p(c, scale=0.2)]
    res = p(*shape, dt=res_dtype or dtype) if residual else None
    return [x, *params, res]


MLP_NAMES = ["x", "ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "residual"]


def _mlp_call(*a):
    return layernorm_mlp(*a[:7], residual=a[7])


def _mlp_ref(*a, upcast):
    return layernorm_mlp_ref(*a[:7], residual=a[7], upcast=upcast)


MLP_SHAPES = [((2, 197, 384), 1536), ((2, 257, 768), 3072), ((1, 577, 192), 768), ((3, 50, 80), 200), ((9, 40), 72)]


@pytest.mark.cuda
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", MLP_SHAPES, ids=lambda c: "x".join(map(str, c[0])) + f"_h{c[1]}")
def test_layernorm_mlp_matches_oracle(case, dtype, residual):
    shape, hidden = case
    *args, res = _mlp_inputs(shape, hidden, dtype, residual=residual)
    check_oracle("layernorm_mlp", "cuda", tuple(args), {"residual": res})


@pytest.mark.cuda
def test_layernorm_mlp_under_autocast_fp32_residual_stream():
    """The model's autocast path: fp32 x, residual and LayerNorm parameters, bf16 GEMMs, fp32 output."""
    ins = _mlp_inputs((2, 197, 384), 1536, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with vit_fast.set_backend("cuda"):
            out = _mlp_call(*ins)
        ref = layernorm_mlp_ref(*leaves(ins)[:7], residual=ins[7])
    assert out.dtype == ref.dtype == torch.float32
    ref32 = layernorm_mlp_ref(*leaves(ins)[:7], residual=ins[7], upcast=True)
    assert_close(out, ref, ref32, atol=ATOL[torch.bfloat16])
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in ins)


@pytest.mark.cuda
def test_layernorm_mlp_only_requested_gradients_and_no_saved_pre():
    x, *params, res = _mlp_inputs((2, 197, 384), 1536, torch.bfloat16)
    for t in params:
        t.requires_grad_(False)
    with vit_fast.set_backend("cuda"):
        out = layernorm_mlp(x, *params, residual=res)
    (dx,) = torch.autograd.grad(out, [x], torch.ones_like(out))
    ref32_in = leaves([x, *params, res], torch.float32)
    (want,) = torch.autograd.grad(layernorm_mlp_ref(*ref32_in[:7], residual=ref32_in[7], upcast=True), [ref32_in[0]],
                                  torch.ones_like(out, dtype=torch.float32))
    low = leaves([x])[0]
    (lo,) = torch.autograd.grad(layernorm_mlp_ref(low, *params, residual=res), [low], torch.ones_like(out))
    assert_close(dx, lo, want, name="dx")
    # The backward recomputes the pre-activation when the forward did not save it.
    ins = _mlp_inputs((3, 50, 80), 200, torch.float16)
    mean_rstd = torch.ops.vit_fast.layernorm_mlp_fwd_cuda(*[t.detach() for t in ins[:7]], None, 1e-6, False)
    assert mean_rstd[3].numel() == 0
    saved = torch.ops.vit_fast.layernorm_mlp_fwd_cuda(*[t.detach() for t in ins[:7]], None, 1e-6, True)
    dout = torch.randn_like(saved[0])
    args = [t.detach() for t in ins[:6]]
    a = torch.ops.vit_fast.layernorm_mlp_bwd_cuda(dout, *args, saved[1], saved[2], saved[3], True, True, True)
    b = torch.ops.vit_fast.layernorm_mlp_bwd_cuda(dout, *args, saved[1], saved[2], mean_rstd[3], True, True, True)
    for g1, g2 in zip(a, b, strict=True):
        torch.testing.assert_close(g1, g2, atol=2e-3, rtol=2e-3)

# ---- the kernel variants (use_variant), through the interpreter --------------------------------------------------


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x)


@needs_interpreter
@needs_tma
@pytest.mark.parametrize("epilogue", [gemm_kernels.EPI_NONE, gemm_kernels.EPI_GELU, gemm_kernels.EPI_GELU_BWD])
@pytest.mark.parametrize("b_layout", ["weight_t", "kn"])
def test_the_tma_gemm_matches_the_reference(epilogue, b_layout):
    """M, N, K not multiples of the tiles: the descriptors' zero fill and clipped stores carry the edges."""
    m, k, n = 70, 40, 48
    dt = torch.float16
    a, w = torch.randn(m, k).to(dt), (torch.randn(n, k) / k**0.5).to(dt)
    b = w.t() if b_layout == "weight_t" else w.t().contiguous()  # (K, N): nn.Linear's .t(), or row-major
    bias, res, pre = torch.randn(n).to(dt), torch.randn(m, n).to(dt), torch.randn(m, n).to(dt)
    c = torch.full((m, n), float("nan"), dtype=dt)
    kw: dict = {"residual": res} if epilogue == gemm_kernels.EPI_NONE else {}
    if epilogue == gemm_kernels.EPI_GELU:
        kw = {"bias": bias, "pre": torch.full((m, n), float("nan"), dtype=dt), "store_aux": True}
    if epilogue == gemm_kernels.EPI_GELU_BWD:
        kw = {"pre": pre, "h": torch.full((m, n), float("nan"), dtype=dt), "store_aux": True,
              "dbias": torch.full((triton.cdiv(m, gemm_kernels.BIAS_GRAD_ROWS), n), float("nan"))}
    with use_variant("gemm", "tma"):
        gemm_kernels.gemm(a, b, c, epilogue=epilogue, **kw)
    for upcast in (torch.float32, dt):
        acc = a.to(upcast) @ b.to(upcast)
        if epilogue == gemm_kernels.EPI_NONE:
            want = acc + res.to(upcast)
        elif epilogue == gemm_kernels.EPI_GELU:
            want = _gelu(acc + bias.to(upcast))
        else:
            p32 = pre.to(upcast).float()
            cdf = 0.5 * (1 + torch.erf(p32 * 2**-0.5))
            want = acc.float() * (cdf + p32 * torch.exp(-0.5 * p32 * p32) * (2 * torch.pi) ** -0.5)
        if upcast == torch.float32:
            oracle = want.float()
        else:
            same = want.to(dt)
    assert_close(c, same, oracle, name="c")
    if epilogue == gemm_kernels.EPI_GELU_BWD:
        dbias = kw["dbias"].sum(0)
        assert torch.allclose(dbias, oracle.sum(0), rtol=2e-2, atol=2e-2)
        assert_close(kw["h"], _gelu(pre.float()).to(dt), _gelu(pre.float()), name="h")
