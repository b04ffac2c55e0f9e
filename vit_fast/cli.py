"""The ``vit-fast`` command: ``vit-fast info`` (versions, devices, backends), ``vit-fast bench``, ``vit-fast train``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch


def _cmd_info(args: argparse.Namespace) -> int:
    from vit_fast import backends
    from vit_fast.envinfo import environment

    env = environment()
    print(f"vit_fast {env['vit_fast']}  (git {env['git_commit'] or 'unknown'})")
    print(f"torch {env['torch']}  triton {env['triton'] or 'not installed'}  "
          f"CUDA runtime {env['cuda_runtime'] or 'none'}  Python {env['python']}")
    print("devices:")
    for d in env["devices"]:
        extra = "  ".join(f"{k} {v}" for k, v in d.items() if k not in ("device", "name"))
        print(f"  {d['device']:<7} {d['name']}  {extra}")
    if not torch.cuda.is_available():
        print("  (no CUDA device visible: the triton and cuda backends need one; CPU runs use the reference)")
    print()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(backends.explain(args.device, dtype))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vit_fast.train import run_from_args  # torchvision and friends load only when training

    return run_from_args(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from vit_fast import bench

    try:
        return bench.main(args)
    except ValueError as e:
        print(f"vit-fast bench: error: {e}", file=sys.stderr)
        return 2


def _cmd_predict(args: argparse.Namespace) -> int:
    from vit_fast.predict import run

    try:
        return run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"vit-fast predict: error: {e}", file=sys.stderr)
        return 1


def _cmd_report(args: argparse.Namespace) -> int:
    from vit_fast.report import run

    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"vit-fast report: error: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-fast", description="vit_fast: a fast Vision Transformer for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, devices and which backend runs each op")
    info.add_argument("--device", default=None, help="device to explain the backends for (default: cuda if visible)")
    info.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "float64"],
                      help="dtype to explain the backends for (default: bfloat16 on CUDA, float32 on CPU)")
    info.set_defaults(func=_cmd_info)

    bench = sub.add_parser("bench", help="benchmark ops and models against PyTorch SDPA, eager, torch.compile, timm",
                           description="Time every vit_fast backend beside PyTorch SDPA (each backend forced), eager "
                           "PyTorch, torch.compile and timm, after checking each against the reference; write "
                           "results.json, report.md and plots.")
    from vit_fast.bench.cli import add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    from vit_fast.train import add_train_arguments

    train = sub.add_parser("train", help="train or fine-tune a ViT (digits by default; also under torchrun)",
                           description="Train a ViT with mixed precision: from scratch on scikit-learn's digits "
                           "(the default, no download), CIFAR-10/100 or an ImageFolder tree, or fine-tune one "
                           "with --init. Under torchrun each process takes a share of every batch (DDP).")
    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)
    from vit_fast.predict import add_predict_arguments

    predict = sub.add_parser("predict", help="classify image files with a trained model; attention-map overlays",
                             description="Top-k classes for image files, folders or globs, from a `vit-fast train` "
                             "run directory, a checkpoint or a preset, with the model's preprocessing; optionally "
                             "one PNG per image with its attention map (rollout or one layer's class token) "
                             "computed alongside the fast forward.")
    add_predict_arguments(predict)
    predict.set_defaults(func=_cmd_predict)
    from vit_fast.report import add_report_arguments

    report = sub.add_parser("report", help="training runs side by side: accuracy, size, GFLOPs, speed, curves",
                            description="A markdown table of `vit-fast train` runs (top-1, top-5, parameters, "
                            "GFLOPs per image, training and inference images/s, wall time) and a PNG of their "
                            "curves.")
    add_report_arguments(report)
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
