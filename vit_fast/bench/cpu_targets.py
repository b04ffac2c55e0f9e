"""The CPU inference targets (issue 21), read from a run's model rows: checked by the benchmark and reported, never
asserted in a timed test. They are set for CPUs with AMX; on another CPU each is reported as not applicable, with
the CPU's features, and the ratios are still shown where the rows exist."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PYTORCH_ROWS = ("timm:eager", "timm:eager:bf16", "compiled:timm", "compiled:timm:freezing",
                "compiled:timm:freezing:bf16", "compiled:timm:freezing+cpp_wrapper:bf16")
INT8_ROWS = ("vit_fast:int8", "vit_fast:pt2e:int8", "vit_fast:pt2e:int8+bf16")


@dataclass(frozen=True)
class CpuTarget:
    """``ours`` over ``theirs`` (images/s) must reach ``ratio``; each side is the fastest of its rows."""

    name: str
    ours: Callable[[dict], bool]
    theirs: Callable[[dict], bool]
    ratio: float
    why: str


def _vit_fast(r: dict) -> bool:
    return r["provider_kind"] == "vit_fast"


def _int8(r: dict) -> bool:
    return r["provider"] in INT8_ROWS or (r["provider"] == "vit_fast:optimized" and "int8" in str(r.get("pick")))


TARGETS: tuple[CpuTarget, ...] = (
    CpuTarget("optimize_for_inference >= PyTorch bf16 compile + freezing",
              lambda r: r["provider"] == "vit_fast:optimized", lambda r: r["provider"] == "compiled:timm:freezing:bf16",
              1.0, "the acceptance point: the default path is at least as fast as PyTorch's best bf16 route"),
    CpuTarget("vit_fast's best >= OpenVINO bf16", _vit_fast, lambda r: r["provider"] == "openvino:bf16", 1.0,
              "the fastest CPU runtime measured"),
    CpuTarget("best int8 >= 1.5x PyTorch bf16 compile + freezing", _int8,
              lambda r: r["provider"] == "compiled:timm:freezing:bf16", 1.5, "AMX int8 has twice AMX bf16's rate"),
    CpuTarget("best int8 >= 2x ONNX Runtime int8", _int8, lambda r: r["provider"] == "onnxruntime:int8", 2.0,
              "ONNX Runtime's dynamic int8"),
    CpuTarget("vit_fast's best >= the best PyTorch path", _vit_fast, lambda r: r["provider"] in PYTORCH_ROWS, 1.0,
              "eager or compiled, fp32 or bf16, measured in the same run"),
)


def _best(rows: list[dict], keep: Callable[[dict], bool]) -> dict | None:
    mine = [r for r in rows if keep(r)]
    return max(mine, key=lambda r: r["images_per_s"]) if mine else None


def cpu_target_status(results: dict) -> list[dict]:
    """Per target and model case of a CPU run: required, measured (the two rows and their ratio) and status (met,
    missed, not measured, or not applicable on a CPU without AMX). Empty for a GPU run."""
    env = results.get("environment", {})
    if env.get("device", {}).get("type") != "cpu":
        return []
    cpu = next((d for d in env.get("devices", []) if d.get("device") == "cpu"), {})
    amx = "AMX-BF16" in cpu.get("features", [])
    rows = [r for r in results["rows"] if r["kind"] == "model" and r["mode"] == "inference" and r["status"] == "ok"]
    cases = list(dict.fromkeys(f"{r['name']} {r['shape_label']}" for r in results["rows"] if r["kind"] == "model"))
    out = []
    for case in cases:
        mine = [r for r in rows if f"{r['name']} {r['shape_label']}" == case]
        for t in TARGETS:
            ours, theirs = _best(mine, t.ours), _best(mine, t.theirs)
            measured, ratio = "-", None
            if ours and theirs:
                ratio = ours["images_per_s"] / theirs["images_per_s"]
                measured = (f"{ours['provider']} {ours['images_per_s']:,.1f} / {theirs['provider']} "
                            f"{theirs['images_per_s']:,.1f} img/s = {ratio:.2f}x")
            if not amx:
                status = f"not applicable: set for AMX CPUs (this one: {', '.join(cpu.get('features', [])) or '-'})"
            elif ratio is None:
                status = "not measured"
            else:
                status = "met" if ratio >= t.ratio else "missed"
            out.append({"target": f"{t.name} ({case})", "required": f">= {t.ratio:g}x ({t.why})",
                        "measured": measured, "status": status})
    return out


__all__ = ["TARGETS", "CpuTarget", "cpu_target_status"]
