"""ViTConfig: the architecture of a Vision Transformer, with timm's argument names, and named presets."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

POOLS = ("token", "avg", "max", "avgmax", "")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass
class ViTConfig:
    """A ViT's architecture and regularization, under timm ``VisionTransformer``'s argument names.

    Derived fields (``grid_size``, ``num_patches``, ``num_prefix_tokens``, ``embed_len``, ``use_fc_norm``,
    ``head_dim``, ``mlp_hidden_dim``) are filled in by ``__post_init__`` and are not constructor arguments.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    reg_tokens: int = 0  # register tokens after the class token (Darcet et al., "Vision Transformers Need Registers")
    no_embed_class: bool = False  # the position embedding covers the patches only, not the prefix tokens
    pre_norm: bool = False  # a LayerNorm before the blocks, and no patch-projection bias (CLIP's layout)
    final_norm: bool = True
    fc_norm: bool | None = None  # final norm after pooling; None: on for the avg/max pools (timm's default)
    drop_rate: float = 0.0  # before the head
    pos_drop_rate: float = 0.0  # after the position embedding
    proj_drop_rate: float = 0.0  # after attn.proj and inside the MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over the blocks
    norm_eps: float = 1e-6  # timm's; Hugging Face checkpoints use 1e-12
    dynamic_img_size: bool = False  # any image size: pos_embed is resampled (and cached) per patch grid
    dynamic_img_pad: bool = False  # zero-pad images at the right/bottom to a multiple of the patch size

    grid_size: tuple[int, int] = field(init=False)
    num_patches: int = field(init=False)
    num_prefix_tokens: int = field(init=False)
    embed_len: int = field(init=False)  # rows of pos_embed
    use_fc_norm: bool = field(init=False)
    head_dim: int = field(init=False)
    mlp_hidden_dim: int = field(init=False)

    def __post_init__(self) -> None:
        img, patch = _pair(self.img_size), _pair(self.patch_size)
        # Padded dynamic models take any size, their own too (timm's grid: rounded down, as pos_embed is built).
        padded = self.dynamic_img_size and self.dynamic_img_pad
        if (img[0] % patch[0] or img[1] % patch[1]) and not padded:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size} (or the "
                             "model dynamic_img_size=True with dynamic_img_pad=True)")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if self.global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}; got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool 'token' needs class_token=True")
        for name in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}")
        if self.num_classes < 0 or self.depth < 1 or self.in_chans < 1 or self.reg_tokens < 0:
            raise ValueError("num_classes and reg_tokens must be >= 0, depth and in_chans >= 1")
        self.grid_size = (img[0] // patch[0], img[1] // patch[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens = int(self.class_token) + self.reg_tokens
        self.embed_len = self.num_patches + (0 if self.no_embed_class else self.num_prefix_tokens)
        self.use_fc_norm = self.global_pool in ("avg", "max", "avgmax") if self.fc_norm is None else self.fc_norm
        self.head_dim = self.embed_dim // self.num_heads
        self.mlp_hidden_dim = int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        """The constructor arguments (no derived fields): ``ViTConfig(**cfg.to_dict()) == cfg``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def replace(self, **overrides: object) -> ViTConfig:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self) if f.init})
        if unknown:
            raise TypeError(f"unknown ViTConfig field(s) {unknown}; fields: {sorted(self.to_dict())}")
        return ViTConfig(**{**self.to_dict(), **overrides})


def _vit(embed_dim: int, depth: int, num_heads: int, patch_size: int, img_size: int, **kw: object) -> ViTConfig:
    return ViTConfig(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                     num_heads=num_heads, **kw)


_SIZES = {  # (embed_dim, depth, num_heads), as in the ViT paper and timm
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}

PRESETS: dict[str, ViTConfig] = {
    # timm's names and architectures (ImageNet heads of 1000 classes, as timm builds them by default)
    **{
        f"vit_{size}_patch{p}_{img}": _vit(*_SIZES[size], patch_size=p, img_size=img)
        for size, p, img in [
            ("tiny", 16, 224), ("tiny", 16, 384),
            ("small", 16, 224), ("small", 16, 384), ("small", 32, 224), ("small", 32, 384),
            ("base", 8, 224), ("base", 16, 224), ("base", 16, 384), ("base", 32, 224), ("base", 32, 384),
            ("large", 16, 224), ("large", 16, 384), ("large", 32, 384),
        ]
    },
    # timm's default weights for ViT-H/14 are ImageNet-21k features: no classifier head.
    "vit_huge_patch14_224": _vit(*_SIZES["huge"], patch_size=14, img_size=224, num_classes=0),
    # 32x32 images (CIFAR-10/100) in 4x4 patches: 64 tokens + class token.
    "vit_tiny_patch4_32": _vit(192, 9, 3, patch_size=4, img_size=32, num_classes=100, mlp_ratio=2.0),
    "vit_small_patch4_32": _vit(384, 9, 12, patch_size=4, img_size=32, num_classes=100, mlp_ratio=2.0),
    # 8x8 grayscale digits (scikit-learn's built-in set) in 2x2 patches: 16 tokens + class token.
    "vit_nano_patch2_8": _vit(64, 4, 4, patch_size=2, img_size=8, in_chans=1, num_classes=10, mlp_ratio=2.0),
}


def list_models(pattern: str = "") -> list[str]:
    """Preset names, sorted, optionally those containing ``pattern`` (``fnmatch`` wildcards allowed)."""
    import fnmatch

    names = sorted(PRESETS)
    if not pattern:
        return names
    pat = pattern if any(ch in pattern for ch in "*?[") else f"*{pattern}*"
    return [n for n in names if fnmatch.fnmatch(n, pat)]


def get_config(name: str, **overrides: object) -> ViTConfig:
    """The preset ``name`` with config fields overridden; an unknown name lists the closest known ones."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=5, cutoff=0.5) or list_models()[:5]
        raise ValueError(f"unknown model {name!r}; closest known: {', '.join(close)} (see vit_fast.list_models())")
    return PRESETS[name].replace(**overrides)
