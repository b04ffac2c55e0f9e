"""The Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words"), with timm's module and
parameter names so timm checkpoints load unchanged. Every hot-path computation goes through
``vit_fast.ops``: patch embedding, LayerNorm, attention, and the whole LayerNorm -> fc1 -> GELU -> fc2
(+ residual) branch are one call each; the backend that runs them is chosen in ``vit_fast.backends``.

Around the forward, the model speaks timm's model API: ``pretrained_cfg``, ``reset_classifier``,
``group_matcher`` (layer-wise LR decay), ``forward_intermediates`` / ``prune_intermediate_layers`` /
``feature_info`` (backbones), ``set_input_size``, ``dynamic_img_size`` / ``dynamic_img_pad`` (any image size, the
position embedding resampled per grid and cached: ``vit_fast.pos_embed``); and it traces with ``torch.fx``."""

from __future__ import annotations

import math
import re

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vit_fast.config import ViTConfig, _pair
from vit_fast.ops import attention_packed, layer_norm, layernorm_mlp, patch_embed
from vit_fast.pos_embed import cached_resample_pos_embed, clear_pos_embed_cache, grid_for, resample_pos_embed
from vit_fast.pretrained import config_pretrained_cfg

# torch.fx traces Python with Proxy tensors, but the ops validate and dispatch on real shapes, dtypes and devices:
# to FX each op is a leaf (torch.fx.wrap patches this module's global of that name while tracing), so a traced
# graph calls each op whole. (The repetition is torch.fx.wrap's: it takes one global name per call.)
torch.fx.wrap("patch_embed")
torch.fx.wrap("layer_norm")
torch.fx.wrap("attention_packed")
torch.fx.wrap("layernorm_mlp")


@torch.fx.wrap
def _checked_images(
    x: torch.Tensor, img_size: tuple[int, int], patch_size: tuple[int, int], dynamic: bool = False, pad: bool = False
) -> torch.Tensor:
    """``x`` after checking it is a batch of ``img_size`` images (any size whose grid the patches tile, with
    ``dynamic``), zero-padded at the right and bottom to a multiple of the patch size with ``pad`` (as timm).
    A leaf to FX: the shape tests and the pad amounts must be run on real shapes, not traced."""
    if x.dim() != 4:
        return x  # the op names the bad rank
    if not dynamic and tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(
            f"images must be {img_size[0]}x{img_size[1]} for this model; got {tuple(x.shape)} "
            "(model.set_input_size(img_size=...) or loading weights into a model of the new size resamples the "
            "position embedding; dynamic_img_size=True takes any size)"
        )
    h, w = x.shape[-2:]
    gh, gw = grid_for((h, w), patch_size, pad)  # raises for a size the patches do not tile
    if (gh * patch_size[0], gw * patch_size[1]) != (h, w):
        x = F.pad(x, (0, gw * patch_size[1] - w, 0, gh * patch_size[0] - h))  # (B, C, gh*P, gw*P)
    return x


@torch.fx.wrap
def _dynamic_pos_embed(
    x: torch.Tensor, pos_embed: torch.Tensor, old_grid: tuple[int, int], patch_size: tuple[int, int],
    num_prefix_tokens: int, pad: bool,
) -> torch.Tensor:
    """The position embedding for images ``x`` (B, C, H, W): ``pos_embed`` itself at its own grid, else resampled
    to the images' grid and cached (``vit_fast.pos_embed``). A leaf to FX: the grid is read from real shapes."""
    grid = grid_for(tuple(x.shape[-2:]), patch_size, pad)
    return cached_resample_pos_embed(pos_embed, grid, old_grid, num_prefix_tokens)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters) computed by :func:`vit_fast.ops.layer_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, eps=self.eps)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, E)
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)  # (B, 1, 1); fixed rank keeps it FX-traceable
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens; holds ``proj`` (an ``nn.Conv2d``, as timm)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_size = _pair(cfg.patch_size)
        self.dynamic_img_size = cfg.dynamic_img_size  # any image size (the model resamples pos_embed to its grid)
        self.dynamic_img_pad = cfg.dynamic_img_pad  # zero-pad images at the right/bottom to a patch multiple
        self.set_input_size(cfg.img_size)
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=self.patch_size, stride=self.patch_size,
                              bias=not cfg.pre_norm)

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        self.img_size = _pair(img_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self) -> tuple[int, int]:
        return self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The grid of an ``img_size`` image (rounded up when padded); plain arithmetic, so FX can trace it."""
        (h, w), (ph, pw) = img_size, self.patch_size
        if self.dynamic_img_pad:
            return -(-h // ph), -(-w // pw)
        return h // ph, w // pw

    def forward(
        self, x: torch.Tensor, cls_token: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = _checked_images(x, self.img_size, self.patch_size, self.dynamic_img_size, self.dynamic_img_pad)
        # (B, C, H, W) -> (B, [1+]N, E)
        return patch_embed(x, self.proj.weight, self.proj.bias, cls_token=cls_token, pos_embed=pos_embed)


class AttentionCore(nn.Module):
    """softmax(q k^T * scale) v of the packed projection, heads merged: (B, N, 3, H, D) -> (B, N, H * D). Holds no
    parameters; its own module so that quantization can swap it (for one that emits proj's e4m3 input)."""

    def __init__(self, scale: float, dropout_p: float = 0.0) -> None:
        super().__init__()
        self.scale, self.dropout_p = scale, dropout_p

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        B, N, _, H, D = qkv.shape
        # the packed entry point: its gradient is the qkv Linear's output gradient, written whole by the backward
        o = attention_packed(qkv, scale=self.scale, dropout_p=self.dropout_p if self.training else 0.0)
        return o.transpose(1, 2).reshape(B, N, H * D)  # a view when o's memory is (B, N, H, D)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, dropout_p={self.dropout_p}"


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.core = AttentionCore(self.scale, cfg.attn_drop_rate)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.proj_drop = nn.Dropout(cfg.proj_drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, N, 3 * E); x may be a quantized model's e4m3 rows
        B, N, _ = qkv.shape
        o = self.core(qkv.view(B, N, 3, self.num_heads, self.head_dim))  # (B, N, E)
        return self.proj_drop(self.proj(o))


class Mlp(nn.Module):
    """Holds ``fc1`` and ``fc2``; called with the block's norm, it computes norm -> fc1 -> GELU -> fc2 (+ the
    residual) as one fused op."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden_dim)
        self.fc2 = nn.Linear(cfg.mlp_hidden_dim, cfg.embed_dim)
        self.dropout_p = cfg.proj_drop_rate

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm, *, residual: torch.Tensor | None = None) -> torch.Tensor:
        return layernorm_mlp(x, norm.weight, norm.bias, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                             self.fc2.bias, eps=norm.eps, residual=residual,
                             dropout_p=self.dropout_p if self.training else 0.0)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, E) -> (B, N, E)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        if isinstance(self.drop_path2, DropPath) and self.training:  # the residual after the dropped branch
            return x + self.drop_path2(self.mlp(x, self.norm2))
        return self.mlp(x, self.norm2, residual=x)


def _take_indices(num_blocks: int, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
    """timm's index convention: None = every block, an int n = the last n, a sequence = those (negative from
    the end). Returns the absolute indices and the largest."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n index {indices} is out of range (1 to {num_blocks})")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = [num_blocks + i if i < 0 else i for i in indices]
        bad = [i for i in take if not 0 <= i < num_blocks]
        if bad or not take:
            raise ValueError(f"block indices {list(indices)} are out of range (0 to {num_blocks - 1})")
    return take, max(take)


class VisionTransformer(nn.Module):
    """ViT for image classification, built from a :class:`ViTConfig`.

    ``forward(images (B, C, H, W)) -> logits (B, num_classes)`` (pooled features when ``num_classes=0``, the
    (B, [prefix+]N, E) tokens when also ``global_pool=''``). ``self.config`` always describes the modules,
    also after ``reset_classifier``, ``set_input_size`` and ``prune_intermediate_layers``.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.global_pool = cfg.global_pool
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.num_reg_tokens = cfg.reg_tokens
        self.has_class_token = cfg.class_token
        self.no_embed_class = cfg.no_embed_class
        self.embed_dim = self.num_features = self.head_hidden_size = cfg.embed_dim
        self.grad_checkpointing = False
        self.pretrained_cfg = config_pretrained_cfg(cfg)  # the factory puts the preset's (tag's) config here

        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, cfg.embed_dim)) if cfg.reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.embed_len, cfg.embed_dim))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.norm_pre = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        # stochastic depth decay rule: linear from 0 to drop_path_rate over the blocks
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.Sequential(*[Block(cfg, drop_path=dpr[i]) for i in range(cfg.depth)])
        reduction = self.patch_embed.feat_ratio()[0]
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=cfg.embed_dim, reduction=reduction)
                             for i in range(cfg.depth)]
        # timm: the final norm moves after pooling ("fc_norm") for average/max pooling unless told otherwise.
        final = cfg.final_norm
        self.norm = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if final and not cfg.use_fc_norm else nn.Identity()
        self.fc_norm = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if final and cfg.use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    @property
    def default_cfg(self) -> dict:
        """timm's older name of ``pretrained_cfg``."""
        return self.pretrained_cfg

    def save_pretrained(self, save_directory: str) -> str:
        """Write config.json + model.safetensors in timm's hub format (see :mod:`vit_fast.hub`)."""
        from vit_fast.hub import save_pretrained

        return str(save_pretrained(self, save_directory))

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's initialization: truncated normal(0.02) for Linear weights and the position embedding,
        zero biases, normal(1e-6) for the class and register tokens; the patch projection keeps PyTorch's."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- timm's optimizer and training hooks -----------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Parameters that take no weight decay besides norms and biases (timm's convention)."""
        return {"pos_embed", "cls_token", "reg_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise LR decay, as timm's ViT: the embeddings (group 0), one group per block,
        then the final norm; parameters no pattern matches (fc_norm, head) go with the last group."""
        return {"stem": r"^(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)",
                "blocks": [(r"^blocks\.(\d+)", None), (r"^norm\.", (99999,))]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of storing them."""
        self.grad_checkpointing = enable

    # ---- head, pooling and input size ------------------------------------------------------------------------

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialized head for ``num_classes`` classes (Identity for 0), on the model's device and
        dtype and in its train/eval mode; ``global_pool`` (when given) changes the pooling, the norm stays put."""
        self.config = self.config.replace(num_classes=num_classes)
        if global_pool is not None:  # the norm's place was chosen by the old pooling: keep it explicitly
            self.config = self.config.replace(global_pool=global_pool, fc_norm=self.config.use_fc_norm)
        self.num_classes, self.global_pool = num_classes, self.config.global_pool
        p = next(self.parameters())
        self.head = nn.Identity()
        if num_classes:
            self.head = nn.Linear(self.embed_dim, num_classes, device=p.device, dtype=p.dtype)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.head.train(self.training)

    def set_input_size(self, img_size: int | tuple[int, int] | None = None,
                       patch_size: int | tuple[int, int] | None = None) -> None:
        """Take images of ``img_size`` from now on: the position embedding is resampled in place (bicubic, as a
        checkpoint load would), keeping its device, dtype and ``requires_grad``."""
        if patch_size is not None and _pair(patch_size) != self.patch_embed.patch_size:
            raise ValueError("set_input_size cannot change the patch size of vit_fast models (only img_size)")
        if img_size is None:
            return
        old_grid = self.patch_embed.grid_size
        self.config = self.config.replace(img_size=img_size)  # validates divisibility by the patch size
        self.patch_embed.set_input_size(img_size)
        if self.patch_embed.grid_size != old_grid:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            with torch.no_grad():
                pe = resample_pos_embed(self.pos_embed, self.patch_embed.grid_size, old_grid, prefix)
            clear_pos_embed_cache(self.pos_embed)  # tables resampled from the old grid go with it
            self.pos_embed = nn.Parameter(pe, requires_grad=self.pos_embed.requires_grad)

    # ---- forward ---------------------------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, prefix+N, E) tokens: [class, registers..., patches] + position embedding."""
        pos_embed = self.pos_embed
        if self.patch_embed.dynamic_img_size:  # resampled (and cached) for the images' grid, as timm resamples
            n_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            pos_embed = _dynamic_pos_embed(x, pos_embed, self.patch_embed.grid_size, self.patch_embed.patch_size,
                                           n_prefix, self.patch_embed.dynamic_img_pad)  # (1, [prefix+]N, E)
        if self.reg_token is None:  # one fused op: projection, class token and position embedding
            x = self.patch_embed(x, self.cls_token, pos_embed)  # (B, [1+]N, E)
        else:
            x = self.patch_embed(x, None, pos_embed if self.no_embed_class else None)  # (B, N, E)
            prefix = [self.reg_token.expand(x.shape[0], -1, -1)]
            if self.cls_token is not None:
                prefix.insert(0, self.cls_token.expand(x.shape[0], -1, -1))
            x = torch.cat(prefix + [x], dim=1)  # (B, prefix+N, E)
            if not self.no_embed_class:
                x = x + pos_embed
        return self.norm_pre(self.pos_drop(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, prefix+N, E) normalized tokens."""
        x = self._embed(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
    ) -> list | tuple[torch.Tensor, list] | dict:
        """The outputs of the blocks ``indices`` (timm's convention: None all, n the last n, a list those), as
        (B, E, h, w) maps (``output_fmt='NCHW'``) or (B, N, E) tokens (``'NLC'``), prefix tokens stripped (or
        returned beside them with ``return_prefix_tokens``), through the final norm with ``norm``.

        Returns ``(forward_features(x), intermediates)``, or the intermediates alone with ``intermediates_only``,
        or timm's dict (``image_features``, ``image_intermediates``[, ``image_intermediates_prefix``]).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC'; got {output_fmt!r}")
        take, last = _take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self._embed(x)
        blocks = self.blocks[: last + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        n = self.num_prefix_tokens
        prefix = [y[:, :n] for y in intermediates] if n else None  # each (B, prefix, E)
        intermediates = [y[:, n:] for y in intermediates]  # each (B, h*w, E)
        if output_fmt == "NCHW":
            h, w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what the blocks ``indices`` do not need: later blocks, the final norm (``prune_norm``), the head and
        its pooling (``prune_head``). Returns the absolute indices to pass to ``forward_intermediates``."""
        take, last = _take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        self.config = self.config.replace(depth=last + 1)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        self.config = self.config.replace(
            final_norm=not all(isinstance(m, nn.Identity) for m in (self.norm, self.fc_norm)),
            fc_norm=not isinstance(self.fc_norm, nn.Identity))
        return take

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """(B, prefix+N, E) -> (B, E) per ``global_pool`` (tokens unchanged for '')."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens :]  # (B, N, E)
        if pool_type == "avg":
            return patches.mean(dim=1)
        if pool_type == "max":
            return patches.amax(dim=1)
        if pool_type == "avgmax":
            return 0.5 * (patches.mean(dim=1) + patches.amax(dim=1))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, prefix+N, E) tokens -> (B, num_classes) logits, or the pooled (B, E) features with ``pre_logits``."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"params={n / 1e6:.2f}M"


def layer_ids(model: VisionTransformer) -> dict[str, int]:
    """Parameter name -> layer for layer-wise LR decay, read from ``model.group_matcher()`` the way timm's optimizer
    factory reads it (without needing timm): the embeddings 0, block i i + 1 with the final norm in the last block's
    layer, then the parameters no pattern matches (fc_norm, head) one layer above."""
    matcher = model.group_matcher()
    join_previous = 99999  # timm's suffix for "same layer as the group before" (the final norm)

    def key(name: str) -> tuple[float, ...]:
        if re.match(matcher["stem"], name):
            return (0,)
        for pattern, suffix in matcher["blocks"]:
            hit = re.match(pattern, name)
            if hit:
                return (1, *(int(g) for g in hit.groups()), *(suffix or ()))
        return (math.inf,)

    keys = {name: key(name) for name, _ in model.named_parameters()}
    rank, layer = {}, -1
    for k in sorted(set(keys.values())):
        if layer < 0 or k[-1] != join_previous:
            layer += 1
        rank[k] = layer
    return {name: rank[k] for name, k in keys.items()}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["VisionTransformer", "Block", "Attention", "AttentionCore", "Mlp", "PatchEmbed", "LayerNorm", "layer_ids",
           "resample_pos_embed"]
