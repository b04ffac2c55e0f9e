"""Training checkpoints: ``checkpoints/step_NNNNNNNN.pt`` in the run directory, and the random state they carry.

A checkpoint is written atomically (a kill mid-save leaves the previous one intact) and holds everything a
resumed run needs to continue bitwise as if never stopped: model, optimizer, scheduler, scaler, counters and
every process's random state.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from vit_fast.fileio import atomic_write

CHECKPOINT_FORMAT = 1
_CKPT_NAME = re.compile(r"step_(\d{8,})\.pt")


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, newest (highest step) first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), d / m.group(0)) for m in map(_CKPT_NAME.fullmatch, os.listdir(d)) if m]
    return [p for _, p in sorted(found, reverse=True)]


def load_newest_checkpoint(ckpt_dir: str | os.PathLike) -> dict | None:
    """The newest readable checkpoint (an unreadable one is reported and passed over), or None."""
    for path in list_checkpoints(ckpt_dir):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any reader failure: fall back to the previous checkpoint
            warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying an older one",
                          stacklevel=2)
            continue
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a vit_fast training checkpoint of format {CHECKPOINT_FORMAT}")
        ckpt["path"] = os.fspath(path)
        return ckpt
    return None


def save_checkpoint(ckpt_dir: str | os.PathLike, ckpt: dict, keep: int) -> None:
    """Write ``ckpt`` (of step ``ckpt["step"]``) atomically, then delete all but the ``keep`` newest."""
    ckpt = {"format": CHECKPOINT_FORMAT, **ckpt}
    atomic_write(Path(ckpt_dir) / f"step_{ckpt['step']:08d}.pt", lambda tmp: torch.save(ckpt, tmp))
    for old in list_checkpoints(ckpt_dir)[keep:]:
        old.unlink()


def tidy_for_resume(ckpt_dir: str | os.PathLike, resumed: dict | None) -> None:
    """Clear what a killed run or a damaged disk left in ``ckpt_dir`` before resuming from ``resumed``: the
    temporary file of a save cut short goes; checkpoints newer than ``resumed`` (unreadable, or it would have
    been chosen) are renamed ``*.unreadable``, set aside for a look rather than pruned."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob("*.tmp*"):
        stale.unlink()
    for bad in list_checkpoints(ckpt_dir):
        if resumed is not None and bad.name == Path(resumed["path"]).name:
            break
        bad.rename(bad.with_suffix(".unreadable"))


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
