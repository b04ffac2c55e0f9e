"""``vit-fast eval RUN_DIR [--quantize fp8|int8]``: a training run's model on its test split (top-1, top-5,
images/s), so a user sees what quantization costs before deploying it.

Under ``torchrun`` every process scores every N-th image of the split (NCCL on GPU, gloo on CPU) and the
counts are summed, so the accuracies are exactly the one-process ones; images/s is the processes' images over
the slowest one's model time. Only the first process prints.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn as nn


def evaluate(model: nn.Module, dataset: torch.utils.data.Dataset, *, batch_size: int = 256,
             device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict:
    """Top-1 and top-5 accuracy of ``model`` over ``dataset`` (items ``(image, label)``), and the forward's
    images/s (model time only: loading and preprocessing are left out; the first batch is a warm-up)."""
    counts = _count(model, dataset, batch_size=batch_size, device=torch.device(device), dtype=dtype)
    return _rates(counts)


@torch.no_grad()
def _count(model: nn.Module, dataset: torch.utils.data.Dataset, *, batch_size: int, device: torch.device,
           dtype: torch.dtype | None) -> list[float]:
    """``[top-1 hits, top-5 hits, images, timed images, timed seconds]`` of ``model`` over ``dataset``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.eval()
    top1 = top5 = seen = 0
    timed_images, timed_s = 0, 0.0
    for i, (images, labels) in enumerate(loader):
        images, labels = images.to(device, dtype or torch.float32), labels.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        logits = model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0 or len(loader) == 1:
            timed_images, timed_s = timed_images + len(images), timed_s + time.perf_counter() - t0
        k = min(5, logits.shape[-1])
        best = logits.float().topk(k, dim=-1).indices  # (B, k)
        hits = best == labels[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        seen += len(labels)
    return [top1, top5, seen, timed_images, timed_s]


def _rates(counts: list[float]) -> dict:
    top1, top5, seen, timed_images, timed_s = counts
    if seen == 0:
        raise ValueError("the test split is empty")
    return {"top1": top1 / seen, "top5": top5 / seen, "images": int(seen),
            "images_per_s": timed_images / timed_s if timed_s > 0 else float("nan")}


def _evaluate_sharded(model: nn.Module, dataset: torch.utils.data.Dataset, d: object, *, batch_size: int,
                      dtype: torch.dtype | None) -> dict:
    """:func:`evaluate` over the processes of ``d`` (a :class:`~vit_fast.train.distributed.Dist`): each scores
    its shard; hits and images are summed (exact integers in float64), the model time is the slowest shard's."""
    import torch.distributed as dist

    from vit_fast.train.data import shard

    counts = _count(model, shard(dataset, d.rank, d.world_size), batch_size=batch_size, device=d.device,
                    dtype=dtype)
    sums = torch.tensor(counts[:4], dtype=torch.float64)
    slowest = torch.tensor([counts[4]], dtype=torch.float64)
    dist.all_reduce(sums, group=d.control)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=d.control)
    return _rates([*sums.tolist(), slowest.item()])


def load_test_split(summary: dict, data_dir: str | None) -> torch.utils.data.Dataset:
    """The test split a run was trained against, preprocessed as in training's evaluation."""
    from vit_fast.train import data

    name = summary.get("dataset") or (summary.get("recipe") or {}).get("dataset")
    if name is None:
        raise ValueError("the run's summary.json names no dataset")
    _train, test, _info = data.load_datasets(name, data_dir, int(summary["img_size"]), data.Augmentation())
    return test


def run(args: argparse.Namespace) -> int:
    """``vit-fast eval``; prints one line per evaluated model and returns the exit status. Under torchrun the
    processes share the test split (see the module docstring)."""
    from vit_fast.train.distributed import env_world_size, setup_distributed, teardown_distributed

    if env_world_size() == 1:
        return _run(args, None)
    d = setup_distributed(args.device or "auto")
    try:
        return _run(args, d)
    finally:
        teardown_distributed()


def _run(args: argparse.Namespace, d: object | None) -> int:
    import vit_fast
    from vit_fast.predict import load_model
    from vit_fast.quantization import quantize

    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    model, summary, description = load_model(args.run_dir)
    if summary is None:
        raise ValueError(f"{args.run_dir} is not a `vit-fast train` run directory (no summary.json)")
    if d is not None:
        device = d.device
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(device, dtype).eval()
    test = load_test_split(summary, args.data_dir)
    candidates = [("fp32" if dtype == torch.float32 else "bf16", model)]
    for fmt in args.quantize or ():
        candidates.append((fmt, quantize(model, fmt)))
    with vit_fast.set_backend(args.backend) if args.backend else contextlib.nullcontext():
        if d is None:
            results = [(name, evaluate(m, test, batch_size=args.batch_size, device=device, dtype=dtype))
                       for name, m in candidates]
        else:
            results = [(name, _evaluate_sharded(m, test, d, batch_size=args.batch_size, dtype=dtype))
                       for name, m in candidates]
    if d is not None and not d.main:
        return 0
    where = f"{device}" if d is None else f"{d.world_size} processes on {device.type}"
    print(f"{description}: {summary.get('dataset')} test split, {results[0][1]['images']} images, {where}")
    base = results[0][1]
    for name, r in results:
        delta = "" if r is base else (f"  (top-1 {100 * (r['top1'] - base['top1']):+.2f} pts, "
                                      f"{r['images_per_s'] / base['images_per_s']:.2f}x images/s)")
        print(f"  {name:<5} top-1 {100 * r['top1']:6.2f}%  top-5 {100 * r['top5']:6.2f}%  "
              f"{r['images_per_s']:9.1f} images/s{delta}")
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from vit_fast.backends import CHOICES

    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `vit-fast train` run directory")
    parser.add_argument("--quantize", nargs="+", choices=["fp8", "int8"], default=None,
                        help="also evaluate the model quantized to these formats, beside the unquantized one")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward (default 256)")
    parser.add_argument("--data-dir", default=None, help="dataset folder (CIFAR, ImageFolder; digits needs none)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if visible)")
    parser.add_argument("--backend", default=None, choices=CHOICES,
                        help="vit_fast backend (default: the current setting)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    return parser


__all__ = ["add_eval_arguments", "evaluate", "load_test_split", "run"]
