"""Preemption: SIGTERM (what schedulers send before they kill a job) or SIGUSR1 (what Slurm's ``--signal``
sends) during ``vit-fast train`` finishes the current step, writes a checkpoint and ends the run with
:data:`EXIT_PREEMPTED`, or 0 under torchrun (see :func:`exit_status`); ``--resume`` continues it bitwise.

The handler only notes the signal. The processes agree on it after every step (a host-side all-reduce of the
flag), so they all stop after the same step, and none is left waiting in a collective for one that stopped.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

# sysexits.h's EX_TEMPFAIL: "a temporary failure, the user is invited to retry" - run it again with --resume.
EXIT_PREEMPTED = 75
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after step ``step``; its checkpoint ``path`` continues it with ``--resume``."""

    def __init__(self, signum: int, step: int, path: str) -> None:
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {path}")


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 set :attr:`received` instead of ending the process (in the main
    thread; elsewhere signals cannot be caught and nothing changes). The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[signal.Signals, object] = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_stop_signals(worker_id: int) -> None:
    """``DataLoader`` workers' ``worker_init_fn``: a signal sent to the whole process group must not kill a loader
    worker under the training process, which finishes its step and checkpoints before it exits."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def shut_down_workers(*loaders: object) -> None:
    """Stop the persistent workers of ``loaders`` now. They ignore SIGTERM (:func:`ignore_stop_signals`), so the
    interpreter's exit, which terminates daemonic children with SIGTERM and then joins them, would wait for them
    forever whenever a loader's iterator outlives the run (an error's traceback holds it, or a reference cycle)."""
    for loader in loaders:
        it = getattr(loader, "_iterator", None)
        if hasattr(it, "_shutdown_workers"):
            loader._iterator = None
            it._shutdown_workers()


def exit_status(under_torchrun: bool) -> int:
    """What a preempted process exits with. torchrun restarts a worker group in place whenever a worker exits
    non-zero (while ``--max-restarts`` lasts), so under torchrun a preempted worker exits 0: the job ends
    instead of training on where it was told to stop. A crashed worker still exits non-zero and is restarted.
    Run alone, :data:`EXIT_PREEMPTED` tells a script to run it again with ``--resume``."""
    return 0 if under_torchrun else EXIT_PREEMPTED
