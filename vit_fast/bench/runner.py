"""A ``vit-fast bench`` run: what it measures (:class:`BenchConfig`), the loop over models and op cases, and
the files it writes as it goes (``results.json`` after every case, then ``report.md`` and the plots)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vit_fast.backends import dtype_name
from vit_fast.bench.analysis import add_speedups, compare_results, read_results
from vit_fast.bench.cases import DTYPES, OP_BENCHES, OP_MODES, OPS, default_ops
from vit_fast.bench.measure import Budget, bench_op_case
from vit_fast.bench.models import MODEL_MODES, bench_model, default_batch, default_models, model_providers
from vit_fast.bench.peaks import measure_peaks
from vit_fast.bench.plots import write_plots
from vit_fast.bench.providers import op_providers
from vit_fast.bench.report import pct, render_report
from vit_fast.bench.timing import CPU_WORKING_SET, Timer, device_info
from vit_fast.config import get_config
from vit_fast.envinfo import environment
from vit_fast.fileio import atomic_write

SCHEMA = "vit_fast.bench/1"
DEFAULT_OUT = "bench-results"


@dataclass
class BenchConfig:
    """What one ``vit-fast bench`` run measures (the flags: :mod:`vit_fast.bench.cli`)."""

    quick: bool = False
    ops: list[str] | None = None  # None: the device's defaults (cases.default_ops)
    models: list[str] | None = None  # None: the defaults for the device
    dtypes: list[str] | None = None  # None: bfloat16 (+ float16, float32 in a full run) on CUDA, float32 on CPU
    device: str | None = None
    out: str = DEFAULT_OUT
    batch_size: int | None = None
    compile: bool = True
    budget_s: float | None = None
    compare: str | None = None
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    threads: int | None = None  # CPU threads; None: torch's setting

    def resolve(self) -> tuple[torch.device, list[torch.dtype], list[str]]:
        try:
            device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise ValueError(f"--device must be cpu or cuda[:N]; got {self.device!r}") from e
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"--device must be cpu or cuda[:N]; got {self.device!r}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
            if device.index is None:  # an explicit index: torch.cuda.set_device rejects a bare "cuda"
                device = torch.device("cuda", torch.cuda.current_device())
            if device.index >= torch.cuda.device_count():
                raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        if self.ops is None:
            self.ops = default_ops(device)
        unknown = [o for o in self.ops if o not in OPS]
        if unknown:
            raise ValueError(f"--ops: unknown op(s) {unknown}; choose from {', '.join(OPS)} (or none)")
        gpu_default = ["bfloat16"] if self.quick else ["bfloat16", "float16", "float32"]
        names = self.dtypes or (gpu_default if device.type == "cuda" else ["float32"])
        bad = [d for d in names if d not in DTYPES]
        if bad:
            raise ValueError(f"--dtype: unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}")
        models = default_models(device, self.quick) if self.models is None else self.models
        for m in models:
            get_config(m)  # an unknown name raises with the closest known ones
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1; got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1; got {self.threads}")
        return device, [DTYPES[d] for d in names], models


def run(cfg: BenchConfig) -> dict:
    """Run the benchmarks of ``cfg``; writes ``results.json`` as rows come in, then ``report.md`` and the plots
    into ``cfg.out``; returns the results."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: BenchConfig) -> dict:
    device, dtypes, models = cfg.resolve()
    earlier = read_results(cfg.compare) if cfg.compare else None  # a broken file fails now, not after the run
    if device.type == "cuda":
        torch.cuda.set_device(device)
    start = time.perf_counter()
    budget = Budget(cfg.budget_s)
    timer = Timer(device, cfg.quick)
    os.makedirs(cfg.out, exist_ok=True)
    env = environment()
    env["git_commit"] = env["git_commit"] or os.environ.get("VIT_FAST_GIT_COMMIT")  # a tree copied without .git
    env["device"] = device_info(device)
    notes = []
    if device.type == "cpu":
        notes.append("No GPU in this run: the Triton and CUDA kernels need a CUDA device, so on CPU vit_fast runs its "
                     "reference backend (PyTorch's own CPU kernels). These numbers say nothing about the kernels.")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if load > (os.cpu_count() or 1):
            notes.append(f"The machine was busy (load average {load:.1f} on {os.cpu_count()} cores): CPU timings are "
                         "unreliable, multi-threaded ones most (--threads 1 steadies them).")
    results = {"schema": SCHEMA, "environment": env, "notes": notes, "peaks": {}, "rows": [], "violations": [],
               "config": {"quick": cfg.quick, "ops": cfg.ops, "models": models,
                          "dtypes": [dtype_name(d) for d in dtypes], "device": str(device),
                          "timer": timer.description, "compile": cfg.compile,
                          "budget_s": cfg.budget_s, "elapsed_s": 0.0,
                          "cpu_working_set_bytes": CPU_WORKING_SET if device.type == "cpu" else None}}
    json_path = os.path.join(cfg.out, "results.json")

    def save() -> None:
        results["config"]["elapsed_s"] = time.perf_counter() - start
        add_speedups(results["rows"])
        results["violations"] = [
            f"{r['name']} {r['mode']} {r['dtype']} {r['shape_label']} {r['provider']}: "
            f"{pct(r['frac_peak_flops'])} of the FLOP/s peak, {pct(r['frac_peak_bw'])} of the bandwidth peak"
            for r in results["rows"] if r.get("exceeds_peak")]
        atomic_write(json_path, json.dumps(results, indent=1, default=str))

    op_plan = []
    for name in cfg.ops:
        op = OP_BENCHES[name]
        provs = op_providers(op, device, quick=cfg.quick, allow_compile=cfg.compile)
        # --quick compiles at the first shape of each op only: each new shape is a new compile
        later = [p if not p.compile or p.skip else dataclasses.replace(
            p, skip="compiled at the first shape of each op only in --quick (compile time)") for p in provs]
        for dtype in dtypes:
            for i, shape in enumerate(op.shapes(cfg.quick, device.type == "cuda")):
                op_plan.append((op, shape, dtype, later if cfg.quick and i else provs))
    model_dtype = dtypes[0]
    mprovs = model_providers(device, model_dtype, quick=cfg.quick, allow_compile=cfg.compile)
    total = sum(len(p) * len(op.modes) for op, *_, p in op_plan) + len(models) * len(mprovs) * len(MODEL_MODES)
    bar = progress(total + 1, cfg.progress)
    results["peaks"] = measure_peaks(device, timer, dtypes)
    bar.update(1)
    save()

    def on_row(row: dict) -> None:
        results["rows"].append(row)
        bar.update(1)

    try:
        for name in models:
            batch = cfg.batch_size or default_batch(name, device, cfg.quick)
            for mode in MODEL_MODES:
                bar.set_description(f"{name} B{batch} {mode}")
                bench_model(name, batch, model_dtype, device, mprovs, (mode,), timer, results["peaks"], budget,
                            on_row)
                save()
        for op, shape, dtype, provs in op_plan:
            bar.set_description(f"{op.name} {op.label(shape)} {dtype_name(dtype)}")
            bench_op_case(op, shape, dtype, device, provs, OP_MODES, timer, results["peaks"], budget, on_row)
            save()
    except KeyboardInterrupt:  # a time limit from outside: keep what was measured, still write the report
        results["interrupted"] = True
        results["notes"].append("Interrupted: the rows missing from this run were not measured.")
    finally:
        bar.close()
        save()
    if earlier is not None:
        results["comparison"] = compare_results(earlier, results)
    try:
        results["plots"] = write_plots(results, cfg.out)
    except ImportError as e:
        results["notes"].append(f"No plots: matplotlib is not installed ({e}); pip install 'vit_fast[bench]'.")
    except Exception as e:  # noqa: BLE001 - a failed plot must not cost the report: recorded instead
        results["notes"].append(f"No plots: {type(e).__name__}: {e}")
    save()
    atomic_write(os.path.join(cfg.out, "report.md"), render_report(results))
    return results


def progress(total: int, enabled: bool | None, desc: str = "peaks", unit: str = "row") -> tqdm:
    """A tqdm bar (for `vit-fast bench` and `vit-fast tune`), shown on a terminal unless ``enabled`` says otherwise."""
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled is None else not enabled,
                dynamic_ncols=True)
