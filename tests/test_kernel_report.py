"""``vit-fast kernels``: every Triton variant lowers to sm_80 and sm_90 machine code without a GPU, and none that
runs at ViT-B/L shapes spills (CONVENTIONS.md section 4, static evidence)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from vit_fast import kernel_report

_SAMPLE = """
Fatbin elf code:
================
arch = sm_80
 Function _Z9ln_kernelIfEvPKT_:
  REG:32 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
 Function _Z9ln_kernelIfEvPKT_:
  REG:40 STACK:8 SHARED:2048 LOCAL:8 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_usage_is_read_per_arch():
    (sm90,) = kernel_report.parse_resource_usage(_SAMPLE, "sm_90")
    assert sm90 == {"name": "_Z9ln_kernelIfEvPKT_", "arch": "sm_90", "regs": 40, "stack": 8, "shared": 2048,
                    "local": 8}
    assert [f["regs"] for f in kernel_report.parse_resource_usage(_SAMPLE)] == [32, 40]


def test_occupancy_formula():
    assert kernel_report.occupancy("sm_90", 32, 0, 4) == 1.0  # 16 blocks of 4 warps: every warp slot
    assert kernel_report.occupancy("sm_90", 255, 0, 4) == 0.125  # 256 regs x 128 threads: 2 blocks
    assert kernel_report.occupancy("sm_80", 64, 100 * 1024, 4) == 4 / 64  # shared memory: one block per SM
    assert kernel_report.occupancy("sm_80", 64, 200 * 1024, 4) == 0.0  # over sm_80's per-block limit


def _report(arch: str, quick: bool) -> dict:
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = [sys.executable, "-m", "vit_fast.cli", "kernels", "--arch", arch, "--json"] + (["--quick"] if quick else [])
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)


def _check(report: dict, arch: str, quick: bool) -> None:
    rows = report["triton"]
    assert len(rows) == len(kernel_report.variants(arch, quick))  # every variant compiled
    assert all(r["regs"] and r["smem"] is not None for r in rows)
    # Every variant is sized at ViT-B/L shapes except attention's head dims 80 and 128 (ViT-H, ViT-g).
    vit_b_l = [r for r in rows if not r["kernel"].startswith("attention") or r["shape"] == "D=64"]
    assert any(r["shape"] == "D=64" for r in vit_b_l)
    spilling = [f"{r['kernel']} {r['dtype']} {r['shape']} {r['config']}: {r['spills']}" for r in vit_b_l if r["spills"]]
    assert not spilling, spilling
    assert all(r["occupancy"] > 0 for r in rows), "a variant does not fit one block on an SM"


@pytest.mark.subprocess
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles_quick(arch):
    _check(_report(arch, quick=True), arch, quick=True)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_variant_compiles_without_spills(arch):
    _check(_report(arch, quick=False), arch, quick=False)
