"""A run's ``metrics.jsonl`` (one JSON line per training step and per evaluation) and its ``curves.png``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from vit_fast.fileio import atomic_write


class MetricsLog:
    """``metrics.jsonl`` opened for appending; disabled (writes nothing) in every process but the first."""

    def __init__(self, path: str | os.PathLike, enabled: bool) -> None:
        self._file = open(path, "a") if enabled else None  # noqa: SIM115 - closed by close()

    def write(self, records: Iterable[dict]) -> None:
        """Append ``records`` and flush them, so a killed run loses no line it logged."""
        if self._file is None:
            return
        self._file.writelines(json.dumps(r) + "\n" for r in records)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


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


def truncate_metrics(path: str | os.PathLike, last_step: int | None) -> None:
    """Keep the records up to ``last_step`` (none when None): a resumed run logs the later steps again."""
    kept = [r for r in read_metrics(path) if last_step is not None and r["step"] <= last_step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_curves(records: Sequence[dict], path: str | os.PathLike, title: str) -> None:
    """A PNG of the training loss and accuracy per step (and their epoch means) and the test metrics."""
    from matplotlib.figure import Figure

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    by_epoch: dict[int, list[dict]] = {}
    for r in train:
        by_epoch.setdefault(r["epoch"], []).append(r)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, label in ((ax_loss, "loss", "train loss"), (ax_acc, "acc", "train top-1")):
        ax.plot([r["step"] for r in train], [r[key] for r in train], lw=0.5, alpha=0.35, color="C0")
        ax.plot([rs[-1]["step"] for rs in by_epoch.values()],
                [sum(r[key] for r in rs) / len(rs) for rs in by_epoch.values()], color="C0",
                label=f"{label} (epoch mean)")
        ax.set_xlabel("step")
    for ax, key, label, color in ((ax_loss, "test_loss", "test loss", "C1"), (ax_acc, "test_top1", "test top-1", "C1"),
                                  (ax_acc, "test_top5", "test top-5", "C2")):
        ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", ms=2, color=color, label=label)
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
