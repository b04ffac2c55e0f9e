"""The ``vit-fast`` command: ``vit-fast info`` (versions, devices, backends)."""

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
    print(f"torch {env['torch']}  triton {env['triton'] or 'not installed'}  CUDA runtime {env['cuda_runtime'] or 'none'}"
          f"  Python {env['python']}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-fast", description="vit_fast: a fast Vision Transformer for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, devices and which backend runs each op")
    info.add_argument("--device", default=None, help="device to explain the backends for (default: cuda if visible)")
    info.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "float64"],
                      help="dtype to explain the backends for (default: bfloat16 on CUDA, float32 on CPU)")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
