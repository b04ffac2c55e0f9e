"""``vit-fast bench``: its flags and what the command prints and returns."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from vit_fast.bench.analysis import format_comparison
from vit_fast.bench.cases import OPS
from vit_fast.bench.cpu_targets import cpu_target_status
from vit_fast.bench.report import summary_table
from vit_fast.bench.runner import DEFAULT_OUT, BenchConfig, run
from vit_fast.bench.targets import target_status


def parse_list(values: Sequence[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: flags take space- or comma-separated lists."""
    return [v for item in values or () for v in item.split(",") if v]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``vit-fast bench``."""
    parser.add_argument("--quick", action="store_true", help="a few shapes per op and one model (minutes, not hours)")
    parser.add_argument("--ops", nargs="+", metavar="OP",
                        help=f"ops to measure, space- or comma-separated, or 'none' (default: every one, "
                        f"{' '.join(OPS)}; on CPU less the fp8 ones, whose e4m3 math is emulated there)")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="model presets to measure, or 'none' (default: vit_base_patch16_224 on CUDA, "
                        "vit_tiny_patch4_32 on CPU; more in a full run)")
    parser.add_argument("--dtype", nargs="+", metavar="DTYPE",
                        help="float32, float16, bfloat16 (default: bfloat16 on CUDA, plus float16 and float32 in a "
                        "full run; float32 on CPU); models use the first")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if visible)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--batch-size", type=int, default=None, help="model batch (default: 256 on CUDA, 64 for "
                        "models larger than ViT-B/16 at 224; on CPU 8 with --quick, else 16)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile providers")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no measurement after this many seconds; the rest are recorded as skipped")
    parser.add_argument("--compare", metavar="RESULTS_JSON", default=None,
                        help="flag rows slower than in this earlier results.json by more than the noise")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 keeps timings stable on a busy machine")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """``vit-fast bench``: exit status 1 when one of vit_fast's providers failed (crashed or disagreed with
    the reference; a baseline that fails is reported, not fatal), 130 when interrupted."""
    ops_, models = parse_list(args.ops), parse_list(args.models)
    cfg = BenchConfig(quick=args.quick, ops=[] if ops_ == ["none"] else ops_ or None,
                      models=None if args.models is None else [] if models == ["none"] else models,
                      dtypes=parse_list(args.dtype) or None, device=args.device, out=args.out,
                      batch_size=args.batch_size, compile=not args.no_compile, budget_s=args.budget_s,
                      compare=args.compare, progress=False if args.no_progress else None, threads=args.threads)
    results = run(cfg)
    print(summary_table(results))
    if results.get("comparison"):
        print(format_comparison(results["comparison"]))
    for t in [*target_status(results), *cpu_target_status(results)]:
        print(f"target {t['target']}: {t['status']}" + (f" ({t['measured']})" if t["measured"] != "-" else ""))
    print(f"wrote {os.path.join(cfg.out, 'results.json')}, report.md and {len(results.get('plots', []))} plots "
          f"in {results['config']['elapsed_s']:.0f} s")
    if results.get("interrupted"):
        return 130
    return 1 if any(r["status"] == "failed" and r["provider_kind"] == "vit_fast" for r in results["rows"]) else 0
