"""Entry points: :func:`main` (``python -m vit_fast.train``), :func:`run_from_args` (``vit-fast train``) and
:func:`train` (a run from Python)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from vit_fast.train.distributed import env_rank, setup_distributed, teardown_distributed
from vit_fast.train.recipes import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vit_fast.train``: parse ``argv`` and train; returns the exit status."""
    return run_from_args(build_parser().parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``train(args)``; user errors and a diverged loss end with a one-line message and exit status 1."""
    try:
        train(args)
    except (ValueError, FileNotFoundError, FloatingPointError, KeyError) as e:
        if env_rank() == 0:
            print(f"vit-fast train: error: {e}", file=sys.stderr)
        return 1
    return 0


def train(args: argparse.Namespace) -> dict:
    """Train as ``args`` (from :func:`add_train_arguments`) say; returns the summary written to summary.json."""
    from vit_fast.train.trainer import Trainer  # torchvision and friends load only when training

    t0 = time.perf_counter()
    d = setup_distributed(args.device)
    try:
        return Trainer(args, d, t0).fit()
    finally:
        teardown_distributed()

