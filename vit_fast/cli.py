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
    bench.add_argument("--quick", action="store_true", help="a few shapes per op and one model (minutes, not hours)")
    bench.add_argument("--ops", nargs="+", metavar="OP",
                       help="ops to measure, space- or comma-separated, or 'none' (default: attention layer_norm "
                       "layernorm_mlp patch_embed)")
    bench.add_argument("--models", nargs="+", metavar="NAME",
                       help="model presets to measure, or 'none' (default: vit_base_patch16_224 on CUDA, "
                       "vit_tiny_patch4_32 on CPU; more in a full run)")
    bench.add_argument("--dtype", nargs="+", metavar="DTYPE",
                       help="float32, float16, bfloat16 (default: bfloat16 on CUDA, plus float16 and float32 in a "
                       "full run; float32 on CPU); models use the first")
    bench.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if visible)")
    bench.add_argument("--out", default="bench-results", help="output folder (default: bench-results)")
    bench.add_argument("--batch-size", type=int, default=None, help="model batch (default: 256 on CUDA, 64 for models "
                       "larger than ViT-B/16 at 224; on CPU 8 with --quick, else 16)")
    bench.add_argument("--no-compile", action="store_true", help="leave out the torch.compile providers")
    bench.add_argument("--budget-s", type=float, default=None,
                       help="start no measurement after this many seconds; the rest are recorded as skipped")
    bench.add_argument("--compare", metavar="RESULTS_JSON", default=None,
                       help="flag rows slower than in this earlier results.json by more than the noise")
    bench.add_argument("--threads", type=int, default=None,
                       help="CPU threads (default: torch's); 1 keeps timings stable on a busy machine")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(func=_cmd_bench)
    from vit_fast.train import add_train_arguments

    train = sub.add_parser("train", help="train or fine-tune a ViT (digits by default; also under torchrun)",
                           description="Train a ViT with mixed precision: from scratch on scikit-learn's digits "
                           "(the default, no download), CIFAR-10/100 or an ImageFolder tree, or fine-tune one "
                           "with --init. Under torchrun each process takes a share of every batch (DDP).")
    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
