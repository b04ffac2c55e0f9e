"""patch_embed: the reference against patch extraction by reshape + matmul, the Triton backend's reasons, and the
Triton kernels (forward and the gradients of images, weight, bias, class token and position embedding) against
the float64 oracle, on CPU through the interpreter (fp32, fp16) and on a GPU (bf16, fp16, ViT-B/16, ViT-L/14,
ViT-B/32 at 224), and the CUDA kernels on a GPU. The contract every op keeps is tests/suites/test_contract.py."""

from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, check_oracle, launches, leaves, needs_triton, patch_embed_inputs

import vit_fast
from vit_fast import backends
from vit_fast.ops import patch_embed, patch_embed_ref
from vit_fast.tolerance import assert_close

pytest.importorskip("triton")  # the kernels need Triton; a kernel module that fails to import fails
kernels = importlib.import_module("vit_fast.kernels.patch_embed")

NAMES = ("images", "weight", "bias", "cls_token", "pos_embed")


def _inputs(b, c, h, w, p, e, *, cls=True, pos="1+N", bias=True, dtype=torch.float32, device=DEVICE) -> dict:
    """Fresh random leaves for patch_embed: a dict of NAMES; pos is "1+N", "N" or None."""
    args, kwargs = patch_embed_inputs(b, c, h, w, p, e, cls=cls, pos=pos, bias=bias, dtype=dtype, device=device)
    return dict(zip(NAMES, (*args, kwargs["cls_token"], kwargs["pos_embed"]), strict=True))


def _leaves(ins: dict, dtype=None) -> dict:
    return leaves(ins, dtype)


def _call(fn, ins: dict, **kw):
    return fn(ins["images"], ins["weight"], ins["bias"], cls_token=ins["cls_token"], pos_embed=ins["pos_embed"], **kw)


def _check(ins: dict, *, dy=None) -> torch.Tensor:
    """Triton forward and every gradient vs the float64 oracle by the tolerance rule."""
    args = (ins["images"], ins["weight"], ins["bias"])
    out, _ = check_oracle("patch_embed", "triton", args, {"cls_token": ins["cls_token"],
                                                          "pos_embed": ins["pos_embed"]}, dout=dy)
    assert out.is_contiguous()
    return out


def _grads(out, ins: dict, dy) -> dict:
    names = [k for k, t in ins.items() if t is not None and t.requires_grad]
    return dict(zip(names, torch.autograd.grad(out, [ins[k] for k in names], dy), strict=True))


def _manual_patch_embed(images, weight, bias, cls_token, pos_embed):
    """Patches by reshape/permute (no convolution), one matmul, then cat and add."""
    b, c, h, w = images.shape
    e, _, ph, pw = weight.shape
    patches = images.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)  # (B, GH, GW, C, PH, PW)
    x = patches.reshape(b, -1, c * ph * pw) @ weight.reshape(e, -1).T  # (B, N, E)
    if bias is not None:
        x = x + bias
    n = x.shape[1]
    if pos_embed is not None and pos_embed.shape[1] == n:
        x = x + pos_embed
    if cls_token is not None:
        x = torch.cat([cls_token.expand(b, 1, e), x], dim=1)
    if pos_embed is not None and pos_embed.shape[1] == n + 1:
        x = x + pos_embed
    return x


# ---- the reference -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, pos, bias", [(True, "1+N", True), (True, "N", True), (False, "N", False), (True, None, True)]
)
def test_reference_matches_manual_patches(cls, pos, bias):
    ins = _inputs(2, 3, 12, 8, 4, 5, cls=cls, pos=pos, bias=bias, dtype=torch.float64, device="cpu")
    out = _call(patch_embed_ref, ins)
    want = _manual_patch_embed(*ins.values())
    torch.testing.assert_close(out, want)
    dy = torch.randn_like(out)
    got, exp = _grads(out, ins, dy), _grads(want, ins, dy)
    for name in got:
        torch.testing.assert_close(got[name], exp[name])


def test_reference_is_conv_flatten_cat_add():
    ins = _inputs(2, 3, 8, 8, 4, 6, dtype=torch.float64, device="cpu")
    images, weight, bias, cls, pos = ins.values()
    conv = F.conv2d(images, weight, bias, stride=4).flatten(2).transpose(1, 2)
    want = torch.cat([cls.expand(2, -1, -1), conv], dim=1) + pos
    torch.testing.assert_close(_call(patch_embed_ref, ins), want)


def test_reference_upcast_returns_fp32():
    ins = _inputs(1, 3, 8, 8, 4, 6, dtype=torch.float16, device="cpu")
    out = _call(patch_embed_ref, ins, upcast=True)
    assert out.dtype == torch.float32
    want = _manual_patch_embed(*(t.float() for t in ins.values()))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_reference_gradcheck():
    ins = _inputs(1, 2, 4, 6, 2, 3, dtype=torch.float64, device="cpu")
    assert torch.autograd.gradcheck(
        lambda *t: _call(patch_embed_ref, dict(zip(NAMES, t, strict=True))), tuple(ins.values())
    )


# One patch wide and one patch tall: oneDNN's AMX bf16 convolution (torch 2.14) is wrong on the first (off by 44
# to 124 or NaN against a correct 0.12); P = 14 and 16, C = 1 and 3, odd E.
ONE_PATCH_GRIDS = [(1, 14, (19, 1), 35), (3, 14, (19, 1), 35), (3, 16, (14, 1), 768), (3, 14, (1, 23), 64),
                   (1, 16, (1, 1), 33)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c, p, grid, e", ONE_PATCH_GRIDS)
def test_16bit_cpu_reference_is_within_rounding_of_fp64_on_one_patch_grids(c, p, grid, e, dtype):
    """vit_fast.ops.patch_embed itself (auto: the reference on CPU): one rounding of an fp32-accumulated GEMM
    (the bias added before it or after it: two roundings at most) off the float64 result."""
    ins = _inputs(2, c, grid[0] * p, grid[1] * p, p, e, pos=None, dtype=torch.float64, device="cpu")
    ins["weight"] = ins["weight"] * (c * p * p) ** -0.5
    low = {k: None if t is None else t.detach().to(dtype) for k, t in ins.items()}
    with launches() as rec:
        out = _call(patch_embed, low)
    assert {r.backend for r in rec} == {"reference"}
    want = _call(patch_embed_ref, {k: None if t is None else t.double() for k, t in low.items()})
    err = (out.double() - want).abs().max().item()
    unit = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    assert torch.isfinite(out).all() and err <= 2 * unit * want.abs().max().item(), f"max error {err:.3g}"


@pytest.mark.parametrize("autocast", [False, True])
def test_16bit_cpu_reference_does_not_use_the_convolution(autocast):
    """The route around oneDNN's bf16 convolution: in 16 bits on CPU (the inputs', or autocast's) the reference
    never calls F.conv2d, forward or backward; fp32 outside autocast still does."""
    ins = _leaves(_inputs(2, 3, 14, 28, 14, 35, dtype=torch.float32 if autocast else torch.bfloat16, device="cpu"))

    def refuse(*args, **kwargs):
        raise AssertionError("F.conv2d called for a 16-bit CPU patch embedding")

    with mock.patch.object(F, "conv2d", refuse), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = _call(patch_embed_ref, ins)
        out.sum().backward()
    assert torch.isfinite(out).all()
    with mock.patch.object(F, "conv2d", wraps=F.conv2d) as conv:
        _call(patch_embed_ref, _leaves(_inputs(1, 3, 8, 8, 4, 6, dtype=torch.float32, device="cpu")))
    assert conv.called


# ---- dispatch to the Triton backend ------------------------------------------------------------------------------


@needs_triton
def test_mixed_conv_dtypes_rejected_with_reason():
    ins = _inputs(1, 3, 8, 8, 4, 6)
    ins["weight"] = ins["weight"].detach().half()
    args = (ins["images"], ins["weight"], ins["bias"])
    why = backends.reasons("triton", "patch_embed", args, {"cls_token": None, "pos_embed": None})
    assert any("weight dtype float16 differs from images dtype float32" in r for r in why)
    with vit_fast.set_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="weight dtype"):
        patch_embed(*args)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's bf16 tl.dot problem concerns CPU tensors only")
@needs_triton
def test_bf16_under_the_interpreter_is_refused_where_its_dot_is_wrong_else_exact():
    """Triton issue 11584: some interpreters multiply raw bf16 bit patterns in tl.dot. Where this one does, bf16
    is refused with that reason (auto runs the reference); where it does not, bf16 meets the oracle."""
    ins = _leaves(_inputs(1, 3, 8, 8, 4, 6, dtype=torch.bfloat16))
    args = (ins["images"], ins["weight"], ins["bias"])
    kwargs = {"cls_token": ins["cls_token"], "pos_embed": ins["pos_embed"]}
    if not any("bfloat16 tl.dot" in r for r in backends.reasons("triton", "patch_embed", args, kwargs)):
        _check(ins)
        return
    with vit_fast.set_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="bfloat16 tl.dot"):
        _call(patch_embed, ins)
    with launches() as rec:
        assert _call(patch_embed, ins).dtype == torch.bfloat16  # auto: the reference
    assert [r.backend for r in rec] == ["reference"]


# ---- Triton kernels: numerics ------------------------------------------------------------------------------------

SHAPES = [  # (B, C, H, W, P, E)
    (2, 3, 32, 32, 4, 48),
    (2, 3, 32, 32, 8, 48),
    (2, 3, 24, 16, 8, 48),  # non-square image
    (2, 1, 8, 8, 2, 24),  # one channel, K = 4
    (1, 3, 28, 42, 14, 40),  # ViT-L/14-style patch, K = 588
    (1, 3, 32, 48, 16, 64),  # ViT-B/16 patch, K = 768
    (1, 3, 64, 32, 32, 16),  # ViT-B/32 patch, K = 3072
]


def _grid() -> list:
    """Every shape in fp32 and fp16; the ViT-B/32 patch (K = 3072, the interpreter's slowest) in fp16 only,
    its fp32 case under -m slow."""
    return [pytest.param(shape, dtype, id=f"{'x'.join(map(str, shape))}-{name}",
                         marks=[pytest.mark.slow] if shape[4] == 32 and dtype == torch.float32 else [])
            for shape in SHAPES for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"))]


@needs_triton
@pytest.mark.parametrize("shape, dtype", _grid())
def test_triton_matches_oracle(shape, dtype):
    _check(_inputs(*shape, dtype=dtype))


VARIANTS = [  # (cls, pos, bias)
    (True, "N", True),
    (True, None, True),
    (False, "N", True),
    (False, None, True),
    (True, "1+N", False),
    (False, None, False),
]


@needs_triton
@pytest.mark.parametrize("cls, pos, bias", VARIANTS)
def test_triton_optional_inputs(cls, pos, bias):
    out = _check(_inputs(2, 3, 16, 24, 4, 20, cls=cls, pos=pos, bias=bias))
    assert out.shape == (2, 24 + cls, 20)


@needs_triton
def test_triton_dweight_split_reduction_is_exact_and_deterministic():
    """M split over several programs per weight tile, the last split partial, summed without atomics: the
    same bits every run."""
    with mock.patch.object(kernels, "_SPLIT_ROWS", 64):
        _check(_inputs(3, 3, 32, 32, 4, 40))
        ins = _inputs(3, 3, 32, 32, 4, 40, dtype=torch.float16)
        dy = torch.randn(3, 65, 40, device=DEVICE, dtype=torch.float16)
        with vit_fast.set_backend("triton"):
            first = _grads(_call(patch_embed, ins), ins, dy)
            second = _grads(_call(patch_embed, ins), ins, dy)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@needs_triton
def test_triton_skips_the_gemms_of_frozen_inputs():
    """Frozen images skip the dimages GEMM; a frozen weight skips the dweight GEMM."""
    ins = _inputs(2, 3, 16, 16, 4, 24)
    for frozen, runs in (("images", (0, 1)), ("weight", (1, 0))):
        ins = _leaves(ins)
        for name, t in ins.items():
            t.requires_grad_(name != frozen)
        with (
            vit_fast.set_backend("triton"),
            mock.patch.object(kernels, "_bwd_images", wraps=kernels._bwd_images) as bwd_images,
            mock.patch.object(kernels, "_bwd_weight", wraps=kernels._bwd_weight) as bwd_weight,
        ):
            _call(patch_embed, ins).sum().backward()
        assert (bwd_images.call_count, bwd_weight.call_count) == runs, frozen
        assert ins[frozen].grad is None and all(t.grad is not None for n, t in ins.items() if n != frozen)


@needs_triton
def test_triton_output_dtype_follows_reference_promotion():
    """fp16 conv with fp32 class token and position embedding: the reference's additions promote to fp32."""
    ins = _inputs(2, 3, 16, 16, 4, 24, dtype=torch.float16)
    for name in ("cls_token", "pos_embed"):
        ins[name] = ins[name].detach().float().requires_grad_()
    out = _check(ins)
    assert out.dtype == torch.float32


@needs_triton
def test_triton_under_autocast_matches_reference_dtype():
    """fp32 parameters under fp16 autocast: the conv runs in fp16, the fp32 additions return fp32."""
    ins = _inputs(2, 3, 16, 16, 4, 24)
    with torch.autocast(DEVICE, dtype=torch.float16):
        with vit_fast.set_backend("triton"), mock.patch.object(kernels, "patch_embed_fwd",
                                                                wraps=kernels.patch_embed_fwd) as fwd:
            out = _call(patch_embed, ins)
        low = _call(patch_embed_ref, _leaves(ins))
    assert out.dtype == low.dtype == torch.float32
    assert_close(out, low, _call(patch_embed_ref, _leaves(ins, torch.float64)))
    assert fwd.call_args.args[0].dtype == torch.float16
    grads = _grads(out, ins, torch.randn_like(out))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())


# ---- GPU only: bf16, ViT sizes -----------------------------------------------------------------------------------

GPU_SHAPES = [
    (64, 3, 224, 224, 16, 768),
    (8, 3, 224, 224, 14, 1024),
    (16, 3, 224, 224, 32, 768),
    (4, 3, 384, 384, 16, 768),
]


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_vit_sizes(shape, dtype):
    _check(_inputs(*shape, dtype=dtype, device="cuda"))


@pytest.mark.cuda
@needs_triton
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_cuda_fp32_follows_tf32_switch(tf32):
    from vit_fast.kernels import fp32_tf32

    # F.conv2d's switch, which the kernel follows (through vit_fast.kernels.fp32_tf32). Set through torch >= 2.9's
    # fp32_precision API where it exists: the legacy allow_tf32 flag raises once that API has been used.
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):
        previous, conv.fp32_precision = conv.fp32_precision, "tf32" if tf32 else "ieee"
    else:
        previous, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, tf32
    try:
        assert fp32_tf32("conv") == tf32
        _check(_inputs(8, 3, 224, 224, 16, 768, device="cuda"))
    finally:
        if hasattr(conv, "fp32_precision"):
            conv.fp32_precision = previous
        else:
            torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.cuda
@needs_triton
def test_cuda_autocast_bf16_model_path():
    """The model under bf16 autocast: fp32 parameters, bf16 conv, fp32 tokens out like the reference."""
    ins = _inputs(32, 3, 224, 224, 16, 768, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with vit_fast.set_backend("triton"):
            out = _call(patch_embed, ins)
        low_in = _leaves(ins)
        low = _call(patch_embed_ref, low_in)
    assert out.dtype == low.dtype == torch.float32
    oracle_in = _leaves(ins, torch.float64)
    oracle = _call(patch_embed_ref, oracle_in)
    assert_close(out, low, oracle)
    dy = torch.randn_like(out)
    got, lo, want = _grads(out, ins, dy), _grads(low, low_in, dy), _grads(oracle, oracle_in, dy.double())
    for name in got:
        assert_close(got[name], lo[name], want[name], name=f"d{name}")


# ---- the CUDA backend (vit_fast._C), on a GPU ----------------------------------------------------------------------

CUDA_CASES = [(2, 3, 224, 224, 16, 192), (2, 3, 64, 48, 16, 96), (1, 3, 56, 56, 14, 80), (2, 1, 12, 20, 4, 24)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pos", ["1+N", "N", None])
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "x".join(map(str, c)))
def test_cuda_kernels_match_oracle(case, pos, dtype):
    B, C, H, W, P, E = case
    ins = _inputs(B, C, H, W, P, E, pos=pos, dtype=dtype, device="cuda")
    ins["cls_token"] = ins["cls_token"].detach().float().requires_grad_()  # fp32, as the model holds it
    if ins["pos_embed"] is not None:
        ins["pos_embed"] = ins["pos_embed"].detach().float().requires_grad_()
    check_oracle("patch_embed", "cuda", (ins["images"], ins["weight"], ins["bias"]),
                 {"cls_token": ins["cls_token"], "pos_embed": ins["pos_embed"]})


@pytest.mark.cuda
def test_cuda_kernels_strided_images_no_cls_no_bias():
    base = torch.randn(2, 3, 64, 80, device="cuda", dtype=torch.bfloat16)
    images = base[..., :64].detach().requires_grad_()  # rows strided by 80
    weight = (torch.randn(32, 3, 16, 16, device="cuda") * 0.03).to(torch.bfloat16).requires_grad_()
    check_oracle("patch_embed", "cuda", (images, weight, None), {})


# ---- GPU code generation without a GPU: tests/suites/test_kernel_resources.py compiles each variant for sm_80/90 ----
