"""Training: ``vit-fast train`` and ``python -m vit_fast.train``, on one CPU or under ``torchrun`` on many GPUs.

One loop for every dataset: mixed precision through ``torch.autocast`` (fp16 with ``torch.amp.GradScaler``),
AdamW with no weight decay on norms, biases, position embedding and class token (optionally with layer-wise
learning-rate decay), linear warmup then cosine decay stepped per step, gradient clipping, label smoothing,
drop-path, torchvision ``v2`` augmentation and MixUp/CutMix, DDP through ``torch.distributed``.

A run lives in its ``--out`` directory: ``checkpoints/step_NNNNNNNN.pt`` (written atomically, every
``--ckpt-every`` steps and at each epoch end), ``metrics.jsonl`` (one line per step and per evaluation),
``curves.png``, ``model.safetensors`` and ``summary.json``. A run killed at any point continues with
``--resume`` and reaches the same final weights as one that was never interrupted (bitwise on CPU): the
checkpoint holds the model, optimizer, scheduler, scaler and every process's random state, and the batches
are a function of the seed and the step alone (see :mod:`vit_fast.data`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import vit_fast
from vit_fast.config import get_config
from vit_fast.model import VisionTransformer, count_params

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
CHECKPOINT_FORMAT = 1
_CKPT_NAME = re.compile(r"step_(\d{8,})\.pt")

# CIFAR from scratch: the strong augmentation and regularization small ViTs need on 50k images.
_CIFAR: dict[str, object] = dict(
    model="vit_tiny_patch4_32", epochs=200, batch_size=512, lr=1e-3, min_lr=1e-5, weight_decay=0.05,
    warmup_epochs=10.0, clip_grad=1.0, label_smoothing=0.1, drop_path=0.1,
    crop="pad", crop_padding=4, crop_scale=1.0, hflip=0.5, color_jitter=0.0,
    randaugment_ops=2, randaugment_magnitude=9, random_erasing=0.25, mixup=0.8, cutmix=1.0,
    workers=8, threads=0, ckpt_every=1000,
)

# Per-dataset defaults of the recipe flags (a flag left unset takes its dataset's value).
RECIPES: dict[str, dict[str, object]] = {
    # 1437 training images of 8x8: a plain ViT learns them from scratch when the images move a little each
    # epoch (no flips: a mirrored digit is another digit or none), with label smoothing and a cosine decay.
    # The 4-block model is too shallow for drop-path to help within 60 epochs.
    "digits": dict(
        model="vit_nano_patch2_8", epochs=60, batch_size=64, lr=2e-3, min_lr=1e-5, weight_decay=0.05,
        warmup_epochs=5.0, clip_grad=1.0, label_smoothing=0.1, drop_path=0.0,
        crop="affine", crop_padding=0, crop_scale=1.0, hflip=0.0, color_jitter=0.0,
        randaugment_ops=0, randaugment_magnitude=9, random_erasing=0.0, mixup=0.0, cutmix=0.0,
        workers=1, threads=1, ckpt_every=500,
    ),
    "cifar10": _CIFAR,
    # CIFAR-100: the same recipe with a wider model and more epochs (100 classes of 500 images each).
    "cifar100": {**_CIFAR, "model": "vit_small_patch4_32", "epochs": 300},
    # Photos of any size (DeiT-style recipe); for fine-tuning add --init and a --layer-decay near 0.65.
    "imagefolder": dict(
        model="vit_small_patch16_224", epochs=100, batch_size=256, lr=5e-4, min_lr=1e-6, weight_decay=0.05,
        warmup_epochs=5.0, clip_grad=1.0, label_smoothing=0.1, drop_path=0.1,
        crop="resized", crop_padding=0, crop_scale=0.08, hflip=0.5, color_jitter=0.0,
        randaugment_ops=2, randaugment_magnitude=9, random_erasing=0.25, mixup=0.8, cutmix=1.0,
        workers=8, threads=0, ckpt_every=1000,
    ),
}
# Defaults shared by every dataset, for the flags that default to None in the parser.
GLOBAL_DEFAULTS: dict[str, object] = dict(
    layer_decay=1.0, beta1=0.9, beta2=0.999, precision="auto", seed=0, img_size=None, init=None, override=[],
)
# What may differ in a resumed run: where and how it runs, not what it computes.
RUNTIME_KEYS = frozenset({"out", "resume", "data_dir", "device", "workers", "compile", "grad_checkpointing",
                          "backend", "ckpt_every", "keep_ckpts", "log_every", "progress", "threads"})


# ------------------------------------------------------------------------------------------------ parser

def _default_text(key: str) -> str:
    values = {name: recipe[key] for name, recipe in RECIPES.items()}
    if len(set(map(str, values.values()))) == 1:
        return f"default: {next(iter(values.values()))}"
    return "default per dataset: " + ", ".join(f"{v} ({k})" for k, v in values.items())


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every ``vit-fast train`` flag to ``parser``. Recipe flags left unset take their dataset's default."""
    from vit_fast.backends import CHOICES

    def recipe_flag(group: argparse._ArgumentGroup, flag: str, help: str, **kw: object) -> None:
        key = flag.lstrip("-").replace("-", "_")
        group.add_argument(flag, default=None, help=f"{help} ({_default_text(key)})", **kw)

    g = parser.add_argument_group("data and model")
    g.add_argument("--dataset", choices=tuple(RECIPES), default=None,
                   help="digits: scikit-learn's 8x8 handwritten digits, bundled, no download; cifar10/cifar100: "
                        "the python-format files under --data-dir; imagefolder: --data-dir/train and "
                        "--data-dir/val with one folder per class (default: digits)")
    g.add_argument("--data-dir", default=None,
                   help="directory of the dataset's files, required for cifar10, cifar100 and imagefolder "
                        "(default: none)")
    recipe_flag(g, "--model", "preset name, see vit_fast.list_models(); its class count, channels and "
                "resolution follow the dataset")
    g.add_argument("--img-size", type=int, default=None,
                   help="training resolution (default: the dataset's, 8 for digits and 32 for CIFAR; the "
                        "model preset's for imagefolder)")
    g.add_argument("--override", action="append", metavar="KEY=VALUE", default=None,
                   help="a ViTConfig field of the model, e.g. --override depth=6 --override embed_dim=128 "
                        "(repeatable; default: none)")
    g.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from these weights (timm / Hugging Face / vit_fast .safetensors, .pth, .pt): the "
                        "position embedding is resampled to the new resolution, a head with another class "
                        "count is replaced by a fresh one (default: random initialization)")

    g = parser.add_argument_group("optimization")
    recipe_flag(g, "--epochs", "passes over the training set", type=int)
    recipe_flag(g, "--batch-size", "global batch size, split evenly over the processes", type=int)
    recipe_flag(g, "--lr", "peak learning rate of AdamW", type=float)
    recipe_flag(g, "--min-lr", "learning rate at the end of the cosine decay", type=float)
    recipe_flag(g, "--weight-decay", "AdamW weight decay (never on norms, biases, pos_embed, cls_token)",
                type=float)
    recipe_flag(g, "--warmup-epochs", "linear warmup from lr/warmup-steps to lr, in epochs (fractions allowed)",
                type=float)
    g.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise learning-rate decay: block i of D gets lr * decay^(D - i), the head lr, the "
                        "embeddings lr * decay^(D + 1); 0.65-0.75 suits fine-tuning (default: 1.0, off)")
    g.add_argument("--beta1", type=float, default=None, help="AdamW beta1 (default: 0.9)")
    g.add_argument("--beta2", type=float, default=None, help="AdamW beta2 (default: 0.999)")
    recipe_flag(g, "--clip-grad", "clip the gradients' global norm to this; 0 turns clipping off", type=float)
    recipe_flag(g, "--label-smoothing", "label smoothing of the cross-entropy", type=float)
    recipe_flag(g, "--drop-path", "stochastic depth rate of the last block (linear from 0 over the blocks)",
                type=float)
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16 or fp16 autocast (fp16 with a GradScaler), or fp32; auto: bf16 on GPUs that "
                        "support it, else fp16 on GPU, fp32 on CPU, where bf16 is emulated and slow "
                        "(default: auto)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the weights, the data order and the augmentation; the same seed gives the "
                        "same run (default: 0)")

    g = parser.add_argument_group("augmentation (torchvision.transforms.v2)")
    recipe_flag(g, "--crop", "pad: random crop after padding by --crop-padding; resized: random resized crop "
                "with area from --crop-scale to 1; affine: small random rotation, shift and scale; none",
                choices=("pad", "resized", "affine", "none"))
    recipe_flag(g, "--crop-padding", "zero padding in pixels before a random crop", type=int)
    recipe_flag(g, "--crop-scale", "smallest area fraction of a random resized crop", type=float)
    recipe_flag(g, "--hflip", "probability of a horizontal flip", type=float)
    recipe_flag(g, "--color-jitter", "strength of random brightness, contrast and saturation; 0 turns it off",
                type=float)
    recipe_flag(g, "--randaugment-ops", "RandAugment operations per image; 0 turns it off", type=int)
    recipe_flag(g, "--randaugment-magnitude", "RandAugment magnitude (0-30)", type=int)
    recipe_flag(g, "--random-erasing", "probability of erasing a random rectangle", type=float)
    recipe_flag(g, "--mixup", "MixUp alpha on each batch; 0 turns it off (with --cutmix: one of them per batch)",
                type=float)
    recipe_flag(g, "--cutmix", "CutMix alpha on each batch; 0 turns it off", type=float)

    g = parser.add_argument_group("run")
    g.add_argument("--out", default=None,
                   help="run directory: checkpoints, metrics.jsonl, curves.png, model.safetensors, summary.json "
                        "(default: runs/<dataset>-<date>-<time>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint, with its recipe (starts afresh "
                        "when it has none) (default: off, and a directory that holds a run is refused)")
    recipe_flag(g, "--ckpt-every", "also checkpoint every this many steps (each epoch end always); 0: epoch "
                "ends only", type=int)
    g.add_argument("--keep-ckpts", type=int, default=2, help="checkpoints kept, the newest (default: 2)")
    g.add_argument("--log-every", type=int, default=10,
                   help="steps between metric flushes: the loss is read back from the device, checked for "
                        "NaN/Inf and written then (every step gets its line) (default: 10)")
    g.add_argument("--device", default="auto",
                   help="cpu, cuda, or auto: cuda when visible; under torchrun each process takes "
                        "cuda:LOCAL_RANK (default: auto)")
    g.add_argument("--backend", choices=CHOICES, default="auto",
                   help="vit_fast backend for the ops (default: auto, or VIT_FAST_BACKEND)")
    recipe_flag(g, "--workers", "DataLoader worker processes per training process, unless given capped at the "
                "CPU cores per process less one", type=int)
    recipe_flag(g, "--threads", "intra-op CPU threads of each training process (torch.set_num_threads); 0 "
                "leaves torch's default. The digits model's ops are too small to split: one thread computes "
                "while the other core runs the loader worker", type=int)
    g.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward to save memory (default: off)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bar on the first process (default: on)")
    return parser


def build_parser(prog: str = "python -m vit_fast.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    return add_train_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``train(args)``; user errors and a diverged loss end with a one-line message and exit status 1."""
    try:
        train(args)
    except (ValueError, FileNotFoundError, FloatingPointError, KeyError) as e:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            print(f"vit-fast train: error: {e}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ recipe

def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with every unset recipe flag given its dataset's (or the global) default, checked."""
    r = argparse.Namespace(**vars(args))
    r.dataset = r.dataset or "digits"
    for key, value in {**GLOBAL_DEFAULTS, **RECIPES[r.dataset]}.items():
        if getattr(r, key, None) is None:
            setattr(r, key, value)
    for key in ("epochs", "batch_size"):
        if getattr(r, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1; got {getattr(r, key)}")
    for key in ("lr", "min_lr", "weight_decay", "warmup_epochs", "clip_grad", "drop_path", "mixup", "cutmix",
                "workers", "threads", "ckpt_every", "seed"):
        if getattr(r, key) < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0; got {getattr(r, key)}")
    if not 0.0 <= r.label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1); got {r.label_smoothing}")
    if not 0.0 < r.layer_decay <= 1.0:
        raise ValueError(f"--layer-decay must be in (0, 1]; got {r.layer_decay}")
    if r.keep_ckpts < 1 or r.log_every < 1:
        raise ValueError("--keep-ckpts and --log-every must be >= 1")
    r.override = list(r.override)
    return r


def recipe_of(args: argparse.Namespace) -> dict[str, object]:
    """The flags of ``args`` that decide what a run computes (all but :data:`RUNTIME_KEYS`)."""
    keys = vars(build_parser().parse_args([])).keys() - RUNTIME_KEYS
    return {k: getattr(args, k) for k in sorted(keys)}


def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """``["depth=6", "qkv_bias=False"]`` -> ``{"depth": 6, "qkv_bias": False}`` (Python literals, else strings)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--override expects KEY=VALUE; got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key.strip()] = text
    owned = {"num_classes": "the dataset", "in_chans": "the dataset", "img_size": "--img-size",
             "drop_path_rate": "--drop-path"}
    taken = sorted(out.keys() & owned.keys())
    if taken:
        raise ValueError(f"--override {taken[0]}=... is not allowed: {owned[taken[0]]} sets it")
    return out


def _precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


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


# ----------------------------------------------------------------------------------- files and checkpoints

def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, flushed to disk, then renamed over ``path``: a reader
    (or a run killed mid-write) sees the old file or the new one, never a torn one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_text(text: str) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return write


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


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def _seed_process(seed: int, rank: int) -> None:
    """The random streams of dropout and drop-path: one per process, so the processes do not draw alike."""
    from vit_fast.data import STREAM_MODEL, derive_seed

    s = derive_seed(seed, STREAM_MODEL, rank)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a torn last line, left by a killed run, is skipped)."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


def plot_curves(records: Sequence[dict], path: str | os.PathLike, title: str) -> None:
    """A PNG of the training loss and accuracy per step (and their epoch means) and the test metrics."""
    from matplotlib.figure import Figure

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    steps = [r["step"] for r in train]
    for ax, key, label in ((ax_loss, "loss", "train loss"), (ax_acc, "acc", "train top-1")):
        ax.plot(steps, [r[key] for r in train], lw=0.5, alpha=0.35, color="C0")
        by_epoch: dict[int, list[dict]] = {}
        for r in train:
            by_epoch.setdefault(r["epoch"], []).append(r)
        ax.plot([rs[-1]["step"] for rs in by_epoch.values()],
                [sum(r[key] for r in rs) / len(rs) for rs in by_epoch.values()], color="C0",
                label=f"{label} (epoch mean)")
        ax.set_xlabel("step")
    ax_loss.plot([r["step"] for r in evals], [r["test_loss"] for r in evals], "o-", ms=2, color="C1",
                 label="test loss")
    ax_acc.plot([r["step"] for r in evals], [r["test_top1"] for r in evals], "o-", ms=2, color="C1",
                label="test top-1")
    ax_acc.plot([r["step"] for r in evals], [r["test_top5"] for r in evals], "o-", ms=2, color="C2",
                label="test top-5")
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# --------------------------------------------------------------------------------------------- distributed

@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the process group when started by torchrun (NCCL on GPU, gloo on CPU), and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
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


def _broadcast(value: object, d: Dist) -> object:
    if d.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------------ training

def train(args: argparse.Namespace) -> dict:
    """Train as ``args`` (from :func:`add_train_arguments`) say; returns the summary written to summary.json."""
    t0 = time.perf_counter()
    d = setup_distributed(args.device)
    try:
        return _Run(args, d, t0).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Run:
    """One training process: state, loop, evaluation and checkpoints."""

    def __init__(self, args: argparse.Namespace, d: Dist, t0: float) -> None:
        from torch.utils.data import DataLoader

        from vit_fast import data

        self.d, self.t0 = d, t0
        stamp = _broadcast(time.strftime("%Y%m%d-%H%M%S"), d)
        self.out = Path(args.out or f"runs/{args.dataset or 'digits'}-{stamp}")
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        ckpt = self._previous_run(args)
        a = self.args = resolve(args)
        if args.workers is None:  # the recipe's count, but no more than this process's share of the cores
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            a.workers = min(a.workers, max(1, (os.cpu_count() or 1) // local_world - 1))
        if a.backend != "auto":
            vit_fast.set_backend(a.backend)
        if a.threads:
            torch.set_num_threads(a.threads)

        self.precision = _precision(a.precision, d.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        aug = data.Augmentation(
            crop=a.crop, crop_padding=a.crop_padding, crop_scale=a.crop_scale, hflip=a.hflip,
            color_jitter=a.color_jitter, randaugment_ops=a.randaugment_ops,
            randaugment_magnitude=a.randaugment_magnitude, random_erasing=a.random_erasing)
        preset_size = get_config(a.model).img_size
        self.img_size = (a.img_size or data.dataset_info(a.dataset, a.data_dir).img_size
                         or (preset_size if isinstance(preset_size, int) else preset_size[0]))
        train_set, test_set, info = data.load_datasets(a.dataset, a.data_dir, self.img_size, aug)
        self.info, self.sizes = info, (len(train_set), len(test_set))

        self.sampler = data.TrainSampler(train_set, batch_size=a.batch_size, seed=a.seed, rank=d.rank,
                                         world_size=d.world_size)
        loader_kw = dict(num_workers=a.workers, pin_memory=d.device.type == "cuda",
                         persistent_workers=a.workers > 0)
        # Own generators: creating a loader iterator then leaves the model's random stream untouched.
        self.train_loader = DataLoader(train_set, batch_size=self.sampler.local_batch, sampler=self.sampler,
                                       generator=torch.Generator().manual_seed(a.seed), **loader_kw)
        self.test_loader = DataLoader(data.shard(test_set, d.rank, d.world_size), batch_size=self.sampler.local_batch,
                                      generator=torch.Generator().manual_seed(a.seed), **loader_kw)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = a.epochs * self.steps_per_epoch
        self.mix = self._batch_mix(a, info.num_classes)

        torch.manual_seed(a.seed)  # the same initial weights in every process and every run with this seed
        try:
            model = vit_fast.create_model(a.model, num_classes=info.num_classes, in_chans=info.in_chans,
                                          img_size=self.img_size, drop_path_rate=a.drop_path,
                                          **parse_overrides(a.override))
        except TypeError as e:  # an unknown config field in --override
            raise ValueError(f"--override: {e}") from e
        if a.init is not None and ckpt is None:
            vit_fast.load_checkpoint(model, a.init)
        model.set_grad_checkpointing(a.grad_checkpointing)
        self.model = model.to(d.device)
        self.optimizer = torch.optim.AdamW(param_groups(model, a.lr, a.weight_decay, a.layer_decay), lr=a.lr,
                                           betas=(a.beta1, a.beta2), fused=d.device.type == "cuda")
        self.scheduler = build_scheduler(self.optimizer, self.total_steps,
                                         round(a.warmup_epochs * self.steps_per_epoch), a.min_lr)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.precision == "fp16")

        self.step, self.skipped, self.train_images, self.train_s, self.elapsed_before = 0, 0, 0, 0.0, 0.0
        self.last_eval: dict | None = None
        if ckpt is not None:
            self._restore(ckpt)
        else:
            _seed_process(a.seed, d.rank)
        self.train_model: torch.nn.Module = model
        if d.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda"
                                                       else None)
        if a.compile:
            self.train_model = torch.compile(self.train_model)
        self.window: list[tuple[int, int, float, torch.Tensor, bool]] = []
        self.epoch_losses: list[float] = []

    # ---------------------------------------------------------------------------------------- set-up

    def _previous_run(self, args: argparse.Namespace) -> dict | None:
        """The checkpoint to resume from (with its recipe put into ``args``), or None for a fresh run."""
        # The first process decides: the others would see the files it is about to create.
        has_run = _broadcast(bool(list_checkpoints(self.ckpt_dir)) or self.metrics_path.exists(), self.d)
        if not args.resume:
            if has_run:
                raise ValueError(f"{self.out} already holds a run: pass --resume to continue it, or another --out")
            if self.d.main:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            return None
        if args.out is None:
            raise ValueError("--resume needs --out, the directory of the run to continue")
        ckpt = load_newest_checkpoint(self.ckpt_dir)
        if self.d.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.ckpt_dir.glob("*.tmp*"):  # a save cut short by a kill
                stale.unlink()
            for bad in list_checkpoints(self.ckpt_dir):  # unreadable ones newer than ckpt: set aside, not pruned
                if ckpt is not None and bad.name == Path(ckpt["path"]).name:
                    break
                bad.rename(bad.with_suffix(".unreadable"))
            kept = [r for r in read_metrics(self.metrics_path) if ckpt is not None and r["step"] <= ckpt["step"]]
            atomic_write(self.metrics_path, _write_text("".join(json.dumps(r) + "\n" for r in kept)))
        if ckpt is None:
            return None
        saved = ckpt["recipe"]
        clashes = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (the run has {saved[k]!r})"
                   for k in saved if getattr(args, k, None) is not None and getattr(args, k) != saved[k]]
        if clashes:
            raise ValueError("a resumed run keeps its recipe; these flags differ from it: " + "; ".join(clashes)
                             + ". Start a new run (with --init to begin from its weights) to change them")
        for k, v in saved.items():
            setattr(args, k, v)
        return ckpt

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.skipped = ckpt["step"], ckpt["skipped_steps"]
        self.train_images, self.train_s, self.elapsed_before = ckpt["train_images"], ckpt["train_s"], ckpt["wall_s"]
        self.last_eval = ckpt["last_eval"]
        states = ckpt["rng"]
        if len(states) == self.d.world_size:
            _set_rng_state(states[self.d.rank], self.d.device)
        else:
            warnings.warn(f"the checkpoint was written by {len(states)} processes, this run has "
                          f"{self.d.world_size}: the random streams restart, so the run is not bitwise the same "
                          "as an uninterrupted one", stacklevel=2)
            _seed_process(self.args.seed + self.step, self.d.rank)
        if self.d.main:
            print(f"resuming {self.out} from step {self.step} ({ckpt['path']})", file=sys.stderr)

    @staticmethod
    def _batch_mix(a: argparse.Namespace, num_classes: int) -> Callable | None:
        from torchvision.transforms import v2

        mixes = []
        if a.mixup > 0:
            mixes.append(v2.MixUp(alpha=a.mixup, num_classes=num_classes))
        if a.cutmix > 0:
            mixes.append(v2.CutMix(alpha=a.cutmix, num_classes=num_classes))
        if not mixes:
            return None
        return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    # ------------------------------------------------------------------------------------------- loop

    def fit(self) -> dict:
        a, d = self.args, self.d
        metrics = open(self.metrics_path, "a") if d.main else None  # noqa: SIM115 - closed below
        self.metrics = metrics
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                   desc=f"{a.dataset} {a.model}", disable=not (d.main and a.progress))
        self.bar = bar
        if d.main:
            bar.write(f"{a.dataset}: {self.sizes[0]} training / {self.sizes[1]} test images; {a.model} at "
                      f"{self.img_size}px, {count_params(self.model) / 1e6:.2f}M params; {self.precision} on "
                      f"{d.device} x{d.world_size}; {a.epochs} epochs of {self.steps_per_epoch} steps, batch "
                      f"{a.batch_size}; run directory {self.out}")
        try:
            start_epoch, start_batch = divmod(self.step, self.steps_per_epoch)
            for epoch in range(start_epoch, a.epochs):
                self.sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
                self.epoch_losses = []
                self.t_window = time.perf_counter()
                for images, labels in self.train_loader:
                    self._train_step(images, labels, epoch)
                    bar.update(1)
                    if self.step % a.log_every == 0:
                        self._flush()
                    if a.ckpt_every and self.step % a.ckpt_every == 0 and self.step % self.steps_per_epoch:
                        self._flush()
                        self._save_checkpoint(epoch)
                        self.t_window = time.perf_counter()
                self._flush()
                self.last_eval = self.evaluate() | {"epoch": epoch + 1, "step": self.step}
                self._log_epoch(epoch)
                self._save_checkpoint(epoch + 1)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        return self._finish()

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> None:
        from vit_fast.data import STREAM_MIX, derive_seed, seeded

        a, d = self.args, self.d
        images = images.to(d.device, non_blocking=True)
        labels = labels.to(d.device, non_blocking=True)
        targets = labels
        if self.mix is not None:
            with seeded(derive_seed(a.seed, STREAM_MIX, self.step, d.rank)):  # MixUp/CutMix draw on the CPU
                images, targets = self.mix(images, labels)
        with torch.autocast(d.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            logits = self.train_model(images)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=a.label_smoothing)
        self.scaler.scale(loss).backward()
        if a.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.clip_grad)
        lr = max(self.scheduler.get_last_lr())
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 0.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale  # fp16 overflow: step skipped
        self.skipped += skipped
        with warnings.catch_warnings():
            # the schedule counts steps, skipped ones too; PyTorch warns when the first one was skipped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        correct = (logits.detach().argmax(-1) == labels).sum()
        self.step += 1
        stats = torch.stack([loss.detach(), correct.float()])
        self.window.append((self.step, epoch, lr, stats, skipped))

    def _flush(self) -> None:
        """Read the window's losses back (one sync), stop on NaN/Inf, and log every step of it."""
        if not self.window:
            return
        d = self.d
        stats = torch.stack([w[3] for w in self.window]).double()  # (steps, 2): loss, correct
        if d.world_size > 1:
            dist.all_reduce(stats)
        rows = stats.tolist()
        elapsed = time.perf_counter() - self.t_window
        images = len(self.window) * self.args.batch_size
        self.train_s += elapsed
        self.train_images += images
        img_s = images / max(elapsed, 1e-9)
        batch = self.args.batch_size
        for (step, epoch, lr, _, skipped), (loss_sum, correct) in zip(self.window, rows, strict=True):
            loss, acc = loss_sum / d.world_size, correct / batch
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss is {loss} at step {step} (epoch {epoch + 1}): the run diverged. Its last "
                    f"checkpoint is in {self.ckpt_dir}; try a lower --lr, a longer --warmup-epochs, --clip-grad, "
                    "or --precision bf16/fp32")
            self.epoch_losses.append(loss)
            if self.metrics is not None:
                rec = {"kind": "train", "step": step, "epoch": epoch + 1, "loss": loss, "acc": acc, "lr": lr,
                       "img_s": img_s}
                if skipped:
                    rec["skipped"] = True
                self.metrics.write(json.dumps(rec) + "\n")
        if self.metrics is not None:
            self.metrics.flush()
        post = {"loss": f"{loss:.4f}", "acc": f"{acc:.3f}", "lr": f"{lr:.2e}", "img/s": f"{img_s:.0f}"}
        if self.skipped:
            post["skipped"] = self.skipped
        self.bar.set_postfix(post, refresh=False)
        self.window = []
        self.t_window = time.perf_counter()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test loss, top-1 and top-5 accuracy over the whole test set (each process scores its shard)."""
        d = self.d
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=d.device)  # loss, top-1, top-5, images
        k = min(5, self.info.num_classes)
        for images, labels in self.test_loader:
            images, labels = images.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
            with torch.autocast(d.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                logits = self.model(images)
            hits = logits.topk(k, dim=-1).indices == labels[:, None]  # (B, k)
            sums += torch.stack([F.cross_entropy(logits.float(), labels, reduction="sum").double(),
                                 hits[:, 0].sum().double(), hits.any(-1).sum().double(),
                                 torch.tensor(float(len(labels)), dtype=torch.float64, device=d.device)])
        if d.world_size > 1:
            dist.all_reduce(sums)
        self.model.train()
        loss, top1, top5, n = sums.tolist()
        return {"test_loss": loss / n, "test_top1": top1 / n, "test_top5": top5 / n}

    def _log_epoch(self, epoch: int) -> None:
        if not self.d.main:
            return
        e = self.last_eval
        self.metrics.write(json.dumps({"kind": "eval", **e}) + "\n")
        self.metrics.flush()
        train_loss = sum(self.epoch_losses) / max(len(self.epoch_losses), 1)
        self.bar.write(f"epoch {epoch + 1}/{self.args.epochs}  step {self.step}  train loss {train_loss:.4f}  "
                       f"test loss {e['test_loss']:.4f}  top-1 {e['test_top1']:.2%}  top-5 {e['test_top5']:.2%}  "
                       f"{self.train_images / max(self.train_s, 1e-9):.0f} img/s  "
                       f"{self._wall():.0f} s")

    def _wall(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def _save_checkpoint(self, epoch: int) -> None:
        """Every process's random state is gathered; the first process writes the checkpoint atomically."""
        d = self.d
        states = [_rng_state(d.device)]
        if d.world_size > 1:
            states = [None] * d.world_size
            dist.all_gather_object(states, _rng_state(d.device))
        if not d.main:
            return
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": states,
            "step": self.step,
            "epoch": epoch,
            "config": self.model.config.to_dict(),
            "recipe": recipe_of(self.args),
            "skipped_steps": self.skipped,
            "train_images": self.train_images,
            "train_s": self.train_s,
            "wall_s": self._wall(),
            "last_eval": self.last_eval,
        }
        atomic_write(self.ckpt_dir / f"step_{self.step:08d}.pt", lambda tmp: torch.save(ckpt, tmp))
        for old in list_checkpoints(self.ckpt_dir)[self.args.keep_ckpts:]:
            old.unlink()

    def _finish(self) -> dict:
        a, d = self.args, self.d
        if d.world_size > 1:
            dist.barrier()
        if not d.main:
            return {}
        from safetensors.torch import save_file

        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        meta = {"config": json.dumps(self.model.config.to_dict()), "dataset": a.dataset, "model": a.model}
        atomic_write(self.out / "model.safetensors", lambda tmp: save_file(weights, tmp, metadata=meta))
        title = f"{a.model} on {a.dataset} ({self.precision}, {a.epochs} epochs, batch {a.batch_size})"
        plot_curves(read_metrics(self.metrics_path), self.out / "curves.png", title)
        e = self.last_eval or {}
        summary = {
            "dataset": a.dataset, "model": a.model, "precision": self.precision, "device": str(d.device),
            "world_size": d.world_size, "epochs": a.epochs, "steps": self.step, "batch_size": a.batch_size,
            "test_top1": e.get("test_top1"), "test_top5": e.get("test_top5"), "test_loss": e.get("test_loss"),
            "train_images_per_s": self.train_images / max(self.train_s, 1e-9), "train_s": self.train_s,
            "wall_s": self._wall(), "skipped_steps": self.skipped, "params": count_params(self.model),
            "img_size": self.img_size, "config": self.model.config.to_dict(),
            "recipe": recipe_of(a),
            "vit_fast": vit_fast.__version__, "torch": torch.__version__,
        }
        atomic_write(self.out / "summary.json", _write_text(json.dumps(summary, indent=2) + "\n"))
        skipped = f", {self.skipped} fp16 overflow steps skipped" if self.precision == "fp16" else ""
        print(f"{a.dataset} {a.model}: test top-1 {e.get('test_top1', float('nan')):.2%}  "
              f"top-5 {e.get('test_top5', float('nan')):.2%} after {a.epochs} epochs ({self.step} steps){skipped}; "
              f"{summary['train_images_per_s']:.0f} img/s, wall {summary['wall_s']:.0f} s -> {self.out}")
        return summary


if __name__ == "__main__":
    sys.exit(main())
