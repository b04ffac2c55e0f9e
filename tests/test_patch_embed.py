"""patch_embed: the reference against patch extraction by reshape + matmul, the public op's validation and
dispatch, and the Triton kernels (forward and the gradients of images, weight, bias, class token and position
embedding) against a float64 oracle, on CPU through the interpreter (fp32, fp16) and on a GPU (bf16, fp16,
ViT-B/16, ViT-L/14, ViT-B/32 at 224).

The oracle is ``patch_embed_ref(..., upcast=True)`` on float64 copies of the inputs, so an fp32 kernel is held to
twice the error of PyTorch's own fp32 convolution (the scale-aware rule of tests/tolerances.py)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from sm90 import compile_for_sm90
from tolerances import assert_scaled_close

import vit_fast
from vit_fast import backends
from vit_fast.ops import patch_embed, patch_embed_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
kernels = pytest.importorskip("vit_fast.kernels.patch_embed")

needs_triton = pytest.mark.skipif("triton" in backends._UNAVAILABLE, reason=backends._UNAVAILABLE.get("triton", ""))

NAMES = ("images", "weight", "bias", "cls_token", "pos_embed")


def _inputs(b, c, h, w, p, e, *, cls=True, pos="1+N", bias=True, dtype=torch.float32, device=DEVICE):
    """Fresh random leaves for patch_embed: a dict of NAMES; pos is "1+N", "N" or None."""
    n = (h // p) * (w // p)
    k = c * p * p

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    return {
        "images": leaf(b, c, h, w),
        "weight": leaf(e, c, p, p, scale=k**-0.5),
        "bias": leaf(e) if bias else None,
        "cls_token": leaf(1, 1, e) if cls else None,
        "pos_embed": None if pos is None else leaf(1, n + (pos == "1+N"), e, scale=0.5),
    }


def _leaves(ins: dict, dtype=None) -> dict:
    return {
        k: None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)
        for k, t in ins.items()
    }


def _call(fn, ins: dict, **kw):
    return fn(ins["images"], ins["weight"], ins["bias"], cls_token=ins["cls_token"], pos_embed=ins["pos_embed"], **kw)


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


@pytest.fixture
def launches():
    """Wrap the launchers: proves the Triton kernels (not a fallback) produced what the test checks."""
    with (
        mock.patch.object(kernels, "patch_embed_fwd", wraps=kernels.patch_embed_fwd) as fwd,
        mock.patch.object(kernels, "patch_embed_bwd", wraps=kernels.patch_embed_bwd) as bwd,
        mock.patch.object(kernels, "_bwd_images", wraps=kernels._bwd_images) as bwd_images,
        mock.patch.object(kernels, "_bwd_weight", wraps=kernels._bwd_weight) as bwd_weight,
    ):
        yield {"fwd": fwd, "bwd": bwd, "bwd_images": bwd_images, "bwd_weight": bwd_weight}


def _check_against_oracle(ins: dict, *, dy=None, launches=None) -> torch.Tensor:
    """Triton forward and every gradient vs the float64 oracle (scale-aware rule)."""
    with vit_fast.set_backend("triton"):
        out = _call(patch_embed, ins)
    oracle_in = _leaves(ins, torch.float64)
    oracle = _call(patch_embed_ref, oracle_in, upcast=True)
    low_in = _leaves(ins)
    low = _call(patch_embed_ref, low_in)
    assert out.dtype == low.dtype and out.is_contiguous()
    assert_scaled_close(out, low, oracle, name="out")
    if launches is not None:
        assert launches["fwd"].call_count == 1
    if dy is None:
        dy = torch.randn(out.shape, device=out.device).to(out.dtype)
    got = _grads(out, ins, dy)
    want = _grads(oracle, oracle_in, dy.double())
    low_grads = _grads(low, low_in, dy)
    assert got.keys() == want.keys()
    for name in got:
        assert got[name].dtype == ins[name].dtype and got[name].shape == ins[name].shape, name
        assert_scaled_close(got[name], low_grads[name], want[name], name=f"d{name}")
    if launches is not None:
        assert launches["bwd"].call_count == 1
    return out


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


def _bad_input_cases():
    img = torch.randn(2, 3, 8, 8)
    w = torch.randn(6, 3, 4, 4)
    b = torch.randn(6)
    cls = torch.randn(1, 1, 6)
    return [
        ((img[0], w, b), {}, ValueError, "images must be 4-D"),
        (([1.0], w, b), {}, TypeError, "images must be a torch.Tensor"),
        ((img.long(), w, b), {}, TypeError, "images must be a floating-point"),
        ((img, w[0], b), {}, ValueError, "weight must be 4-D"),
        ((img, torch.randn(6, 1, 4, 4), b), {}, ValueError, "weight must have shape"),
        ((img[..., :6], w, b), {}, ValueError, "divisible by the patch size"),
        ((img, w, torch.randn(5)), {}, ValueError, "bias must have shape"),
        ((img, w, b.int()), {}, TypeError, "bias must be a floating-point"),
        ((img, w, b), {"cls_token": torch.randn(1, 6)}, ValueError, "cls_token must be 3-D"),
        ((img, w, b), {"cls_token": torch.randn(1, 1, 5)}, ValueError, "cls_token must have shape"),
        ((img, w, b), {"pos_embed": torch.randn(1, 5, 6)}, ValueError, "pos_embed must have shape"),
        ((img, w, b), {"cls_token": cls, "pos_embed": torch.randn(1, 6, 6)}, ValueError, "pos_embed must have shape"),
        ((img, w, b), {"pos_embed": torch.randn(2, 4, 6)}, ValueError, "pos_embed must have shape"),
        ((img, w, b.to("meta")), {}, ValueError, "one device"),
        ((img, w, b), {"cls_token": cls.to("meta")}, ValueError, "one device"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_input_cases())))
def test_bad_inputs_raise(case):
    args, kwargs, err, match = _bad_input_cases()[case]
    with pytest.raises(err, match=match):
        patch_embed(*args, **kwargs)


def test_pos_embed_covering_cls_needs_cls_token():
    img, w = torch.randn(1, 3, 8, 8), torch.randn(6, 3, 4, 4)
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(1, 4, 6\)"):
        patch_embed(img, w, None, pos_embed=torch.randn(1, 5, 6))


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_empty_batch_returns_empty_without_launch(backend, launches):
    ins = _inputs(0, 3, 8, 8, 4, 6)
    with vit_fast.set_backend(backend):
        out = _call(patch_embed, ins)
    assert out.shape == (0, 5, 6)
    assert launches["fwd"].call_count == 0


# ---- dispatch to the Triton backend ------------------------------------------------------------------------------


@needs_triton
def test_float64_triton_raises_auto_uses_reference(launches):
    ins = _leaves(_inputs(1, 3, 8, 8, 4, 6, dtype=torch.float64))
    with vit_fast.set_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="float64"):
        _call(patch_embed, ins)
    torch.testing.assert_close(_call(patch_embed, ins), _call(patch_embed_ref, ins))
    assert launches["fwd"].call_count == 0


@needs_triton
def test_mixed_conv_dtypes_rejected_with_reason(launches):
    ins = _inputs(1, 3, 8, 8, 4, 6)
    ins["weight"] = ins["weight"].detach().half()
    args = (ins["images"], ins["weight"], ins["bias"])
    why = backends.reasons("triton", "patch_embed", args, {"cls_token": None, "pos_embed": None})
    assert "weight dtype float16 differs from images dtype float32" in why
    with vit_fast.set_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="weight dtype"):
        patch_embed(*args)
    assert launches["fwd"].call_count == 0


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's bf16 tl.dot problem concerns CPU tensors only")
def test_bf16_rejected_under_interpreter(launches):
    ins = _leaves(_inputs(1, 3, 8, 8, 4, 6, dtype=torch.bfloat16))
    with vit_fast.set_backend("triton"), pytest.raises(backends.BackendUnavailableError, match="bfloat16 tl.dot"):
        _call(patch_embed, ins)
    assert _call(patch_embed, ins).dtype == torch.bfloat16  # auto: the reference
    assert launches["fwd"].call_count == 0


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


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_oracle(shape, dtype, launches):
    _check_against_oracle(_inputs(*shape, dtype=dtype), launches=launches)


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
def test_triton_optional_inputs(cls, pos, bias, launches):
    out = _check_against_oracle(_inputs(2, 3, 16, 24, 4, 20, cls=cls, pos=pos, bias=bias), launches=launches)
    assert out.shape == (2, 24 + cls, 20)


@needs_triton
def test_triton_strided_images_and_grads(launches):
    """channels_last and a cropped view as images; dY a stride-0 broadcast and a transposed tensor."""
    ins = _inputs(2, 3, 16, 16, 4, 32)
    ins["images"] = ins["images"].detach().to(memory_format=torch.channels_last).requires_grad_()
    assert not ins["images"].is_contiguous()
    _check_against_oracle(ins, dy=torch.randn(1, 1, 32, device=DEVICE).expand(2, 17, 32), launches=launches)
    _check_against_oracle(ins, dy=torch.randn(17, 2, 32, device=DEVICE).transpose(0, 1))
    ins["images"] = torch.randn(2, 4, 20, 18, device=DEVICE)[:, 1:, 2:18, 1:17].detach().requires_grad_()
    _check_against_oracle(ins)


@needs_triton
def test_triton_dweight_split_reduction(launches):
    """M split over several programs per weight tile, the last split partial, summed without atomics."""
    with mock.patch.object(kernels, "_SPLIT_ROWS", 64):
        _check_against_oracle(_inputs(3, 3, 32, 32, 4, 40), launches=launches)


@needs_triton
def test_triton_only_requested_gradients(launches):
    """Frozen images skip the dimages GEMM; a frozen weight skips the dweight GEMM."""
    ins = _inputs(2, 3, 16, 16, 4, 24)
    ins["images"].requires_grad_(False)
    with vit_fast.set_backend("triton"):
        _call(patch_embed, ins).sum().backward()
    assert launches["bwd_images"].call_count == 0 and launches["bwd_weight"].call_count == 1
    assert ins["images"].grad is None and ins["weight"].grad is not None and ins["pos_embed"].grad is not None
    ins = _leaves(ins)
    ins["weight"].requires_grad_(False)
    ins["images"].requires_grad_(True)
    with vit_fast.set_backend("triton"):
        _call(patch_embed, ins).sum().backward()
    assert launches["bwd_images"].call_count == 1 and launches["bwd_weight"].call_count == 1
    assert ins["weight"].grad is None and ins["images"].grad is not None and ins["cls_token"].grad is not None


@needs_triton
def test_triton_backward_is_deterministic():
    ins = _inputs(3, 3, 32, 32, 4, 40, dtype=torch.float16)
    dy = torch.randn(3, 65, 40, device=DEVICE, dtype=torch.float16)
    with vit_fast.set_backend("triton"), mock.patch.object(kernels, "_SPLIT_ROWS", 64):
        first = _grads(_call(patch_embed, ins), ins, dy)
        second = _grads(_call(patch_embed, ins), ins, dy)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@needs_triton
def test_triton_nan_rows_match_reference():
    ins = _leaves(_inputs(2, 3, 16, 16, 4, 24))
    ins["images"].requires_grad_(False)
    ins["images"][1, 2, 5, 9] = float("nan")  # patch (1, 2) of image 1: token 1 + 6
    with vit_fast.set_backend("triton"):
        out = _call(patch_embed, ins)
    ref = _call(patch_embed_ref, _leaves(ins, torch.float64))
    assert torch.isnan(ref[1, 7]).all() and int(torch.isnan(ref).any(-1).sum()) == 1
    assert_scaled_close(out, _call(patch_embed_ref, ins), ref)


@needs_triton
def test_triton_output_dtype_follows_reference_promotion(launches):
    """fp16 conv with fp32 class token and position embedding: the reference's additions promote to fp32."""
    ins = _inputs(2, 3, 16, 16, 4, 24, dtype=torch.float16)
    for name in ("cls_token", "pos_embed"):
        ins[name] = ins[name].detach().float().requires_grad_()
    out = _check_against_oracle(ins, launches=launches)
    assert out.dtype == torch.float32


@needs_triton
def test_triton_under_autocast_matches_reference_dtype(launches):
    """fp32 parameters under fp16 autocast: the conv runs in fp16, the fp32 additions return fp32."""
    ins = _inputs(2, 3, 16, 16, 4, 24)
    with torch.autocast(DEVICE, dtype=torch.float16):
        with vit_fast.set_backend("triton"):
            out = _call(patch_embed, ins)
        low = _call(patch_embed_ref, _leaves(ins))
    assert out.dtype == low.dtype == torch.float32
    assert_scaled_close(out, low, _call(patch_embed_ref, _leaves(ins, torch.float64)))
    assert launches["fwd"].call_args.args[0].dtype == torch.float16
    grads = _grads(out, ins, torch.randn_like(out))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())


@needs_triton
@pytest.mark.parametrize("cls, pos, bias", [(True, "1+N", True), (True, "N", False), (False, None, False)])
def test_opcheck_forward_and_backward(cls, pos, bias):
    ins = _inputs(2, 3, 8, 12, 4, 16, cls=cls, pos=pos, bias=bias)
    args = tuple(ins.values())
    torch.library.opcheck(torch.ops.vit_fast.patch_embed_fwd_triton, args)
    detached = tuple(None if t is None else t.detach() for t in args)
    out = torch.ops.vit_fast.patch_embed_fwd_triton(*detached)
    for flags in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(torch.ops.vit_fast.patch_embed_bwd_triton, (torch.randn_like(out), *detached, *flags))


@needs_triton
def test_compile_fullgraph_no_graph_break(launches):
    ins = _inputs(2, 3, 16, 16, 8, 32)

    def f(images, weight, bias, cls_token, pos_embed):
        return patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed) * 2

    with vit_fast.set_backend("triton"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = compiled(*ins.values())
        out.sum().backward()
    torch.testing.assert_close(out, f(*_leaves(ins).values()), atol=1e-5, rtol=1e-5)
    assert launches["fwd"].call_count >= 1 and launches["bwd"].call_count >= 1


# ---- GPU only: bf16, ViT sizes -----------------------------------------------------------------------------------

GPU_SHAPES = [
    (64, 3, 224, 224, 16, 768),
    (8, 3, 224, 224, 14, 1024),
    (16, 3, 224, 224, 32, 768),
    (4, 3, 384, 384, 16, 768),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_vit_sizes(shape, dtype, launches):
    _check_against_oracle(_inputs(*shape, dtype=dtype, device="cuda"), launches=launches)


@pytest.mark.cuda
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_cuda_fp32_follows_tf32_switch(tf32, launches):
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32  # F.conv2d's switch; the kernel follows it
    try:
        _check_against_oracle(_inputs(8, 3, 224, 224, 16, 768, device="cuda"), launches=launches)
    finally:
        torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.cuda
def test_cuda_autocast_bf16_model_path(launches):
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
    assert_scaled_close(out, low, oracle)
    dy = torch.randn_like(out)
    got, lo, want = _grads(out, ins, dy), _grads(low, low_in, dy), _grads(oracle, oracle_in, dy.double())
    for name in got:
        assert_scaled_close(got[name], lo[name], want[name], name=f"d{name}")


# ---- GPU code generation without a GPU ---------------------------------------------------------------------------

_COMPILE_SCRIPT = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vit_fast.kernels import patch_embed as k

every = sys.argv[1] == "all"
flag_sets = [(1, 1, 1, 1), (1, 1, 1, 0), (0, 0, 0, 0)]  # HAS_BIAS, HAS_CLS, HAS_POS, POS_SKIP
for dt in ("bf16", "fp16", "fp32") if every else ("bf16",):
    prec = "tf32" if dt == "fp32" else "ieee"
    ptrs = dict.fromkeys(("dweight_partial_ptr", "grad_ptr", "cls_ptr", "pos_ptr", "out_ptr"), "*fp32")
    names = ("HAS_BIAS", "HAS_CLS", "HAS_POS", "POS_SKIP")
    jobs = [(k._patch_embed_fwd_kernel, dict(zip(names, f))) for f in flag_sets]
    jobs += [(k._patch_embed_bwd_weight_kernel, {"HAS_CLS": 1}), (k._patch_embed_bwd_images_kernel, {"HAS_CLS": 1})]
    for kern, flags in jobs if every else [jobs[0], *jobs[3:]]:
        configs = kern.early_config_prune(kern.configs, {"M": 12544, "E": 768, "K": 768})
        for cfg in configs if every else configs[:1]:
            consts = {"PH": 16, "PW": 14, "DOT_PRECISION": prec, **flags, **cfg.kwargs}
            names = kern.fn.arg_names
            sig = {n: "constexpr" if n in consts else ptrs.get(n, f"*{dt}") if n.endswith("_ptr") else "i32"
                   for n in names}
            src = ASTSource(kern.fn, sig, {(names.index(n),): v for n, v in consts.items()})
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
print("compiled")
"""


@needs_triton
def test_kernels_compile_for_sm90():
    compile_for_sm90(_COMPILE_SCRIPT, "one")


@pytest.mark.slow
def test_every_config_compiles_for_sm90():
    compile_for_sm90(_COMPILE_SCRIPT, "all")
