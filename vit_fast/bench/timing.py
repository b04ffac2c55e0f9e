"""The one timing helper of every benchmark, and what is recorded about the timed device."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# CPU: inputs rotate through this many bytes (beyond the last-level cache of most CPUs), and the copies that
# set the bandwidth peak move a working set of the same size, so both live in the same level of memory.
CPU_WORKING_SET = 128 * 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: torch.device) -> dict:
    """Name, memory and, on CUDA, capability, driver, cuDNN and L2 size of the benchmarked device."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        driver = None
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        return {"type": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1), "sm_count": p.multi_processor_count,
                "l2_bytes": getattr(p, "L2_cache_size", None), "driver": driver,
                "cudnn": torch.backends.cudnn.version()}
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    return {"type": "cpu", "name": name, "threads": torch.get_num_threads(), "cores": os.cpu_count()}


@dataclass
class Timing:
    """Per-call time in milliseconds: fastest, 20th percentile, median, 80th percentile."""

    min_ms: float
    p20_ms: float
    median_ms: float
    p80_ms: float
    repeats: int | None

    @property
    def spread(self) -> float:
        """The run's noise: (p80 - p20) / median."""
        return (self.p80_ms - self.p20_ms) / self.median_ms


class Timer:
    """The one timing helper of every benchmark.

    CUDA: ``triton.testing.do_bench``: CUDA events around each call, a warm-up, the L2 cache flushed before
    every repeat (so inputs never start in L2), quantiles of many repeats. Without triton,
    ``torch.utils.benchmark`` (which synchronizes CUDA) with no L2 flush, and the description says so.
    CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` on all threads; callers rotate inputs through a
    working set of :data:`CPU_WORKING_SET` bytes.
    """

    def __init__(self, device: torch.device, quick: bool) -> None:
        self.device = device
        self.quick = quick
        self._do_bench = None
        if device.type == "cuda":
            try:
                from triton.testing import do_bench
            except ImportError:
                self.description = "torch.utils.benchmark (triton not installed: no L2 flush between repeats)"
            else:
                self._do_bench = do_bench
                self.description = ("triton.testing.do_bench: CUDA events, warm-up, L2 flushed before every "
                                    "repeat, median of the repeats")
        else:
            self.description = (f"torch.utils.benchmark blocked_autorange on {torch.get_num_threads()} threads, "
                                f"inputs rotated through {CPU_WORKING_SET // 2**20} MiB")

    def time(self, fn: Callable[[], object], *, heavy: bool = False) -> Timing:
        """Time ``fn`` (already called once by the caller: compiled, autotuned, correct). ``heavy`` marks
        long calls (model steps, the peaks), which get a longer window so that there are enough repeats."""
        if self._do_bench is not None:
            warmup, rep = (10, 60) if self.quick else (25, 200)
            if heavy:
                warmup, rep = warmup * 4, rep * 8
            q = self._do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.0, 0.2, 0.5, 0.8])
            return Timing(*(float(v) for v in q), repeats=None)
        from torch.utils.benchmark import Timer as TorchTimer

        min_run_time = (0.05 if self.quick else 0.4) * (8 if heavy else 1)
        m = TorchTimer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=min_run_time)
        times = [t * 1e3 for t in m.times]
        lo, p20, med, p80 = np.percentile(times, [0, 20, 50, 80])
        return Timing(float(lo), float(p20), float(med), float(p80), repeats=len(times) * m.number_per_run)

    def best_ms(self, fn: Callable[[], object]) -> float:
        """The fastest single call of many, for the peaks. On CPU each call is timed alone (the quantiles of
        ``time`` are over blocks of calls), so a moment when the machine is not shared is caught."""
        fn()
        if self.device.type == "cuda":
            return self.time(fn, heavy=True).min_ms
        from torch.utils.benchmark import Timer as TorchTimer

        timer = TorchTimer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return min(timer.timeit(1).median for _ in range(20 if self.quick else 50)) * 1e3
