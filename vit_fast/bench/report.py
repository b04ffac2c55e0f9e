"""What a run prints and writes: the summary table of the console and the markdown report."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vit_fast.bench.analysis import case_key, format_comparison
from vit_fast.bench.cases import OP_BENCHES
from vit_fast.bench.cpu_targets import cpu_target_status
from vit_fast.bench.targets import target_status


def fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def targets_table(results: dict | None) -> str:
    """Where each speed target stands in ``results`` (None: no run), as a markdown table."""
    return md_table(["target", "required", "measured", "status"],
                    [(t["target"], t["required"], t["measured"], t["status"]) for t in target_status(results)])


def cpu_machine(results: dict) -> str | None:
    """The CPU's features line of the machine section (None for a run without a CPU entry)."""
    cpu = next((d for d in results["environment"].get("devices", []) if d.get("device") == "cpu"), None)
    if cpu is None or "features" not in cpu:
        return None
    bf16 = "native bf16" if cpu.get("native_bf16") else "no native bf16 (bf16 rows and peak skipped)"
    return f"{cpu['name']}: {', '.join(cpu['features']) or 'none of AVX2/AVX-512/AMX'}; {bf16}"


def metric(r: dict) -> tuple[str, str]:
    """The headline derived figure of a row and its fraction of the matching peak."""
    if r["kind"] == "model":
        return f"{r['images_per_s']:,.0f} img/s, {r['tflops']:.3g} TFLOP/s", pct(r["frac_peak_flops"])
    if OP_BENCHES[r["name"]].metric == "GB/s":
        return f"{r['gbps']:.3g} GB/s", pct(r["frac_peak_bw"])
    return f"{r['tflops']:.3g} TFLOP/s", pct(r["frac_peak_flops"])


def summary_table(results: dict) -> str:
    """The compact table printed at the end: per op case, the best baseline and each vit_fast backend's
    speedup over it; per model, images/s of every provider."""
    rows = results["rows"]
    ours = sorted({r["provider"] for r in rows if r["provider_kind"] == "vit_fast" and r["kind"] == "op"
                   and r["status"] != "skipped"})
    lines = []
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        cases.setdefault(case_key(r), []).append(r)
    op_cases = [(k, v) for k, v in cases.items() if k[0] == "op"]
    if op_cases:
        w = max(len(f"{k[1]} {k[2]} {k[3]} {k[4]}") for k, _ in op_cases)
        lines.append(f"{'op case':<{w}}  {'best PyTorch':<28}" + "".join(f"{o:>20}" for o in ours))
        for k, rs in op_cases:
            ok = [r for r in rs if r["status"] == "ok"]
            b = next((r for r in ok if r["provider"] == (ok[0]["best_baseline"] if ok else None)), None)
            best = f"{b['provider']} {b['median_ms']:.3g} ms" if b else "-"
            cells = []
            for o in ours:
                r = next((x for x in rs if x["provider"] == o), None)
                cells.append("-" if r is None or r["status"] == "skipped" else "FAILED" if r["status"] == "failed"
                             else f"{r['median_ms']:.3g} ms {r['speedup']:.2f}x" if r["speedup"] else
                             f"{r['median_ms']:.3g} ms")
            lines.append(f"{k[1] + ' ' + k[2] + ' ' + k[3] + ' ' + k[4]:<{w}}  {best:<28}"
                         + "".join(f"{c:>20}" for c in cells))
    model_rows = [r for r in rows if r["kind"] == "model"]
    if model_rows:
        lines.append("")
        lines.append(f"{'model':<34} {'mode':<10} {'provider':<20} {'images/s':>12} {'vs best timm':>13}")
        for r in model_rows:
            if r["status"] == "ok":
                lines.append(f"{r['name'] + ' ' + r['shape_label']:<34} {r['mode']:<10} {r['provider']:<20} "
                             f"{r['images_per_s']:>12,.0f} {fmt(r['speedup'], '.2f') + 'x':>13}")
            elif r["status"] == "failed":
                lines.append(f"{r['name'] + ' ' + r['shape_label']:<34} {r['mode']:<10} {r['provider']:<20} "
                             f"{'FAILED':>12}")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines.append("")
        lines += [f"FAILED {r['name']} {r['mode']} {r['dtype']} {r['shape_label']} {r['provider']}: {r['reason']}"
                  for r in failed]
    for v in results.get("violations", []):
        lines.append(f"WARNING derived figure above the measured peak: {v}")
    return "\n".join(lines)


def render_report(results: dict) -> str:
    env, peaks, rows = results["environment"], results["peaks"], results["rows"]
    dev = env["device"]
    out = [f"# vit_fast benchmark: {dev['name']} ({dev['type']}), {env['time']}", ""]
    out.append(md_table(["", ""], [
        ("device", ", ".join(f"{k} {v}" for k, v in dev.items() if k not in ("type",))),
        ("versions", f"vit_fast {env['vit_fast']} (git {env['git_commit'] or 'unknown'}), torch {env['torch']}, "
                     f"triton {env['triton'] or 'not installed'}, CUDA {env['cuda_runtime'] or 'none'}, "
                     f"Python {env['python']}"),
        ("run", f"{'quick' if results['config']['quick'] else 'full'}; dtypes {', '.join(results['config']['dtypes'])}"
                f"; {results['config']['elapsed_s']:.0f} s"),
        *([("CPU", cpu_machine(results))] if dev["type"] == "cpu" and cpu_machine(results) else []),
        ("timing", results["config"]["timer"]),
        ("peaks", "matmul " + ", ".join(f"{v:.3g} TFLOP/s {k}" for k, v in peaks["matmul_tflops"].items())
                  + f" ({peaks['matmul']}); bandwidth " + ", ".join(f"{k} {v:.4g} GB/s" for k, v in
                                                                  peaks["bandwidth"].items())
                  + f" ({peaks['bandwidth_of']})" + "".join(f"; no {k} peak: {why}" for k, why in
                                                          peaks.get("peaks_skipped", {}).items())),
    ]))
    for note in results.get("notes", []):
        out += ["", f"> {note}"]
    out += ["", "## Targets", "", targets_table(results)]
    cpu_targets = cpu_target_status(results)
    if cpu_targets:
        out += ["", "## CPU targets", "", "Fastest row of each side, images/s, same run (issue 21; a missed target is "
                "reported, not a failure).", "",
                md_table(["target", "required", "measured", "status"],
                         [(t["target"], t["required"], t["measured"], t["status"]) for t in cpu_targets])]
    picks = [r for r in rows if r.get("search")]
    for r in picks:
        out += ["", f"CPU path search for {r['name']} {r['shape_label']}: picked {r['pick']} in "
                f"{r['search_s']:.0f} s; " + "; ".join(
                    f"{t['name']} {t['status']}" + (f" ({t['reason']})" if t["reason"] else "")
                    + "".join(f" {float(ms):.3g} ms" for ms in t["ms"].values()) for t in r["search"]["trials"])]
    models = [r for r in rows if r["kind"] == "model" and r["status"] == "ok"]
    if models:
        out += ["", "## Models", "", "Speedup over the fastest timm provider of the same row group; "
                "fraction of the matmul peak from the analytic FLOPs.", ""]
        out.append(md_table(["model", "mode", "precision", "provider", "median ms (spread)", "images/s", "TFLOP/s",
                             "of peak", "peak memory", "compile s", "speedup"],
                            [(f"{r['name']} {r['shape_label']}", r["mode"], r["precision"], r["provider"],
                              f"{r['median_ms']:.4g} ({r['spread']:.0%})", f"{r['images_per_s']:,.0f}",
                              fmt(r["tflops"]), pct(r["frac_peak_flops"]),
                              "-" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**30:.2f} GiB",
                              fmt(r.get("compile_s"), ".1f"), fmt(r["speedup"], ".2f")) for r in models]))
    for name in OP_BENCHES:
        mine = [r for r in rows if r["kind"] == "op" and r["name"] == name and r["status"] == "ok"]
        if not mine:
            continue
        out += ["", f"## {name}", "", f"Derived figure: {OP_BENCHES[name].metric}; speedup over the fastest "
                "PyTorch provider of the same case.", ""]
        out.append(md_table(["mode", "dtype", "shape", "provider", "median ms (spread)", "figure", "of peak",
                             "compile s", "speedup"],
                            [(r["mode"], r["dtype"], r["shape_label"], r["provider"],
                              f"{r['median_ms']:.4g} ({r['spread']:.0%})", *metric(r), fmt(r.get("compile_s"), ".1f"),
                              fmt(r["speedup"], ".2f")) for r in mine]))
        note = OP_BENCHES[name].note([r["shape"] for r in mine])
        if note:
            out += ["", note]
    not_run: dict[tuple, int] = {}
    for r in rows:
        if r["status"] != "ok":
            k = (r["status"], r["name"], r["provider"], r["reason"])
            not_run[k] = not_run.get(k, 0) + 1
    if not_run:
        out += ["", "## Not measured", "", md_table(["status", "op / model", "provider", "rows", "reason"],
                                                    [(s, n, p, c, why) for (s, n, p, why), c in not_run.items()])]
    if results.get("violations"):
        out += ["", "## Violations", ""] + [f"- {v}" for v in results["violations"]]
    if results.get("comparison"):
        out += ["", "## Regression check", "", "```", format_comparison(results["comparison"]), "```"]
    out += ["", "Plots: " + ", ".join(f"`{p}`" for p in results.get("plots", [])) if results.get("plots") else ""]
    return "\n".join(out) + "\n"
