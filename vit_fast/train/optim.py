"""The optimizer and learning-rate schedule: AdamW without weight decay on norms, biases and embeddings (with
optional layer-wise learning-rate decay), linear warmup then cosine decay, stepped per step."""

from __future__ import annotations

import argparse

import torch

from vit_fast.model import VisionTransformer


def param_groups(model: VisionTransformer, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups: no decay for 1-d parameters (norms, biases) and ``model.no_weight_decay()``;
    with ``layer_decay < 1`` block i of D gets ``lr * layer_decay ** (D - i)`` (embeddings one step lower)."""
    depth = len(model.blocks)
    skip = model.no_weight_decay()
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        scale = layer_decay ** (depth + 1 - layer)
        decay = 0.0 if p.ndim <= 1 or name in skip else weight_decay
        group = groups.setdefault((scale, decay), {"params": [], "lr": lr * scale, "weight_decay": decay})
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(model: VisionTransformer, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with the recipe's learning rate, weight decay and betas."""
    return torch.optim.AdamW(param_groups(model, args.lr, args.weight_decay, args.layer_decay), lr=args.lr,
                             betas=(args.beta1, args.beta2), fused=device.type == "cuda")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    min_lr: float) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over ``warmup_steps`` then cosine decay to ``min_lr`` at ``total_steps``; step it per step."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warmup_steps = min(warmup_steps, total_steps - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1), eta_min=min_lr)
    if warmup_steps <= 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
