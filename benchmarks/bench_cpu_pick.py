"""CPU: `vit_fast.optimize_for_inference(model)` with default arguments against PyTorch's own ways of running the
same model (timm's ViT with the same weights: fp32 and bf16, eager and torch.compile with inductor freezing), in one
process, timed interleaved.

On a shared or throttling machine a rate drifts by 10 % within a minute, so contenders timed one after the other
can swap places. Here every round times each contender in turn (a fresh random order per round) for --calls calls
and keeps the median; a contender's figure is the median of its round medians, and its ratio to the baseline is the
median of the per-round ratios, with their range, so drift moves both sides of each ratio alike. Each contender's
output is compared with fp32 eager first (relative error, top-1 agreement). The PyTorch contenders are built by the
CPU path search's own builders, so they get the same input casts and compile settings as the pick, and the bf16
compile also with PyTorch's default inductor settings (no C++ wrapper), the route users reach for. Results go to
--out (results.json, report.md) with the CPU model and features, versions and the commit.

    python benchmarks/bench_cpu_pick.py --model vit_small_patch16_224 --batch-size 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_COMPILE = "pytorch:compiled:freezing:bf16"  # PyTorch's bf16 compile + freezing, default inductor settings


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224", help="a preset timm also has (random weights)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=5, help="timed calls per contender and round (the median is kept)")
    p.add_argument("--out", default=None, help="folder (default: benchmarks/results/cpu-pick-<date>/)")
    return p.parse_args(argv)


def _contenders(name: str, batch: int):
    """(name, callable taking fp32 images) for the pick and each PyTorch way; the pick's search explanation."""
    import timm

    import vit_fast
    from vit_fast import cpu_paths

    ours = vit_fast.create_model(name).eval()
    theirs = timm.create_model(name).eval()
    theirs.load_state_dict(ours.state_dict())  # the same weights under timm's module tree
    with tempfile.TemporaryDirectory() as cache:  # a fresh search, not an earlier run's cached pick
        old = os.environ.get("XDG_CACHE_HOME")
        os.environ["XDG_CACHE_HOME"] = cache
        try:
            t0 = time.perf_counter()
            predictor = vit_fast.optimize_for_inference(ours)
            search_s = time.perf_counter() - t0
        finally:
            if old is None:
                os.environ.pop("XDG_CACHE_HOME")
            else:
                os.environ["XDG_CACHE_HOME"] = old
    import torch

    builders = {c.name: c.build for c in cpu_paths.candidates()}
    default_compile = cpu_paths.compiled_build(torch.bfloat16, cpp_wrapper=False)
    # PyTorch's bf16 ways run on every CPU, native bf16 or not: where bf16 is emulated, the rows show what it costs
    out = [("vit_fast:optimized", predictor), ("pytorch:eager", builders["fp32"](theirs, None)),
           ("pytorch:compiled:freezing", builders["compiled:fp32"](theirs, None)),
           ("pytorch:eager:bf16", builders["bf16"](theirs, None)),
           ("pytorch:compiled:freezing:bf16", default_compile(theirs, None)),
           ("pytorch:compiled:freezing+cpp_wrapper:bf16", builders["compiled:bf16"](theirs, None))]
    return out, theirs, predictor.explain(), search_s


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from vit_fast import cpu_features, cpu_paths
    from vit_fast.envinfo import git_commit

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    contenders, fp32_model, explanation, search_s = _contenders(args.model, args.batch_size)
    names = [n for n, _ in contenders]
    x = torch.randn(args.batch_size, 3, *fp32_model.default_cfg["input_size"][1:])
    with torch.no_grad():
        ref = fp32_model(x)
    checks = {}
    for n, fn in contenders:
        with torch.no_grad():
            for _ in range(2):  # compiles at the first call
                y = fn(x).float()
        rel, top1, why = cpu_paths.agreement(y, ref, cpu_paths.AccuracyBudget())
        checks[n] = {"rel_error": rel, "top1": top1, "within_budget": why is None}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = contenders[:]
        rng.shuffle(order)
        for n, fn in order:
            ts = []
            with torch.no_grad():
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    fn(x)
                    ts.append(time.perf_counter() - t0)
            per_round[n].append(statistics.median(ts))
    base = min((n for n in names if n.startswith("pytorch:")), key=lambda n: statistics.median(per_round[n]))

    def ratio(n: str, to: str) -> tuple[float, list[float]]:
        ratios = sorted(b / m for m, b in zip(per_round[n], per_round[to], strict=True))
        return statistics.median(ratios), [ratios[0], ratios[-1]]

    rows = []
    for n in names:
        (vs, vs_range), (vs_default, vs_default_range) = ratio(n, base), ratio(n, DEFAULT_COMPILE)
        rows.append({"name": n, "images_per_s": args.batch_size / statistics.median(per_round[n]),
                     "ms": statistics.median(per_round[n]) * 1e3, "vs_baseline": vs, "vs_baseline_range": vs_range,
                     "vs_default_compile": vs_default, "vs_default_compile_range": vs_default_range, **checks[n]})
    feats = cpu_features.cpu_features()
    result = {"model": args.model, "batch_size": args.batch_size, "threads": args.threads, "rounds": args.rounds,
              "calls": args.calls, "baseline": base, "cpu": feats.as_dict(), "torch": torch.__version__,
              "commit": git_commit(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "search_s": search_s,
              "pick": explanation, "rows": rows}
    out = Path(args.out or Path(__file__).parent / "results" / f"cpu-pick-{time.strftime('%Y-%m-%d')}")
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# optimize_for_inference on {feats.name} ({', '.join(feats.present)})", "",
             f"{args.model}, batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}, commit "
             f"{result['commit']}; {args.rounds} interleaved rounds x {args.calls} calls. Ratio: the baseline's time "
             f"over the contender's, median of the per-round ratios [range], against the fastest PyTorch way here "
             f"and against PyTorch's bf16 compile + freezing with default inductor settings.", "",
             f"| contender | images/s | vs {base} | vs {DEFAULT_COMPILE} | rel. error vs fp32 | top-1 agreement |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['images_per_s']:.1f} | {r['vs_baseline']:.2f}x "
                     f"[{r['vs_baseline_range'][0]:.2f}, {r['vs_baseline_range'][1]:.2f}] | "
                     f"{r['vs_default_compile']:.2f}x [{r['vs_default_compile_range'][0]:.2f}, "
                     f"{r['vs_default_compile_range'][1]:.2f}] | {r['rel_error']:.3g} | {r['top1']:.2f} |")
    lines += ["", f"The search took {search_s:.0f} s. Its explanation:", "", "```", explanation, "```", ""]
    from vit_fast.fileio import atomic_write

    atomic_write(out / "results.json", json.dumps(result, indent=1))
    atomic_write(out / "report.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
