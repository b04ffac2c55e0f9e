"""``vit-fast kernels``: registers, spills, shared memory and theoretical occupancy of every kernel variant.

Every Triton kernel variant the dispatcher can launch at ViT shapes (each kernel x head dim or width x dtype x each
tuning config its pruning keeps on the target) is compiled for sm_80 or sm_90 without a GPU (``triton.compile``
with a ``GPUTarget``), and its resources are read from the cubin with the ``cuobjdump`` Triton ships. The
``vit_fast._C`` extension's CUDA kernels are read the same way from the built library, when it and a ``cuobjdump``
are present.

Each row also says whether its config is the kernel's fixed one (``fixed``: what a launch outside the autotuner
runs: ``VIT_FAST_AUTOTUNE=0``, the GPU check's correctness step, graph capture), whether its PTX moves tiles by
TMA (``tma``: ``cp.async.bulk.tensor``) and multiplies on Hopper's wgmma (``wgmma``), whether Triton split it into
warp-specialized partitions (``warp_specialized``), and how long it took to compile (``compile_s``). ``--shortlist``
writes the 2-3 best configs per kernel and arch (no spills in any variant, fitting, the fixed one first) with
their compile times into ``kernels/shortlist.py``, which the launches on that arch and the GPU check's plan read.

Spills are counted as Triton counts them (local memory bytes per thread / 4): a Triton kernel uses local
memory only for spills. Occupancy is the theoretical one: resident warps per SM over the SM's maximum, limited
by registers, shared memory, warps and blocks per SM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any
from unittest import mock

# Per-SM limits of the targets (CUDA occupancy calculator values): shared memory per SM and the opt-in maximum
# per block, both including the 1 KiB the driver reserves per block.
LIMITS = {
    "sm_80": {"regs": 65536, "warps": 64, "blocks": 32, "smem_sm": 167936, "smem_block": 166912},
    "sm_90": {"regs": 65536, "warps": 64, "blocks": 32, "smem_sm": 233472, "smem_block": 232448},
}
_RESERVED_SMEM = 1024

# ViT shapes the variants are sized for: ViT-B/16 at batch 64 (197 tokens), its widths and ViT-L's.
_TOKENS = 197
_ROWS = 64 * _TOKENS
_HEAD_DIMS = (64, 80, 128)
_WIDTHS = (768, 1024)
_DTYPES = ("fp16", "bf16")


@dataclasses.dataclass
class Variant:
    """One compilation: ``fn`` (a ``@triton.jit`` function) with ``consts`` baked in and ``types`` for the pointer
    and float arguments (the rest are i32). ``aligned``: every pointer and integer argument is a multiple of 16,
    as at the ViT shapes the variant is sized for; a launch tells Triton so, and it decides whether loads can be
    vectorized and staged through shared memory asynchronously."""

    kernel: str
    dtype: str
    shape: str
    config: str
    fn: Any
    consts: dict[str, Any]
    types: dict[str, str]
    options: dict[str, int]
    aligned: bool = False
    fixed: bool = False
    family: str = ""  # the function name the shortlists key on


@dataclasses.dataclass
class Row:
    kernel: str
    dtype: str
    shape: str
    config: str
    regs: int | None
    spills: int | None
    smem: int | None
    occupancy: float | None
    note: str = ""
    fixed: bool = False
    family: str = ""
    tma: bool = False
    wgmma: bool = False
    warp_specialized: bool = False
    compile_s: float | None = None


def occupancy(arch: str, regs: int, smem: int, warps: int) -> float:
    """Theoretical occupancy (resident warps / max warps per SM) of a block of ``warps`` warps using ``regs``
    registers per thread and ``smem`` bytes of shared memory on ``arch``; 0 when one block does not fit."""
    lim = LIMITS[arch]
    smem_block = smem + _RESERVED_SMEM
    if smem_block > lim["smem_block"] or regs > 255:
        return 0.0
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256 registers
    by_regs = (lim["regs"] // regs_per_warp) // warps
    by_smem = lim["smem_sm"] // (-(-smem_block // 128) * 128)
    blocks = min(by_regs, by_smem, lim["warps"] // warps, lim["blocks"])
    return blocks * warps / lim["warps"]


def _config_label(kwargs: dict[str, Any], warps: int, stages: int | None) -> str:
    blocks = "x".join(str(v) for k, v in kwargs.items() if k.startswith("BLOCK"))
    return f"{blocks} w{warps}" + (f" s{stages}" if stages is not None else "")


def _meta(dtype: str) -> Any:
    import torch

    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    return torch.empty(0, device="meta", dtype=names[dtype])


MODES = ("all", "fixed", "shortlist")  # every config the pruning keeps; the fixed ones; the arch's shortlist
_ASKED = {"mode": "all", "arch": "sm_90"}  # what the generators below are asked for (set by variants())


def _kept(tuned: Any, named: dict[str, Any], mode: str | None = None, fixed: Any = None, **kwargs: Any
          ) -> list[tuple[Any, bool]]:
    """(config, is the fixed one) for each config to report: ``fixed`` picks the fixed config from the kept list
    (default: the first, as :func:`vit_fast.kernels.fixed_config`)."""
    from vit_fast.kernels import config_label
    from vit_fast.kernels.shortlist import SHORTLIST

    mode = mode or _ASKED["mode"]
    kept = tuned.early_config_prune(tuned.configs, named, **kwargs) if tuned.early_config_prune else tuned.configs
    first = fixed(kept) if fixed else kept[0]
    if mode == "fixed":
        return [(first, True)]
    if mode == "shortlist":
        allowed = SHORTLIST.get(_ASKED["arch"], {}).get(tuned.fn.__name__)
        kept = [c for c in kept if allowed is None or config_label(c) in allowed or c is first]
    return [(c, c is first) for c in kept]


def _tuned(kernel: str, dtype: str, shape: str, fn: Any, cfg: Any, consts: dict, types: dict, fixed: bool = False
           ) -> Variant:
    consts = {k: v for k, v in {**consts, **cfg.kwargs}.items() if k in fn.arg_names}  # the ones it takes
    label = _config_label(cfg.kwargs, cfg.num_warps, cfg.num_stages)
    return Variant(kernel, dtype, shape, label, fn, consts, types,
                   {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, fixed=fixed, family=fn.__name__)


def _tma(dt: str, *block: int) -> str:
    return f"tensordesc<{dt}[{', '.join(map(str, block))}]>"


def _attention() -> Iterator[Variant]:
    from vit_fast.kernels import attention as a
    from vit_fast.kernels.attention import fused as f
    from vit_fast.kernels.attention import tma as t

    for dt in _DTYPES:
        types = dict.fromkeys(("Q", "K", "V", "OUT", "DOUT", "DK", "DV", "DQ"), f"*{dt}")
        types.update({"LSE": "*fp32", "DELTA": "*fp32", "OUT_SCALE": "*fp32", "DQ_ACC": "*fp32", "scale": "fp32",
                      "qk_scale": "fp32"})
        for d in _HEAD_DIMS:
            block_d, block_d1 = a.head_split(d)  # D = 80: 64 + 16, as the launchers pass it
            consts = {"INPUT_PRECISION": "tf32", "HEAD_DIM": d, "BLOCK_D": block_d, "BLOCK_D1": block_d1}
            shape, named = f"D={d}", {"N": _TOKENS, "Q": _meta(dt)}
            fp8 = {**consts, "BLOCK_D": 1 << (d - 1).bit_length(), "BLOCK_D1": 0, "OUT_FP8": True}  # one part
            for name, tuned, extra, kinds in (
                ("attention_fwd", a._attention_fwd_tuned, {"OUT_FP8": False, "ROUND_E4M3": False}, types),
                ("attention_fwd_fp8", a._attention_fwd_tuned, {**fp8, "ROUND_E4M3": False},
                 {**types, "OUT": "*fp8e4nv"}),
                ("attention_bwd_dkdv", a._attention_bwd_dkdv_tuned, {}, types),
                ("attention_bwd_dq", a._attention_bwd_dq_tuned, {}, types),
                ("attention_bwd_fused", f._attention_bwd_fused_tuned, {}, types),
                ("attention_bwd_delta", f._attention_bwd_delta_tuned, {}, types),
            ):
                for cfg, fixed in _kept(tuned, named, HEAD_DIM=d):
                    yield _tuned(name, dt, shape, tuned.fn, cfg, {**consts, **extra}, kinds, fixed)
            if t.head_dim_reason(d) is None and int(_ASKED["arch"][3:]) >= 90:
                for cfg, fixed in _kept(t._attention_fwd_tma_tuned, {"N": _TOKENS, "q_desc": _Desc(_meta(dt))},
                                        HEAD_DIM=d):
                    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                    descs = {"q_desc": _tma(dt, 1, 1, bm, d), "o_desc": _tma(dt, 1, 1, bm, d),
                             "k_desc": _tma(dt, 1, 1, bn, d), "v_desc": _tma(dt, 1, 1, bn, d)}
                    yield _tuned("attention_fwd_tma", dt, shape, t._attention_fwd_tma_tuned.fn, cfg,
                                 {"INPUT_PRECISION": "tf32", "HEAD_DIM": d}, {**types, **descs}, fixed)


@dataclasses.dataclass
class _Desc:
    base: Any  # what the TMA pruners read of a tensor descriptor: its base tensor


def _layer_norm() -> Iterator[Variant]:
    from vit_fast.kernels import layer_norm as k

    for dt in _DTYPES:
        fp32 = dict.fromkeys(("mean_ptr", "rstd_ptr", "scale_ptr", "dweight_partial_ptr", "dbias_partial_ptr"),
                             "*fp32")
        base = {**dict.fromkeys(("x_ptr", "dy_ptr", "weight_ptr", "bias_ptr", "y_ptr", "dx_ptr"), f"*{dt}"), **fp32,
                "eps": "fp32"}
        for c in _WIDTHS:
            block_c = 1 << (c - 1).bit_length()
            for name, tuned, extra, types in (
                ("layer_norm_fwd", k._layer_norm_fwd_kernel,
                 {"QUANT_FP8": False, "ROUND_E4M3": False, "STATS_IN": False}, base),
                ("layer_norm_fwd_fp8", k._layer_norm_fwd_kernel,
                 {"QUANT_FP8": True, "ROUND_E4M3": False, "STATS_IN": False},
                 {**base, "y_ptr": "*fp8e4nv"}),
                ("layer_norm_bwd", k._layer_norm_bwd_kernel, {}, base),
            ):
                largest = k._largest_block(tuned)
                for cfg, fixed in _kept(tuned, {}, fixed=lambda kept, f=largest, b=block_c: f((), {"BLOCK_C": b}),
                                        BLOCK_C=block_c):
                    yield _tuned(name, dt, f"C={c}", tuned.fn, cfg, {"BLOCK_C": block_c, **extra}, types, fixed)


def _quantize_rows() -> Iterator[Variant]:
    from vit_fast.kernels import quantize_rows as k

    # The fc1 output (4C wide) goes through GELU first; a LayerNorm output or residual stream does not. One
    # launch shape per width, not tuned: that one is the fixed config.
    shapes = [(4 * c, True) for c in _WIDTHS] + [(c, False) for c in _WIDTHS]
    for dt in _DTYPES:
        types = {"x_ptr": f"*{dt}", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}
        for c, gelu in shapes:
            block_m, block_c, warps = k.launch_shape(c)
            consts = {"GELU": gelu, "ROUND_E4M3": False, "BLOCK_M": block_m, "BLOCK_C": block_c}
            yield Variant("quantize_rows" + ("_gelu" if gelu else ""), dt, f"C={c}", f"{block_m}x{block_c} w{warps}",
                          k._quantize_rows_fwd_kernel, consts, types, {"num_warps": warps}, fixed=True,
                          family="_quantize_rows_fwd_kernel")


def _scaled_gemm() -> Iterator[Variant]:
    from vit_fast.kernels import scaled_gemm as k

    c = _WIDTHS[0]
    types = {"X": "*fp8e4nv", "W": "*fp8e4nv", "X_SCALE": "*fp32", "W_SCALE": "*fp32", "BIAS": "*bf16", "OUT": "*bf16"}
    # (name, N, K, scale groups): proj with one scale per (token, head) at D = 64, and a row-wise GEMM (fc2)
    for name, n, kk, groups in (("scaled_gemm_per_head", c, c, c // 64), ("scaled_gemm_rowwise", c, 4 * c, 1)):
        consts = {"GROUPS": groups, "GROUP_K": kk // groups, "HAS_BIAS": True, "BLOCK_K": k.block_k(kk // groups)}
        shape = f"N={n} K={kk} G={groups}"
        for cfg, fixed in _kept(k._scaled_gemm_tuned, {}):
            # a launch at ViT-B batch 64 specializes every pointer and size as a multiple of 16
            v = _tuned(name, "bf16", shape, k._scaled_gemm_kernel, cfg, consts, types, fixed)
            yield dataclasses.replace(v, aligned=True)
        if int(_ASKED["arch"][3:]) >= 90:
            tuned = k._scaled_gemm_tma_tuned
            for cfg, fixed in _kept(tuned, {"out_desc": _Desc(_meta("bf16"))}, **consts):
                bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], consts["BLOCK_K"]
                descs = {"x_desc": _tma("fp8e4nv", bm, bk), "w_desc": _tma("fp8e4nv", bn, bk),
                         "out_desc": _tma("bf16", bm, bn)}
                v = _tuned(name + "_tma", "bf16", shape, tuned.fn, cfg, consts, {**types, **descs}, fixed)
                yield dataclasses.replace(v, aligned=True)


def _mlp_gemms(dt: str, c: int) -> list[tuple[str, str, int, int, dict]]:
    """(name, C dtype, N, K, flags): every GEMM layernorm_mlp_fwd/_bwd launches (operands in dt). An fp32 C and
    residual is fc2 under autocast with an fp32 residual stream. The unit strides are those of the launches (a
    launch specializes an integer argument equal to 1): A is row-major; B is an nn.Linear weight, seen through .t()
    (unit K stride) in the forward and as it is (unit N stride) in the backward."""
    from vit_fast.kernels import gemm as g

    fwd, bwd = {"stride_ak": 1, "stride_bk": 1}, {"stride_ak": 1, "stride_bn": 1}
    return [
        ("mlp_fc1_gelu_train", dt, 4 * c, c, {"HAS_BIAS": True, "EPILOGUE": g.EPI_GELU, "STORE_AUX": True, **fwd}),
        ("mlp_fc1_gelu", dt, 4 * c, c, {"HAS_BIAS": True, "EPILOGUE": g.EPI_GELU, **fwd}),
        ("mlp_fc1_recompute", dt, 4 * c, c, {"HAS_BIAS": True, **fwd}),
        ("mlp_fc2_bias_residual", dt, c, 4 * c, {"HAS_BIAS": True, "HAS_RESIDUAL": True, **fwd}),
        ("mlp_fc2_bias_residual_fp32", "fp32", c, 4 * c, {"HAS_BIAS": True, "HAS_RESIDUAL": True, **fwd}),
        ("mlp_dh_gelu_bwd", dt, 4 * c, c,
         {"EPILOGUE": g.EPI_GELU_BWD, "STORE_AUX": True, "BIAS_GRAD": True, **bwd}),
        ("mlp_dln", "fp32", c, 4 * c, bwd),
    ]


def _layernorm_mlp() -> Iterator[Variant]:
    from vit_fast.kernels import gemm as g
    from vit_fast.kernels import layer_norm as ln

    off = {"HAS_BIAS": False, "HAS_RESIDUAL": False, "EPILOGUE": g.EPI_NONE, "STORE_AUX": False,
           "BIAS_GRAD": False, "BIAS_GRAD_ROWS": g.BIAS_GRAD_ROWS}
    tma_arch = int(_ASKED["arch"][3:]) >= 90
    for dt in _DTYPES:
        c = _WIDTHS[0]
        for name, c_dt, n, kk, flags in _mlp_gemms(dt, c):
            types = {"c_ptr": f"*{c_dt}", "res_ptr": f"*{c_dt}", "dbias_ptr": "*fp32",
                     **dict.fromkeys(("a_ptr", "b_ptr", "bias_ptr", "pre_ptr", "h_ptr"), f"*{dt}")}
            named = {"M": _ROWS, "N": n, "a_ptr": _meta(dt), "b_ptr": _meta(dt)}
            consts = {**off, "FP32_PRECISION": "ieee", **flags}
            for cfg, fixed in _kept(g._gemm_tuned, named, fixed=lambda kept, f=consts: g.fixed_config(kept, f)):
                v = _tuned(name, dt, f"N={n} K={kk}", g._gemm_kernel, cfg, consts, types, fixed)
                yield dataclasses.replace(v, aligned=True)
            if not tma_arch:
                continue
            b_kn = "stride_bn" in flags
            consts = {**off, **{k_: v_ for k_, v_ in flags.items() if not k_.startswith("stride")}, "B_KN": b_kn,
                      "WARP_SPECIALIZE": False}
            named = {"M": _ROWS, "N": n, "a_desc": _Desc(_meta(dt)), "c_desc": _Desc(_meta(c_dt))}
            for cfg, fixed in _kept(g._gemm_tma_tuned, named):
                bm, bn, bk = (cfg.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                descs = {"a_desc": _tma(dt, bm, bk), "b_desc": _tma(dt, bk, bn) if b_kn else _tma(dt, bn, bk),
                         "c_desc": _tma(c_dt, bm, bn)}
                v = _tuned(name + "_tma", dt, f"N={n} K={kk}", g._gemm_tma_kernel, cfg, consts, {**types, **descs},
                           fixed)
                yield dataclasses.replace(v, aligned=True)
                if fixed and name == "mlp_fc1_gelu_train":  # does this triton warp-specialize the loop on sm_90?
                    ws = dataclasses.replace(v, kernel=name + "_tma_ws", consts={**v.consts, "WARP_SPECIALIZE": True},
                                             fixed=False)
                    yield ws
        # The LayerNorm variants layer_norm's own rows do not cover: an fp32 x (autocast) written in dt, and y
        # rebuilt from the saved statistics in the backward.
        block_c = 1 << (c - 1).bit_length()
        fn = ln._layer_norm_fwd_kernel
        largest = ln._largest_block(fn)
        fp32 = dict.fromkeys(("mean_ptr", "rstd_ptr", "scale_ptr"), "*fp32")
        for name, x_dt, stats_in in (("mlp_ln_fp32x", "fp32", False), ("mlp_ln_apply", dt, True)):
            types = {"x_ptr": f"*{x_dt}", **dict.fromkeys(("weight_ptr", "bias_ptr"), f"*{x_dt}"),
                     "y_ptr": f"*{dt}", **fp32, "eps": "fp32"}
            consts = {"BLOCK_C": block_c, "QUANT_FP8": False, "ROUND_E4M3": False, "STATS_IN": stats_in}
            pick = lambda kept, f=largest, b=block_c: f((), {"BLOCK_C": b})  # noqa: E731 - bound per loop
            for cfg, fixed in _kept(fn, {}, fixed=pick, BLOCK_C=block_c):
                yield _tuned(name, dt, f"C={c}", fn.fn, cfg, consts, types, fixed)


def _patch_embed() -> Iterator[Variant]:
    from vit_fast.kernels import patch_embed as k

    e, kk = _WIDTHS[0], 3 * 16 * 16  # ViT-B/16
    m = 64 * 196
    for dt in _DTYPES:
        # The token output, its gradient and the fp32 partial sums stay fp32 under autocast; images and weight
        # are in the compute dtype.
        types = {**dict.fromkeys(("images_ptr", "weight_ptr", "bias_ptr", "dimages_ptr"), f"*{dt}"),
                 **dict.fromkeys(("dweight_partial_ptr", "grad_ptr", "cls_ptr", "pos_ptr", "out_ptr"), "*fp32")}
        named = {"M": m, "E": e, "K": kk, "images_ptr": _meta(dt), "weight_ptr": _meta(dt), "grad_ptr": _meta("fp32")}
        jobs = [
            ("patch_embed_fwd", k._patch_embed_fwd_kernel, {"HAS_BIAS": 1, "HAS_CLS": 1, "HAS_POS": 1, "POS_SKIP": 1}),
            ("patch_embed_fwd_plain", k._patch_embed_fwd_kernel,
             {"HAS_BIAS": 0, "HAS_CLS": 0, "HAS_POS": 0, "POS_SKIP": 0}),
            ("patch_embed_bwd_weight", k._patch_embed_bwd_weight_kernel, {"HAS_CLS": 1}),
            ("patch_embed_bwd_images", k._patch_embed_bwd_images_kernel, {"HAS_CLS": 1}),
        ]
        for name, tuned, flags in jobs:
            for cfg, fixed in _kept(tuned, named):
                consts = {"PH": 16, "PW": 16, "DOT_PRECISION": "ieee", **flags}
                yield _tuned(name, dt, f"E={e} K={kk}", tuned.fn, cfg, consts, types, fixed)


def variants(arch: str, mode: str = "all") -> list[Variant]:
    """Every Triton variant for ``arch`` (the tuning pruners see the target's shared memory per block) at each
    config ``mode`` asks for (:data:`MODES`)."""
    import vit_fast.kernels as kernels_pkg
    from vit_fast.kernels import gemm, patch_embed, scaled_gemm
    from vit_fast.kernels.attention import parts as attention_parts

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    budget = LIMITS[arch]["smem_block"] - _RESERVED_SMEM
    _ASKED.update(arch=arch, mode=mode)
    with contextlib.ExitStack() as stack:
        for module in (attention_parts, gemm, patch_embed, scaled_gemm, kernels_pkg):
            stack.enter_context(mock.patch.object(module, "smem_limit", lambda device: budget))
        found = [v for family in (_attention, _layer_norm, _quantize_rows, _scaled_gemm, _layernorm_mlp, _patch_embed)
                 for v in family()]
    # e4m3 needs sm_89 or newer: the fp8 paths (layer_norm_fp8, quantize_rows, attention_fwd_fp8, scaled_gemm)
    # are never dispatched on sm_80.
    return [v for v in found if int(arch[3:]) >= 89 or "fp8e4nv" not in "".join(v.types.values())]


def cuobjdump() -> str | None:
    """Triton's bundled cuobjdump, else one on PATH or in the CUDA toolkit."""
    try:
        import triton.backends.nvidia as nvidia

        bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    return shutil.which("cuobjdump") or next(
        (p for p in ("/usr/local/cuda/bin/cuobjdump",) if os.access(p, os.X_OK)), None)


_FUNCTION = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ARCH = re.compile(r"arch = (sm_\d+)")


def parse_resource_usage(text: str, arch: str | None = None) -> list[dict[str, Any]]:
    """``cuobjdump --dump-resource-usage`` output as one dict per function (name, arch, regs, stack, shared,
    local); a fat binary's sections are told apart by their ``arch = sm_XX`` headers, kept when ``arch`` is
    None or matches."""
    found = []
    marks = [(m.start(), m.group(1)) for m in _ARCH.finditer(text)]
    for m in _FUNCTION.finditer(text):
        sect = next((a for pos, a in reversed(marks) if pos < m.start()), None)
        if arch is None or sect in (None, arch):
            found.append({"name": m.group(1), "arch": sect, "regs": int(m.group(2)), "stack": int(m.group(3)),
                          "shared": int(m.group(4)), "local": int(m.group(5))})
    return found


def _resources(tool: str, cubin: bytes) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    return parse_resource_usage(out.stdout)[0]


_WORK: dict[str, list[Variant]] = {}


def _compile_one(arch: str, mode: str, index: int) -> Row:
    """Compile variant ``index`` (rebuilt in the worker: jit functions do not pickle) and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    key = f"{arch}:{mode}"
    if key not in _WORK:
        _WORK[key] = variants(arch, mode)
    v = _WORK[key][index]
    names = v.fn.arg_names
    sig = {n: "constexpr" if n in v.consts else v.types.get(n, "i32") for n in names}
    unspecialized = {names[i] if isinstance(i, int) else i for i in getattr(v.fn, "do_not_specialize", ())}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if v.aligned and n not in unspecialized and (sig[n].startswith("*") or sig[n] == "i32")}
    src = ASTSource(v.fn, sig, {(names.index(n),): val for n, val in v.consts.items()}, attrs)
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", int(arch[3:]), 32), options=v.options)
    seconds = time.perf_counter() - start
    res = _resources(cuobjdump(), compiled.asm["cubin"])
    smem = compiled.metadata.shared + res["shared"]  # dynamic (Triton's pipelines) + static
    warps = v.options["num_warps"]
    ptx, ttgir = compiled.asm["ptx"], compiled.asm.get("ttgir", "")
    return Row(v.kernel, v.dtype, v.shape, v.config, res["regs"], res["local"] // 4, smem,
               occupancy(arch, res["regs"], smem, warps), fixed=v.fixed, family=v.family,
               tma="cp.async.bulk.tensor" in ptx, wgmma="wgmma.mma_async" in ptx,
               warp_specialized="ttg.warp_specialize" in ttgir, compile_s=round(seconds, 3))


def triton_rows(arch: str, mode: str, jobs: int, cold: bool = False) -> list[Row]:
    """Compile every variant of ``mode`` for ``arch``. ``cold``: into an empty Triton cache, so that
    ``compile_s`` is what a first run pays (not a cache hit)."""
    count = len(variants(arch, mode))
    with contextlib.ExitStack() as stack:
        if cold:
            stack.enter_context(mock.patch.dict(os.environ, {"TRITON_CACHE_DIR": stack.enter_context(
                tempfile.TemporaryDirectory(prefix="vit_fast_kernels_"))}))
        if jobs <= 1:
            return [_compile_one(arch, mode, i) for i in range(count)]
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_compile_one, [arch] * count, [mode] * count, range(count)))


def extension_rows(arch: str) -> tuple[list[Row], str]:
    """The ``vit_fast._C`` kernels' resources for ``arch``, or no rows and why."""
    spec = importlib.util.find_spec("vit_fast._C")
    if spec is None or not spec.origin:
        return [], "vit_fast._C is not built"
    tool = cuobjdump()
    if tool is None:
        return [], "no cuobjdump (pip install nvidia-cuda-cuobjdump, or a CUDA toolkit)"
    out = subprocess.run([tool, "--dump-resource-usage", spec.origin], capture_output=True, text=True)
    if out.returncode != 0:
        return [], f"cuobjdump failed: {out.stderr.strip()[-200:]}"
    funcs = parse_resource_usage(out.stdout, arch)
    if not funcs:
        return [], f"vit_fast._C holds no {arch} code"
    demangle = shutil.which("c++filt")
    names = [f["name"] for f in funcs]
    if demangle:
        names = subprocess.run([demangle], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    # Block sizes are chosen at launch in C++: occupancy is not known from the binary alone.
    return [Row(name[:60], "", "", "", f["regs"], f["local"] // 4, f["shared"], None, "_C")
            for name, f in zip(names, funcs, strict=False)], ""


def format_table(arch: str, rows: list[Row]) -> str:
    lines = [f"| kernel ({arch}) | dtype | shape | config | fixed | TMA | wgmma | regs | spills | smem KiB | occupancy "
             "|",
             "|---|---|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        occ = "" if r.occupancy is None else f"{r.occupancy:.0%}"
        smem = "" if r.smem is None else f"{r.smem / 1024:.1f}"
        flags = " | ".join("yes" if f else "" for f in (r.fixed, r.tma, r.wgmma))
        lines.append(f"| {r.kernel} | {r.dtype} | {r.shape} | {r.config} | {flags} | {r.regs} | {r.spills} | {smem} "
                     f"| {occ} |")
    return "\n".join(lines)


SHORTLIST_SIZE = 3


def shortlist(rows: list[Row]) -> tuple[dict[str, list[str]], dict[str, dict[str, float]]]:
    """From every config's rows on one arch: per kernel function, the fixed configs then the next configs in list
    order that compile with no spills and fit one block in every variant, up to :data:`SHORTLIST_SIZE` (the fixed
    ones always); and per kernel, how many variant rows those configs are and their compile seconds."""
    chosen: dict[str, list[str]] = {}
    for family in dict.fromkeys(r.family for r in rows):
        mine = [r for r in rows if r.family == family]
        bad = {r.config for r in mine if r.spills or not r.occupancy}
        fixed = list(dict.fromkeys(r.config for r in mine if r.fixed))
        good = [c for c in dict.fromkeys(r.config for r in mine) if c not in bad and c not in fixed]
        chosen[family] = fixed + good[: max(0, SHORTLIST_SIZE - len(fixed))]
    cost = {f: {"rows": 0, "seconds": 0.0} for f in chosen}
    for r in rows:
        if r.config in chosen[r.family]:
            cost[r.family]["rows"] += 1
            cost[r.family]["seconds"] = round(cost[r.family]["seconds"] + (r.compile_s or 0.0), 2)
    return chosen, cost


def write_shortlist(path: str, arch: str, rows: list[Row]) -> None:
    """Write (or update ``arch``'s part of) the shortlist module at ``path`` (kernels/shortlist.py), in 120 columns."""
    import pprint

    from vit_fast.fileio import atomic_write

    found: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), found)  # noqa: S102 - the module this function wrote
    short, cost = dict(found.get("SHORTLIST", {})), dict(found.get("COMPILE_S", {}))
    short[arch], cost[arch] = shortlist(rows)
    names = ("SHORTLIST: dict[str, dict[str, list[str]]]", "COMPILE_S: dict[str, dict[str, dict[str, float]]]")
    atomic_write(path, f'"""{_SHORTLIST_DOC}"""\n\n' + "\n".join(f"{t} = {pprint.pformat(v, width=116 - len(t))}\n"
                                                              for t, v in zip(names, (short, cost), strict=True)))


_SHORTLIST_DOC = """The Triton configs a launch on each GPU architecture tunes over: per kernel function, its fixed
configs, then the next ones in its list that compile with no register spills and fit one block on an SM in every
variant (static evidence, no GPU): at most 3. COMPILE_S: how many variant rows those are per kernel and the CPU
seconds they took to compile from a cold cache, which the GPU check's plan derives its compile budget from.

Written by ``vit-fast kernels --arch sm_XX --cold --shortlist kernels/shortlist.py`` (with ``--quick``: the fixed
configs alone, a first shortlist that tunes nothing): rerun it when a kernel or its config list changes
(tests/suites/test_kernel_resources.py checks that every fixed config is listed)."""


def add_kernels_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=sorted(LIMITS), default="sm_90", help="target to compile for")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a markdown table")
    parser.add_argument("--quick", action="store_true",
                        help="only each variant's fixed (untuned) config (a minute or two, not many)")
    parser.add_argument("--shortlisted", action="store_true", help="only the configs kernels/shortlist.py lists")
    parser.add_argument("--cold", action="store_true",
                        help="compile into an empty Triton cache, so compile_s is a first run's")
    parser.add_argument("--shortlist", metavar="PATH", default=None,
                        help="write the arch's shortlist and compile times to PATH (kernels/shortlist.py): from "
                        "every config, or with --quick the fixed configs alone")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")


def _mode(args: argparse.Namespace) -> str:
    return "fixed" if args.quick else "shortlist" if args.shortlisted else "all"


def _argv(args: argparse.Namespace) -> list[str]:
    flags = [f"--{f}" for f in ("json", "quick", "shortlisted", "cold") if getattr(args, f)]
    return ["--arch", args.arch, "--jobs", str(args.jobs), *flags, *(["--shortlist", args.shortlist] if args.shortlist
                                                                     else [])]


def main(args: argparse.Namespace) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Under the interpreter triton.jit gives functions that do not compile for a GPU: run in a process
        # without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "vit_fast.kernel_resources", *_argv(args)], env=env).returncode
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        print("triton's NVIDIA backend is not installed", file=sys.stderr)
        return 1
    if args.shortlist and args.shortlisted:
        print("vit-fast kernels: --shortlist is made from every config (or, with --quick, the fixed ones alone), "
              "not from the current shortlist", file=sys.stderr)
        return 2
    rows = triton_rows(args.arch, _mode(args), args.jobs, cold=args.cold)
    if args.shortlist:
        write_shortlist(args.shortlist, args.arch, rows)
    ext, why = extension_rows(args.arch)
    if args.json:
        print(json.dumps({"arch": args.arch, "mode": _mode(args), "triton": [dataclasses.asdict(r) for r in rows],
                          "extension": [dataclasses.asdict(r) for r in ext], "extension_skipped": why}, indent=1))
        return 0
    print(format_table(args.arch, rows))
    spilling = sorted({f"{r.kernel} {r.dtype} {r.shape} {r.config}" for r in rows if r.spills})
    print(f"\n{len(rows)} Triton variants; spilling: {', '.join(spilling) if spilling else 'none'}")
    print(f"\nvit_fast._C: {why}" if why else "\n" + format_table(args.arch, ext))
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="vit-fast kernels")
    add_kernels_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
