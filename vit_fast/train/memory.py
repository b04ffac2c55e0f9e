"""Memory per process: what DDP and FSDP keep on each device, estimated from parameter counts, and measured.

Training with AdamW in fp32 keeps, per parameter, its weight (4 bytes), its gradient (4) and two moments (8):
16 bytes. DDP keeps all of it in every process, plus gradient buckets (4 bytes, the all-reduce's copy) and, under
16-bit autocast, a 16-bit copy of each weight it casts. FSDP keeps a 1/N shard of the 16 bytes, plus, for the
step's duration, the units it has gathered: the root's own parameters (embeddings, final norm, head), the block
computing and the one prefetched, in the compute dtype, and one block's unsharded gradients before they are
reduce-scattered. Activations come on top; they grow with the per-GPU batch and shrink with
``--grad-checkpointing``. :func:`estimate_memory` is the arithmetic; the trainer logs each process's live state
bytes and peak memory beside it (a ``"memory"`` line of metrics.jsonl), and ``vit-fast train --dry-run``
prints it without training.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource

import torch
from torch import nn

GIB = 1 << 30
TABLE_MODELS: tuple[str, ...] = ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224")
TABLE_GPUS: tuple[int, ...] = (1, 8, 64)
_ADAMW_BYTES = 8  # exp_avg and exp_avg_sq in fp32


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process keeps on its device: weights, gradients and optimizer states (all fp32), and what a
    step holds besides (DDP's buckets and autocast copies, FSDP's gathered units); activations not included."""

    strategy: str
    world_size: int
    params: int
    weights: int
    grads: int
    optimizer: int
    transient: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.transient

    def lines(self) -> list[str]:
        share = "" if self.strategy == "ddp" else f", a 1/{self.world_size} shard"
        rows = [("weights", self.weights, f"fp32{share}"), ("gradients", self.grads, f"fp32{share}"),
                ("AdamW states", self.optimizer, f"2 x fp32{share}"),
                ("during a step", self.transient,
                 "DDP buckets, autocast copies" if self.strategy == "ddp" else "gathered root and blocks"),
                ("total", self.total, "before activations")]
        return [f"  {name:<14}{size / GIB:9.3f} GiB  ({what})" for name, size, what in rows]


def estimate_memory(params: int, *, strategy: str, world_size: int, block_params: int = 0, root_params: int = 0,
                    compute_bytes: int = 4, shard_params: int | None = None, offload: bool = False) -> MemoryEstimate:
    """Per-process bytes for a model of ``params`` parameters (blocks of ``block_params``, the rest
    ``root_params``) trained with AdamW under ``strategy`` over ``world_size`` processes, computing in
    ``compute_bytes``-byte floats (2 under bf16/fp16, 4 in fp32). ``shard_params`` is the size of one process's
    shard (FSDP pads each parameter's first dimension to a multiple of the process count; default
    ``ceil(params / world_size)``). With ``offload`` FSDP keeps the shards in host memory instead."""
    if strategy == "ddp":
        buckets = 4 * params if world_size > 1 else 0
        casts = compute_bytes * params if compute_bytes < 4 else 0
        return MemoryEstimate(strategy, world_size, params, 4 * params, 4 * params, _ADAMW_BYTES * params,
                              buckets + casts)
    if strategy != "fsdp":
        raise ValueError(f"strategy must be ddp or fsdp; got {strategy!r}")
    shard = math.ceil(params / world_size) if shard_params is None else shard_params
    on_device = 0 if offload else shard
    gathered = compute_bytes * (root_params + 2 * block_params)  # root + the block computing + the prefetched one
    unsharded_grads = compute_bytes * block_params + (4 * block_params if compute_bytes < 4 else 0)
    return MemoryEstimate(strategy, world_size, params, 4 * on_device, 4 * on_device, _ADAMW_BYTES * on_device,
                          gathered + unsharded_grads)


def estimate_for_model(model: nn.Module, *, strategy: str, world_size: int, compute_bytes: int = 4,
                       offload: bool = False) -> MemoryEstimate:
    """:func:`estimate_memory` for ``model`` (unsharded; a meta-device model will do), from its parameters'
    shapes: FSDP's shards, its units (``model.blocks``) and the root's own parameters."""
    params = sum(p.numel() for p in model.parameters())
    blocks = list(getattr(model, "blocks", ()))
    block_params = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    root_params = params - sum(sum(p.numel() for p in b.parameters()) for b in blocks)
    shard = sum(math.ceil(p.shape[0] / world_size) * (p.numel() // p.shape[0]) if p.dim() else p.numel()
                for p in model.parameters())
    return estimate_memory(params, strategy=strategy, world_size=world_size, block_params=block_params,
                           root_params=root_params, compute_bytes=compute_bytes, shard_params=shard, offload=offload)


def memory_table(models: tuple[str, ...] = TABLE_MODELS, gpus: tuple[int, ...] = TABLE_GPUS,
                 compute_bytes: int = 2) -> str:
    """The README's markdown table: GiB per GPU before activations, per preset x strategy x GPU count."""
    import vit_fast

    head = "| model | parameters | strategy | " + " | ".join(f"{n} GPU{'s' * (n > 1)}" for n in gpus) + " |"
    rows = [head, "|" + "---|" * (3 + len(gpus))]
    for name in models:
        with torch.device("meta"):
            model = vit_fast.create_model(name)
        params = sum(p.numel() for p in model.parameters())
        for strategy in ("ddp", "fsdp"):
            cells = [estimate_for_model(model, strategy=strategy, world_size=n, compute_bytes=compute_bytes).total
                     for n in gpus]
            rows.append(f"| `{name}` | {params / 1e6:.1f} M | {strategy.upper()} | "
                        + " | ".join(f"{c / GIB:.2f} GiB" for c in cells) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- measured


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This process's live weights, gradients and optimizer states, in bytes (its shards under FSDP)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    def size(t: torch.Tensor | None) -> int:
        return 0 if t is None else local(t).numel() * t.element_size()

    params = list(model.parameters())
    optim = sum(size(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"weights": sum(map(size, params)), "grads": sum(size(p.grad) for p in params), "optimizer": optim}


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(device: torch.device, baseline: int) -> tuple[int, str]:
    """``(bytes, how)``: the device's peak allocation on GPU; on CPU the growth of the process's peak resident
    memory over ``baseline`` (its resident memory before the run built anything)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline, "peak RSS growth"


# -------------------------------------------------------------------------------------------------- plan


def describe_plan(args: argparse.Namespace) -> str:
    """``vit-fast train --dry-run``: the strategy, process count and the memory estimate per process for
    ``args`` (resolved), from a model built on the meta device; nothing is loaded or trained."""
    from vit_fast.train import data
    from vit_fast.train.distributed import device_kind, env_world_size
    from vit_fast.train.models import build_model, default_img_size
    from vit_fast.train.recipes import parse_overrides, resolve_precision

    kind = device_kind(args.device)
    world = env_world_size()
    info = data.dataset_info(args.dataset, args.data_dir)
    img_size = args.img_size or info.img_size or default_img_size(args.model)
    with torch.device("meta"):
        model = build_model(args.model, num_classes=info.num_classes, in_chans=info.in_chans, img_size=img_size,
                            drop_path=args.drop_path, overrides=parse_overrides(args.override))
    if kind == "cuda" and not torch.cuda.is_available():
        precision = "bf16 (assumed: no GPU visible)" if args.precision == "auto" else args.precision
    else:
        precision = resolve_precision(args.precision, torch.device(kind))
    compute_bytes = 2 if precision.startswith(("bf16", "fp16")) else 4
    est = estimate_for_model(model, strategy=args.strategy, world_size=world, compute_bytes=compute_bytes,
                             offload=args.cpu_offload)
    blocks = len(getattr(model, "blocks", ()))
    lines = [f"plan: {args.model} ({est.params / 1e6:.2f}M parameters, {blocks} blocks) at {img_size}px on "
             f"{args.dataset}; strategy {args.strategy} over {world} process{'es' * (world > 1)} on {kind}; "
             f"precision {precision}; batch {args.batch_size} ({args.batch_size // max(world, 1)} per process)",
             "estimated memory per process:", *est.lines()]
    if args.strategy == "fsdp" and args.cpu_offload:
        lines.append("  (--cpu-offload: the shards and AdamW's step live in host memory)")
    lines.append("nothing was trained (--dry-run)")
    return "\n".join(lines)
