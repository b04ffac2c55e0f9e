"""The ``vit-fast`` command: one subcommand per job, each living in the module that does it.

``info`` (versions, devices, backends), ``bench``, ``tune``, ``train``, ``predict``, ``report``, ``eval``,
``kernels``.
A subcommand's module is imported only when it runs or when its flags are listed, so ``vit-fast info`` needs
none of the extras.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Command:
    """A subcommand: ``module.add_arguments(parser)`` declares its flags, ``module.run(args)`` runs it; the
    exceptions in ``errors`` are a user's mistake, printed as one line with exit status ``status``."""

    name: str
    module: str
    add_arguments: str
    run: str
    help: str
    description: str
    errors: tuple[type[BaseException], ...] = ()
    status: int = 1


COMMANDS = (
    Command("bench", "vit_fast.bench", "add_bench_arguments", "main",
            "benchmark ops and models against PyTorch SDPA, eager, torch.compile, timm",
            "Time every vit_fast backend beside PyTorch SDPA (each backend forced), eager PyTorch, torch.compile "
            "and timm, after checking each against the reference; write results.json, report.md and plots.",
            (ValueError,), 2),
    Command("tune", "vit_fast.tune", "add_tune_arguments", "main",
            "measure which backend auto should run on this GPU; write its policy",
            "Check every backend against the fp32 oracle, then time it as `vit-fast bench` does, per op, dtype, "
            "mode and shape bucket of the ViT presets' shapes; write the policy auto follows on this kind of GPU "
            "(kernels only where they beat PyTorch)."),
    Command("train", "vit_fast.train", "add_train_arguments", "run_from_args",
            "train or fine-tune a ViT or a timm CNN (digits by default; also under torchrun)",
            "Train with mixed precision: from scratch on scikit-learn's digits (the default, no download), "
            "CIFAR-10/100 or an ImageFolder tree, or fine-tune with --init. Under torchrun each process takes a "
            "share of every batch (DDP)."),
    Command("predict", "vit_fast.predict", "add_predict_arguments", "run",
            "classify image files with a trained model; attention-map overlays",
            "Top-k classes for image files, folders or globs, from a `vit-fast train` run directory, a checkpoint "
            "or a preset, with the model's preprocessing; optionally one PNG per image with its attention map "
            "(rollout or one layer's class token) computed alongside the fast forward.",
            (ValueError, FileNotFoundError, KeyError)),
    Command("report", "vit_fast.run_report", "add_report_arguments", "run",
            "training runs side by side: accuracy, size, GFLOPs, speed, curves",
            "A markdown table of `vit-fast train` runs (top-1, top-5, parameters, GFLOPs per image, training and "
            "inference images/s, wall time) and a PNG of their curves.",
            (ValueError, FileNotFoundError)),
    Command("eval", "vit_fast.evaluate", "add_eval_arguments", "run",
            "a training run's model on its test split, optionally quantized",
            "Top-1, top-5 and images/s of a `vit-fast train` run's model on its test split; with --quantize also "
            "of the model quantized to fp8 or int8, side by side.",
            (ValueError, FileNotFoundError, RuntimeError)),
    Command("convert", "vit_fast.train.convert", "add_convert_arguments", "run",
            "consolidate a training checkpoint (FSDP's sharded or a single file) into one model.safetensors",
            "Read a `vit-fast train` checkpoint (a torch.distributed.checkpoint directory written by any number of "
            "processes, a step_NNNNNNNN.pt file, or a run directory's newest) and write the model's weights as one "
            "safetensors file that vit_fast.load_checkpoint, timm and `vit-fast predict` load.",
            (ValueError, FileNotFoundError)),
    Command(name="kernels", module="vit_fast.kernel_resources", add_arguments="add_kernels_arguments", run="main",
            help="registers, spills, shared memory and occupancy of every kernel variant (no GPU needed)",
            description="Compile every Triton kernel variant the dispatcher can launch at ViT shapes for sm_80 or "
            "sm_90 and read its registers, spills and shared memory from the cubin, and the vit_fast._C kernels' "
            "when the extension is built; theoretical occupancy from the target's per-SM limits."),
    Command("export", "vit_fast.export_cli", "add_export_arguments", "run",
            "a model as ONNX, a torch.export program (.pt2) or an AOTInductor package, checked against eager",
            "Export a run directory, checkpoint, preset or model directory (config.json + model.safetensors) with "
            "torch.onnx's dynamo exporter (checked under onnxruntime), torch.export or AOTInductor, dynamic or "
            "fixed batch; the artifact is compared with eager on fresh inputs and written only if it matches.",
            (ValueError, FileNotFoundError, KeyError, ImportError)),
)


def _cmd_info(args: argparse.Namespace) -> int:
    from vit_fast.envinfo import environment
    from vit_fast.explanation import explain

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
    print(explain(args.device, dtype))
    return 0


def error_message(e: Exception) -> str:
    """The line a user reads for a user error: str() of a KeyError is its argument's repr, quoted."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _runner(command: Command):
    """``command``'s run, with its user errors and, for every subcommand alike, a full disk or an I/O error
    while writing (:mod:`vit_fast.fileio`) each ending in one line on stderr and a status, not a traceback."""
    from vit_fast.fileio import EXIT_WRITE_FAILED, describe_write_failure

    def run(args: argparse.Namespace) -> int:
        try:
            return getattr(importlib.import_module(command.module), command.run)(args)
        except command.errors as e:
            print(f"vit-fast {command.name}: error: {error_message(e)}", file=sys.stderr)
            return command.status
        except OSError as e:
            line = describe_write_failure(e)
            if line is None:
                raise
            print(f"vit-fast {command.name}: error: {line}", file=sys.stderr)
            return EXIT_WRITE_FAILED

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-fast", description="vit_fast: a fast Vision Transformer for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, devices and which backend runs each op")
    info.add_argument("--device", default=None, help="device to explain the backends for (default: cuda if visible)")
    info.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "float64"],
                      help="dtype to explain the backends for (default: bfloat16 on CUDA, float32 on CPU)")
    info.set_defaults(func=_cmd_info)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        getattr(importlib.import_module(command.module), command.add_arguments)(p)
        p.set_defaults(func=_runner(command))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
