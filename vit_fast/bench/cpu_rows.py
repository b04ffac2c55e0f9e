"""The CPU rows of the model benchmark (inference): vit_fast's measured pick (the CPU path search of
:mod:`vit_fast.cpu_paths` at the case's batch), PT2E int8 with and without bf16 autocast, and beside them the
PyTorch ways (timm in bf16 eager, ``torch.compile`` with inductor freezing in fp32 and bf16, and in bf16 with
the C++ wrapper the compiled candidates use) and the other CPU
runtimes where installed (:mod:`vit_fast.bench.runtimes`: ONNX Runtime fp32 and int8, OpenVINO f32 and bf16).

Each row is checked before it is timed against a yardstick of its own kind, by the one tolerance rule: bf16 rows
against vit_fast's reference in bf16 (whose patch embedding is a GEMM, not oneDNN's bf16 convolution that AMX gets
wrong for some patch grids: a timm row that hits it fails the check), PT2E rows against the same quantized graph run
eagerly, the pick against the yardstick of what it picked. bf16 rows are skipped, with the reason, on CPUs without
native bf16, where bf16 is emulated (8x slower than fp32 for ViT-S/16 on an AVX2 EPYC).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.nn as nn

from vit_fast import cpu_features, cpu_paths, pt2e
from vit_fast.bench import runtimes
from vit_fast.bench.providers import Provider, compile_skip
from vit_fast.config import ViTConfig

OPTIMIZED = "vit_fast:optimized"
INFERENCE_ONLY = "inference only: this CPU row measures the serving path"
# What each pick of the CPU path search is checked against: the yardstick of its kind.
PRECISION = {"vit_fast:pt2e:int8": "int8 weights and activations (static)",
             "vit_fast:pt2e:int8+bf16": "int8 (static), the rest under bf16 autocast",
             "onnxruntime:int8": "int8 weights, dynamic int8 activations", "openvino:bf16": "bf16 inference hint"}
PICK_KIND = {"fp32": "fp32", "compiled:fp32": "fp32", "bf16": "bf16", "compiled:bf16": "bf16", "int8": "int8",
             "pt2e:int8": "pt2e:int8", "pt2e:int8+bf16": "pt2e:int8+bf16"}


def calibration(cfg: ViTConfig) -> list[torch.Tensor]:
    """The PT2E rows' static activation scales come from one seeded batch of 8 random images (not the checked ones;
    the exported batch dimension is dynamic)."""
    shape = (cfg.in_chans, *(g * p for g, p in zip(cfg.grid_size, _patch(cfg), strict=True)))
    return [torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))]


def _patch(cfg: ViTConfig) -> tuple[int, int]:
    return (cfg.patch_size, cfg.patch_size) if isinstance(cfg.patch_size, int) else tuple(cfg.patch_size)


class _Fn(nn.Module):
    """A callable as a module (the case casts and evals what a provider builds). The callable is held outside the
    module tree: an exported graph refuses ``eval()``, and a built path is already cast as it must be."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.__dict__["fn"] = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def pt2e_graph(cfg: ViTConfig, base: nn.Module) -> nn.Module:
    """The PT2E int8 graph of ``base`` (statically calibrated, not compiled): the rows compile it, the yardstick
    runs it eagerly."""
    return _Fn(pt2e.quantize_pt2e(base, calibration(cfg), compile=False))


def _bf16_context(bf16: bool) -> Callable[[], contextlib.AbstractContextManager]:
    def context() -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(cpu_paths.inductor_freezing())
        if bf16:
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        return stack

    return context


def cpu_providers(device: torch.device, *, quick: bool, allow_compile: bool, timm_copy: Callable,
                  timm_skip: str | None) -> list[Provider]:
    """The CPU-only inference rows (none on CUDA)."""
    if device.type != "cpu":
        return []
    no_bf16 = cpu_features.cpu_features().why_no_bf16()
    cskip = compile_skip(device, quick, allow_compile)
    no_pt2e = pt2e.unavailable()
    bf16 = torch.bfloat16
    search = functools.partial(search_pick, quick=quick, allow_compile=allow_compile)
    out = [Provider(OPTIMIZED, "vit_fast", search, train_skip=INFERENCE_ONLY),
           Provider("vit_fast:pt2e:int8", "vit_fast", pt2e_graph, _bf16_context(False), compile=True,
                    skip=no_pt2e or cskip, train_skip=INFERENCE_ONLY),
           Provider("vit_fast:pt2e:int8+bf16", "vit_fast", pt2e_graph, _bf16_context(True), compile=True,
                    skip=no_pt2e or no_bf16 or cskip, train_skip=INFERENCE_ONLY),
           Provider("timm:eager:bf16", "baseline", timm_copy, skip=timm_skip or no_bf16, train_skip=INFERENCE_ONLY,
                    dtype=bf16),
           Provider("compiled:timm:freezing", "baseline", timm_copy, cpu_paths.inductor_freezing, compile=True,
                    skip=timm_skip or cskip, train_skip=INFERENCE_ONLY),
           Provider("compiled:timm:freezing:bf16", "baseline", timm_copy, cpu_paths.inductor_freezing, compile=True,
                    skip=timm_skip or cskip or no_bf16, train_skip=INFERENCE_ONLY, dtype=bf16),
           # the compiled candidates' own settings on timm's model: PyTorch's strongest route measured here
           Provider("compiled:timm:freezing+cpp_wrapper:bf16", "baseline", timm_copy,
                    functools.partial(cpu_paths.inductor_freezing, cpp_wrapper=True), compile=True,
                    skip=timm_skip or cskip or no_bf16, train_skip=INFERENCE_ONLY, dtype=bf16)]
    return out + runtimes.providers(quick=quick, no_bf16=no_bf16, timm_copy=timm_copy, timm_skip=timm_skip)


def expect_kind(p: Provider) -> str | None:
    """The yardstick a CPU row is checked against beyond the case's own: ``bf16``, ``pt2e:int8[+bf16]``, or None."""
    if p.name.startswith("vit_fast:pt2e:"):
        return p.name.removeprefix("vit_fast:")
    return "bf16" if p.dtype == torch.bfloat16 or p.name == "openvino:bf16" else None


def check_dtype(kind: str | None, case_dtype: torch.dtype) -> torch.dtype:
    """The dtype whose absolute tolerance a row of ``kind`` is checked with (bf16 for rows computing in bf16)."""
    return torch.bfloat16 if kind in ("bf16", "pt2e:int8+bf16") else case_dtype


def yardstick(kind: str, base: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The same-kind result the scale-aware rule measures a row's error from (see :func:`expect_kind`)."""
    import copy

    with torch.no_grad():
        if kind == "bf16":
            return copy.deepcopy(base).to(torch.bfloat16).eval()(images.to(torch.bfloat16))
        graph = pt2e_graph(base.config, base)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind.endswith("+bf16")):
            return graph(images)


def search_pick(base: nn.Module, batch: int, *, quick: bool, allow_compile: bool
                ) -> tuple[cpu_paths.CpuPick, Callable[[ViTConfig, nn.Module], nn.Module]]:
    """The CPU path search at ``batch`` (eager candidates only in --quick, or without compile), and a provider
    function that runs its pick."""
    cands = cpu_paths.candidates()
    if quick or not allow_compile:
        cands = [c for c in cands if not (c.name.startswith("compiled:") or c.name.startswith("pt2e:"))]
    pick, runners = cpu_paths.search(base, (batch,), calibration=calibration(base.config), cands=cands)
    runner = runners[batch]
    return pick, lambda cfg, model: _Fn(runner)


__all__ = ["OPTIMIZED", "PICK_KIND", "PRECISION", "check_dtype", "cpu_providers", "expect_kind", "search_pick",
           "yardstick"]
