"""Training checkpoints in the run directory's ``checkpoints/``, and the random state they carry.

Two layouts, one per ``--strategy``: ``step_NNNNNNNN.pt``, one ``torch.save`` file the first process writes
(DDP and one process), and ``step_NNNNNNNN/``, a ``torch.distributed.checkpoint`` (DCP) directory where every
process writes its own shards (``__R_0.distcp``, an index ``.metadata``) and the first one ``trainer.pt``, the
rest of the state. Either holds everything a resumed run needs to continue bitwise as if never stopped:
model, optimizer, scheduler, scaler, counters and every process's random state. Either is read by a run of
either strategy at any number of processes (DCP reshards on load).

A checkpoint appears whole or not at all: a file is written to a temporary name and renamed, a directory is
written as ``.staging-step_NNNNNNNN/`` and renamed. A new one is checked readable (sizes and headers, against
the DCP index) before the oldest ones beyond ``--keep-ckpts`` are deleted; a write that fails (a full disk, an
I/O error) leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vit_fast.fileio import WriteError, atomic_write

CHECKPOINT_FORMAT = 1
TRAINER_FILE = "trainer.pt"  # in a DCP checkpoint: all but the sharded tensors
_CKPT_NAME = re.compile(r"step_(\d{8,})(\.pt)?")
_STAGING, _DELETING = ".staging-", ".deleting-"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints (files and DCP directories), newest (highest step) first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = []
    for m in map(_CKPT_NAME.fullmatch, os.listdir(d)):
        if m and (d / m.group(0)).is_dir() != bool(m.group(2)):
            found.append((int(m.group(1)), d / m.group(0)))
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint's name says it was written at."""
    m = _CKPT_NAME.fullmatch(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not named as a training checkpoint (step_NNNNNNNN.pt or step_NNNNNNNN/)")
    return int(m.group(1))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's contents. A file's are all of it; a DCP directory's are its ``trainer.pt`` with ``"dcp"``
    set to the directory, whose tensors :func:`restore_model_and_optimizer` loads into a model."""
    path = Path(path)
    if path.is_dir():
        verify_checkpoint(path)
        ckpt = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
        ckpt["dcp"] = os.fspath(path)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["dcp"] = None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a vit_fast training checkpoint of format {CHECKPOINT_FORMAT}")
    ckpt["path"] = os.fspath(path)
    return ckpt


def load_newest_checkpoint(ckpt_dir: str | os.PathLike) -> dict | None:
    """The newest readable checkpoint (an unreadable one is reported and passed over), or None."""
    for path in list_checkpoints(ckpt_dir):
        try:
            return read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any reader failure: fall back to the previous checkpoint
            warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying an older one",
                          stacklevel=2)
    return None


# ------------------------------------------------------------------------------------------- checking


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming the file unless ``path`` reads back as a checkpoint: a file's zip header,
    directory and pickle (tensors mapped, not read); a DCP directory's index, every shard file at least as long
    as the index says, and its ``trainer.pt``."""
    path = Path(path)
    if not path.is_dir():
        _verify_file(path)
        return
    for rel, size in _shard_sizes(read_dcp_index(path)).items():
        shard = path / rel
        have = shard.stat().st_size if shard.is_file() else None
        if have is None or have < size:
            raise ValueError(f"{shard}: {'missing' if have is None else f'{have} bytes'}; the checkpoint's index "
                             f"needs {size}")
    _verify_file(path / TRAINER_FILE)


def _verify_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if head != _ZIP_MAGIC:
        raise ValueError(f"{path}: not a torch.save file ({path.stat().st_size} bytes, header {head!r})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a torn zip fails in many ways
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "step" not in ckpt:
        raise ValueError(f"{path}: not a vit_fast training checkpoint of format {CHECKPOINT_FORMAT}")


class _IndexUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle; this one builds only the index's own classes, so reading a checkpoint
    runs no code it carries."""

    _DCP = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    _ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> object:
        if module in self._DCP or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint index")


def read_dcp_index(path: str | os.PathLike) -> object:
    """The ``torch.distributed.checkpoint`` ``Metadata`` of the DCP directory ``path``, read safely."""
    index = Path(path) / ".metadata"
    try:
        with open(index, "rb") as f:
            return _IndexUnpickler(f).load()
    except FileNotFoundError:
        raise ValueError(f"{index}: missing (the checkpoint was not finished)") from None
    except Exception as e:  # noqa: BLE001 - torn or foreign: unpickling fails in many ways
        raise ValueError(f"{index}: unreadable ({type(e).__name__}: {e})") from e


def _shard_sizes(index: object) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for info in index.storage_data.values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    return sizes


# -------------------------------------------------------------------------------------------- writing


def _torch_save(obj: object, path: str) -> None:
    # Through a Python file: a full disk then surfaces as the OSError (ENOSPC) behind torch's own message.
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(ckpt_dir: str | os.PathLike, ckpt: dict, keep: int) -> Path:
    """Write ``ckpt`` (of step ``ckpt["step"]``) as one file, atomically; check it reads back, then delete all
    but the ``keep`` newest. Returns its path. A failed write raises :class:`~vit_fast.fileio.WriteError` and
    leaves the older checkpoints as they were."""
    path = Path(ckpt_dir) / f"step_{ckpt['step']:08d}.pt"
    atomic_write(path, lambda tmp: _torch_save({"format": CHECKPOINT_FORMAT, **ckpt}, tmp))
    _check_written(path)
    prune_checkpoints(ckpt_dir, keep)
    return path


def _check_written(path: Path) -> None:
    """A checkpoint just written that does not read back is an I/O error: it is set aside, never pruned to."""
    try:
        verify_checkpoint(path)
    except (ValueError, OSError) as e:
        with contextlib.suppress(OSError):
            path.rename(path.with_name(path.name.removesuffix(".pt") + ".unreadable"))
        raise WriteError(errno.EIO, f"the checkpoint does not read back after writing ({e})", os.fspath(path)) from e


def save_sharded_checkpoint(ckpt_dir: str | os.PathLike, step: int, tensors: dict, trainer_state: dict | None,
                            keep: int, d: object) -> Path:
    """Every process: write this process's shards of ``tensors`` (``{"model": ..., "optimizer": ...}`` of
    :func:`sharded_state`) into a DCP checkpoint of ``step``; the first process adds ``trainer_state`` (the
    rest), checks the whole reads back and renames it into place, then deletes all but the ``keep`` newest.
    A failure in any process (a full disk, an I/O error) raises the same error in all of them and leaves the
    older checkpoints as they were. ``d`` is the run's :class:`~vit_fast.train.distributed.Dist`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from vit_fast.train.distributed import barrier, broadcast, gather

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:08d}"
    staging = ckpt_dir / f"{_STAGING}{final.name}"
    if d.main:
        shutil.rmtree(staging, ignore_errors=True)  # what a save cut short left
    barrier(d)
    writer = dcp.FileSystemWriter(staging, sync_files=True)
    writer.fs = _errno_keeping_file_system()()
    try:
        dcp.save(tensors, storage_writer=writer)
    except CheckpointException as e:  # raised in every process when any one failed, so all leave here
        codes = [c for c in gather(writer.fs.errno, d) if c]
        if d.main:
            shutil.rmtree(staging, ignore_errors=True)
        if not codes:
            raise
        raise WriteError(codes[0], os.strerror(codes[0]), os.fspath(final)) from e
    failure: OSError | None = None
    if d.main:
        try:
            atomic_write(staging / TRAINER_FILE,
                         lambda tmp: _torch_save({"format": CHECKPOINT_FORMAT, "step": step, **trainer_state}, tmp))
            try:
                verify_checkpoint(staging)
            except ValueError as e:
                raise WriteError(errno.EIO, f"the checkpoint does not read back after writing ({e})",
                                 os.fspath(staging)) from e
            os.rename(staging, final)
            _fsync_dir(ckpt_dir)
        except OSError as e:
            failure = e
            shutil.rmtree(staging, ignore_errors=True)
    failure = broadcast(failure, d)  # the other processes must not go on to a collective the first one left
    if failure is not None:
        raise failure
    if d.main:
        prune_checkpoints(ckpt_dir, keep)
    return final


def _errno_behind(e: BaseException) -> int:
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        e = e.__cause__ or e.__context__
    return 0


@functools.cache
def _errno_keeping_file_system() -> type:
    """A subclass of DCP's ``FileSystem``, made when DCP is first used (importing it costs seconds)."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class ErrnoKeepingFileSystem(FileSystem):
        """DCP's file system, noting the errno of the first write that fails in this process: DCP reports a
        failure to every process as text (torch.save's "unexpected pos ..."), which no longer says why."""

        errno = 0

        @contextlib.contextmanager
        def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[object]:
            try:
                with super().create_stream(path, mode) as stream:
                    yield stream
            except BaseException as e:
                self.errno = self.errno or _errno_behind(e)
                raise

    return ErrnoKeepingFileSystem


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints. A directory is renamed out of the listing first, so a kill
    mid-delete leaves no half checkpoint under a checkpoint's name."""
    for old in list_checkpoints(ckpt_dir)[keep:]:
        try:
            if old.is_dir():
                doomed = old.with_name(_DELETING + old.name)
                old.rename(doomed)
                shutil.rmtree(doomed)
            else:
                old.unlink()
        except OSError as e:  # a checkpoint too many is no reason to stop training
            warnings.warn(f"could not delete the old checkpoint {old}: {e}", stacklevel=2)


def tidy_for_resume(ckpt_dir: str | os.PathLike, resumed: dict | None) -> None:
    """Clear what a killed run or a damaged disk left in ``ckpt_dir`` before resuming from ``resumed``: temporary
    files and the staging or half-deleted directories of saves cut short go; checkpoints newer than ``resumed``
    (unreadable, or it would have been chosen) are renamed ``*.unreadable``, set aside for a look rather than
    pruned."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*ckpt_dir.glob("*.tmp*"), *ckpt_dir.glob(_STAGING + "*"), *ckpt_dir.glob(_DELETING + "*")]:
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    for bad in list_checkpoints(ckpt_dir):
        if resumed is not None and bad.name == Path(resumed["path"]).name:
            break
        bad.rename(bad.with_name(bad.name.removesuffix(".pt") + ".unreadable"))


# ------------------------------------------------------------------------------- model and optimizer


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list[dict]]:
    """``({"model": ..., "optimizer": ...}, param_groups)``: the tensors a DCP checkpoint holds (this process's
    shards, keyed by parameter name) and the optimizer's hyperparameters, which go to ``trainer.pt`` (kept out
    of DCP, whose loader unpickles non-tensor values)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd["state"]}, optim_sd["param_groups"]


def restore_model_and_optimizer(ckpt: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                                sharded: bool) -> None:
    """Load ``ckpt``'s (:func:`read_checkpoint`) weights and optimizer state into ``model`` and ``optimizer``,
    whatever layout and process count wrote it: a file into an unsharded model as it is (bitwise); a file into
    a sharded one as full tensors each process takes its shard of; a DCP directory through DCP's resharding."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if ckpt["dcp"] is None and not sharded:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return
    if ckpt["dcp"] is None:
        set_state_dict(model, optimizer, model_state_dict=ckpt["model"],
                       optim_state_dict=_optimizer_state_by_name(ckpt["optimizer"], model, optimizer),
                       options=StateDictOptions(full_state_dict=True))
        return
    tensors, _ = sharded_state(model, optimizer)  # the layout to load into: this run's shards
    _dcp_load(tensors, ckpt["dcp"])
    set_state_dict(model, optimizer, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors["optimizer"], "param_groups": ckpt["param_groups"]})


def _optimizer_state_by_name(saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` keys parameters by their place in the groups; DCP's helpers by name. The
    optimizer here is built as the saved one was, so the places line up."""
    names = {id(p): n for n, p in model.named_parameters()}
    name_of = {}
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=True):
        for index, p in zip(saved_group["params"], group["params"], strict=True):
            name_of[index] = names[id(p)]
    return {"state": {name_of[i]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in saved["param_groups"]]}


def full_model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU: gathered from the shards (every process must call it; the first
    gets the tensors, the others an empty dict) or the model's own."""
    if not sharded:
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.contiguous() for k, v in full.items()}


def load_dcp_model_state(path: str | os.PathLike, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model weights of the DCP checkpoint ``path``, consolidated into ``template``'s full tensors, in one
    process (no process group)."""
    verify_checkpoint(path)
    state = {"model": template}
    _dcp_load(state, path)
    return state["model"]


def _dcp_load(state: dict, path: str | os.PathLike) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # without a group DCP loads in this one process, as wanted, and says so
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=os.fspath(path), no_dist=not dist.is_initialized())


def save_weights(path: str | os.PathLike, weights: dict[str, torch.Tensor], config: dict, *, dataset: str,
                 model: str) -> None:
    """A run's ``model.safetensors``: ``weights`` with the metadata that rebuilds the network (``config``, as
    :func:`~vit_fast.train.models.config_of` gives it) and names its dataset and ``--model``."""
    from safetensors.torch import save_file

    from vit_fast.train.models import TIMM

    meta = {"config": json.dumps(config), "dataset": dataset, "model": model,
            "model_family": TIMM if config.get("family") == TIMM else "vit_fast"}
    atomic_write(path, lambda tmp: save_file(weights, tmp, metadata=meta))


# -------------------------------------------------------------------------------------------- random state


def rng_state(device: torch.device) -> dict:
    """This process's random state: torch (CPU and ``device``), NumPy and Python, as tensors and plain data
    that ``torch.load(weights_only=True)`` reads back."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    """Put back a state from :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def seed_process(seed: int, rank: int) -> None:
    """The random streams of dropout and drop-path: one per process, so the processes do not draw alike."""
    from vit_fast.train.data import STREAM_MODEL, derive_seed  # torchvision loads only when training

    s = derive_seed(seed, STREAM_MODEL, rank)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


@dataclasses.dataclass
class Progress:
    """The counters a checkpoint carries over a restart."""

    step: int = 0
    skipped: int = 0  # fp16 steps the GradScaler skipped on an overflow
    train_images: int = 0
    train_s: float = 0.0
    wall_before: float = 0.0  # wall time of the run's earlier sessions, when resumed
    last_eval: dict | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> Progress:
        return cls(ckpt["step"], ckpt["skipped_steps"], ckpt["train_images"], ckpt["train_s"], ckpt["wall_s"],
                   ckpt["last_eval"])

    def to_checkpoint(self, wall_s: float) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped, "train_images": self.train_images,
                "train_s": self.train_s, "wall_s": wall_s, "last_eval": self.last_eval}

    @property
    def images_per_s(self) -> float:
        return self.train_images / max(self.train_s, 1e-9)
