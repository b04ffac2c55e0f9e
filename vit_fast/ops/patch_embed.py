"""Patch embedding: non-overlapping P x P patches of an NCHW image projected to E channels, with the class
token prepended and the position embedding added, producing the token sequence (B, [1+]N, E)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.ops import _checks
from vit_fast.ops._checks import upcast_dtype


def patch_embed_ref(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    cls_token: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    upcast: bool = False,
) -> torch.Tensor:
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
            f"images height and width must be divisible by the patch size {ph}x{pw}; got images {_checks.describe(images)}"
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


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    def m(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=dtype)

    # ViT-B/16 at 224: 196 patches + class token
    return (m(64, 3, 224, 224), m(768, 3, 16, 16), m(768)), {"cls_token": m(1, 1, 768), "pos_embed": m(1, 197, 768)}


backends.declare("patch_embed", _example)
backends.register("patch_embed", "reference")(patch_embed_ref)


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
        (B, N, E), or (B, 1+N, E) with ``cls_token``.
    """
    _validate(images, weight, bias, cls_token, pos_embed)
    kwargs = {"cls_token": cls_token, "pos_embed": pos_embed}
    return backends.select("patch_embed", images, weight, bias, **kwargs)(images, weight, bias, **kwargs)
