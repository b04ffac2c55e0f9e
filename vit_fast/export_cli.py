"""`vit-fast export MODEL --format onnx|pt2|aoti`: loads MODEL as `vit-fast predict` does (or a model directory) and
writes it through :func:`vit_fast.export.export_model`. Kept apart from that module, which the package's top level
imports, because loading a run directory imports the trainer's model builders, which import the package."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vit_fast.export import DTYPES, FORMATS, export_model


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model_path", metavar="MODEL",
                        help="a `vit-fast train` run directory, a checkpoint file, a preset name (as `vit-fast "
                             "predict` takes) or a model directory (config.json + model.safetensors)")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS),
                        help="onnx (torch.onnx dynamo exporter, checked under onnxruntime), pt2 (torch.export) or "
                             "aoti (an AOTInductor package for --device)")
    parser.add_argument("--out", default=None,
                        help="file to write (default: MODEL's name + .onnx, .pt2 or .aoti.pt2, here)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="fix the batch size (default: dynamic, any batch)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameters and inputs")
    parser.add_argument("--device", default="cpu", help="where it runs: cpu or cuda (aoti compiles for it)")
    parser.add_argument("--backend", default=None, choices=["auto", "reference", "triton", "cuda"],
                        help="the vit_fast backend while tracing (default: the one in force, auto)")
    parser.add_argument("--quantize", default=None, choices=["int8", "fp8"],
                        help="quantize the model first (vit_fast.quantize); formats that cannot hold it say why")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="preset of a checkpoint that records no config (as `vit-fast predict --model`)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="largest max relative error vs eager accepted (default: 1e-4 fp32, 1e-2 fp16, "
                             "5e-2 bf16)")
    return parser


def load_for_export(spec: str, model_name: str | None = None) -> tuple[torch.nn.Module, str]:
    """``(model, description)`` for what ``vit-fast export`` takes as MODEL."""
    from vit_fast.hub import is_model_dir

    if is_model_dir(spec):
        from vit_fast.factory import from_pretrained

        return from_pretrained(spec), f"model directory {spec}"
    from vit_fast.predict import load_model

    model, _, description = load_model(spec, model_name=model_name)
    return model, description


def run(args: argparse.Namespace) -> int:
    model, description = load_for_export(args.model_path, args.model)
    if args.quantize:
        from vit_fast.quantization import quantize

        model = quantize(model, args.quantize)
    spec = Path(args.model_path)
    out = args.out or (spec.stem if spec.is_file() else spec.name) + FORMATS[args.format]
    print(f"exporting {description} as {args.format} ...", flush=True)
    result = export_model(model, out, args.format, batch_size=args.batch_size, dtype=DTYPES[args.dtype],
                          device=args.device, backend=args.backend, rtol=args.rtol)
    print(result.describe())
    return 0
