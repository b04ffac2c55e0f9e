"""Patch embedding: non-overlapping P x P patches of an NCHW image projected to E channels, with the class
token prepended and the position embedding added, producing the token sequence (B, [1+]N, E)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.backends import HALF, Call, Facts, Limits
from vit_fast.ops import _checks
from vit_fast.ops._checks import upcast_dtype
from vit_fast.ops._inputs import BATCHES, DTYPES, meta, randn, widths
from vit_fast.ops.spec import Bench, Cases, Contract, OpSpec, declare, register_backend, triton_kernels

_kernels = triton_kernels("patch_embed")  # None when the Triton kernels cannot load: the reason is recorded


def patch_embed_ref(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    cls_token: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None, *,
                    upcast: bool = False) -> torch.Tensor:
    """Reference: the patch projection (``F.conv2d`` with stride = kernel = patch, or the same GEMM on the
    flattened patches, see :func:`_project`), then flatten, transpose, cat and add.

    A ``pos_embed`` of length N is added to the patch tokens before the class token is prepended; one of
    length 1+N covers the class token too (timm's default). ``upcast=True`` computes in float32.
    """
    if upcast:
        dt = upcast_dtype(images.dtype)
        images, weight = images.to(dt), weight.to(dt)
        bias, cls_token, pos_embed = (None if t is None else t.to(dt) for t in (bias, cls_token, pos_embed))
    x = _project(images, weight, bias)  # (B, N, E)
    n = x.shape[1]
    if pos_embed is not None and pos_embed.shape[1] == n:
        x = x + pos_embed
        pos_embed = None
    if cls_token is not None:
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, 1+N, E)
    if pos_embed is not None:
        x = x + pos_embed
    return x


def _project(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(B, C, H, W) images -> (B, N, E) patch tokens, ``images`` cut into the weight's P x P patches.

    On CPU, 16-bit convolutions (the images' dtype, or autocast's) run as one GEMM on the flattened patches:
    oneDNN's bf16 convolution with stride = kernel (its AMX brgemm path, torch 2.14) returns wrong values or NaN
    for images one patch wide. The GEMM is the same sum over (C, P, P), in the weight's layout. It is faster
    too: 4.7-5.0x the bf16 convolution at ViT-S/B shapes on an AVX2 EPYC (1 and 2 threads, patch copy included).
    fp32 and fp64 keep ``F.conv2d``, which is right there and within 0.9-1.2x of the GEMM on that CPU.
    """
    conv_dtype = _autocast_dtype(images.device) or images.dtype
    if images.device.type != "cpu" or conv_dtype not in (torch.float16, torch.bfloat16):
        return F.conv2d(images, weight, bias, stride=weight.shape[-2:]).flatten(2).transpose(1, 2)  # (B, N, E)
    b, c, h, w = images.shape
    e, _, ph, pw = weight.shape
    gh, gw = h // ph, w // pw
    images = images[..., : gh * ph, : gw * pw]  # a remainder the patches do not tile is dropped, as by conv2d
    patches = images.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, P, P)
    patches = patches.reshape(b, gh * gw, c * ph * pw)  # (B, N, C*P*P)
    return F.linear(patches, weight.reshape(e, c * ph * pw), bias)  # (B, N, E)


def _validate(images, weight, bias, cls_token, pos_embed) -> None:
    _checks.tensor("images", images, ndim=4)
    _checks.tensor("weight", weight, ndim=4)
    b, c, h, w = images.shape
    e, wc, ph, pw = weight.shape
    if wc != c:
        raise ValueError(
            f"weight must have shape (E, C, P, P) with C = {c} (the channels of images); got {_checks.describe(weight)}"
        )
    if h % ph or w % pw:
        raise ValueError(
            f"images height and width must be divisible by the patch size {ph}x{pw}; "
            f"got images {_checks.describe(images)}"
        )
    n = (h // ph) * (w // pw)
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        _checks.shape("bias", bias, (e,), "(E,)")
    if cls_token is not None:
        _checks.tensor("cls_token", cls_token, ndim=3)
        _checks.shape("cls_token", cls_token, (1, 1, e), "(1, 1, E)")
    if pos_embed is not None:
        _checks.tensor("pos_embed", pos_embed, ndim=3)
        lengths = (n, n + 1) if cls_token is not None else (n,)
        if pos_embed.shape[0] != 1 or pos_embed.shape[2] != e or pos_embed.shape[1] not in lengths:
            want = f"(1, {n}, {e}) or (1, {n + 1}, {e})" if cls_token is not None else f"(1, {n}, {e})"
            raise ValueError(
                f"pos_embed must have shape {want} for {h}x{w} images in {ph}x{pw} patches; "
                f"got {_checks.describe(pos_embed)}"
            )
    _checks.same_device(images=images, weight=weight, bias=bias, cls_token=cls_token, pos_embed=pos_embed)


def _call(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
          cls_token: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None) -> Call:
    dt = _autocast_dtype(images.device)
    if dt is not None:  # custom ops do not see autocast: the reference's projection runs in autocast's dtype
        images, weight = images.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    return Call((images, weight, bias, cls_token, pos_embed))


def _facts(call: Call) -> Facts:
    images, weight, bias = call.args[:3]
    return Facts(gemm_dtype=images.dtype, mismatch=tuple(_conv_dtype_reasons(images, weight, bias)))


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    # ViT-B/16 at 224: 196 patches + class token
    return ((meta(64, 3, 224, 224, dtype=dtype), meta(768, 3, 16, 16, dtype=dtype), meta(768, dtype=dtype)),
            {"cls_token": meta(1, 1, 768, dtype=dtype), "pos_embed": meta(1, 197, 768, dtype=dtype)})


def _bucket(call: Call) -> tuple[int, ...]:
    images, weight = call.args[:2]
    e, c, ph, pw = weight.shape
    patches = images.shape[0] * (images.shape[2] // ph) * (images.shape[3] // pw)
    return c, ph, pw, e, backends.size_bucket(patches)  # (C, P, P, E, B * patches)


# ---- the kernel contract ----------------------------------------------------------------------------------------
#
#   forward (images, weight, bias, cls_token, pos_embed) -> the (B, [1+]N, E) tokens in the reference's dtype
#   backward (grad_out, images, weight, bias, cls_token, pos_embed, images_grad, weight_grad)
#     -> (dimages, dweight, dbias, dcls_token, dpos_embed), absent or unrequested gradients as empty (0,) tensors

def _out_dtype(images: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.dtype:
    """The reference's result dtype: the conv's, promoted by the position embedding's addition."""
    return images.dtype if pos_embed is None else torch.promote_types(images.dtype, pos_embed.dtype)


def _flat(t: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(*shape).contiguous()


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs F.conv2d in on ``device``, or None when autocast is off there."""
    if _checks.autocast_on(device):
        return torch.get_autocast_dtype(device.type)
    return None


def _conv_dtype_reasons(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> list[str]:
    """Weight and bias must have the images' dtype (under autocast the call cast all three to its own)."""
    others = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    return [
        f"{name} dtype {str(t.dtype)[6:]} differs from images dtype {str(images.dtype)[6:]}"
        for name, t in others
        if t.dtype != images.dtype
    ]


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward_for(bwd_op: Callable) -> Callable:
    """The autograd rule for a backend's forward op, given its backward op (same signature in every backend):
    ``bwd_op(grad_out, images, weight, bias, cls_token, pos_embed, images_grad, weight_grad)
    -> (dimages, dweight, dbias, dcls_token, dpos_embed)``, absent gradients as empty tensors."""

    def backward(ctx, grad_out: torch.Tensor) -> tuple:
        images, weight, bias, cls_token, pos_embed = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = bwd_op(grad_out, images, weight, bias, cls_token, pos_embed, need[0], need[1])
        return tuple(g if wanted else None for g, wanted in zip(grads, need, strict=True))

    return backward


# The fakes take the schemas' arguments (register_fake calls them positionally).
def _fwd_fake(images, weight, bias, cls_token, pos_embed):
    """Fake of every backend's forward op: the (B, [1+]N, E) token sequence in the reference's dtype."""
    b, _, h, w = images.shape
    e, _, ph, pw = weight.shape
    tokens = (h // ph) * (w // pw) + int(cls_token is not None)  # a bool in a SymInt sum breaks torch 2.11
    return images.new_empty((b, tokens, e), dtype=_out_dtype(images, pos_embed))


def _bwd_fake(grad_out, images, weight, bias, cls_token, pos_embed, images_grad, weight_grad):
    """Fake of every backend's backward op: each gradient like its input, (0,) when absent or not asked for."""

    def like(t: torch.Tensor | None, wanted: bool = True) -> torch.Tensor:
        return t.new_empty(t.shape) if t is not None and wanted else grad_out.new_empty((0,))

    return like(images, images_grad), like(weight, weight_grad), like(bias), like(cls_token), like(pos_embed)


CONTRACT = Contract(
    "(Tensor images, Tensor weight, Tensor? bias, Tensor? cls_token, Tensor? pos_embed) -> Tensor", _fwd_fake,
    bwd_schema="(Tensor grad_out, Tensor images, Tensor weight, Tensor? bias, Tensor? cls_token, Tensor? pos_embed, "
               "bool images_grad, bool weight_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    bwd_fake=_bwd_fake, setup_context=_setup_context, backward=_backward_for)


def patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                cls_token: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """Embed non-overlapping patches, prepend the class token, add the position embedding.

    Args:
        images: (B, C, H, W); H and W divisible by the patch size.
        weight: (E, C, P, P), ``nn.Conv2d`` layout; bias: (E,) or None.
        cls_token: optional (1, 1, E), prepended to every sequence.
        pos_embed: optional (1, N, E) (patch tokens only) or (1, 1+N, E) (class token included),
            N = (H / P) * (W / P).

    Returns:
        (B, N, E), or (B, 1+N, E) with ``cls_token``. A NaN in a patch's pixels gives a NaN token, in every
        backend.
    """
    _validate(images, weight, bias, cls_token, pos_embed)
    return backends.dispatch("patch_embed", _call(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed))


def _triton_fwd(images, weight, bias, cls_token, pos_embed):
    e = weight.shape[0]
    return _kernels.patch_embed_fwd(images, weight.contiguous(), bias, _flat(cls_token, e), _flat(pos_embed, -1, e),
                                    _out_dtype(images, pos_embed))


def _triton_bwd(grad_out, images, weight, bias, cls_token, pos_embed, images_grad, weight_grad):
    e = weight.shape[0]
    dimages, dweight, dbias, dcls, dpos = _kernels.patch_embed_bwd(
        grad_out, images, weight.contiguous(), bias, _flat(cls_token, e), _flat(pos_embed, -1, e), images_grad,
        weight_grad)
    return (dimages, dweight, dbias, dcls if cls_token is None else dcls.view(cls_token.shape),
            dpos if pos_embed is None else dpos.view(pos_embed.shape))


# ---- cases ------------------------------------------------------------------------------------------------------

PATCH_SIZES = (2, 4, 7, 8, 14, 16)
LAYOUTS = ("contiguous", "channels_last", "cropped", "channels_sliced")
_NAMES = ("images", "weight", "bias", "cls_token", "pos_embed")


def _hw(dims: Mapping) -> tuple[int, int]:
    gh, gw = dims["grid"]
    return int(gh) * int(dims["P"]), int(gw) * int(dims["P"])


def _leaves(dims: Mapping, g: torch.Generator) -> dict[str, torch.Tensor]:
    b, c, p, e = (int(dims[k]) for k in ("B", "C", "P", "E"))
    h, w = _hw(dims)
    image = {"contiguous": (b, c, h, w), "channels_last": (b, h, w, c), "cropped": (b, c, h + 3, w + 5),
             "channels_sliced": (b, 2 * c, h, w)}[dims.get("layout", "contiguous")]
    leaves = {"images": randn(g, *image), "weight": randn(g, e, c, p, p, std=(c * p * p) ** -0.5)}
    if dims.get("bias", True):
        leaves["bias"] = randn(g, e, std=0.5)
    if dims.get("cls_token", False):
        leaves["cls_token"] = randn(g, 1, 1, e)
    if dims.get("pos_embed") is not None:
        leaves["pos_embed"] = randn(g, 1, int(dims["pos_embed"]), e, std=0.5)
    return leaves


def _view(dims: Mapping, t: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    images = t["images"]
    h, w = _hw(dims)
    layout = dims.get("layout", "contiguous")
    if layout == "channels_last":
        images = images.permute(0, 3, 1, 2)  # (B, C, H, W) over NHWC memory
    elif layout == "cropped":
        images = images[..., 1 : h + 1, 2 : w + 2]
    elif layout == "channels_sliced":
        images = images[:, ::2]
    return (images, t["weight"], t.get("bias")), {"cls_token": t.get("cls_token"), "pos_embed": t.get("pos_embed")}


def _oracle(dims: Mapping, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """By hand: patches by reshape and permute, one matmul, then the class token and the position
    embedding (of N tokens, added before the class token; of 1 + N, after)."""
    (images, weight, bias), kw = _view(dims, t)
    b, c, h, w = images.shape
    e, _, ph, pw = weight.shape
    patches = images.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, P, P)
    x = patches.reshape(b, -1, c * ph * pw) @ weight.reshape(e, -1).t()  # (B, N, E)
    if bias is not None:
        x = x + bias
    cls, pos = kw["cls_token"], kw["pos_embed"]
    if pos is not None and pos.shape[1] == x.shape[1]:
        x, pos = x + pos, None
    if cls is not None:
        x = torch.cat([cls.expand(b, 1, e), x], dim=1)  # (B, 1+N, E)
    return x if pos is None else x + pos


def _nan(leaves: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A pixel of patch (1, 2) of image 1 (4 x 4 patches): token 1 + 1 * 4 + 2 after the class token."""
    images = leaves["images"]
    images[1, 2, 5, 9] = float("nan")
    n = (images.shape[2] // 4) * (images.shape[3] // 4)
    mask = torch.zeros(images.shape[0], 1 + n, 1, dtype=torch.bool, device=images.device)
    mask[1, 7] = True
    return mask


def _bad() -> list:
    img, w, b = torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4), torch.randn(6)
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
        # a position embedding covering a class token needs the class token
        ((img[:1], w, None), {"pos_embed": torch.randn(1, 5, 6)}, ValueError, r"pos_embed must have shape \(1, 4, 6\)"),
    ]


# 64 x 64 x 32 tiles of each of the three GEMMs (forward, dweight, dimages) one example may walk
_TILES = {"reference": 400, "interpreter": 12, "interpreter_slow": 300}


def _strategy(budget: str):
    from hypothesis import strategies as st

    tiles = _TILES[budget]

    @st.composite
    def draw(d) -> tuple[torch.dtype, dict]:
        p = d(st.sampled_from(PATCH_SIZES))
        c = d(st.integers(1, max(1, min(4, tiles * 32 // (p * p)))))
        k_tiles = math.ceil(c * p * p / 32)
        e = d(widths(min(192, 64 * max(1, tiles // k_tiles))))
        b = d(st.sampled_from(BATCHES))
        m_tiles = max(1, tiles // (k_tiles * math.ceil(e / 64)))
        tokens = max(1, min(600, 64 * m_tiles // max(b, 1)))
        gh = d(st.integers(1, min(tokens, 40)))
        gw = d(st.integers(1, max(1, min(tokens // gh, 40))))  # independent sides: mostly non-square grids
        cls, n = d(st.booleans()), gh * gw
        dims = {"B": b, "C": c, "P": p, "grid": (gh, gw), "E": e, "layout": d(st.sampled_from(LAYOUTS)),
                "bias": d(st.booleans()), "cls_token": cls,
                "pos_embed": d(st.sampled_from((None, n, n + 1) if cls else (None, n)))}
        return d(st.sampled_from(DTYPES)), dims

    return draw()


def _grads(dims: Mapping) -> tuple[str, ...]:
    present = (dims.get("images_grad", True), True, dims.get("bias", True), dims.get("cls_token", False),
               dims.get("pos_embed") is not None)
    return tuple(n for n, p in zip(_NAMES, present, strict=True) if p)


def _patches(dims: Mapping) -> int:
    gh, gw = dims["grid"]
    return int(gh) * int(gw)


def _eager(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, cls_token: torch.Tensor,
           pos_embed: torch.Tensor) -> torch.Tensor:
    """What timm does: conv, flatten, transpose, cat the class token, add the position embedding."""
    x = F.conv2d(images, weight, bias, stride=weight.shape[-2:]).flatten(2).transpose(1, 2)  # (B, N, E)
    return torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_embed  # (B, 1+N, E)


# The benchmark's shapes are a model's: B square images of img pixels and in_chans channels in P x P patches, E wide.


def _bench_dims(shape: Mapping) -> dict:
    grid = int(shape["img"]) // int(shape["P"])
    return {"B": shape["B"], "C": shape["in_chans"], "P": shape["P"], "E": shape["E"], "grid": (grid, grid),
            "cls_token": True, "pos_embed": grid * grid + 1}


def _flops(shape: Mapping, mode: str) -> int:
    # a GEMM of (B * N) x (C * P * P) x E; the backward computes the weight gradient only
    n = (int(shape["img"]) // int(shape["P"])) ** 2
    fwd = 2 * int(shape["B"]) * n * int(shape["in_chans"]) * int(shape["P"]) ** 2 * int(shape["E"])
    return fwd if mode == "fwd" else 2 * fwd


def _bytes(shape: Mapping, mode: str, elem: int) -> int:
    # forward reads images, weight, bias, class token, position embedding and writes the tokens; the backward
    # reads dout and the images and writes the four parameter gradients.
    b, c, img, p, e = (int(shape[k]) for k in ("B", "in_chans", "img", "P", "E"))
    n1 = (img // p) ** 2 + 1
    images, weight = b * c * img * img, e * c * p * p
    params = weight + 2 * e + n1 * e
    fwd = (images + params + b * n1 * e) * elem
    return fwd if mode == "fwd" else fwd + (b * n1 * e + images + params) * elem


CASES = Cases(
    leaves=_leaves, view=_view, oracle=_oracle, grads=_grads,
    reduction=lambda dims: max(int(dims["C"]) * int(dims["P"]) ** 2, int(dims["E"]), int(dims["B"]) * _patches(dims)),
    small={"B": 2, "C": 3, "P": 4, "grid": (4, 4), "E": 24, "cls_token": True, "pos_embed": 17},
    empty=({"B": 0, "C": 3, "P": 4, "grid": (2, 2), "E": 6, "cls_token": True, "pos_embed": 5},),
    deterministic={"B": 3, "C": 3, "P": 4, "grid": (8, 8), "E": 40, "cls_token": True, "pos_embed": 65},
    layouts=LAYOUTS, nan=(("images", _nan),),
    requested=((("weight", "bias", "cls_token", "pos_embed"), True), (("images", "bias", "cls_token"), True)),
    bad=_bad, strategy=_strategy,
    examples=((torch.float32, {"B": 0, "C": 3, "P": 16, "grid": (2, 3), "E": 40, "cls_token": True, "pos_embed": 7}),
              (torch.float16, {"B": 0, "C": 3, "P": 16, "grid": (2, 3), "E": 40, "cls_token": True, "pos_embed": 7}),
              (torch.float32, {"B": 2, "C": 2, "P": 14, "grid": (2, 3), "E": 40, "layout": "channels_last",
                               "cls_token": True, "pos_embed": 7}),
              # one patch wide, where oneDNN's AMX bf16 convolution is wrong (the yardstick came out 44-59 off,
              # and NaN for C = 3)
              (torch.bfloat16, {"B": 1, "C": 1, "P": 14, "grid": (19, 1), "E": 35}),
              (torch.bfloat16, {"B": 1, "C": 3, "P": 14, "grid": (19, 1), "E": 35, "cls_token": True,
                                "pos_embed": 20})),
)
BENCH = Bench(
    "TFLOP/s", ("B", "img", "P", "E"),
    (({"B": 256, "in_chans": 3, "img": 224, "P": 16, "E": 768},),
     ({"B": 8, "in_chans": 3, "img": 32, "P": 4, "E": 192}, {"B": 2, "in_chans": 3, "img": 224, "P": 16, "E": 192})),
    model_shape=lambda d: {"in_chans": d["in_chans"], "img": d["img"], "P": d["P"], "E": d["C"]},
    flops=_flops, bytes=_bytes, baselines=lambda: [("eager", _eager, contextlib.nullcontext)],
    compiled=("compiled", _eager), tokens=lambda s: (int(s["img"]) // int(s["P"])) ** 2 + 1,
    model_dims={"images_grad": False}, to_dims=_bench_dims,  # the model's images need no gradient
    gpu_check=({"B": 2, "in_chans": 3, "img": 224, "P": 16, "E": 768}, {"B": 2, "in_chans": 3, "img": 56, "P": 14,
                                                                         "E": 80}))

PATCH_EMBED = declare(OpSpec("patch_embed", patch_embed, patch_embed_ref, _call, _facts, _bucket, _example, CONTRACT,
                             CASES, BENCH))

if _kernels is not None:
    register_backend(PATCH_EMBED, "triton", Limits(devices=("cuda", "cpu"), auto_gemm_dtypes=HALF), fwd=_triton_fwd,
                     bwd=_triton_bwd)
register_backend(PATCH_EMBED, "cuda", Limits(gemm_dtypes=HALF))
