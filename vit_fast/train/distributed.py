"""Processes of a run: joining ``torchrun``'s process group, the few collectives training needs, and the one
place a model is spread over the processes (DDP, or FSDP2's ``fully_shard``).

Every helper is a no-op in a single process, so the trainer reads the same with one process or many.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # a gloo group for host-side agreement (the stop flag) when the training group is NCCL; None: the default one
    control: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """Whether a process group is joined (several processes, or ``--strategy fsdp`` in one)."""
        return dist.is_initialized()


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun); readable before the group is joined."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """How many training processes share this machine (and its CPU cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def under_torchrun() -> bool:
    """Whether torchrun's elastic agent started this process (it restarts failed workers, see ``--max-restarts``)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def device_kind(device: str) -> str:
    """``"cuda"`` or ``"cpu"`` for ``--device`` (auto: cuda when visible)."""
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device).type
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cpu, cuda[:N] or auto; got {device!r}")
    return kind


def setup_distributed(device: str, strategy: str = "ddp") -> Dist:
    """Join the process group when started by torchrun (NCCL on GPU, gloo on CPU), and pick the device. FSDP
    needs a group even in one process: there it is a group of one, on an in-process store."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {STRATEGIES}; got {strategy!r}")
    world = env_world_size()
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    kind = device_kind(device)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")
        dev = torch.device("cuda", local_rank if world > 1 else (torch.device(device).index or 0))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if kind == "cuda" else "gloo"
    if world > 1 and not dist.is_initialized():
        _join_group(backend, rank, world)
    elif strategy == "fsdp" and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    control = dist.new_group(backend="gloo") if dist.is_initialized() and backend == "nccl" else None
    return Dist(rank, world, local_rank, dev, control)


SHARED_STORE_WARNING = (
    "torchrun shares its rendezvous store with the workers across restarts, and across nodes this run cannot "
    "keep the restarts' keys apart: a restarted group may wait for workers that are gone. Start torchrun with "
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (see the README's Multi-node training)")


def _join_group(backend: str, rank: int, world: int) -> None:
    """``init_process_group`` from torchrun's environment. torchrun hands its workers one store for the agent's
    whole life (``TORCHELASTIC_USE_AGENT_STORE``), and the default group's keys in it are the same in every
    attempt: workers restarted by ``--max-restarts`` then read the addresses their dead predecessors published
    and wait for them forever (pytorch/pytorch#135712). Each attempt's keys go under its restart count, which
    one agent gives all its workers alike; agents on several nodes count apart, so there it takes torchrun's
    own switch (:data:`SHARED_STORE_WARNING`)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 and rank == 0:
        import warnings

        warnings.warn(SHARED_STORE_WARNING, stacklevel=3)
    store, _, _ = next(dist.rendezvous("env://", rank, world))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"vit_fast/attempt_{attempt}", store), rank=rank,
                            world_size=world)


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


def all_reduce_max(value: int, d: Dist) -> int:
    """The largest of the processes' ``value``, agreed on the host (no device sync)."""
    if d.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.control)
    return int(t.item())


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def fsdp_policies(device_type: str, precision: str, cpu_offload: bool) -> tuple[object, object]:
    """``(MixedPrecisionPolicy, OffloadPolicy)`` for ``fully_shard``: bf16 compute with fp32 gradient reduction
    on GPU under bf16, plain fp32 otherwise (CPU bf16 is autocast's job there, and gradients reduce in fp32);
    ``CPUOffloadPolicy`` (pinned on GPU) with ``cpu_offload``."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device_type == "cuda" and precision == "bf16" else MixedPrecisionPolicy())
    return mp, CPUOffloadPolicy(pin_memory=device_type == "cuda") if cpu_offload else OffloadPolicy()


def shard_model(model: nn.Module, d: Dist, *, precision: str, compile: bool, cpu_offload: bool) -> nn.Module:
    """``--strategy fsdp``: ``fully_shard`` each of ``model.blocks``, then the root, in place (the parameters
    become DTensor shards, so the optimizer is built afterwards). On GPU with bf16 the blocks compute in bf16 and
    reduce gradients in fp32 (``MixedPrecisionPolicy``); otherwise everything stays fp32. ``compile`` compiles
    each block's forward, with FSDP's all-gathers left outside the compiled graphs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not hasattr(model, "config"):
        raise ValueError(f"--strategy fsdp shards a vit_fast ViT block by block; {type(model).__name__} is not one: "
                         "use --strategy ddp")
    if precision == "fp16":
        raise ValueError("--strategy fsdp with --precision fp16: the GradScaler's overflow check is not agreed "
                         "over shards; use --precision bf16 or fp32")
    mp, offload = fsdp_policies(d.device.type, precision, cpu_offload)
    mesh = init_device_mesh(d.device.type, (dist.get_world_size(),))
    for block in blocks:
        if compile:
            block.forward = torch.compile(block.forward)
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return model


def wrap_model(model: nn.Module, d: Dist, compile: bool, strategy: str = "ddp") -> nn.Module:
    """The module the training step calls: DDP over the processes, then ``torch.compile`` when asked; under
    FSDP the model is already sharded in place (:func:`shard_model`) and is called as it is. ``model`` itself
    stays the network the optimizer and the checkpoints see."""
    if strategy == "fsdp":
        return model
    wrapped = model
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if compile:
        wrapped = torch.compile(wrapped)
    return wrapped
