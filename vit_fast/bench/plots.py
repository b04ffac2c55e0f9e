"""The plots of a run: speedup over the best PyTorch provider per op, images/s per provider for the models."""

from __future__ import annotations

import os

from vit_fast.bench.cases import OP_BENCHES
from vit_fast.fileio import atomic_write


def write_plots(results: dict, out_dir: str) -> list[str]:
    """Speedup over the best PyTorch provider vs sequence length, per op (one panel per mode and dtype, one
    line per provider and shape family, at the largest batch measured for each length); images/s per
    provider for the models. matplotlib without pyplot (no global backend state)."""
    from matplotlib.figure import Figure

    written = []
    rows = [r for r in results["rows"] if r["status"] == "ok" and r.get("speedup")]
    for name in OP_BENCHES:
        mine = [r for r in rows if r["kind"] == "op" and r["name"] == name]
        if not mine:
            continue
        panels = sorted({(r["mode"], r["dtype"]) for r in mine})
        fig = Figure(figsize=(6.5 * len(panels), 4.5), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (mode, dt) in zip(axes, panels, strict=True):
            sel = [r for r in mine if r["mode"] == mode and r["dtype"] == dt]
            families: dict[tuple, list[dict]] = {}
            for r in sel:
                fam = tuple((k, v) for k, v in r["shape"].items() if k not in ("B", "N", "img"))
                families.setdefault(fam, []).append(r)
            for fam, rs in families.items():
                fam_label = " ".join(f"{k}{v}" for k, v in fam if k in ("D", "C", "E", "P"))
                for prov in sorted({r["provider"] for r in rs}):
                    largest: dict[int, dict] = {}  # per sequence length, the row of the largest batch
                    for r in rs:
                        if r["provider"] == prov and r["shape"]["B"] >= largest.get(r["tokens"], {"shape": {"B": 0}})[
                                "shape"]["B"]:
                            largest[r["tokens"]] = r
                    pts = sorted((n, r["speedup"]) for n, r in largest.items())
                    style = "-o" if prov.startswith("vit_fast") else "--."
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{prov} {fam_label}".strip())
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("sequence length N (tokens)")
            ax.set_ylabel("speedup over the best PyTorch provider")
            ax.set_title(f"{name} {mode} {dt}")
            ax.legend(fontsize=6)
        written.append(_save(fig, out_dir, f"{name}_speedup.png"))
    models = [r for r in results["rows"] if r["kind"] == "model" and r["status"] == "ok"]
    if models:
        groups = list(dict.fromkeys(f"{r['name']} {r['shape_label']} {r['mode']}" for r in models))
        provs = list(dict.fromkeys(r["provider"] for r in models))
        fig = Figure(figsize=(max(6.0, 2.2 * len(groups) + 2), 4.5), layout="constrained")
        ax = fig.subplots()
        width = 0.8 / len(provs)
        for i, prov in enumerate(provs):
            vals = [next((r["images_per_s"] for r in models if r["provider"] == prov
                          and f"{r['name']} {r['shape_label']} {r['mode']}" == g), 0.0) for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=prov)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=7)
        ax.set_ylabel("images/s")
        ax.set_title(f"models on {results['environment']['device']['name']}")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir, "models.png"))
    return written


def _save(fig: object, out_dir: str, name: str) -> str:
    atomic_write(os.path.join(out_dir, name), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return name
