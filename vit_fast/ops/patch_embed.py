"""Patch embedding: non-overlapping P x P patches of an NCHW image projected to E channels, with the class
token prepended and the position embedding added, producing the token sequence (B, [1+]N, E)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.backends import HALF, Facts, Limits
from vit_fast.ops import _checks
from vit_fast.ops._checks import upcast_dtype
from vit_fast.ops._custom_op import KernelOp, register_backend, triton_kernels

_kernels = triton_kernels("patch_embed")  # None when the Triton kernels cannot load: the reason is recorded


def patch_embed_ref(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                    cls_token: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None,
                    upcast: bool = False) -> torch.Tensor:
    """Reference through ``F.conv2d`` (stride = kernel = patch), flatten, transpose, cat and add.

    A ``pos_embed`` of length N is added to the patch tokens before the class token is prepended; one of
    length 1+N covers the class token too (timm's default). ``upcast=True`` computes in float32.
    """
    if upcast:
        dt = upcast_dtype(images.dtype)
        images, weight = images.to(dt), weight.to(dt)
        bias, cls_token, pos_embed = (None if t is None else t.to(dt) for t in (bias, cls_token, pos_embed))
    x = F.conv2d(images, weight, bias, stride=weight.shape[-2:])  # (B, E, H/P, W/P)
    x = x.flatten(2).transpose(1, 2)  # (B, N, E)
    n = x.shape[1]
    if pos_embed is not None and pos_embed.shape[1] == n:
        x = x + pos_embed
        pos_embed = None
    if cls_token is not None:
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, 1+N, E)
    if pos_embed is not None:
        x = x + pos_embed
    return x


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


def _facts(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, **_: object) -> Facts:
    conv = _autocast_dtype(images.device) or images.dtype
    return Facts(gemm_dtype=conv, mismatch=tuple(_conv_dtype_reasons(images, weight, bias)))


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    def m(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dtype)

    # ViT-B/16 at 224: 196 patches + class token
    return (m(64, 3, 224, 224), m(768, 3, 16, 16), m(768)), {"cls_token": m(1, 1, 768), "pos_embed": m(1, 197, 768)}


def _bucket(images: torch.Tensor, weight: torch.Tensor, *args: object, **_: object) -> tuple[int, ...]:
    e, c, ph, pw = weight.shape
    patches = images.shape[0] * (images.shape[2] // ph) * (images.shape[3] // pw)
    return c, ph, pw, e, backends.size_bucket(patches)  # (C, P, P, E, B * patches)


backends.declare("patch_embed", patch_embed_ref, _facts, _example, _bucket)


# ---- the kernel contract ----------------------------------------------------------------------------------------
#
#   forward (images, weight, bias, cls_token, pos_embed) -> the (B, [1+]N, E) tokens in the reference's dtype
#   backward (grad_out, images, weight, bias, cls_token, pos_embed, images_grad, weight_grad)
#     -> (dimages, dweight, dbias, dcls_token, dpos_embed), absent or unrequested gradients as empty (0,) tensors

FWD_SCHEMA = "(Tensor images, Tensor weight, Tensor? bias, Tensor? cls_token, Tensor? pos_embed) -> Tensor"
BWD_SCHEMA = (
    "(Tensor grad_out, Tensor images, Tensor weight, Tensor? bias, Tensor? cls_token, Tensor? pos_embed, "
    "bool images_grad, bool weight_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

def _out_dtype(images: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.dtype:
    """The reference's result dtype: the conv's, promoted by the position embedding's addition."""
    return images.dtype if pos_embed is None else torch.promote_types(images.dtype, pos_embed.dtype)


def _flat(t: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(*shape).contiguous()


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs F.conv2d in on ``device``, or None when autocast is off there."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _conv_dtype_reasons(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> list[str]:
    """Outside autocast, weight and bias must have the images' dtype (autocast casts all three to its own)."""
    if _autocast_dtype(images.device) is not None:
        return []
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


def _public_for(fwd_op: Callable) -> Callable:
    """The public op's signature over a backend's forward op."""

    def run(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
            cls_token: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        dt = _autocast_dtype(images.device)
        if dt is not None:  # the reference's F.conv2d runs in the autocast dtype
            images, weight = images.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        return fwd_op(images, weight, bias, cls_token, pos_embed)

    return run


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


PATCH_EMBED = KernelOp(
    "patch_embed", FWD_SCHEMA, _fwd_fake, _public_for, BWD_SCHEMA, _bwd_fake, _setup_context, _backward_for
)

if _kernels is not None:

    def _triton_fwd(images, weight, bias, cls_token, pos_embed):
        e = weight.shape[0]
        return _kernels.patch_embed_fwd(
            images,
            weight.contiguous(),
            bias,
            _flat(cls_token, e),
            _flat(pos_embed, -1, e),
            _out_dtype(images, pos_embed),
        )


    def _triton_bwd(grad_out, images, weight, bias, cls_token, pos_embed, images_grad, weight_grad):
        e = weight.shape[0]
        dimages, dweight, dbias, dcls, dpos = _kernels.patch_embed_bwd(
            grad_out,
            images,
            weight.contiguous(),
            bias,
            _flat(cls_token, e),
            _flat(pos_embed, -1, e),
            images_grad,
            weight_grad,
        )
        return (
            dimages,
            dweight,
            dbias,
            dcls if cls_token is None else dcls.view(cls_token.shape),
            dpos if pos_embed is None else dpos.view(pos_embed.shape),
        )


    register_backend(PATCH_EMBED, "triton", Limits(devices=("cuda", "cpu"), auto_gemm_dtypes=HALF), fwd=_triton_fwd,
                     bwd=_triton_bwd)
register_backend(PATCH_EMBED, "cuda", Limits(gemm_dtypes=HALF))


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    cls_token: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
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
    return backends.dispatch("patch_embed", images, weight, bias, cls_token=cls_token, pos_embed=pos_embed)
