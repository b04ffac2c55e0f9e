"""The optimizer and learning-rate schedule: AdamW without weight decay on norms, biases and the model's
``no_weight_decay()`` parameters (optionally with layer-wise learning-rate decay), linear warmup then cosine
decay, stepped per step. The groups are timm's (``timm.optim.param_groups_weight_decay`` and
``param_groups_layer_decay``), so a vit_fast ViT and a timm CNN take one code path, and the groups are those
``timm.optim.create_optimizer_v2(model, weight_decay=..., layer_decay=...)`` builds."""

from __future__ import annotations

import argparse

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups: no decay for 1-d parameters (norms, biases) and ``model.no_weight_decay()``;
    with ``layer_decay < 1`` the layers of ``model.group_matcher()`` (a ViT: embeddings, block 1..D, final
    norm and head) get ``lr * layer_decay ** (last - layer)``, each group's ``lr`` set from timm's
    ``lr_scale`` because torch's optimizers and schedulers read ``lr``, not ``lr_scale``."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay  # timm loads only when training

    skip = getattr(model, "no_weight_decay", lambda: set())()
    if layer_decay >= 1.0:
        # timm's two groups (no decay, decay): what create_optimizer_v2 builds without layer decay
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip)
    else:
        if not hasattr(model, "group_matcher"):
            # timm would fall back to guessing layers by parameter order; a silent guess is worse than an error
            raise ValueError(f"--layer-decay: {type(model).__name__} has no group_matcher() to tell its layers")
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                          layer_decay=layer_decay)
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return groups


def build_optimizer(model: nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
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
