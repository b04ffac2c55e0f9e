"""Processes of a run: joining ``torchrun``'s process group, and the few collectives training needs.

Every helper is a no-op in a single process, so the trainer reads the same with one process or many.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun); readable before the group is joined."""
    return int(os.environ.get("RANK", "0"))


def local_world_size() -> int:
    """How many training processes share this machine (and its CPU cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def setup_distributed(device: str) -> Dist:
    """Join the process group when started by torchrun (NCCL on GPU, gloo on CPU), and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")
        dev = torch.device("cuda", local_rank if world > 1 else (torch.device(device).index or 0))
        torch.cuda.set_device(dev)
    elif kind == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"--device must be cpu, cuda[:N] or auto; got {device!r}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: object, d: Dist) -> object:
    """The first process's ``value``, in every process."""
    if d.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: object, d: Dist) -> list:
    """Every process's ``value``, by rank, in every process."""
    if d.world_size == 1:
        return [value]
    values = [None] * d.world_size
    dist.all_gather_object(values, value)
    return values


def all_reduce_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    """``tensor`` summed over the processes, in place."""
    if d.world_size > 1:
        dist.all_reduce(tensor)
    return tensor


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def wrap_model(model: torch.nn.Module, d: Dist, compile: bool) -> torch.nn.Module:
    """The module the training step calls: DDP over the processes (the one place a model is wrapped, where
    sharding would go), then ``torch.compile`` when asked. ``model`` itself stays the unwrapped network."""
    wrapped = model
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if compile:
        wrapped = torch.compile(wrapped)
    return wrapped
