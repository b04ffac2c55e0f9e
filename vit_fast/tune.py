"""``vit-fast tune``: measure on this device which backend is fastest for each op, dtype, mode and shape bucket
of the ViT shapes you run, and write the policy ``auto`` follows (:mod:`vit_fast.policy`).

Every case is checked, then timed, exactly as ``vit-fast bench`` does it (:func:`vit_fast.bench.bench_op_case`:
each backend's output and gradients against the fp32 oracle by :mod:`vit_fast.tolerance`'s rule, then
:class:`~vit_fast.bench.Timer`). A kernel backend is ranked before the reference only when it passed that check
and was faster beyond the noise (:func:`entry`); on CPU the reference always runs, and the file says why.

Two verdicts per case, from one set of measurements at the same shape: eager (the kernels against the reference,
``order``) and under ``torch.compile`` (the kernels against what inductor makes of the op, ``compiled_order``: a
kernel is an opaque custom op in a compiled graph, so its own time stands, while the reference's becomes
inductor's). Where a kernel family has more than one implementation (:data:`vit_fast.kernels.VARIANTS`), the
triton backend is timed with each, and the entry names the fastest verified one (``kernel_variants``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import vit_fast
from vit_fast import backends, policy
from vit_fast.backends import dtype_name
from vit_fast.bench.cases import (
    CPU_BATCHES,
    CPU_PRESETS,
    DTYPES,
    OP_BENCHES,
    OP_MODES,
    OPS,
    OpBench,
    default_ops,
    preset_dims,
)
from vit_fast.bench.measure import Budget, bench_op_case
from vit_fast.bench.providers import Provider, backend_providers, compile_skip
from vit_fast.bench.runner import progress
from vit_fast.bench.timing import Timer, device_info
from vit_fast.config import get_config
from vit_fast.envinfo import git_commit

# The ViT presets whose shapes a full GPU run measures, most used first (a budget cut keeps the most useful).
GPU_MODELS = ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224", "vit_small_patch16_224",
              "vit_base_patch16_384", "vit_large_patch16_384")
GPU_BATCHES = (64, 256, 8)
QUICK_GPU_MODELS = ("vit_base_patch16_224", "vit_huge_patch14_224")  # head dims 64 and 80
QUICK_GPU_BATCHES = (64, 256)
QUICK_CPU_MODELS, QUICK_CPU_BATCHES = CPU_PRESETS[:1], (2,)

MARGIN = 0.03  # a kernel must also be at least this much faster (median) than the reference
RULE = ("A kernel backend is ranked before the reference only when its output and every gradient passed "
        "vit_fast.tolerance's rule against the fp32 oracle and it was faster beyond the noise: its 80th-percentile "
        f"time below the reference's 20th percentile, and its median at least {MARGIN:.0%} below the reference's. "
        "Backends not verified and timed are never ranked: unmeasured means the reference.")
CPU_NOTE = ("On CPU auto runs the reference whatever a policy says: PyTorch's own CPU kernels are the fast path; "
            "the Triton kernels run on CPU only through the interpreter, a correctness tool that is never timed, "
            "and the CUDA kernels need a GPU.")
# tune keeps times, not fractions of a peak: no peak is measured, so the derived fractions come out as 0
_NO_PEAKS = {"matmul_tflops": defaultdict(lambda: math.inf), "bandwidth_gbps": math.inf}


@dataclass
class TuneConfig:
    """What one ``vit-fast tune`` run measures (the flags: :func:`add_tune_arguments`)."""

    models: list[str] | None = None  # None: the defaults for the device
    batch_sizes: list[int] | None = None
    dtypes: list[str] | None = None  # None: bfloat16 on CUDA, float32 on CPU
    ops: list[str] | None = None  # None: the device's defaults (bench.cases.default_ops)
    modes: list[str] = field(default_factory=lambda: list(OP_MODES))
    device: str | None = None
    out: str | None = None  # None: policy.default_path for the device
    quick: bool = False
    budget_s: float | None = None
    progress: bool | None = None  # None: a progress bar when stderr is a terminal


@dataclass(frozen=True)
class Case:
    """One measurement: an op at one shape and dtype, standing for its policy bucket."""

    op: str
    shape: dict
    dtype: torch.dtype
    bucket: tuple[int, ...]
    source: str  # the model and batch it comes from


def op_shapes(model: str, batch: int) -> dict[str, dict[str, int]]:
    """Each op's benchmark shape (:mod:`vit_fast.bench.cases`) in ``model`` at ``batch`` images."""
    dims = preset_dims(model)
    return {name: {"B": batch, **bench.model_shape(dims)} for name, bench in OP_BENCHES.items()}


def resolve(cfg: TuneConfig) -> tuple[torch.device, list[str], list[int], list[torch.dtype]]:
    """The device, models, batch sizes and dtypes of ``cfg``, with its defaults filled in; ValueError when bad."""
    try:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device must be cpu or cuda[:N]; got {cfg.device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cpu or cuda[:N]; got {cfg.device!r}")
    gpu = device.type == "cuda"
    models = cfg.models or list((QUICK_GPU_MODELS if cfg.quick else GPU_MODELS) if gpu else
                                (QUICK_CPU_MODELS if cfg.quick else CPU_PRESETS))
    for m in models:
        get_config(m)  # an unknown name raises with the closest known ones
    batches = cfg.batch_sizes or list((QUICK_GPU_BATCHES if cfg.quick else GPU_BATCHES) if gpu else
                                      (QUICK_CPU_BATCHES if cfg.quick else CPU_BATCHES))
    if any(b < 1 for b in batches):
        raise ValueError(f"--batch-sizes must be >= 1; got {batches}")
    names = cfg.dtypes or (["bfloat16"] if gpu else ["float32"])
    if cfg.ops is None:
        cfg.ops = default_ops(device)
    bad = [d for d in names if d not in DTYPES] + [o for o in cfg.ops if o not in OPS]
    bad += [m for m in cfg.modes if m not in OP_MODES]
    if bad:
        raise ValueError(f"unknown {bad}: dtypes are {', '.join(DTYPES)}; ops {', '.join(OPS)}; modes "
                         f"{', '.join(OP_MODES)}")
    return device, models, batches, [DTYPES[d] for d in names]


def plan(models: Sequence[str], batches: Sequence[int], dtypes: Sequence[torch.dtype], ops: Sequence[str]
         ) -> list[Case]:
    """One case per policy bucket, the first shape that falls in it; the buckets come from meta tensors, so
    planning allocates nothing."""
    cases, seen = [], set()
    meta = torch.device("meta")
    for model in models:
        for batch in batches:
            shapes = op_shapes(model, batch)
            for dtype in dtypes:
                for op in ops:
                    inputs = OP_BENCHES[op].make(shapes[op], dtype, meta)
                    args, kwargs = inputs.assemble(inputs.tensors)
                    bucket = backends.bucket(op, args, kwargs)
                    if (op, dtype, bucket) not in seen:
                        seen.add((op, dtype, bucket))
                        cases.append(Case(op, shapes[op], dtype, bucket, f"{model} B{batch}"))
    return cases


# The kernel families each op's triton backend launches, whose variants tune times (moves into the op specs).
OP_KERNEL_FAMILIES: dict[str, tuple[str, ...]] = {"attention": ("attention_fwd", "attention_bwd"),
                                                  "layernorm_mlp": ("gemm",)}
INDUCTOR = "inductor"  # the measured key of the op under torch.compile (the bench case's compiled baseline)


def _beats(measured: dict[str, dict], base: str, key: str) -> list[str]:
    """The backends (no variant rows) faster than ``base`` beyond the noise, fastest first; each measured row gets
    its ``key`` (speedup over ``base``)."""
    ref = measured.get(base, {})
    if "median_ms" not in ref:
        return []
    for m in measured.values():
        if "median_ms" in m:
            m[key] = ref["median_ms"] / m["median_ms"]
    return sorted((b for b, m in measured.items() if b in backends.BACKENDS[1:] and key in m
                   and m["p80_ms"] < ref["p20_ms"] and m[key] >= 1 + MARGIN), key=lambda b: measured[b]["median_ms"])


def _measured(rows: Sequence[dict]) -> dict[str, dict]:
    measured: dict[str, dict] = {}
    for r in rows:
        name = r["provider"].split(":", 1)[1] if r["provider"].startswith("vit_fast:") else INDUCTOR
        if r["status"] == "ok":
            measured[name] = {"status": "ok", **{k: r[k] for k in ("median_ms", "p20_ms", "p80_ms", "agreement")}}
        else:
            measured[name] = {"status": r["status"], "reason": r["reason"]}
    return measured


def _fastest_variants(measured: dict[str, dict]) -> dict[str, str]:
    """family -> the triton variant measured fastest and verified (the launcher's default included)."""
    found: dict[str, str] = {}
    for family in dict.fromkeys(b.split("@", 1)[1].split("=")[0] for b in measured if b.startswith("triton@")):
        timed = {name: measured[b]["median_ms"] for b in measured if b.startswith(f"triton@{family}=")
                 and "median_ms" in measured[b] for name in [b.split("=", 1)[1]]}
        if "median_ms" in measured.get("triton", {}):
            timed["default"] = measured["triton"]["median_ms"]
        if timed:
            found[family] = min(timed, key=timed.get)
    return found


def entry(case: Case, mode: str, rows: Sequence[dict], device: torch.device) -> dict:
    """The policy entry for one case and mode from its ``vit-fast bench`` rows (one per backend, triton variant
    and the compiled baseline)."""
    measured = _measured(rows)
    ref = measured.get("reference", {})
    winners = _beats(measured, "reference", "speedup")
    compiled_winners = _beats(measured, INDUCTOR, "compiled_speedup")
    inductor = measured.get(INDUCTOR, {})
    if device.type not in backends.POLICY_DEVICES:
        winners, compiled_winners, why = [], [], CPU_NOTE
    elif "median_ms" not in ref:
        winners, why = [], f"the reference was not measured ({ref.get('reason')}): nothing to compare with"
    elif winners:
        w, m = winners[0], measured[winners[0]]
        why = (f"{w} is {m['speedup']:.2f}x the reference beyond the noise (p80 {m['p80_ms']:.4g} ms < the "
               f"reference's p20 {ref['p20_ms']:.4g} ms)")
    else:
        why = "no kernel backend beat the reference beyond the noise"
    others = [f"{b} {m['speedup']:.2f}x" if "speedup" in m else f"{b} {m['median_ms']:.4g} ms" if "median_ms" in m
              else f"{b} {m['status']}: {m['reason']}" for b, m in measured.items() if b in backends.BACKENDS[1:]]
    if device.type not in backends.POLICY_DEVICES:
        compiled_why = CPU_NOTE
    elif "median_ms" not in inductor:
        compiled_why = (f"the op under torch.compile was not measured ({inductor.get('reason')}): under compile the "
                        "reference (inductor) runs")
    elif compiled_winners:
        w = compiled_winners[0]
        compiled_why = f"{w} is {measured[w]['compiled_speedup']:.2f}x inductor's code for the op beyond the noise"
    else:
        compiled_why = "no kernel backend beat inductor's code for the op beyond the noise"
    found = {"op": case.op, "dtype": dtype_name(case.dtype), "mode": mode, "bucket": list(case.bucket),
             "shape": case.shape, "source": case.source, "order": [*winners, "reference"],
             "compiled_order": [*compiled_winners, "reference"], "measured": measured,
             "why": why + (f" ({'; '.join(others)})" if others else ""), "compiled_why": compiled_why}
    variants = _fastest_variants(measured)
    if variants:
        found["kernel_variants"] = variants
    return found


def providers(op: OpBench, device: torch.device, quick: bool) -> list[Provider]:
    """Each backend; the triton backend with each other variant of the op's kernel families (where the device
    can run it); and the op under torch.compile (the reference traced by inductor), the compiled verdict's
    baseline."""
    out = backend_providers(op.public(), device)
    triton = next(p for p in out if p.name == "vit_fast:triton")
    import vit_fast.kernels as kernels

    for family in OP_KERNEL_FAMILIES.get(op.name, ()):
        for name in kernels.VARIANTS[family][1:]:
            skip = triton.skip or backends.unavailable("triton")
            if not skip and "tma" in kernels.VARIANTS[family] and device.type == "cuda":
                skip = kernels.tma_device_reason(device)
            out.append(Provider(f"vit_fast:triton@{family}={name}", "vit_fast", op.public(),
                                _variant_context(family, name), skip=skip))
    cname, cfn = op.compiled_baseline()
    out.append(Provider(cname, "baseline", cfn, compile=True, skip=compile_skip(device, quick, True)))
    return out


def _variant_context(family: str, name: str):
    import vit_fast.kernels as kernels

    @contextlib.contextmanager
    def both():
        with vit_fast.set_backend("triton"), kernels.use_variant(family, name):
            yield

    return both


def tune(cfg: TuneConfig) -> tuple[dict, str, bool]:
    """Run ``cfg``: returns the policy document, the path it was written to (after every case, so a run cut
    short keeps what it measured), and whether a kernel backend failed its check."""
    device, models, batches, dtypes = resolve(cfg)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    kind = policy.device_kind(device)
    path = cfg.out or policy.default_path(kind)
    timer, budget = Timer(device, cfg.quick), Budget(cfg.budget_s)
    cases = plan(models, batches, dtypes, cfg.ops)
    command = (f"vit-fast tune --device {device} --models {' '.join(models)} --batch-sizes "
               f"{' '.join(map(str, batches))} --dtype {' '.join(map(dtype_name, dtypes))} --ops {' '.join(cfg.ops)} "
               f"--modes {' '.join(cfg.modes)}{' --quick' if cfg.quick else ''}")
    doc = policy.new_document(
        kind, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=command, git_commit=git_commit(), device_info=device_info(device), timer=timer.description,
        rule=RULE, models=models, batch_sizes=batches, notes=[CPU_NOTE] if device.type == "cpu" else [])
    failed = False
    bar = progress(len(cases), cfg.progress, "tune", "case")
    try:
        for i, case in enumerate(cases):
            if budget.left() < 2:
                doc["notes"].append(f"Time budget (--budget-s {cfg.budget_s:g}) used up: {len(cases) - i} of "
                                    f"{len(cases)} cases not measured (auto runs the reference there).")
                break
            bar.set_description(f"{case.op} {OP_BENCHES[case.op].label(case.shape)} {dtype_name(case.dtype)}")
            op = OP_BENCHES[case.op]
            rows = bench_op_case(op, case.shape, case.dtype, device, providers(op, device, cfg.quick), cfg.modes,
                                 timer, _NO_PEAKS, budget)
            failed |= any(r["status"] == "failed" for r in rows)
            doc["entries"] += [entry(case, mode, [r for r in rows if r["mode"] == mode], device) for mode in cfg.modes
                               if mode in op.modes]
            policy.write(path, doc)
            bar.update(1)
    except KeyboardInterrupt:  # a time limit from outside: the file holds every case measured so far
        doc["notes"].append("Interrupted: the cases missing from this file were not measured.")
    finally:
        bar.close()
    policy.write(path, doc)
    return doc, path, failed


def summary(doc: dict) -> str:
    """A table of the entries: what auto picks per op, dtype, mode and bucket, and the measured speedups."""
    lines = [f"{'op':<14} {'dtype':<9} {'mode':<8} {'bucket':<22} {'from':<28} {'auto picks':<10} "
             f"{'compiled':<10} speedups"]
    for e in doc["entries"]:
        gains = ", ".join(f"{b} {s:.2f}x" for b, s in policy.speedups(e) if b != "reference") or "-"
        compiled = e.get("compiled_order", e["order"])[0]
        lines.append(f"{e['op']:<14} {e['dtype']:<9} {e['mode']:<8} {str(tuple(e['bucket'])):<22} "
                     f"{e['source']:<28} {e['order'][0]:<10} {compiled:<10} {gains}")
    return "\n".join(lines + [f"note: {n}" for n in doc["notes"]])


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``vit-fast tune``."""
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="model presets whose shapes to measure (default: ViT-S/B/L/H presets on CUDA)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, metavar="B",
                        help=f"batch sizes (default on CUDA: {' '.join(map(str, GPU_BATCHES))})")
    parser.add_argument("--dtype", nargs="+", metavar="DTYPE", choices=list(DTYPES),
                        help="dtypes (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--ops", nargs="+", metavar="OP", choices=list(OPS), default=None,
                        help="ops (default: every one; on CPU less the fp8 ones, whose e4m3 math is emulated there)")
    parser.add_argument("--modes", nargs="+", choices=list(OP_MODES), default=list(OP_MODES),
                        help="fwd (inference) and/or fwd+bwd (training); both by default")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if visible)")
    parser.add_argument("--out", default=None, help="the policy file to write (default: $VIT_FAST_POLICY, else "
                        "~/.cache/vit_fast/policies/<gpu>.json, where auto finds it)")
    parser.add_argument("--quick", action="store_true", help="a few shapes (ViT-B/16 and ViT-H/14 heads on CUDA)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no case after this many seconds; the rest stay unmeasured (the reference)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """``vit-fast tune``: exit status 1 when a kernel backend failed its check (it is never ranked), 2 on bad
    arguments."""
    cfg = TuneConfig(models=args.models, batch_sizes=args.batch_sizes, dtypes=args.dtype, ops=args.ops,
                     modes=args.modes, device=args.device, out=args.out, quick=args.quick, budget_s=args.budget_s,
                     progress=False if args.no_progress else None)
    try:
        doc, path, failed = tune(cfg)
    except ValueError as e:
        print(f"vit-fast tune: error: {e}", file=sys.stderr)
        return 2
    print(summary(doc))
    print(f"wrote {path}: {len(doc['entries'])} entries for {policy.describe_kind(doc['device'])}")
    shipped = policy.file_name(doc["device"])
    print(f"auto reads it at the first pick of each new process; to ship it with vit_fast, commit it as "
          f"vit_fast/policies/{shipped}")
    if failed:
        print("a kernel backend failed its check against the fp32 oracle: see the entries' 'measured' reasons")
    return 1 if failed else 0
