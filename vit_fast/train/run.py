"""Entry points: :func:`main` (``python -m vit_fast.train``), :func:`run_from_args` (``vit-fast train``) and
:func:`train` (a run from Python).

Exit statuses: 0 the run finished (or ``--dry-run`` printed its plan); 1 a mistake in the flags or the data, or
a diverged loss; :data:`~vit_fast.fileio.EXIT_WRITE_FAILED` (74) a checkpoint or output could not be written (a
full disk, an I/O error; the previous checkpoint is intact); :data:`~vit_fast.train.preemption.EXIT_PREEMPTED`
(75) stopped by SIGTERM or SIGUSR1 after writing a checkpoint, to be continued with ``--resume``. Under torchrun
a preempted worker exits 0 instead (see :func:`~vit_fast.train.preemption.exit_status`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from vit_fast.cli import error_message
from vit_fast.fileio import EXIT_WRITE_FAILED, describe_write_failure
from vit_fast.train.distributed import env_rank, setup_distributed, teardown_distributed, under_torchrun
from vit_fast.train.preemption import Preempted, StopSignals, exit_status
from vit_fast.train.recipes import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vit_fast.train``: parse ``argv`` and train; returns the exit status."""
    return run_from_args(build_parser().parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``train(args)``; a user error, a diverged loss, a failed write or a preemption ends with one line on
    stderr (from the first process; a preemption's from every process, naming its rank and step) and the
    status the module docstring lists."""
    try:
        train(args)
    except Preempted as p:
        print(f"vit-fast train: rank {env_rank()} {p}; continue with --resume", file=sys.stderr)
        return exit_status(under_torchrun())
    except (ValueError, FileNotFoundError, FloatingPointError, KeyError) as e:
        if env_rank() == 0:
            print(f"vit-fast train: error: {error_message(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        line = describe_write_failure(e)
        if line is None:
            raise
        if env_rank() == 0:
            print(f"vit-fast train: error: {line}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    return 0


def train(args: argparse.Namespace) -> dict:
    """Train as ``args`` (from :func:`add_train_arguments`) say; returns the summary written to summary.json.
    A SIGTERM or SIGUSR1 meanwhile ends it after a checkpoint with :class:`Preempted`."""
    from vit_fast.train.trainer import Trainer  # torchvision and friends load only when training

    t0 = time.perf_counter()
    if args.dry_run:
        from vit_fast.train.memory import describe_plan
        from vit_fast.train.recipes import resolve

        if env_rank() == 0:
            print(describe_plan(resolve(args)))
        return {}
    with StopSignals() as stop:
        d = setup_distributed(args.device, args.strategy)
        try:
            return Trainer(args, d, t0, stop).fit()
        finally:
            teardown_distributed()
