"""``vit-fast convert CHECKPOINT --out model.safetensors``: a training checkpoint consolidated into one file of
the model's weights.

CHECKPOINT is a DCP directory (``--strategy fsdp``, written by any number of processes), a ``step_NNNNNNNN.pt``
file, or a run directory (its newest readable checkpoint). The output is what a finished run writes as its
``model.safetensors``: timm's parameter names, and the metadata that rebuilds the network, so
``vit_fast.load_checkpoint``, timm's ``load_checkpoint`` and ``vit-fast predict`` read it. It runs in one
process, without a process group.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def convert(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the weights of ``checkpoint`` (see the module docstring) to the safetensors file ``out``; returns
    the checkpoint read."""
    from vit_fast.train.checkpoints import (
        list_checkpoints,
        load_dcp_model_state,
        load_newest_checkpoint,
        read_checkpoint,
        save_weights,
    )
    from vit_fast.train.models import model_from_config

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"CHECKPOINT {path} does not exist")
    if (path / "checkpoints").is_dir():
        ckpt = load_newest_checkpoint(path / "checkpoints")
        if ckpt is None:
            found = ", ".join(p.name for p in list_checkpoints(path / "checkpoints")) or "none"
            raise ValueError(f"CHECKPOINT {path}: a run directory without a readable checkpoint (found: {found})")
    else:
        try:
            ckpt = read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - torn, foreign or of another format: one message naming the file
            raise ValueError(f"CHECKPOINT {path} is not a readable vit_fast training checkpoint ({e})") from e
    if ckpt["dcp"] is None:
        weights = {k: v.contiguous() for k, v in ckpt["model"].items()}
    else:
        with torch.device("meta"):
            model = model_from_config(ckpt["config"])
        template = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
        weights = load_dcp_model_state(ckpt["dcp"], template)
    save_weights(out, weights, ckpt["config"], dataset=ckpt["recipe"]["dataset"], model=ckpt["recipe"]["model"])
    return Path(ckpt["path"])


def run(args: argparse.Namespace) -> int:
    """``vit-fast convert``; prints what it read and wrote."""
    source = convert(args.checkpoint, args.out)
    print(f"{source} -> {args.out}")
    return 0


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a training checkpoint: a step_NNNNNNNN/ DCP directory, a step_NNNNNNNN.pt file, or a "
                             "run directory (its newest checkpoint)")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the .safetensors file to write (replaced atomically if it exists)")
    return parser


__all__ = ["add_convert_arguments", "convert", "run"]
