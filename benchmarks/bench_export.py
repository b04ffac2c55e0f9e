"""CPU speed of each artifact `vit-fast export` writes (ONNX under onnxruntime, torch.export .pt2, AOTInductor
package) beside eager PyTorch, for one model, fp32, at a few batch sizes.

Each artifact is written by `vit_fast.export_model` (so it has passed the check against eager before it is
timed), with a dynamic batch: one file serves every batch size, as a user's default export does. Timings are
the median of --repeats calls after --warmup calls, on --threads threads (set before torch is imported, so that
OpenMP, which AOTInductor's code uses, sees the same count). Results go to a JSON file (--out) with the machine's
CPU model and flags, versions and the commit.

    python benchmarks/bench_export.py --model vit_small_patch16_224 --batch-sizes 1 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ("pt2", "aoti", "onnx")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224", help="a vit_fast preset (random weights)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for torch, OpenMP and onnxruntime")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None,
                   help="JSON file to write (default: benchmarks/results/export-cpu-<date>/results.json)")
    return p.parse_args(argv)


def _cpu() -> dict:
    from vit_fast import cpu_features

    return {**cpu_features.cpu_features().as_dict(), "logical_cpus": os.cpu_count()}


def _median_s(fn, x, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch: its OpenMP pool is sized at import
        os.environ[var] = str(args.threads)
    import torch

    import vit_fast
    from vit_fast.envinfo import git_commit
    from vit_fast.export import FORMATS as SUFFIX
    from vit_fast.export import export_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vit_fast.create_model(args.model, img_size=args.img_size).eval()
    shape = (model.config.in_chans, args.img_size, args.img_size)
    runners = {"eager": lambda x: model(x)}
    artifacts = {}
    work = tempfile.mkdtemp(prefix="bench-export-")
    for fmt in args.formats:
        path = os.path.join(work, "m" + SUFFIX[fmt])
        result = export_model(model, path, fmt)
        artifacts[fmt] = {"export_s": round(result.seconds, 1), "max_rel_error": result.max_rel_error,
                          "custom_ops": list(result.custom_ops),
                          "mib": round(sum(os.path.getsize(f) for f in result.files) / 2**20, 1)}
        print(f"{fmt}: exported in {result.seconds:.1f} s, max relative error {result.max_rel_error:.1e}",
              flush=True)
        if fmt == "pt2":
            runners["pt2"] = torch.export.load(path).module()
        elif fmt == "aoti":
            runners["aoti"] = torch._inductor.aoti_load_package(path)
        else:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.inter_op_num_threads = 1
            session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            runners["onnx"] = lambda x, s=session, n=name: s.run(None, {n: x.numpy()})[0]

    rows = []
    with torch.no_grad():
        for b in args.batch_sizes:
            x = torch.randn(b, *shape)
            eager_s = None
            for name, fn in runners.items():
                s = _median_s(fn, x, args.warmup, args.repeats)
                eager_s = s if name == "eager" else eager_s
                rows.append({"runner": name, "batch_size": b, "median_s": s, "images_per_s": b / s,
                             "vs_eager": eager_s / s})
                print(f"batch {b:3d}  {name:6s} {s * 1e3:9.1f} ms  {b / s:8.1f} img/s  {eager_s / s:5.2f}x eager",
                      flush=True)

    out = Path(args.out or Path(__file__).parent / "results" / f"export-cpu-{time.strftime('%Y-%m-%d')}"
               / "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = {"torch": torch.__version__, "vit_fast": vit_fast.__version__}
    if "onnx" in args.formats:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    record = {
        "schema": "vit_fast.bench_export/1", "model": args.model, "img_size": args.img_size, "dtype": "float32",
        "batch": "dynamic export, timed at each batch size", "threads": args.threads, "warmup": args.warmup,
        "repeats": args.repeats, "cpu": _cpu(), "commit": git_commit(), "python": sys.version.split()[0],
        "versions": versions,
        "artifacts": artifacts, "rows": rows,
    }
    shutil.rmtree(work, ignore_errors=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
