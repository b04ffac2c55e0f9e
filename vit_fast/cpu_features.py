"""What this CPU can do natively (AMX, AVX-512 BF16/VNNI, AVX-VNNI), and the one measurement training needs from
it: whether bf16 autocast is faster than fp32 here.

CPUs differ by several times in 16-bit and int8 matrix throughput: AMX (Sapphire Rapids and later Xeons) and
AVX-512 BF16 (Cooper Lake, Zen 4) compute bf16 natively, where an AVX2 CPU emulates it through fp32 and runs it
several times slower than fp32 (8x for a ViT-S/16 forward on an AVX2 EPYC). The flags say what is possible; only
a measurement says what is faster, so the flags decide which candidates are tried and timing decides which one
runs (:mod:`vit_fast.cpu_paths` for inference, :func:`training_precision` for ``vit-fast train --precision auto``).

:func:`cpu_features` is probed once per process. Code that branches on it calls it through this module, so tests
fake another CPU by replacing ``vit_fast.cpu_features.cpu_features``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from vit_fast import policy
from vit_fast.fileio import atomic_write

# /proc/cpuinfo flag -> how results and messages name it. The first two are the native bf16 units.
FEATURES: dict[str, str] = {
    "amx_bf16": "AMX-BF16", "avx512_bf16": "AVX-512 BF16", "amx_int8": "AMX-INT8", "amx_tile": "AMX tiles",
    "avx512_fp16": "AVX-512 FP16", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI", "avx512f": "AVX-512F",
    "avx2": "AVX2", "fma": "FMA",
}
BF16_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
INT8_DOT_FLAGS: tuple[str, ...] = ("amx_int8", "avx512_vnni", "avx_vnni")
TRAIN_SCHEMA = "vit_fast.cpu_train_precision/1"
BF16_MARGIN = 0.05  # bf16 autocast must beat fp32 by this much: a tie keeps fp32's exact numerics


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's name and flags (``/proc/cpuinfo``'s spelling: ``amx_bf16``, ``avx512_vnni``, ...)."""

    name: str
    flags: frozenset[str]
    source: str = "/proc/cpuinfo"

    @property
    def present(self) -> list[str]:
        """The features of :data:`FEATURES` this CPU has, by their display names."""
        return [label for flag, label in FEATURES.items() if flag in self.flags]

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def int8_dot(self) -> bool:
        """An int8 dot-product unit (AMX-INT8 or VNNI): what makes int8 GEMMs faster than fp32 ones."""
        return any(f in self.flags for f in INT8_DOT_FLAGS)

    def why_no_bf16(self) -> str | None:
        """Why bf16 candidates are not tried here, or None where the CPU has native bf16."""
        if self.native_bf16:
            return None
        return (f"{self.name} has no native bf16 (neither AMX-BF16 nor AVX-512 BF16 among its flags): bf16 would be "
                "emulated through fp32 and slower than fp32, so it is not tried")

    def as_dict(self) -> dict:
        """For the machine section of results and for cache keys."""
        return {"name": self.name, "features": self.present, "native_bf16": self.native_bf16,
                "int8_dot": self.int8_dot, "source": self.source}


def probe() -> CpuFeatures:
    """Read this machine's CPU: ``/proc/cpuinfo`` where it exists, else torch's vector capability (AVX2/AVX512)."""
    name, flags = None, None
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:  # every core repeats its block: the first of each field is the CPU's
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name is None:
                    name = value.strip()
                elif key.strip() == "flags" and flags is None:
                    flags = frozenset(value.split())
    name = name or platform.processor() or platform.machine() or "unknown"
    if flags is not None:
        return CpuFeatures(name, flags)
    capability = torch.backends.cpu.get_cpu_capability()
    guessed = {"AVX512": {"avx512f", "avx2"}, "AVX2": {"avx2"}}.get(capability, set())
    return CpuFeatures(name, frozenset(guessed), source=f"torch.backends.cpu.get_cpu_capability() = {capability}")


@functools.cache
def _probed() -> CpuFeatures:
    return probe()


def cpu_features() -> CpuFeatures:
    """This machine's CPU, probed once per process (tests replace this function to fake another CPU)."""
    return _probed()


def cache_dir() -> str:
    """Where measured CPU picks live: beside the GPU policies, ``$XDG_CACHE_HOME/vit_fast/cpu_paths``."""
    return os.path.join(os.path.dirname(policy.user_dir()), "cpu_paths")


def slug(text: str) -> str:
    """A CPU name as a file-name part: ``intel-r-xeon-r-platinum-8480``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "unknown"


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_cached(path: str, key: dict) -> dict | None:
    """The cached entry at ``path`` when it was measured for exactly ``key``; None when absent or unreadable."""
    try:
        with open(path) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("key") == json.loads(json.dumps(key, default=str)) else None


# ---- training: bf16 autocast only where it is measured faster ---------------------------------------------------


def _model_key(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return {"class": type(model).__name__, "config": config.to_dict()}
    shapes = [list(p.shape) for p in model.parameters()]  # a timm CNN: its class and parameter shapes name it
    return {"class": type(model).__name__, "params": hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]}


def _step_ms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, amp: bool, steps: int) -> float:
    times = []
    for i in range(steps + 2):  # two warm-up steps: the allocator and oneDNN's primitive caches settle
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        model.zero_grad(set_to_none=True)
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_training_precision(model: nn.Module, images_shape: tuple[int, ...], steps: int = 5) -> dict:
    """Time forward + backward of a copy of ``model`` on random images of ``images_shape``, in fp32 and under
    bf16 autocast: ``{"fp32_ms", "bf16_ms", "precision", "why"}``. The global random state is left as it was
    (a training run's seed still gives the same run)."""
    with torch.random.fork_rng(devices=[]):
        gen = torch.Generator().manual_seed(0)
        probe_model = copy.deepcopy(model).cpu().train()
        images = torch.randn(*images_shape, generator=gen)
        labels = torch.zeros(images_shape[0], dtype=torch.long)
        fp32 = _step_ms(probe_model, images, labels, False, steps)
        bf16 = _step_ms(probe_model, images, labels, True, steps)
    faster = bf16 < fp32 * (1 - BF16_MARGIN)
    why = (f"bf16 autocast measured {fp32 / bf16:.2f}x fp32 per forward + backward "
           f"({bf16:.3g} ms vs {fp32:.3g} ms, batch {images_shape[0]}, {torch.get_num_threads()} threads): "
           + ("bf16" if faster else f"fp32 (bf16 must win by more than {BF16_MARGIN:.0%})"))
    return {"fp32_ms": fp32, "bf16_ms": bf16, "precision": "bf16" if faster else "fp32", "why": why}


def training_precision(model: nn.Module, batch: int, in_chans: int, img_size: int | tuple[int, int], *,
                       cache: bool = True, verbose: bool = True) -> str:
    """``--precision auto`` on CPU: ``"bf16"`` where the CPU has native bf16 and bf16 autocast is measured faster
    than fp32 for this model and batch (``batch`` images of ``in_chans`` x ``img_size``), else ``"fp32"``. The
    measurement (a few forward + backward steps of each on a copy of the model) is cached per model, CPU and flags,
    threads, batch and torch version, so a resumed run makes the same choice."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    images_shape = (batch, in_chans, h, w)
    features = cpu_features()
    if not features.native_bf16:
        if verbose:
            print(f"--precision auto: fp32 ({features.why_no_bf16()})")
        return "fp32"
    key = {"schema": TRAIN_SCHEMA, "model": _model_key(model), "images": list(images_shape),
           "cpu": features.name, "flags": sorted(features.flags), "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    path = os.path.join(cache_dir(), f"train-{slug(features.name)}-{key_digest(key)}.json")
    entry = read_cached(path, key) if cache else None
    if entry is None:
        entry = {"key": key, **measure_training_precision(model, images_shape)}
        if cache:
            atomic_write(path, json.dumps(entry, indent=1, default=str) + "\n")
    elif verbose:
        entry["why"] += f" (cached: {path})"
    if verbose:
        print(f"--precision auto: {entry['why']}")
    return entry["precision"]


__all__ = ["BF16_FLAGS", "FEATURES", "CpuFeatures", "cpu_features", "probe", "training_precision"]
