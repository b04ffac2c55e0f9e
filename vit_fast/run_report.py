"""``vit-fast report RUN_DIR...``: training runs side by side, as a markdown table and a PNG of their curves.

Per run: test top-1 and top-5, parameters, GFLOPs per image, training and inference images/s, wall time,
read from the run's ``summary.json`` (a run still in progress: its ``metrics.jsonl``). GFLOPs count a
multiply-add as 2 FLOPs: analytic for a ViT (every matmul, attention's two included; norms, softmax and GELU
left out, as is usual), ``torch.utils.flop_counter`` for any other model. Inference images/s is the
summary's when it records one, else measured here on the run's architecture (random weights: speed does not
depend on them), said so in the report.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "run"), ("model", "model"), ("dataset", "dataset"), ("epochs", "epochs"), ("top1", "top-1"),
    ("top5", "top-5"), ("params", "params"), ("gflops", "GFLOPs/img"), ("train_img_s", "train img/s"),
    ("infer_img_s", "infer img/s"), ("wall_s", "wall time"),
)


def vit_flops(config: object) -> int:
    """FLOPs of one image through a ViT with this :class:`~vit_fast.ViTConfig` (2 per multiply-add): patch
    projection, per block qkv, q k^T, p v, proj, fc1, fc2, and the head."""
    c = config
    ph, pw = (c.patch_size, c.patch_size) if isinstance(c.patch_size, int) else tuple(c.patch_size)
    E, n = c.embed_dim, c.num_patches + c.num_prefix_tokens
    macs = c.num_patches * c.in_chans * ph * pw * E
    per_block = n * E * 3 * E + 2 * n * n * E + n * E * E + 2 * n * E * c.mlp_hidden_dim
    macs += c.depth * per_block + E * c.num_classes
    return 2 * macs


def model_flops(model: torch.nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one image of ``input_shape`` (C, H, W): :func:`vit_flops` for a vit_fast ViT, else what
    ``torch.utils.flop_counter`` counts in a forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from vit_fast.model import VisionTransformer

    if isinstance(model, VisionTransformer):
        return vit_flops(model.config)
    p = next(model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    return int(counter.get_total_flops())


def inference_images_per_s(model: torch.nn.Module, input_shape: Sequence[int], *, batch_size: int = 64,
                           device: str | torch.device = "cpu", min_time_s: float = 0.5) -> float:
    """Forward images/s of ``model`` in eval mode without gradients: one warm-up batch, then batches until
    ``min_time_s`` has passed (at least two)."""
    device = torch.device(device)
    model = model.to(device).eval()
    x = torch.randn(batch_size, *input_shape, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        model(x)
        sync()
        t0, n = time.perf_counter(), 0
        while n < 2 or time.perf_counter() - t0 < min_time_s:
            model(x)
            sync()
            n += 1
        return n * batch_size / (time.perf_counter() - t0)


def load_run(run_dir: str | os.PathLike, *, measure: bool = True, device: str = "cpu",
             batch_size: int = 64) -> dict:
    """One row of the report (the :data:`COLUMNS` keys, None where unknown) plus the run's metrics records,
    read by :mod:`vit_fast.rundir` (a file of the run that is torn or of the wrong shape raises its error, which
    names the file)."""
    from vit_fast.rundir import read_run

    run = read_run(run_dir)
    path = run.path
    summary = run.facts()
    records = run.metrics()
    evals = [r for r in records if r.get("kind") == "eval"]
    last = evals[-1] if evals else {}
    train = [r for r in records if r.get("kind") == "train"]
    row = {
        "run": path.name or os.fspath(path), "path": os.fspath(path), "finished": run.finished,
        "model": summary.get("model"), "dataset": summary.get("dataset"),
        "epochs": summary.get("epochs", last.get("epoch")),
        "top1": summary.get("test_top1", last.get("test_top1")),
        "top5": summary.get("test_top5", last.get("test_top5")),
        "params": summary.get("params"), "gflops": summary.get("gflops"),
        "train_img_s": summary.get("train_images_per_s", _mean([r.get("img_s") for r in train])),
        "infer_img_s": summary.get("inference_images_per_s"), "infer_measured": False,
        "wall_s": summary.get("wall_s"), "records": records,
    }
    model = run.network()
    cfg = getattr(model, "config", None)  # a timm CNN has none: its summary records the input
    img_size = cfg.img_size if cfg is not None else summary.get("img_size")
    if model is not None and img_size is not None:
        in_chans = cfg.in_chans if cfg is not None else summary.get("in_chans", 3)
        shape = (in_chans, *((img_size, img_size) if isinstance(img_size, int) else img_size[-2:]))
        row["params"] = row["params"] or sum(p.numel() for p in model.parameters())
        if row["gflops"] is None:
            row["gflops"] = model_flops(model, shape) / 1e9
        if row["infer_img_s"] is None and measure:
            row["infer_img_s"] = inference_images_per_s(model, shape, batch_size=batch_size, device=device)
            row["infer_measured"] = True
    return row


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _cell(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key in ("top1", "top5"):
        return f"{value:.2%}"
    if key == "params":
        return f"{value / 1e6:.2f}M"
    if key == "gflops":
        return f"{value:.3g}"
    if key in ("train_img_s", "infer_img_s"):
        return f"{value:,.0f}"
    if key == "wall_s":
        return _duration(float(value))
    return str(value)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 60 else f"{minutes / 60:.1f} h"


def markdown_table(rows: Sequence[dict]) -> str:
    """The runs as a markdown table, then footnotes on unfinished runs and measured inference speeds."""
    names = _unique_names(rows)
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" if k in ("run", "model", "dataset") else "---:" for k, _ in COLUMNS) + "|"]
    for row, name in zip(rows, names, strict=True):
        cells = [name if k == "run" else _cell(k, row.get(k)) for k, _ in COLUMNS]
        if not row["finished"]:
            cells[0] += " (unfinished)"
        if row.get("infer_measured"):
            cells[-2] += "*"
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["GFLOPs: one image's forward, 2 FLOPs per multiply-add."]
    if any(r.get("infer_measured") for r in rows):
        notes.append("\\* inference img/s measured by `vit-fast report` (forward only, batch and device as given "
                     "to it), not during training.")
    if not all(r["finished"] for r in rows):
        notes.append("(unfinished): no summary.json yet; accuracy from the last evaluation in metrics.jsonl, the "
                     "rest from the newest checkpoint.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _unique_names(rows: Sequence[dict]) -> list[str]:
    names = [r["run"] for r in rows]
    return [r["path"] if names.count(r["run"]) > 1 else r["run"] for r in rows]


def plot_runs(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """A PNG of each run's test top-1 and training loss (epoch means) against the epoch."""
    from matplotlib.figure import Figure

    from vit_fast.fileio import atomic_write

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    for row, name in zip(rows, _unique_names(rows), strict=True):
        evals = [r for r in row["records"] if r.get("kind") == "eval"]
        ax_acc.plot([r["epoch"] for r in evals], [r["test_top1"] for r in evals], "o-", ms=2, label=name)
        by_epoch: dict[int, list[float]] = {}
        for r in row["records"]:
            if r.get("kind") == "train":
                by_epoch.setdefault(r["epoch"], []).append(r["loss"])
        ax_loss.plot(list(by_epoch), [sum(v) / len(v) for v in by_epoch.values()], label=name)
    ax_acc.set(xlabel="epoch", ylabel="test top-1", ylim=(0, 1), title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="training loss (epoch mean)")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def run(args: argparse.Namespace) -> int:
    """``vit-fast report``: print the table; write report.md and curves.png under ``--out``."""
    from vit_fast.fileio import atomic_write

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = [load_run(d, measure=args.measure, device=device, batch_size=args.batch_size) for d in args.runs]
    table = markdown_table(rows)
    print(table, end="")
    out = Path(args.out)
    atomic_write(out / "report.md", "# Runs\n\n" + table + "\n![curves](curves.png)\n")
    plot_runs(rows, out / "curves.png")
    print(f"-> {out / 'report.md'}, {out / 'curves.png'}")
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("runs", metavar="RUN_DIR", nargs="+", help="`vit-fast train` run directories")
    parser.add_argument("--out", default="report", metavar="DIR",
                        help="where report.md and curves.png go (default: report)")
    parser.add_argument("--no-measure", dest="measure", action="store_false",
                        help="do not time inference for runs whose summary has no inference speed")
    parser.add_argument("--device", default=None, help="device for timing inference (default: cuda if visible)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch for timing inference (default: 64)")
    return parser


__all__ = ["inference_images_per_s", "load_run", "markdown_table", "model_flops", "plot_runs", "vit_flops"]
