"""The rows of a run read against each other: per case the best baseline and every row's speedup over it,
and the regression check of one run against an earlier one on the same device."""

from __future__ import annotations

import os

from vit_fast.fileio import FileFormatError, read_json

# What the comparison reads of a row: the case and provider (strings), status, median and spread.
_ROW_STRINGS = ("kind", "name", "mode", "dtype", "shape_label", "provider", "status")


def case_key(row: dict) -> tuple:
    return (row["kind"], row["name"], row["mode"], row["dtype"], row["shape_label"])


def row_key(row: dict) -> tuple:
    return (*case_key(row), row["provider"])


def add_speedups(rows: list[dict]) -> None:
    """Per case, the best baseline (fastest PyTorch / timm provider) and every row's speedup over it."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["status"] == "ok" and r["provider_kind"] == "baseline":
            k = case_key(r)
            if k not in best or r["median_ms"] < best[k]["median_ms"]:
                best[k] = r
    for r in rows:
        b = best.get(case_key(r))
        r["best_baseline"] = b["provider"] if b else None
        r["speedup"] = b["median_ms"] / r["median_ms"] if b and r["status"] == "ok" else None


def read_results(path: str | os.PathLike) -> dict:
    """A ``results.json`` of ``vit-fast bench``, checked for what :func:`compare_results` reads: a file that is
    torn, not JSON or of another shape raises :class:`~vit_fast.fileio.FileFormatError` (a ValueError) naming it
    and what is wrong; a missing one, ``FileNotFoundError``."""
    doc = read_json(path, what="vit-fast bench results file")
    env = doc.get("environment")
    dev = env.get("device") if isinstance(env, dict) else None
    problems = [] if isinstance(dev, dict) and all(isinstance(dev.get(k), str) for k in ("type", "name")) else \
        ["no environment.device with a type and a name (strings)"]
    rows = doc.get("rows")
    if not isinstance(rows, list):
        problems.append("'rows' missing or not a list")
    for i, r in enumerate(rows if isinstance(rows, list) else []):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in _ROW_STRINGS):
            problems.append(f"row {i} lacks one of {', '.join(_ROW_STRINGS)} (strings)")
        elif r["status"] == "ok" and not (_is_number(r.get("median_ms")) and r["median_ms"] > 0):
            problems.append(f"row {i} is 'ok' without a positive median_ms")
        elif r.get("spread") is not None and not _is_number(r["spread"]):
            problems.append(f"row {i} has a spread that is not a number")
        else:
            continue
        break
    if problems:
        raise FileFormatError(f"{os.fspath(path)}: not a valid vit-fast bench results file: {'; '.join(problems)}")
    return doc


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def compare_results(old: dict, new: dict, min_rel: float = 0.02) -> dict:
    """Rows of ``new`` slower than the same rows of ``old`` by more than the noise of the two runs:
    ``new_median > old_median * (1 + max(spread_old, spread_new, min_rel))``, spread = (p80 - p20) / median.
    Only runs on the same device compare."""
    dev_old, dev_new = old["environment"]["device"]["name"], new["environment"]["device"]["name"]
    if dev_old != dev_new:
        return {"compared": 0, "flagged": [], "warning": f"different devices ({dev_old} vs {dev_new}): not compared"}
    before = {row_key(r): r for r in old["rows"] if r["status"] == "ok"}
    flagged, compared = [], 0
    for r in new["rows"]:
        o = before.get(row_key(r))
        if r["status"] != "ok" or o is None:
            continue
        compared += 1
        noise = max(o.get("spread") or 0.0, r.get("spread") or 0.0, min_rel)
        ratio = r["median_ms"] / o["median_ms"]
        if ratio > 1 + noise:
            flagged.append({"key": " | ".join(str(k) for k in row_key(r)), "old_ms": o["median_ms"],
                            "new_ms": r["median_ms"], "slowdown": ratio, "noise": noise})
    flagged.sort(key=lambda f: -f["slowdown"])
    return {"compared": compared, "flagged": flagged, "warning": None}


def format_comparison(cmp: dict) -> str:
    if cmp["warning"]:
        return f"regression check: {cmp['warning']}"
    if not cmp["flagged"]:
        return f"regression check: {cmp['compared']} rows compared, none slower beyond the noise"
    lines = [f"regression check: {len(cmp['flagged'])} of {cmp['compared']} rows slower beyond the noise:"]
    lines += [f"  {f['slowdown']:.2f}x slower ({f['old_ms']:.4g} -> {f['new_ms']:.4g} ms, noise {f['noise']:.0%}): "
              f"{f['key']}" for f in cmp["flagged"]]
    return "\n".join(lines)
