"""What a run computes: the per-dataset recipes, the ``vit-fast train`` flags, and their resolution.

A recipe flag left unset takes its dataset's value from :data:`RECIPES`; a resumed run takes the recipe
saved in its checkpoint, and only the flags in :data:`RUNTIME_KEYS` (where and how it runs) may differ.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Sequence

import torch

from vit_fast.train.distributed import STRATEGIES

DESCRIPTION = ("Training: ``vit-fast train`` and ``python -m vit_fast.train``, on one CPU or under ``torchrun`` "
               "on many GPUs.")
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")

# Values no dataset changes.
_EVERY_DATASET: dict[str, object] = dict(
    weight_decay=0.05, clip_grad=1.0, label_smoothing=0.1, color_jitter=0.0, randaugment_magnitude=9,
    crop_padding=0, crop_scale=1.0,
)
# Natural images (CIFAR, photos): the strong augmentation and regularization ViTs need without pre-training.
_PHOTOS: dict[str, object] = dict(
    drop_path=0.1, hflip=0.5, randaugment_ops=2, random_erasing=0.25, mixup=0.8, cutmix=1.0,
    workers=8, threads=0, ckpt_every=1000,
)
# CIFAR from scratch: 50k images of 32x32, padded random crops.
_CIFAR: dict[str, object] = {
    **_EVERY_DATASET, **_PHOTOS,
    "model": "vit_tiny_patch4_32", "epochs": 200, "batch_size": 512, "lr": 1e-3, "min_lr": 1e-5,
    "warmup_epochs": 10.0, "crop": "pad", "crop_padding": 4,
}

# Per-dataset defaults of the recipe flags (a flag left unset takes its dataset's value).
RECIPES: dict[str, dict[str, object]] = {
    # 1437 training images of 8x8: a plain ViT learns them from scratch when the images move a little each
    # epoch (no flips: a mirrored digit is another digit or none), with label smoothing and a cosine decay.
    # The 4-block model is too shallow for drop-path to help within 60 epochs.
    "digits": {
        **_EVERY_DATASET,
        "model": "vit_nano_patch2_8", "epochs": 60, "batch_size": 64, "lr": 2e-3, "min_lr": 1e-5,
        "warmup_epochs": 5.0, "drop_path": 0.0, "crop": "affine", "hflip": 0.0, "randaugment_ops": 0,
        "random_erasing": 0.0, "mixup": 0.0, "cutmix": 0.0, "workers": 1, "threads": 1, "ckpt_every": 500,
    },
    "cifar10": _CIFAR,
    # CIFAR-100: the same recipe with a wider model and more epochs (100 classes of 500 images each).
    "cifar100": {**_CIFAR, "model": "vit_small_patch4_32", "epochs": 300},
    # Photos of any size (DeiT-style recipe); for fine-tuning add --init and a --layer-decay near 0.65.
    "imagefolder": {
        **_EVERY_DATASET, **_PHOTOS,
        "model": "vit_small_patch16_224", "epochs": 100, "batch_size": 256, "lr": 5e-4, "min_lr": 1e-6,
        "warmup_epochs": 5.0, "crop": "resized", "crop_scale": 0.08,
    },
}
# Defaults shared by every dataset, for the flags that default to None in the parser.
GLOBAL_DEFAULTS: dict[str, object] = dict(
    layer_decay=1.0, beta1=0.9, beta2=0.999, precision="auto", seed=0, img_size=None, init=None, override=[],
)
# What may differ in a resumed run: where and how it runs, not what it computes.
RUNTIME_KEYS = frozenset({"out", "resume", "data_dir", "device", "workers", "compile", "grad_checkpointing",
                          "backend", "ckpt_every", "keep_ckpts", "log_every", "progress", "threads", "strategy",
                          "cpu_offload", "dry_run"})
# Model config fields (timm.create_model keywords too) that other flags or the dataset set, so --override may not.
_OWNED_FIELDS = {"num_classes": "the dataset", "in_chans": "the dataset", "img_size": "--img-size",
                 "drop_path_rate": "--drop-path"}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


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
    recipe_flag(g, "--model", "vit_fast preset name (vit_fast.list_models()), or any other timm CNN name "
                "(timm.list_models(), e.g. resnet18) for a baseline with the same recipe; class count, channels "
                "and resolution follow the dataset. For inputs of 64 px or less a CNN gets the usual small-image "
                "stem: a 3x3 stride-1 first convolution and no max-pool")
    g.add_argument("--img-size", type=int, default=None,
                   help="training resolution (default: the dataset's, 8 for digits and 32 for CIFAR; the "
                        "model preset's for imagefolder)")
    g.add_argument("--override", action="append", metavar="KEY=VALUE", default=None,
                   help="a ViTConfig field of the model, e.g. --override depth=6 --override embed_dim=128, or for a "
                        "timm CNN a keyword of timm.create_model (repeatable; default: none)")
    g.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from these weights (timm / Hugging Face / vit_fast .safetensors, .pth, .pt): the "
                        "position embedding is resampled to the new resolution, a head with another class "
                        "count is replaced by a fresh one; vit_fast presets only (default: random initialization)")

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
                   help="layer-wise learning-rate decay over the layers of the model's group_matcher(), grouped as "
                        "timm's create_optimizer_v2 does (ViT and timm CNN alike): for a ViT block i of D gets "
                        "lr * decay^(D - i), the final norm and head lr, the embeddings lr * decay^(D + 1); "
                        "0.65-0.75 suits fine-tuning (default: 1.0, off)")
    g.add_argument("--beta1", type=float, default=None, help="AdamW beta1 (default: 0.9)")
    g.add_argument("--beta2", type=float, default=None, help="AdamW beta2 (default: 0.999)")
    recipe_flag(g, "--clip-grad", "clip the gradients' global norm to this; 0 turns clipping off", type=float)
    recipe_flag(g, "--label-smoothing", "label smoothing of the cross-entropy", type=float)
    recipe_flag(g, "--drop-path", "stochastic depth rate of the last block (linear from 0 over the blocks); a "
                "timm CNN gets it as drop_path_rate", type=float)
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
                   help="recompute each block's activations in the backward to save memory, through the model's "
                        "set_grad_checkpointing (timm's) (default: off)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bar on the first process (default: on)")

    g = parser.add_argument_group("processes (torchrun)")
    g.add_argument("--strategy", choices=STRATEGIES, default="ddp",
                   help="ddp: every process holds the whole model and optimizer, gradients are all-reduced; fsdp: "
                        "FSDP2 shards them over the processes (fully_shard on each block, then the root; bf16 "
                        "compute with fp32 gradient reduction on GPU under --precision bf16), checkpoints are "
                        "torch.distributed.checkpoint directories. Either resumes the other's checkpoints, at any "
                        "process count (default: ddp)")
    g.add_argument("--cpu-offload", action="store_true",
                   help="with --strategy fsdp: keep the parameter shards, gradients and AdamW states in host "
                        "memory and step the optimizer on the CPU (FSDP2's CPUOffloadPolicy) (default: off)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan (model size, strategy, processes, estimated memory per process) and "
                        "train nothing; the process count is torchrun's WORLD_SIZE, 1 outside it (default: off)")
    return parser


def build_parser(prog: str = "python -m vit_fast.train") -> argparse.ArgumentParser:
    """The parser of ``python -m vit_fast.train`` (``vit-fast train`` adds the same flags to its subcommand)."""
    return add_train_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with every unset recipe flag given its dataset's (or the global) default, checked."""
    r = argparse.Namespace(**vars(args))
    r.dataset = r.dataset or "digits"
    for key, value in {**GLOBAL_DEFAULTS, **RECIPES[r.dataset]}.items():
        if getattr(r, key, None) is None:
            setattr(r, key, value)
    for key in ("epochs", "batch_size"):
        if getattr(r, key) < 1:
            raise ValueError(f"{_flag(key)} must be >= 1; got {getattr(r, key)}")
    for key in ("lr", "min_lr", "weight_decay", "warmup_epochs", "clip_grad", "drop_path", "mixup", "cutmix",
                "workers", "threads", "ckpt_every", "seed"):
        if getattr(r, key) < 0:
            raise ValueError(f"{_flag(key)} must be >= 0; got {getattr(r, key)}")
    if not 0.0 <= r.label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1); got {r.label_smoothing}")
    if not 0.0 < r.layer_decay <= 1.0:
        raise ValueError(f"--layer-decay must be in (0, 1]; got {r.layer_decay}")
    if r.keep_ckpts < 1 or r.log_every < 1:
        raise ValueError("--keep-ckpts and --log-every must be >= 1")
    if r.cpu_offload and r.strategy != "fsdp":
        raise ValueError("--cpu-offload offloads FSDP's shards: it needs --strategy fsdp")
    r.override = list(r.override)
    return r


def recipe_of(args: argparse.Namespace) -> dict[str, object]:
    """The flags of ``args`` that decide what a run computes (all but :data:`RUNTIME_KEYS`)."""
    keys = vars(build_parser().parse_args([])).keys() - RUNTIME_KEYS
    return {k: getattr(args, k) for k in sorted(keys)}


def adopt_saved_recipe(args: argparse.Namespace, saved: dict[str, object]) -> None:
    """Put a resumed run's ``saved`` recipe into ``args``; a recipe flag given with another value is an error."""
    clashes = [f"{_flag(k)} {getattr(args, k)!r} (the run has {saved[k]!r})"
               for k in saved if getattr(args, k, None) is not None and getattr(args, k) != saved[k]]
    if clashes:
        raise ValueError("a resumed run keeps its recipe; these flags differ from it: " + "; ".join(clashes)
                         + ". Start a new run (with --init to begin from its weights) to change them")
    for k, v in saved.items():
        setattr(args, k, v)


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
    taken = sorted(out.keys() & _OWNED_FIELDS.keys())
    if taken:
        raise ValueError(f"--override {taken[0]}=... is not allowed: {_OWNED_FIELDS[taken[0]]} sets it")
    return out


def resolve_precision(name: str, device: torch.device) -> str:
    """``--precision auto`` made concrete: bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"
