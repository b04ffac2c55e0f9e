"""``vit-fast kernels``: every Triton variant lowers to sm_80 and sm_90 machine code without a GPU, no fixed
(non-autotuned) config of any kernel or epilogue spills or overflows shared memory on either, none that runs at
ViT-B/L shapes spills (CONVENTIONS.md section 4, static evidence), the rows say which config is fixed and whether
the PTX uses TMA and wgmma (the LN+MLP GEMM, the FP8 GEMM and the attention forward have TMA variants on sm_90),
the FP8 GEMM promotes to fp32 every K block, and the shortlists hold every fixed config."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from vit_fast import kernel_resources

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
    (sm90,) = kernel_resources.parse_resource_usage(_SAMPLE, "sm_90")
    assert sm90 == {"name": "_Z9ln_kernelIfEvPKT_", "arch": "sm_90", "regs": 40, "stack": 8, "shared": 2048,
                    "local": 8}
    assert [f["regs"] for f in kernel_resources.parse_resource_usage(_SAMPLE)] == [32, 40]


def test_occupancy_formula():
    assert kernel_resources.occupancy("sm_90", 32, 0, 4) == 1.0  # 16 blocks of 4 warps: every warp slot
    assert kernel_resources.occupancy("sm_90", 255, 0, 4) == 0.125  # 256 regs x 128 threads: 2 blocks
    assert kernel_resources.occupancy("sm_80", 64, 100 * 1024, 4) == 4 / 64  # shared memory: one block per SM
    assert kernel_resources.occupancy("sm_80", 64, 200 * 1024, 4) == 0.0  # over sm_80's per-block limit


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
    assert len(rows) == len(kernel_resources.variants(arch, "fixed" if quick else "all"))  # every variant compiled
    assert all(r["regs"] and r["smem"] is not None and r["compile_s"] is not None for r in rows)
    # Every variant is sized at ViT-B/L shapes except attention's head dims 80 and 128 (ViT-H, ViT-g).
    vit_b_l = [r for r in rows if not r["kernel"].startswith("attention") or r["shape"] == "D=64"]
    assert any(r["shape"] == "D=64" for r in vit_b_l)
    spilling = [f"{r['kernel']} {r['dtype']} {r['shape']} {r['config']}: {r['spills']}" for r in vit_b_l if r["spills"]]
    assert not spilling, spilling
    assert all(r["occupancy"] > 0 for r in rows), "a variant does not fit one block on an SM"
    fixed = [r for r in rows if r["fixed"]]
    # the fixed configs, at every shape (head dims 80 and 128 included): no spill, one block fits
    assert fixed and not [f"{r['kernel']} {r['shape']} {r['config']}" for r in fixed if r["spills"]]
    assert {(r["kernel"], r["dtype"], r["shape"]) for r in fixed} == {
        (r["kernel"], r["dtype"], r["shape"]) for r in rows if not r["kernel"].endswith("_ws")}  # one per variant
    tma = {r["kernel"] for r in rows if r["tma"]}
    if arch == "sm_90":
        assert {"attention_fwd_tma", "mlp_fc1_gelu_train_tma", "mlp_fc2_bias_residual_tma", "mlp_dh_gelu_bwd_tma",
                "scaled_gemm_per_head_tma", "scaled_gemm_rowwise_tma"} <= tma
        assert all(r["wgmma"] for r in rows if r["tma"])
        assert tma == {r["kernel"] for r in rows if "_tma" in r["kernel"]}  # the pointer kernels load by pointer
    else:
        assert not tma and not any(r["wgmma"] for r in rows)


@pytest.mark.subprocess
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_fixed_config_compiles_without_spills(arch):
    """--quick compiles every kernel variant (each epilogue, head dim, dtype) at its fixed config."""
    _check(_report(arch, quick=True), arch, quick=True)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_variant_compiles_without_spills(arch):
    _check(_report(arch, quick=False), arch, quick=False)


def _row(config: str, spills: int = 0, fixed: bool = False, family: str = "_k", occupancy: float = 0.5):
    return kernel_resources.Row("k", "bf16", "s", config, 100, spills, 1024, occupancy, fixed=fixed, family=family,
                             compile_s=1.5)


def test_the_shortlist_is_the_fixed_configs_then_the_next_clean_ones():
    rows = [_row("a", fixed=True), _row("b", spills=4), _row("c"), _row("d", occupancy=0.0), _row("e"), _row("f"),
            _row("c", family="_other", fixed=True)]
    chosen, cost = kernel_resources.shortlist(rows)
    assert chosen == {"_k": ["a", "c", "e"], "_other": ["c"]}  # b spills, d does not fit: never listed
    assert cost["_k"] == {"rows": 3, "seconds": 4.5} and cost["_other"] == {"rows": 1, "seconds": 1.5}


def test_the_table_marks_fixed_configs_and_tma():
    table = kernel_resources.format_table("sm_90", [dataclasses.replace(_row("a", fixed=True), tma=True, wgmma=True),
                                                 _row("b")])
    assert "| fixed | TMA | wgmma |" in table.splitlines()[0]
    assert "| a | yes | yes | yes |" in table and "| b |  |  |  |" in table


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_fixed_config_is_in_the_arch_shortlist(arch):
    """A launch on that arch tunes over the shortlist: the fixed config, the one the correctness checks run, must be
    among them (else the pruning would hand the launch another one)."""
    from vit_fast.kernels.shortlist import SHORTLIST

    if arch not in SHORTLIST:
        pytest.skip(f"kernels/shortlist.py lists nothing for {arch} (vit-fast kernels --shortlist writes it)")
    missing = sorted({f"{v.family}: {v.config}" for v in kernel_resources.variants(arch, "fixed")
                      if v.fixed and v.config not in SHORTLIST[arch].get(v.family, [v.config])})
    assert not missing, missing


_IMPRECISE = """
import re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vit_fast import kernel_resources as kr

for v in [v for v in kr.variants("sm_90", "fixed") if v.kernel.startswith("scaled_gemm")]:
    names = v.fn.arg_names
    sig = {n: "constexpr" if n in v.consts else v.types.get(n, "i32") for n in names}
    src = ASTSource(v.fn, sig, {(names.index(n),): val for n, val in v.consts.items()}, {})
    ttgir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=v.options).asm["ttgir"]
    found = set(re.findall(r"maxNumImpreciseAcc = (\\d+)", ttgir))
    assert found == {str(v.consts["BLOCK_K"])}, (v.kernel, found)  # promoted after every K block
print("compiled")
"""


@pytest.mark.subprocess
def test_the_fp8_gemms_promote_to_fp32_every_k_block():
    """sm_90's default (2**30) never promotes within a dot chain: every FP8 dot sets max_num_imprecise_acc."""
    from sm90 import compile_for_sm90

    compile_for_sm90(_IMPRECISE, "fp8")
