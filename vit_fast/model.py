"""The Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words"), with timm's module and
parameter names so timm checkpoints load unchanged. Every hot-path computation goes through
``vit_fast.ops``: patch embedding, LayerNorm, attention, and the whole LayerNorm -> fc1 -> GELU -> fc2
(+ residual) branch are one call each; the backend that runs them is chosen in ``vit_fast.backends``."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from vit_fast import ops
from vit_fast.config import ViTConfig, get_config


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters) computed by :func:`vit_fast.ops.layer_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, eps=self.eps)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens; holds ``proj`` (an ``nn.Conv2d``, as timm)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.img_size = (cfg.grid_size[0] * _pair(cfg.patch_size)[0], cfg.grid_size[1] * _pair(cfg.patch_size)[1])
        self.patch_size = _pair(cfg.patch_size)
        self.grid_size = cfg.grid_size
        self.num_patches = cfg.num_patches
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(
        self, x: torch.Tensor, cls_token: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.dim() == 4 and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"images must be {self.img_size[0]}x{self.img_size[1]} for this model; got {tuple(x.shape)} "
                "(load weights into a model of the new size to resample the position embedding)"
            )
        # (B, C, H, W) -> (B, [1+]N, E)
        return ops.patch_embed(x, self.proj.weight, self.proj.bias, cls_token=cls_token, pos_embed=pos_embed)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.attn_drop = cfg.attn_drop_rate
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.proj_drop = nn.Dropout(cfg.proj_drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, E = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), strided views: no copy
        o = ops.attention(q, k, v, scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0)
        o = o.transpose(1, 2).reshape(B, N, E)  # (B, N, H*D); a view when o's memory is (B, N, H, D)
        return self.proj_drop(self.proj(o))


class Mlp(nn.Module):
    """Holds ``fc1`` and ``fc2``; the block computes norm2 -> fc1 -> GELU -> fc2 as one fused op."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden_dim)
        self.fc2 = nn.Linear(cfg.mlp_hidden_dim, cfg.embed_dim)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.proj_drop = cfg.proj_drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, E) -> (B, N, E)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        n, fc1, fc2 = self.norm2, self.mlp.fc1, self.mlp.fc2
        p = self.proj_drop if self.training else 0.0
        if isinstance(self.drop_path2, DropPath) and self.training:
            mlp = ops.layernorm_mlp(x, n.weight, n.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, eps=n.eps,
                                    dropout_p=p)
            return x + self.drop_path2(mlp)
        return ops.layernorm_mlp(x, n.weight, n.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, eps=n.eps,
                                 residual=x, dropout_p=p)


class VisionTransformer(nn.Module):
    """ViT for image classification, built from a :class:`ViTConfig`.

    ``forward(images (B, C, H, W)) -> logits (B, num_classes)`` (pooled features when ``num_classes=0``).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.embed_dim = self.num_features = cfg.embed_dim
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix_tokens + cfg.num_patches, cfg.embed_dim))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        # stochastic depth decay rule: linear from 0 to drop_path_rate over the blocks
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.Sequential(*[Block(cfg, drop_path=dpr[i]) for i in range(cfg.depth)])
        # timm: the final norm moves after pooling ("fc_norm") for average/max pooling.
        use_fc_norm = cfg.global_pool in ("avg", "max", "avgmax")
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.fc_norm = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's initialization: truncated normal(0.02) for Linear weights and the position embedding,
        zero biases, normal(1e-6) for the class token; the patch projection keeps PyTorch's Conv2d init."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters that take no weight decay besides norms and biases (timm's convention)."""
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of storing them."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialized head for ``num_classes`` classes (Identity for 0)."""
        self.num_classes = num_classes
        self.config = self.config.replace(num_classes=num_classes)
        p = next(self.parameters())
        self.head = nn.Identity()
        if num_classes:
            self.head = nn.Linear(self.embed_dim, num_classes, device=p.device, dtype=p.dtype)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, [1+]N, E) normalized tokens."""
        x = self.patch_embed(x, self.cls_token, self.pos_embed)  # (B, 1+N, E)
        x = self.pos_drop(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, [1+]N, E) -> (B, E) per ``global_pool`` (tokens unchanged for '')."""
        if self.global_pool == "token":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens :]  # (B, N, E)
        if self.global_pool == "avg":
            return patches.mean(dim=1)
        if self.global_pool == "max":
            return patches.amax(dim=1)
        if self.global_pool == "avgmax":
            return 0.5 * (patches.mean(dim=1) + patches.amax(dim=1))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, [1+]N, E) tokens -> (B, num_classes) logits, or the pooled (B, E) features with ``pre_logits``."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"params={n / 1e6:.2f}M"


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def create_model(name: str, *, checkpoint_path: str | None = None, **overrides: object) -> VisionTransformer:
    """Build the preset ``name`` (timm's model names; see :func:`vit_fast.list_models`).

    ``overrides`` are :class:`ViTConfig` fields (``num_classes=10``, ``img_size=384``, ``drop_path_rate=0.1``);
    ``checkpoint_path`` loads weights through :func:`vit_fast.load_checkpoint` (timm or Hugging Face layout,
    position embedding resampled to the model's grid).
    """
    model = VisionTransformer(get_config(name, **overrides))
    if checkpoint_path is not None:
        from vit_fast.weights import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["VisionTransformer", "Block", "Attention", "Mlp", "PatchEmbed", "LayerNorm", "create_model"]
