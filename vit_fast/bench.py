"""Benchmarks: vit_fast's backends side by side with PyTorch SDPA (each SDPA backend forced), eager PyTorch,
``torch.compile`` and timm, with the peaks of the same machine measured at the start of the same run.

``vit-fast bench`` runs it (see :func:`main`); ``benchmarks/bench_<op>.py`` runs one op's part, and under
``pytest benchmarks/ --benchmark-only`` the same providers and shapes as a pytest-benchmark suite.

How the numbers are made trustworthy:

- Correct first: every provider's output (and, for forward+backward, every gradient) is compared with an
  oracle (the reference in float64 for float32 inputs, in float32 otherwise) on fresh random inputs before
  it is timed, by the scale-aware rule ``max|out - oracle| <= 2 * max|ref_same_dtype - oracle| + atol``.
  A provider that disagrees is reported as failed and not timed.
- One timing helper (:class:`Timer`): on CUDA ``triton.testing.do_bench`` (CUDA events, warm-up, the L2
  cache flushed before every repeat, median and quantiles); on CPU ``torch.utils.benchmark`` with the inputs
  rotated through a working set of :data:`CPU_WORKING_SET` bytes, the one the bandwidth peak is measured on.
- FLOP and byte counts are analytic (formulas in each op's ``flops``/``bytes``: the useful work, counted
  the same for every provider), and every derived figure is checked against the peaks measured in the
  same run (a large matmul and a large copy); a figure above a peak is flagged as a violation.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import re
import subprocess
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import vit_fast
from vit_fast import backends, ops
from vit_fast.config import ViTConfig, get_config
from vit_fast.envinfo import environment

SCHEMA = "vit_fast.bench/1"
OPS: tuple[str, ...] = ("attention", "layer_norm", "layernorm_mlp", "patch_embed")
OP_MODES: tuple[str, ...] = ("fwd", "fwd+bwd")
MODEL_MODES: tuple[str, ...] = ("inference", "train")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Same values as the test suite's tolerances; scaled by the oracle's magnitude (see _agreement).
ATOL: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3,
                                  torch.bfloat16: 1.6e-2}
SEQ_LENS: tuple[int, ...] = (65, 197, 257, 577, 1025)  # CIFAR/4, /16 at 224, /14 at 224, /16 at 384, /16 at 512
# CPU: inputs rotate through this many bytes (beyond the last-level cache of most CPUs), and the copies that
# set the bandwidth peak move a working set of the same size, so both live in the same level of memory.
CPU_WORKING_SET = 128 * 2**20
MAX_ROTATE_SETS = 4096
CHECK_PARAMS = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "head.weight")
DEFAULT_OUT = "bench-results"


# ------------------------------------------------------------------------------------------------ small helpers


def atomic_write(path: str, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_list(values: Sequence[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: flags take space- or comma-separated lists."""
    return [v for item in values or () for v in item.split(",") if v]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seed(*parts: object) -> None:
    """A seed of its own per case: fresh inputs for every case, the same ones on a rerun."""
    torch.manual_seed(zlib.crc32(repr(parts).encode()))


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


# --------------------------------------------------------------------------------------------------- timing


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


# ---------------------------------------------------------------------------------------------------- peaks


def measure_peaks(device: torch.device, timer: Timer, dtypes: Sequence[torch.dtype]) -> dict:
    """The ceilings of this machine, measured now. Each is the fastest repeat: a peak is what the machine can
    reach.

    - FLOP/s: a large matmul per dtype of the run (and bf16 on CUDA); per dtype because the dtypes differ by
      several times (tensor cores, AMX).
    - Bandwidth: the best of a large copy (bytes read + written), a large reduction (bytes read) and, on CPU,
      a copy from the rotated working set into a small buffer that stays in cache: an op's fresh output
      usually lands in a recently freed, cached block while its rotated inputs come from memory, and this
      copy has that same pattern. CUDA: 1 GiB, far beyond any L2 (do_bench flushes the L2 anyway); CPU: the
      working set the ops rotate through.
    """
    cuda = device.type == "cuda"
    n = 8192 if cuda else (1024 if timer.quick else 2048)
    matmul = {}
    for dt in dict.fromkeys([*([torch.bfloat16] if cuda else []), *dtypes]):
        a, b = (torch.randn(n, n, device=device, dtype=dt) for _ in range(2))
        ms = timer.best_ms(lambda a=a, b=b: torch.mm(a, b))
        matmul[dtype_name(dt)] = 2 * n**3 / (ms * 1e-3) / 1e12
    nbytes = 2**30 if cuda else CPU_WORKING_SET
    bandwidth = _bandwidth_peaks(device, timer, nbytes)
    if cuda:
        torch.cuda.empty_cache()
    return {"matmul_tflops": matmul, "matmul": f"{n}x{n}x{n}", "bandwidth": bandwidth,
            "bandwidth_of": f"{nbytes // 2**20} MiB {'device memory' if cuda else 'working set'}",
            "bandwidth_gbps": max(bandwidth.values())}


def _bandwidth_peaks(device: torch.device, timer: Timer, nbytes: int) -> dict[str, float]:
    src = torch.randn(nbytes // 4, device=device)
    half, dst = src[: src.numel() // 2], torch.empty(src.numel() // 2, device=device)
    bandwidth = {"copy": nbytes / (timer.best_ms(lambda: dst.copy_(half)) * 1e-3) / 1e9,
                 "read": nbytes / (timer.best_ms(lambda: src.sum()) * 1e-3) / 1e9}
    if device.type == "cpu":
        chunks, hot = src.view(-1, 2**18), torch.empty(2**18)  # 1 MiB each
        cycle = itertools.cycle(chunks)
        bandwidth["copy to cache"] = 2 * 2**20 / (timer.best_ms(lambda: hot.copy_(next(cycle))) * 1e-3) / 1e9
    return bandwidth


# ------------------------------------------------------------------------------------------------------ ops


@dataclass
class Inputs:
    """An op's inputs: base tensors (fresh random), which of them get gradients, and how they are assembled
    into the op's ``(args, kwargs)`` (attention takes strided views of one packed qkv tensor)."""

    tensors: dict[str, torch.Tensor]
    grad_names: tuple[str, ...]
    assemble: Callable[[dict[str, torch.Tensor]], tuple[tuple, dict]]
    grad_out: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for n in self.grad_names:
            self.tensors[n].requires_grad_(True)

    def nbytes(self) -> int:
        ts = [*self.tensors.values(), *([self.grad_out] if self.grad_out is not None else [])]
        return sum(t.numel() * t.element_size() for t in ts)

    def to(self, dtype: torch.dtype) -> Inputs:
        tensors = {k: v.detach().to(dtype) for k, v in self.tensors.items()}
        grad_out = None if self.grad_out is None else self.grad_out.to(dtype)
        return Inputs(tensors, self.grad_names, self.assemble, grad_out)

    def replicas(self, n: int) -> list[Inputs]:
        """``n`` copies (this one first), each tensor's copies carved from one allocation: thousands of small
        allocations would each cost page faults."""
        named = {**self.tensors, **({"__grad_out": self.grad_out} if self.grad_out is not None else {})}
        bufs = {k: v.detach().expand(n - 1, *v.shape).contiguous() for k, v in named.items()}
        out = [self]
        for i in range(n - 1):
            tensors = {k: bufs[k][i].detach() for k in self.tensors}
            grad_out = bufs["__grad_out"][i] if self.grad_out is not None else None
            out.append(Inputs(tensors, self.grad_names, self.assemble, grad_out))
        return out

    def leaves(self) -> list[torch.Tensor]:
        return [self.tensors[n] for n in self.grad_names]


def run_once(fn: Callable, inputs: Inputs, mode: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One forward (without autograd) or one forward+backward; the backward returns the gradients of the
    inputs' leaves for ``grad_out`` without accumulating them into ``.grad``."""
    if mode == "fwd":
        with torch.no_grad():
            args, kwargs = inputs.assemble(inputs.tensors)
            return fn(*args, **kwargs), ()
    args, kwargs = inputs.assemble(inputs.tensors)
    out = fn(*args, **kwargs)
    return out, torch.autograd.grad(out, inputs.leaves(), inputs.grad_out)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _layer_norm_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _mlp_eager(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, fc1_weight: torch.Tensor,
               fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, *, eps: float,
               residual: torch.Tensor) -> torch.Tensor:
    """What a PyTorch ViT block does: LayerNorm -> Linear -> GELU -> Linear, plus the residual."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    return residual + F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def _patch_embed_eager(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, cls_token: torch.Tensor,
                       pos_embed: torch.Tensor) -> torch.Tensor:
    """What timm does: conv, flatten, transpose, cat the class token, add the position embedding."""
    x = F.conv2d(images, weight, bias, stride=weight.shape[-2:]).flatten(2).transpose(1, 2)  # (B, N, E)
    return torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_embed  # (B, 1+N, E)


def _preset_dims(name: str) -> dict[str, int]:
    cfg = get_config(name)
    return {"N": cfg.num_patches + cfg.num_prefix_tokens, "C": cfg.embed_dim, "H": cfg.num_heads,
            "D": cfg.head_dim, "hidden": cfg.mlp_hidden_dim, "P": _patch(cfg),
            "img": cfg.grid_size[0] * _patch(cfg), "in_chans": cfg.in_chans}


def _patch(cfg: ViTConfig) -> int:
    return cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]


# Presets whose token shapes the per-op benchmarks take (ViT-S/B/L/H at 224 and 384, CIFAR size).
GPU_PRESETS = ("vit_tiny_patch4_32", "vit_small_patch16_224", "vit_small_patch16_384", "vit_base_patch16_224",
               "vit_base_patch16_384", "vit_large_patch16_224", "vit_large_patch16_384", "vit_huge_patch14_224")
CPU_PRESETS = ("vit_tiny_patch4_32", "vit_small_patch4_32", "vit_tiny_patch16_224")
GPU_BATCHES = (8, 64, 256)
CPU_BATCHES = (1, 8)


class OpBench:
    """One op's benchmark: its shapes, inputs, analytic counts and the PyTorch ways of computing it."""

    name: str
    metric: str  # "TFLOP/s" (compute-bound work) or "GB/s" (memory-bound)
    shape_keys: tuple[str, ...]

    def shapes(self, quick: bool, gpu: bool) -> list[dict[str, int]]:
        raise NotImplementedError

    def tokens(self, shape: dict[str, int]) -> int:
        """The sequence length, the x axis of the plots."""
        return shape["N"]

    def make(self, shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
        raise NotImplementedError

    def flops(self, shape: dict[str, int], mode: str) -> int:
        raise NotImplementedError

    def bytes(self, shape: dict[str, int], mode: str, elem: int) -> int:
        raise NotImplementedError

    def reference(self) -> Callable:
        return getattr(ops, f"{self.name}_ref")

    def public(self) -> Callable:
        return getattr(ops, self.name)

    def baselines(self) -> list[tuple[str, Callable, Callable[[], contextlib.AbstractContextManager]]]:
        """(name, function with the op's signature, context it runs in) for each eager PyTorch way."""
        raise NotImplementedError

    def compiled_baseline(self) -> tuple[str, Callable]:
        raise NotImplementedError

    def peers(self) -> list[tuple[str, str, Callable[[], Callable]]]:
        """(name, module that must be importable, factory of a function with the op's signature)."""
        return []

    def label(self, shape: dict[str, int]) -> str:
        return " ".join(f"{k}{shape[k]}" for k in self.shape_keys)

    def _from_presets(self, quick: bool, gpu: bool, quick_gpu: list[dict], quick_cpu: list[dict],
                      pick: Callable[[dict[str, int]], dict[str, int]]) -> list[dict[str, int]]:
        if quick:
            return quick_gpu if gpu else quick_cpu
        out = []
        for name in GPU_PRESETS if gpu else CPU_PRESETS:
            for b in GPU_BATCHES if gpu else CPU_BATCHES:
                s = {"B": b, **pick(_preset_dims(name))}
                if s not in out:
                    out.append(s)
        return out


class AttentionBench(OpBench):
    name, metric, shape_keys = "attention", "TFLOP/s", ("B", "H", "N", "D")

    def shapes(self, quick: bool, gpu: bool) -> list[dict[str, int]]:
        if quick:
            if gpu:  # the shapes of the attention targets: ViT-B heads and ViT-H/14 heads at 197, 257, 577 tokens
                return [{"B": 64, "H": h, "N": n, "D": d} for h, d in ((12, 64), (16, 80)) for n in (197, 257, 577)]
            return [{"B": 4, "H": 3, "N": 65, "D": 64}, {"B": 1, "H": 3, "N": 197, "D": 64}]
        heads = ((12, 64), (16, 80)) if gpu else ((3, 64), (3, 80))  # ViT-B and ViT-H/14 (ViT-Ti heads on CPU)
        seqs = SEQ_LENS if gpu else SEQ_LENS[:3]
        return [{"B": b, "H": h, "N": n, "D": d} for h, d in heads for n in seqs
                for b in (GPU_BATCHES if gpu else CPU_BATCHES)]

    def make(self, shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
        B, H, N, D = (shape[k] for k in "BHND")
        qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype)  # the qkv projection's output, as in the model

        def assemble(t: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
            q, k, v = t["qkv"].permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), strided views (no copy)
            return (q, k, v), {"scale": D**-0.5}

        return Inputs({"qkv": qkv}, ("qkv",), assemble)

    def flops(self, shape: dict[str, int], mode: str) -> int:
        # forward: q k^T and p v, 2 * N * N * D each per head; backward: dV = P^T dO, dP = dO V^T, dQ = dS K,
        # dK = dS^T Q, twice the forward. The recomputation of P that FlashAttention-style kernels do is not
        # counted: it is not useful work, and every provider is credited the same.
        fwd = 4 * shape["B"] * shape["H"] * shape["N"] ** 2 * shape["D"]
        return fwd if mode == "fwd" else 3 * fwd

    def bytes(self, shape: dict[str, int], mode: str, elem: int) -> int:
        # forward reads q, k, v and writes o; the backward at least reads q, k, v, dO and writes dq, dk, dv.
        t = shape["B"] * shape["H"] * shape["N"] * shape["D"] * elem
        return 4 * t if mode == "fwd" else 11 * t

    def baselines(self) -> list[tuple[str, Callable, Callable[[], contextlib.AbstractContextManager]]]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def forced(backend: SDPBackend) -> Callable[[], contextlib.AbstractContextManager]:
            return lambda: sdpa_kernel([backend])

        kinds = (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                 ("math", "MATH"))
        return [(f"sdpa:{short}", _sdpa, forced(getattr(SDPBackend, attr)))
                for short, attr in kinds if hasattr(SDPBackend, attr)]

    def compiled_baseline(self) -> tuple[str, Callable]:
        return "compiled:reference", ops.attention_ref

    def peers(self) -> list[tuple[str, str, Callable[[], Callable]]]:
        def flash_attn() -> Callable:
            from flash_attn import flash_attn_func

            def fn(q, k, v, *, scale):  # flash_attn takes (B, N, H, D)
                return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       softmax_scale=scale).transpose(1, 2)

            return fn

        def xformers() -> Callable:
            from xformers.ops import memory_efficient_attention

            def fn(q, k, v, *, scale):  # xformers takes (B, N, H, D)
                return memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  scale=scale).transpose(1, 2)

            return fn

        return [("peer:flash_attn", "flash_attn", flash_attn), ("peer:xformers", "xformers", xformers)]


class LayerNormBench(OpBench):
    name, metric, shape_keys = "layer_norm", "GB/s", ("B", "N", "C")

    def shapes(self, quick: bool, gpu: bool) -> list[dict[str, int]]:
        return self._from_presets(quick, gpu, [{"B": 256, "N": 197, "C": 768}],
                                  [{"B": 8, "N": 65, "C": 192}, {"B": 2, "N": 197, "C": 384}],
                                  lambda d: {"N": d["N"], "C": d["C"]})

    def make(self, shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
        B, N, C = shape["B"], shape["N"], shape["C"]
        t = {"x": torch.randn(B, N, C, device=device, dtype=dtype),
             "weight": 1 + 0.1 * torch.randn(C, device=device, dtype=dtype),
             "bias": 0.1 * torch.randn(C, device=device, dtype=dtype)}
        return Inputs(t, ("x", "weight", "bias"), lambda t: ((t["x"], t["weight"], t["bias"]), {"eps": 1e-6}))

    def flops(self, shape: dict[str, int], mode: str) -> int:
        # about 8 per element forward (mean, variance, normalize, affine) and 12 backward; memory-bound
        m = shape["B"] * shape["N"] * shape["C"]
        return 8 * m if mode == "fwd" else 20 * m

    def bytes(self, shape: dict[str, int], mode: str, elem: int) -> int:
        # forward reads x, weight, bias and writes y; the backward reads x, dy, weight and writes dx, dweight,
        # dbias (per-row statistics, M * 8 bytes, left out: a kernel may recompute them).
        mc, c = shape["B"] * shape["N"] * shape["C"], shape["C"]
        fwd = (2 * mc + 2 * c) * elem
        return fwd if mode == "fwd" else fwd + (3 * mc + 3 * c) * elem

    def baselines(self) -> list[tuple[str, Callable, Callable[[], contextlib.AbstractContextManager]]]:
        return [("eager:F.layer_norm", _layer_norm_eager, contextlib.nullcontext)]

    def compiled_baseline(self) -> tuple[str, Callable]:
        return "compiled:F.layer_norm", _layer_norm_eager

    def peers(self) -> list[tuple[str, str, Callable[[], Callable]]]:
        def liger() -> Callable:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            return lambda x, w, b, *, eps: LigerLayerNormFunction.apply(x, w, b, eps)

        return [("peer:liger", "liger_kernel", liger)]


class LayerNormMlpBench(OpBench):
    name, metric, shape_keys = "layernorm_mlp", "TFLOP/s", ("B", "N", "C", "hidden")

    def shapes(self, quick: bool, gpu: bool) -> list[dict[str, int]]:
        return self._from_presets(
            quick, gpu,
            [{"B": 64, "N": 197, "C": 768, "hidden": 3072}],
            [{"B": 8, "N": 65, "C": 192, "hidden": 384}, {"B": 2, "N": 197, "C": 192, "hidden": 768}],
            lambda d: {"N": d["N"], "C": d["C"], "hidden": d["hidden"]})

    def make(self, shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
        B, N, C, Hd = shape["B"], shape["N"], shape["C"], shape["hidden"]

        def r(*s: int, scale: float = 1.0) -> torch.Tensor:
            return scale * torch.randn(*s, device=device, dtype=dtype)

        t = {"x": r(B, N, C), "ln_weight": 1 + r(C, scale=0.1), "ln_bias": r(C, scale=0.1),
             "fc1_weight": r(Hd, C, scale=C**-0.5), "fc1_bias": r(Hd, scale=0.1),
             "fc2_weight": r(C, Hd, scale=Hd**-0.5), "fc2_bias": r(C, scale=0.1)}
        names = tuple(t)
        # the model's call: the residual is the block's input itself
        return Inputs(t, names, lambda t: (tuple(t[n] for n in names), {"eps": 1e-6, "residual": t["x"]}))

    def flops(self, shape: dict[str, int], mode: str) -> int:
        # forward: fc1 and fc2, 2 * M * C * hidden each; backward: input and weight gradients of both, twice
        # the forward. LayerNorm, GELU, bias and residual (O(M * hidden)) are left out.
        fwd = 4 * shape["B"] * shape["N"] * shape["C"] * shape["hidden"]
        return fwd if mode == "fwd" else 3 * fwd

    def bytes(self, shape: dict[str, int], mode: str, elem: int) -> int:
        # forward reads x (also the residual) and the parameters, writes the output; the hidden activation
        # need not leave the chip. The backward reads dout, x and the weights, writes dx and the parameter
        # gradients.
        mc, c, hd = shape["B"] * shape["N"] * shape["C"], shape["C"], shape["hidden"]
        params = 2 * c * hd + hd + 3 * c
        fwd = (2 * mc + params) * elem
        return fwd if mode == "fwd" else fwd + (3 * mc + 2 * c * hd + params) * elem

    def baselines(self) -> list[tuple[str, Callable, Callable[[], contextlib.AbstractContextManager]]]:
        return [("eager", _mlp_eager, contextlib.nullcontext)]

    def compiled_baseline(self) -> tuple[str, Callable]:
        return "compiled", _mlp_eager


class PatchEmbedBench(OpBench):
    name, metric, shape_keys = "patch_embed", "TFLOP/s", ("B", "img", "P", "E")

    def shapes(self, quick: bool, gpu: bool) -> list[dict[str, int]]:
        return self._from_presets(
            quick, gpu,
            [{"B": 256, "in_chans": 3, "img": 224, "P": 16, "E": 768}],
            [{"B": 8, "in_chans": 3, "img": 32, "P": 4, "E": 192},
             {"B": 2, "in_chans": 3, "img": 224, "P": 16, "E": 192}],
            lambda d: {"in_chans": d["in_chans"], "img": d["img"], "P": d["P"], "E": d["C"]})

    def tokens(self, shape: dict[str, int]) -> int:
        return (shape["img"] // shape["P"]) ** 2 + 1

    def make(self, shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
        B, Ci, img, P, E = shape["B"], shape["in_chans"], shape["img"], shape["P"], shape["E"]
        n = (img // P) ** 2
        t = {"images": torch.randn(B, Ci, img, img, device=device, dtype=dtype),
             "weight": torch.randn(E, Ci, P, P, device=device, dtype=dtype) * (Ci * P * P) ** -0.5,
             "bias": 0.02 * torch.randn(E, device=device, dtype=dtype),
             "cls_token": 0.02 * torch.randn(1, 1, E, device=device, dtype=dtype),
             "pos_embed": 0.02 * torch.randn(1, 1 + n, E, device=device, dtype=dtype)}
        # the images need no gradient, as in the model
        return Inputs(t, ("weight", "bias", "cls_token", "pos_embed"), lambda t: (
            (t["images"], t["weight"], t["bias"]), {"cls_token": t["cls_token"], "pos_embed": t["pos_embed"]}))

    def flops(self, shape: dict[str, int], mode: str) -> int:
        # a GEMM of (B * N) x (C * P * P) x E; the backward computes the weight gradient only
        n = (shape["img"] // shape["P"]) ** 2
        fwd = 2 * shape["B"] * n * shape["in_chans"] * shape["P"] ** 2 * shape["E"]
        return fwd if mode == "fwd" else 2 * fwd

    def bytes(self, shape: dict[str, int], mode: str, elem: int) -> int:
        # forward reads images, weight, bias, class token, position embedding and writes the tokens; the
        # backward reads dout and the images and writes the four parameter gradients.
        B, img, E = shape["B"], shape["img"], shape["E"]
        n1 = (img // shape["P"]) ** 2 + 1
        images, weight = B * shape["in_chans"] * img * img, E * shape["in_chans"] * shape["P"] ** 2
        params = weight + 2 * E + n1 * E
        fwd = (images + params + B * n1 * E) * elem
        return fwd if mode == "fwd" else fwd + (B * n1 * E + images + params) * elem

    def baselines(self) -> list[tuple[str, Callable, Callable[[], contextlib.AbstractContextManager]]]:
        return [("eager", _patch_embed_eager, contextlib.nullcontext)]

    def compiled_baseline(self) -> tuple[str, Callable]:
        return "compiled", _patch_embed_eager


OP_BENCHES: dict[str, OpBench] = {b.name: b for b in (AttentionBench(), LayerNormBench(), LayerNormMlpBench(),
                                                        PatchEmbedBench())}


# ------------------------------------------------------------------------------------------------ providers


@dataclass
class Provider:
    """One way of computing an op or a model. ``kind``: ``vit_fast`` (ours), ``baseline`` (PyTorch, timm:
    what the speedups are over) or ``peer`` (other libraries, shown beside). ``fn``: for an op, a function
    with the op's signature; for a model, ``(config, base model) -> the module to run``."""

    name: str
    kind: str
    fn: Callable | None = None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    compile: bool = False
    skip: str | None = None
    factory: Callable[[], Callable] | None = None  # peers: built on first use, so a broken install is a skip
    train_skip: str | None = None  # models: why the training step is not measured


def _interpreter_skip(backend: str, device: torch.device) -> str | None:
    if backend == "triton" and device.type == "cpu" and backends.triton_interpreter():
        return ("Triton on CPU runs through the interpreter (TRITON_INTERPRET=1): a correctness tool, not timed; "
                "the Triton kernels need a GPU")
    return None


def compile_skip(device: torch.device, quick: bool, allow: bool) -> str | None:
    if not allow:
        return "torch.compile disabled (--no-compile)"
    if device.type == "cpu" and quick:
        return ("torch.compile skipped on CPU in --quick: its C++ code generation takes ~10 s per graph here; "
                "the full run includes it")
    return None


def op_providers(op: OpBench, device: torch.device, *, quick: bool, allow_compile: bool = True) -> list[Provider]:
    """Every vit_fast backend, each eager PyTorch way, the compiled one, and the peers that are installed."""
    import importlib.util

    out = [Provider(f"vit_fast:{b}", "vit_fast", op.public(), (lambda b=b: vit_fast.set_backend(b)),
                    skip=_interpreter_skip(b, device)) for b in backends.BACKENDS]
    out += [Provider(name, "baseline", fn, ctx) for name, fn, ctx in op.baselines()]
    cname, cfn = op.compiled_baseline()
    out.append(Provider(cname, "baseline", cfn, compile=True, skip=compile_skip(device, quick, allow_compile)))
    for name, module, factory in op.peers():
        if importlib.util.find_spec(module) is not None:
            out.append(Provider(name, "peer", factory=factory))
    return out


# ------------------------------------------------------------------------------------------------- checking


def _agreement(outs: Sequence[torch.Tensor], same: Sequence[torch.Tensor], oracle: Sequence[torch.Tensor],
               dtype: torch.dtype) -> tuple[float, str]:
    """The worst ``err / tol`` over the tensors (<= 1 passes), by the scale-aware rule
    ``max|out - oracle| <= 2 * max|ref_same_dtype - oracle| + atol * max(1, max|oracle|)``."""
    worst, detail = 0.0, ""
    for i, (o, s, r) in enumerate(zip(outs, same, oracle, strict=True)):
        if o.shape != r.shape:
            return math.inf, f"tensor {i}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        r64 = r.detach().double()
        diff = (o.detach().double() - r64).abs()
        err = math.inf if torch.isnan(diff).any() else float(diff.max()) if diff.numel() else 0.0
        base = float((s.detach().double() - r64).abs().max()) if diff.numel() else 0.0
        scale = max(1.0, float(r64.abs().max())) if diff.numel() else 1.0
        tol = 2 * base + ATOL[dtype] * scale
        if err / tol > worst:
            worst, detail = err / tol, f"tensor {i}: max|out - oracle| = {err:.3g}, tolerance {tol:.3g}"
    return worst, detail


def _classify_error(e: BaseException, provider: Provider, caught: Sequence[warnings.WarningMessage] = ()
                    ) -> tuple[str, str]:
    """(status, reason) for an exception on a provider's first call: 'skipped' when it cannot run these
    inputs (unavailable backend, unsupported SDPA kernel, out of memory, a peer's own error), else 'failed'.
    SDPA says why a forced kernel cannot run in warnings (``caught``): the first one joins the reason."""
    if isinstance(e, backends.BackendUnavailableError):
        return "skipped", _first_line(e)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "skipped", "out of memory at this shape"
    if provider.kind == "peer":
        return "skipped", f"{type(e).__name__}: {_first_line(e)}"
    if isinstance(e, RuntimeError) and re.search(r"no (viable|available) (backend|kernel)", str(e), re.I):
        why = next((str(w.message).strip() for w in caught), "")
        return "skipped", "this SDPA kernel cannot run these inputs" + (f": {why[:300]}" if why else "")
    return "failed", f"{type(e).__name__}: {_first_line(e)}"


# ------------------------------------------------------------------------------------------------- op runs


@dataclass
class Budget:
    """Stops new measurements once ``seconds`` have passed (the rest are recorded as skipped)."""

    seconds: float | None
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.perf_counter() - self.start)


def _row(kind: str, name: str, provider: Provider, mode: str, dtype: torch.dtype, shape: dict, label: str) -> dict:
    return {"kind": kind, "name": name, "provider": provider.name, "provider_kind": provider.kind,
            "compiled": provider.compile, "mode": mode, "dtype": dtype_name(dtype), "shape": shape,
            "shape_label": label, "status": "ok", "reason": None}


def _derive(row: dict, timing: Timing, flop: int | None, nbytes: int | None, peaks: dict) -> None:
    """Timing fields plus the derived figures and their fractions of the run's peaks."""
    s = timing.median_ms * 1e-3
    row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, min_ms=timing.min_ms,
               spread=timing.spread, repeats=timing.repeats, flop=flop, bytes=nbytes)
    row["tflops"] = flop / s / 1e12 if flop else None
    row["gbps"] = nbytes / s / 1e9 if nbytes else None
    peak = peaks["matmul_tflops"][row["dtype"]]
    row["frac_peak_flops"] = row["tflops"] / peak if row["tflops"] is not None else None
    row["frac_peak_bw"] = row["gbps"] / peaks["bandwidth_gbps"] if row["gbps"] is not None else None
    row["exceeds_peak"] = any(f is not None and f > 1.0 for f in (row["frac_peak_flops"], row["frac_peak_bw"]))


def _input_sets(base: Inputs, device: torch.device) -> list[Inputs]:
    if device.type == "cuda":
        return [base]  # do_bench flushes the L2 before every repeat
    return base.replicas(max(1, min(MAX_ROTATE_SETS, math.ceil(CPU_WORKING_SET / max(1, base.nbytes())))))


def bench_op_case(op: OpBench, shape: dict[str, int], dtype: torch.dtype, device: torch.device,
                  providers: Sequence[Provider], modes: Sequence[str], timer: Timer, peaks: dict,
                  budget: Budget | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Check, then time, every provider on one shape and dtype, in each mode. Returns one row per
    (provider, mode), measured, skipped (with the reason) or failed (with the reason)."""
    label = op.label(shape)
    _seed(op.name, label, dtype_name(dtype))
    base = op.make(shape, dtype, device)
    with torch.no_grad():
        args, kwargs = base.assemble(base.tensors)
        base.grad_out = torch.randn_like(op.reference()(*args, **kwargs))
    oracle_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    oracle_out, oracle_grads = run_once(op.reference(), base.to(oracle_dtype), "fwd+bwd")
    same_out, same_grads = run_once(op.reference(), base, "fwd+bwd")
    sets = _input_sets(base, device)
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    for mode in modes:
        for p in providers:
            row = _row("op", op.name, p, mode, dtype, shape, label)
            row["tokens"] = op.tokens(shape)
            _bench_provider(row, p, op, sets, mode, (oracle_out, *oracle_grads), (same_out, *same_grads), dtype,
                            device, timer, budget)
            if row["status"] == "ok":
                _derive(row, row.pop("_timing"), op.flops(shape, mode), op.bytes(shape, mode, elem), peaks)
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def _bench_provider(row: dict, p: Provider, op: OpBench, sets: list[Inputs], mode: str,
                    oracle: tuple[torch.Tensor, ...], same: tuple[torch.Tensor, ...], dtype: torch.dtype,
                    device: torch.device, timer: Timer, budget: Budget | None) -> None:
    if p.skip:
        row.update(status="skipped", reason=p.skip)
        return
    if budget is not None and budget.left() < (60 if p.compile else 1):
        row.update(status="skipped", reason="time budget (--budget-s) used up")
        return
    fn, caught = p.fn, []
    try:
        if p.factory is not None:
            fn = p.factory()
        if p.compile:
            torch._dynamo.reset()  # a fresh cache per case: no recompile limit reached, no stale graphs
            fn = torch.compile(fn, dynamic=False)
        with p.context(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # SDPA explains an unsupported input in a warning: kept for the reason
            t0 = time.perf_counter()
            out, grads = run_once(fn, sets[0], mode)
            _sync(device)
            first_s = time.perf_counter() - t0
            n = 1 + len(grads)
            ratio, detail = _agreement((out, *grads), same[:n], oracle[:n], dtype)
            row.update(agreement=ratio)
            if not ratio <= 1.0:
                row.update(status="failed", reason=f"disagrees with the reference: {detail}")
                return
            cycle = itertools.cycle(sets)
            timing = timer.time(lambda: run_once(fn, next(cycle), mode))
    except Exception as e:  # noqa: BLE001 - recorded per provider; the run goes on
        status, reason = _classify_error(e, p, caught)
        row.update(status=status, reason=reason)
        return
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["_timing"] = timing
    if p.compile:
        row["compile_s"] = max(0.0, first_s - timing.median_ms * 1e-3)


# --------------------------------------------------------------------------------------------------- models


def model_flops(cfg: ViTConfig, mode: str) -> int:
    """Analytic FLOPs per image (a multiply-add is 2). Forward: patch embedding 2 * Np * (C * P * P) * E; per
    block qkv 2 * N * E * 3E, attention 4 * N * N * E (q k^T and p v over all heads), proj 2 * N * E * E,
    MLP 4 * N * E * hidden; head 2 * E * classes. Norms, softmax, GELU and adds are left out. A training
    step is the forward plus a backward of twice the forward, except the patch embedding's input gradient
    (images need none). ViT-B/16 at 224: 35.1 GFLOP forward."""
    p = _patch(cfg)
    n, e = cfg.num_patches + cfg.num_prefix_tokens, cfg.embed_dim
    patch = 2 * cfg.num_patches * cfg.in_chans * p * p * e
    block = 2 * n * e * 3 * e + 4 * n * n * e + 2 * n * e * e + 4 * n * e * cfg.mlp_hidden_dim
    fwd = patch + cfg.depth * block + 2 * e * cfg.num_classes
    return fwd if mode == "inference" else 3 * fwd - patch


def timm_model(cfg: ViTConfig) -> torch.nn.Module:
    """timm's ``VisionTransformer`` with the same architecture (and so the same parameter names)."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer as TimmViT

    kw = cfg.to_dict()
    eps = kw.pop("norm_eps")
    return TimmViT(**kw, norm_layer=partial(torch.nn.LayerNorm, eps=eps))


def model_providers(device: torch.device, dtype: torch.dtype, *, quick: bool, allow_compile: bool = True,
                    ) -> list[Provider]:
    """vit_fast per backend, ``auto`` when it mixes backends, vit_fast compiled, timm eager and compiled."""
    import importlib.util

    def ours(cfg: ViTConfig, base: torch.nn.Module) -> torch.nn.Module:
        return copy.deepcopy(base)

    out = [Provider(f"vit_fast:{b}", "vit_fast", ours, (lambda b=b: vit_fast.set_backend(b)),
                    skip=_interpreter_skip(b, device)) for b in backends.BACKENDS]
    with vit_fast.set_backend("auto"):
        picked = set(backends.explain(device, dtype).picked.values())
    same = f"auto picks {next(iter(picked))} for every op: the same as vit_fast:{next(iter(picked))}"
    out.append(Provider("vit_fast:auto", "vit_fast", ours, lambda: vit_fast.set_backend("auto"),
                        skip=same if len(picked) == 1 else None))
    cskip = compile_skip(device, quick, allow_compile)
    # compiling a whole training step costs minutes on a GPU too: the full run measures it
    ctrain = "compiled training step skipped in --quick (compile time); the full run measures it" \
        if quick and device.type == "cuda" else None
    out.append(Provider("compiled:vit_fast", "vit_fast", ours, lambda: vit_fast.set_backend("auto"), compile=True,
                        skip=cskip, train_skip=ctrain))
    tskip = None if importlib.util.find_spec("timm") else "timm is not installed (pip install timm)"
    out.append(Provider("timm:eager", "baseline", _timm_copy, skip=tskip))
    out.append(Provider("compiled:timm", "baseline", _timm_copy, compile=True, skip=tskip or cskip,
                        train_skip=ctrain))
    return out


def _timm_copy(cfg: ViTConfig, base: torch.nn.Module) -> torch.nn.Module:
    model = timm_model(cfg)
    model.load_state_dict(base.state_dict())
    return model.to(next(base.parameters()).device)


def _autocast(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 2 and logits.shape[-1] > 1:
        return F.cross_entropy(logits.float(), labels % logits.shape[-1])
    return logits.float().square().mean()  # no classifier head (num_classes=0): any scalar of the features


def _train_grads(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 amp: torch.dtype | None) -> list[torch.Tensor]:
    with _autocast(images.device, amp):
        loss = _loss(model(images), labels)
    loss.backward()
    named = dict(getattr(model, "_orig_mod", model).named_parameters())  # a compiled module prefixes the names
    grads = [named[n].grad.detach().clone() for n in CHECK_PARAMS if n in named]
    model.zero_grad(set_to_none=True)
    return grads


def bench_model(name: str, batch: int, dtype: torch.dtype, device: torch.device, providers: Sequence[Provider],
                modes: Sequence[str], timer: Timer, peaks: dict, budget: Budget | None = None,
                on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Inference (weights in ``dtype``) and a training step (fp32 weights, autocast ``dtype`` unless fp32,
    forward + backward + AdamW) per provider: images/s, TFLOP/s, peak memory, compile time separately."""
    cfg = get_config(name)
    _seed(name, batch, dtype_name(dtype))
    base = vit_fast.VisionTransformer(cfg).to(device)
    images = torch.randn(batch, cfg.in_chans, *(g * _patch(cfg) for g in cfg.grid_size), device=device)
    labels = torch.randint(0, max(1, cfg.num_classes), (batch,), device=device)
    oracle_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    amp = None if dtype == torch.float32 else dtype
    label = f"B{batch}"
    rows = []
    for mode in modes:
        with vit_fast.set_backend("reference"):
            if mode == "inference":
                with torch.no_grad():
                    oracle = [copy.deepcopy(base).to(oracle_dtype).eval()(images.to(oracle_dtype))]
                    same = [copy.deepcopy(base).to(dtype).eval()(images.to(dtype))]
            else:
                oracle = _train_grads(copy.deepcopy(base).to(oracle_dtype).train(), images.to(oracle_dtype), labels,
                                      None)
                same = _train_grads(copy.deepcopy(base).train(), images, labels, amp)
        for p in providers:
            row = _row("model", name, p, mode, dtype, {"B": batch}, label)
            row.update(batch=batch, precision=(f"{dtype_name(dtype)} weights" if mode == "inference" else
                                               f"autocast {dtype_name(amp)}" if amp else "float32"))
            _bench_model_provider(row, p, cfg, base, images, labels, mode, dtype, amp, oracle, same, device, timer,
                                  budget)
            gc.collect()  # the provider's model and optimizer are gone: give their memory back
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if row["status"] == "ok":
                _derive(row, row.pop("_timing"), model_flops(cfg, mode) * batch, None, peaks)
                row["images_per_s"] = batch / (row["median_ms"] * 1e-3)
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def _bench_model_provider(row: dict, p: Provider, cfg: ViTConfig, base: torch.nn.Module, images: torch.Tensor,
                          labels: torch.Tensor, mode: str, dtype: torch.dtype, amp: torch.dtype | None,
                          oracle: list[torch.Tensor], same: list[torch.Tensor], device: torch.device, timer: Timer,
                          budget: Budget | None) -> None:
    skip = p.skip or (p.train_skip if mode == "train" else None)
    if skip:
        row.update(status="skipped", reason=skip)
        return
    if budget is not None and budget.left() < (120 if p.compile else 5):
        row.update(status="skipped", reason="time budget (--budget-s) used up")
        return
    opt = None
    try:
        model = p.fn(cfg, base)
        if mode == "inference":
            model = model.to(dtype).eval()
            x = images.to(dtype)
        else:
            model = model.train()
            x = images
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if p.compile:
            torch._dynamo.reset()
        net = torch.compile(model, dynamic=False) if p.compile else model
        with p.context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            if mode == "inference":
                with torch.no_grad():
                    outs = [net(x)]
            else:
                outs = _train_grads(net, x, labels, amp)
            _sync(device)
            first_s = time.perf_counter() - t0
            ratio, detail = _agreement(outs, same, oracle, dtype)
            row.update(agreement=ratio)
            if not ratio <= 1.0:
                row.update(status="failed", reason=f"disagrees with the reference: {detail}")
                return

            def step() -> None:
                if mode == "inference":
                    with torch.no_grad():
                        net(x)
                    return
                with _autocast(device, amp):
                    loss = _loss(net(x), labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            timing = timer.time(step, heavy=True)  # both timers warm up first
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                step()
                torch.cuda.synchronize(device)
                row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
            else:
                row["peak_mem_bytes"] = None  # no allocator statistics on CPU
    except Exception as e:  # noqa: BLE001 - recorded per provider; the run goes on
        status, reason = _classify_error(e, p)
        row.update(status=status, reason=reason)
        return
    row["_timing"] = timing
    if p.compile:
        row["compile_s"] = max(0.0, first_s - timing.median_ms * 1e-3)


# ------------------------------------------------------------------------------------------------- analysis


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


def _gap(got: float, need: float) -> str:
    """How far ``got`` falls short of ``need``, as a signed percentage (a tenth of a percent near zero)."""
    rel = got / need - 1
    return f"{rel:+.1%}" if abs(rel) < 0.005 else f"{rel:+.0%}"


@dataclass(frozen=True)
class Target:
    """A model speed target: images/s of the fastest vit_fast provider, and its ratio to named baselines."""

    what: str
    model: str
    mode: str
    batch: int
    dtype: str
    min_images_per_s: float
    min_vs: tuple[tuple[str, float], ...]

    def required(self) -> str:
        return ", ".join([f">= {self.min_images_per_s:,.0f} images/s"] + [f">= {x:.2f}x {p}" for p, x in self.min_vs])

    def evaluate(self, rows: list[dict], gpu: str) -> tuple[str, str]:
        """(measured, status) from the rows of a GPU run."""
        mine = [r for r in rows if r["kind"] == "model" and r["name"] == self.model and r["mode"] == self.mode
                and r.get("batch") == self.batch and r["dtype"] == self.dtype and r["status"] == "ok"]
        ours = [r for r in mine if r["provider_kind"] == "vit_fast"]
        if not ours:
            return "-", "not measured"
        best = max(ours, key=lambda r: r["images_per_s"])
        got = [f"{best['images_per_s']:,.0f} images/s ({best['provider']})"]
        missed = []
        if best["images_per_s"] < self.min_images_per_s:
            missed.append(f"{_gap(best['images_per_s'], self.min_images_per_s)} on images/s")
        for prov, x in self.min_vs:
            ref = next((r for r in mine if r["provider"] == prov), None)
            if ref is None:
                missed.append(f"{prov} not measured")
                continue
            ratio = best["images_per_s"] / ref["images_per_s"]
            got.append(f"{ratio:.2f}x {prov}")
            if ratio < x:
                missed.append(f"{_gap(ratio, x)} on the ratio to {prov}")
        return ", ".join(got) + f" on {gpu}", "met" if not missed else "missed (" + "; ".join(missed) + ")"


@dataclass(frozen=True)
class OpShape:
    """A shape an op target names: the dimensions it fixes and, for row-wise ops, a range of rows ``B * N``.
    The other dimensions are free; of the matching cases of a run the one with the largest batch is taken
    (small batches measure launch overhead, not the kernel)."""

    fixed: tuple[tuple[str, int], ...]
    rows: tuple[int, int] | None = None

    def matches(self, shape: dict[str, int]) -> bool:
        if any(shape.get(k) != v for k, v in self.fixed):
            return False
        return self.rows is None or self.rows[0] <= shape["B"] * shape["N"] <= self.rows[1]

    def __str__(self) -> str:
        rows = [f"B*N {self.rows[0]:,}-{self.rows[1]:,}"] if self.rows else []
        return " ".join(rows + [f"{k}{v}" for k, v in self.fixed])


def _op_shape(rows: tuple[int, int] | None = None, **fixed: int) -> OpShape:
    return OpShape(tuple(fixed.items()), rows)


@dataclass(frozen=True)
class OpTarget:
    """A per-op speed target, on the run's rows of ``op`` in ``mode`` and ``dtype`` at every shape of
    ``shapes``. "Ours" is the fastest vit_fast kernel backend of a case (every vit_fast backend but the
    reference). ``min_vs``: (baselines, ratio): ours must be ``ratio`` times as fast as the fastest of those
    baselines that ran in the same case; a ratio of None reports the figure without a target. ``min_gbps``:
    the bandwidth ours must reach. With several shapes the worst case is shown."""

    what: str
    op: str
    mode: str
    shapes: tuple[OpShape, ...]
    min_vs: tuple[tuple[tuple[str, ...], float | None], ...] = ()
    min_gbps: float | None = None
    dtype: str = "bfloat16"

    def required(self) -> str:
        need = [f">= {self.min_gbps:,.0f} GB/s"] if self.min_gbps else []
        for bases, x in self.min_vs:
            need.append(f">= {x:.2f}x {_baselines(bases)}" if x is not None else
                        f"none: the ratio to {_baselines(bases)} is reported")
        return ", ".join(need) + (", at every shape" if len(self.shapes) > 1 else "")

    def evaluate(self, rows: list[dict], gpu: str) -> tuple[str, str]:
        """(measured, status) from the rows of a GPU run."""
        cases, absent = self._cases(rows)
        ours: dict[str, dict] = {}
        missed: list[str] = []
        failed: dict[str, list[str]] = {}  # what went wrong -> the shapes it happened at
        unmeasured: dict[str, list[str]] = {}
        for label, rs in cases.items():
            kernels = [r for r in rs if r["provider_kind"] == "vit_fast" and r["provider"] != "vit_fast:reference"]
            ok = [r for r in kernels if r["status"] == "ok"]
            if ok:
                ours[label] = min(ok, key=lambda r: r["median_ms"])
            elif any(r["status"] == "failed" for r in kernels):
                why = ", ".join(r["provider"] for r in kernels if r["status"] == "failed") + " failed"
                failed.setdefault(why, []).append(label)
            else:
                why = "no vit_fast kernel ran" + (f" ({', '.join(r['provider'] + ' ' + r['status'] for r in kernels)})"
                                                  if kernels else "")
                unmeasured.setdefault(why, []).append(label)
        got = []
        if self.min_gbps is not None and ours:
            label, worst = min(ours.items(), key=lambda kv: kv[1]["gbps"])
            got.append(f"{self._worst()}{worst['gbps']:,.0f} GB/s ({worst['provider']}) at {label}")
            if worst["gbps"] < self.min_gbps:
                missed.append(f"{_gap(worst['gbps'], self.min_gbps)} on GB/s at {label}")
        for bases, x in self.min_vs:
            ratios = []
            for label, mine in ours.items():
                base = [r for r in cases[label] if r["provider"] in bases and r["status"] == "ok"]
                if base:
                    b = min(base, key=lambda r: r["median_ms"])
                    ratios.append((b["median_ms"] / mine["median_ms"], label, b["provider"]))
                else:
                    unmeasured.setdefault(f"no {_baselines(bases, short=True)} row", []).append(label)
            if not ratios:
                continue
            ratio, label, base_name = min(ratios)
            got.append(f"{self._worst()}{ratio:.2f}x {base_name} ({ours[label]['provider']}) at {label}")
            below = sum(x is not None and r < x for r, *_ in ratios)
            if below:
                count = f", {below} of {len(ratios)} shapes below" if len(ratios) > 1 else ""
                missed.append(f"{_gap(ratio, x)} on the ratio to {_baselines(bases)} at {label}{count}")
        missed += [f"{why} at {', '.join(labels)}" for why, labels in failed.items()]
        measured = "; ".join(got) + f" on {gpu}" if got else "-"
        if absent:
            measured = ("" if measured == "-" else measured + "; ") + "not in this run: " + ", ".join(absent)
        if missed:
            return measured, "missed (" + "; ".join(missed) + ")"
        if absent:
            return measured, "not measured (shape not in this run)"
        if unmeasured:
            return measured, "not measured (" + "; ".join(f"{why} at {', '.join(labels)}"
                                                          for why, labels in unmeasured.items()) + ")"
        has_bar = self.min_gbps is not None or any(x is not None for _, x in self.min_vs)
        return measured, "met" if has_bar else "reported (no target)"

    def _cases(self, rows: list[dict]) -> tuple[dict[str, list[dict]], list[str]]:
        """The rows of the case taken for each shape of the target (by shape label), and the shapes with none."""
        mine = [r for r in rows if r["kind"] == "op" and r["name"] == self.op and r["mode"] == self.mode
                and r["dtype"] == self.dtype]
        cases, absent = {}, []
        for s in self.shapes:
            by_label: dict[str, list[dict]] = {}
            for r in mine:
                if s.matches(r["shape"]):
                    by_label.setdefault(r["shape_label"], []).append(r)
            if by_label:
                label = max(by_label, key=lambda k: by_label[k][0]["shape"]["B"])
                cases[label] = by_label[label]
            else:
                absent.append(str(s))
        return cases, absent

    def _worst(self) -> str:
        return "worst " if len(self.shapes) > 1 else ""


def _baselines(names: Sequence[str], short: bool = False) -> str:
    if len(names) == 1:
        return names[0]
    return ("" if short else "the fastest of ") + "/".join(names)


_SDPA_KERNELS = ("sdpa:flash", "sdpa:efficient", "sdpa:cudnn")
_ATTENTION_SHAPES = tuple(_op_shape(N=n, D=d) for d in (64, 80) for n in (197, 257, 577))
# ViT-B/16 at 224: 197 tokens of width 768, MLP hidden 3072; LayerNorm rows B * N ~ 50k (batch 256)
_VIT_B_MLP = (_op_shape(N=197, C=768, hidden=3072),)
_VIT_B_PATCH = (_op_shape(img=224, P=16, E=768, in_chans=3),)
_VIT_B_ROWS = (_op_shape((40_000, 62_500), C=768),)

TARGETS: tuple[Target | OpTarget, ...] = (
    Target("ViT-B/16 at 224, batch 256, inference, bf16 (H200)", "vit_base_patch16_224", "inference", 256,
           "bfloat16", 17000, (("timm:eager", 1.4), ("compiled:timm", 1.15))),
    Target("ViT-B/16 at 224, batch 256, training step, autocast bf16 (H200)", "vit_base_patch16_224", "train", 256,
           "bfloat16", 5500, (("timm:eager", 1.3),)),
    OpTarget("attention forward, bf16, N 197/257/577 x D 64/80 (H200)", "attention", "fwd", _ATTENTION_SHAPES,
             ((_SDPA_KERNELS, 1.3),)),
    OpTarget("attention forward+backward, bf16, N 197/257/577 x D 64/80 (H200)", "attention", "fwd+bwd",
             _ATTENTION_SHAPES, ((_SDPA_KERNELS, 1.2),)),
    OpTarget("layernorm_mlp forward, bf16, ViT-B/16 at 224 (H200)", "layernorm_mlp", "fwd",
             _VIT_B_MLP, ((("eager",), 1.3), (("compiled",), 1.1))),
    OpTarget("layernorm_mlp forward+backward, bf16, ViT-B/16 at 224 (H200)", "layernorm_mlp", "fwd+bwd",
             _VIT_B_MLP, ((("eager",), 1.3), (("compiled",), 1.1))),
    OpTarget("patch_embed forward, bf16, ViT-B/16 at 224 (H200)", "patch_embed", "fwd",
             _VIT_B_PATCH, ((("eager",), 3.0),)),
    OpTarget("patch_embed forward+backward, bf16, ViT-B/16 at 224 (H200)", "patch_embed", "fwd+bwd",
             _VIT_B_PATCH, ((("eager",), None),)),
    OpTarget("layer_norm forward, bf16, ViT-B sizes (B*N ~ 50k rows x 768) (H200)", "layer_norm", "fwd",
             _VIT_B_ROWS, min_gbps=3300),
)


def target_status(results: dict | None) -> list[dict]:
    """Where each target stands in ``results``: 'not measured' (no GPU run, or not these rows; the reason in
    parentheses when the run was on a GPU), 'met', or 'missed' with the gap; the measured figure with the GPU."""
    on_gpu = bool(results) and results["environment"]["device"]["type"] == "cuda"
    out = []
    for t in TARGETS:
        measured, status = t.evaluate(results["rows"], results["environment"]["device"]["name"]) if on_gpu \
            else ("-", "not measured")
        out.append({"target": t.what, "required": t.required(), "measured": measured, "status": status})
    return out


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


# ------------------------------------------------------------------------------------------------ reporting


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _metric(r: dict) -> tuple[str, str]:
    """The headline derived figure of a row and its fraction of the matching peak."""
    if r["kind"] == "model":
        return f"{r['images_per_s']:,.0f} img/s, {r['tflops']:.3g} TFLOP/s", _pct(r["frac_peak_flops"])
    if OP_BENCHES[r["name"]].metric == "GB/s":
        return f"{r['gbps']:.3g} GB/s", _pct(r["frac_peak_bw"])
    return f"{r['tflops']:.3g} TFLOP/s", _pct(r["frac_peak_flops"])


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
                             f"{r['images_per_s']:>12,.0f} {_fmt(r['speedup'], '.2f') + 'x':>13}")
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
    out.append(_table(["", ""], [
        ("device", ", ".join(f"{k} {v}" for k, v in dev.items() if k not in ("type",))),
        ("versions", f"vit_fast {env['vit_fast']} (git {env['git_commit'] or 'unknown'}), torch {env['torch']}, "
                     f"triton {env['triton'] or 'not installed'}, CUDA {env['cuda_runtime'] or 'none'}, "
                     f"Python {env['python']}"),
        ("run", f"{'quick' if results['config']['quick'] else 'full'}; dtypes {', '.join(results['config']['dtypes'])}"
                f"; {results['config']['elapsed_s']:.0f} s"),
        ("timing", results["config"]["timer"]),
        ("peaks", "matmul " + ", ".join(f"{v:.3g} TFLOP/s {k}" for k, v in peaks["matmul_tflops"].items())
                  + f" ({peaks['matmul']}); bandwidth " + ", ".join(f"{k} {v:.4g} GB/s" for k, v in
                                                                  peaks["bandwidth"].items())
                  + f" ({peaks['bandwidth_of']})"),
    ]))
    for note in results.get("notes", []):
        out += ["", f"> {note}"]
    out += ["", "## Targets", "", _table(["target", "required", "measured", "status"],
                                         [(t["target"], t["required"], t["measured"], t["status"])
                                          for t in target_status(results)])]
    models = [r for r in rows if r["kind"] == "model" and r["status"] == "ok"]
    if models:
        out += ["", "## Models", "", "Speedup over the fastest timm provider of the same row group; "
                "fraction of the matmul peak from the analytic FLOPs.", ""]
        out.append(_table(["model", "mode", "precision", "provider", "median ms (spread)", "images/s", "TFLOP/s",
                           "of peak", "peak memory", "compile s", "speedup"],
                          [(f"{r['name']} {r['shape_label']}", r["mode"], r["precision"], r["provider"],
                            f"{r['median_ms']:.4g} ({r['spread']:.0%})", f"{r['images_per_s']:,.0f}",
                            _fmt(r["tflops"]), _pct(r["frac_peak_flops"]),
                            "-" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**30:.2f} GiB",
                            _fmt(r.get("compile_s"), ".1f"), _fmt(r["speedup"], ".2f")) for r in models]))
    for name in OP_BENCHES:
        mine = [r for r in rows if r["kind"] == "op" and r["name"] == name and r["status"] == "ok"]
        if not mine:
            continue
        out += ["", f"## {name}", "", f"Derived figure: {OP_BENCHES[name].metric}; speedup over the fastest "
                "PyTorch provider of the same case.", ""]
        out.append(_table(["mode", "dtype", "shape", "provider", "median ms (spread)", "figure", "of peak",
                           "compile s", "speedup"],
                          [(r["mode"], r["dtype"], r["shape_label"], r["provider"],
                            f"{r['median_ms']:.4g} ({r['spread']:.0%})", *_metric(r), _fmt(r.get("compile_s"), ".1f"),
                            _fmt(r["speedup"], ".2f")) for r in mine]))
    not_run: dict[tuple, int] = {}
    for r in rows:
        if r["status"] != "ok":
            k = (r["status"], r["name"], r["provider"], r["reason"])
            not_run[k] = not_run.get(k, 0) + 1
    if not_run:
        out += ["", "## Not measured", "", _table(["status", "op / model", "provider", "rows", "reason"],
                                                  [(s, n, p, c, why) for (s, n, p, why), c in not_run.items()])]
    if results.get("violations"):
        out += ["", "## Violations", ""] + [f"- {v}" for v in results["violations"]]
    if results.get("comparison"):
        out += ["", "## Regression check", "", "```", format_comparison(results["comparison"]), "```"]
    out += ["", "Plots: " + ", ".join(f"`{p}`" for p in results.get("plots", [])) if results.get("plots") else ""]
    return "\n".join(out) + "\n"


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
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(os.path.join(out_dir, name), buf.getvalue())
    return name


# ---------------------------------------------------------------------------------------------- README table


README_BEGIN, README_END = "<!-- bench:results -->", "<!-- /bench:results -->"


def committed_results(results_dir: str) -> list[str]:
    """The ``results.json`` files under ``results_dir`` that git tracks (all of them outside a checkout)."""
    found = sorted(os.path.join(root, "results.json") for root, _, files in os.walk(results_dir)
                   if "results.json" in files)
    try:
        out = subprocess.run(["git", "-C", results_dir, "ls-files", "--full-name", "."], capture_output=True,
                             text=True, timeout=20)
        top = subprocess.run(["git", "-C", results_dir, "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return found
    if out.returncode != 0 or top.returncode != 0:
        return found
    tracked = {os.path.realpath(os.path.join(top.stdout.strip(), p)) for p in out.stdout.split()}
    return [f for f in found if os.path.realpath(f) in tracked]


def newest_results(results_dir: str, *, device_type: str = "cuda", device_name: str | None = None,
                   exclude: str | None = None) -> tuple[str, dict] | None:
    """The newest committed run (by its recorded time) on a device of this type (and name): (path, results)."""
    runs = []
    for path in committed_results(results_dir):
        if exclude and os.path.realpath(path) == os.path.realpath(exclude):
            continue
        with open(path) as f:
            res = json.load(f)
        dev = res.get("environment", {}).get("device", {})
        if res.get("schema") == SCHEMA and dev.get("type") == device_type and device_name in (None, dev.get("name")):
            runs.append((res["environment"]["time"], path, res))
    if not runs:
        return None
    _, path, res = max(runs, key=lambda t: t[0])
    return path, res


def readme_table(results_dir: str, repo_root: str) -> str:
    """The README's results section, generated from the newest committed GPU run (never typed by hand)."""
    found = newest_results(results_dir)
    lines = ["*Generated by `python benchmarks/readme_table.py` from the newest GPU run committed under "
             "`benchmarks/results/`; do not edit by hand.*", ""]
    if found is None:
        lines += ["No GPU run is committed yet, so no number is claimed.", ""]
        res = None
    else:
        path, res = found
        env = res["environment"]
        lines += [f"From `{os.path.relpath(path, repo_root)}`: {env['device']['name']}, torch {env['torch']}, "
                  f"triton {env['triton']}, CUDA {env['cuda_runtime']}, vit_fast git {env['git_commit']}, "
                  f"{env['time']}; peaks measured in the run: "
                  + ", ".join(f"{v:.0f} TFLOP/s {k} matmul" for k, v in res["peaks"]["matmul_tflops"].items())
                  + f", {res['peaks']['bandwidth_gbps']:.0f} GB/s.", ""]
        models = [r for r in res["rows"] if r["kind"] == "model" and r["status"] == "ok"]
        if models:
            lines += [_table(["model", "mode", "provider", "images/s", "of peak", "vs best timm"],
                             [(f"{r['name']} {r['shape_label']}", f"{r['mode']} ({r['precision']})", r["provider"],
                               f"{r['images_per_s']:,.0f}", _pct(r["frac_peak_flops"]), _fmt(r["speedup"], ".2f"))
                              for r in models]), ""]
        op_rows = []
        cases: dict[tuple, list[dict]] = {}
        for r in res["rows"]:
            if r["kind"] == "op" and r["status"] == "ok":
                cases.setdefault(case_key(r), []).append(r)
        for k, rs in cases.items():
            ours = [r for r in rs if r["provider_kind"] == "vit_fast"]
            base = [r for r in rs if r["provider_kind"] == "baseline"]
            if ours and base:
                o, b = min(ours, key=lambda r: r["median_ms"]), min(base, key=lambda r: r["median_ms"])
                op_rows.append((f"{k[1]} {k[2]}", k[3], k[4],
                                f"{o['provider']} {o['median_ms']:.3g} ms ({_metric(o)[0]})",
                                f"{b['provider']} {b['median_ms']:.3g} ms", f"{b['median_ms'] / o['median_ms']:.2f}x"))
        if op_rows:
            lines += [_table(["op", "dtype", "shape", "fastest vit_fast", "fastest PyTorch", "speedup"], op_rows), ""]
    lines += ["Targets:", "", _table(["target", "required", "measured", "status"],
                                     [(t["target"], t["required"], t["measured"], t["status"])
                                      for t in target_status(res)])]
    return "\n".join(lines)


def update_readme(readme: str, section: str) -> str:
    """``readme`` with the text between the results markers replaced by ``section``."""
    i, j = readme.find(README_BEGIN), readme.find(README_END)
    if i < 0 or j < i:
        raise ValueError(f"README has no {README_BEGIN} ... {README_END} markers")
    return readme[: i + len(README_BEGIN)] + "\n" + section + "\n" + readme[j:]


# ----------------------------------------------------------------------------------------------------- runs


def default_models(device: torch.device, quick: bool) -> list[str]:
    if device.type == "cuda":
        return ["vit_base_patch16_224"] if quick else ["vit_small_patch16_224", "vit_base_patch16_224",
                                                        "vit_base_patch16_384", "vit_large_patch16_224"]
    return ["vit_tiny_patch4_32"] if quick else ["vit_tiny_patch4_32", "vit_small_patch4_32", "vit_tiny_patch16_224"]


def default_batch(name: str, device: torch.device, quick: bool) -> int:
    if device.type != "cuda":
        return 8 if quick else 16
    cfg = get_config(name)
    return 256 if cfg.num_patches * cfg.embed_dim <= 196 * 768 else 64


@dataclass
class BenchConfig:
    """What one ``vit-fast bench`` run measures (see :func:`main` for the flags)."""

    quick: bool = False
    ops: list[str] = field(default_factory=lambda: list(OPS))
    models: list[str] | None = None  # None: the defaults for the device
    dtypes: list[str] | None = None  # None: bfloat16 (+ float16, float32 in a full run) on CUDA, float32 on CPU
    device: str | None = None
    out: str = DEFAULT_OUT
    batch_size: int | None = None
    compile: bool = True
    budget_s: float | None = None
    compare: str | None = None
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    threads: int | None = None  # CPU threads; None: torch's setting

    def resolve(self) -> tuple[torch.device, list[torch.dtype], list[str]]:
        try:
            device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise ValueError(f"--device must be cpu or cuda[:N]; got {self.device!r}") from e
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"--device must be cpu or cuda[:N]; got {self.device!r}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
            if device.index is None:  # an explicit index: torch.cuda.set_device rejects a bare "cuda"
                device = torch.device("cuda", torch.cuda.current_device())
            if device.index >= torch.cuda.device_count():
                raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        unknown = [o for o in self.ops if o not in OPS]
        if unknown:
            raise ValueError(f"--ops: unknown op(s) {unknown}; choose from {', '.join(OPS)} (or none)")
        gpu_default = ["bfloat16"] if self.quick else ["bfloat16", "float16", "float32"]
        names = self.dtypes or (gpu_default if device.type == "cuda" else ["float32"])
        bad = [d for d in names if d not in DTYPES]
        if bad:
            raise ValueError(f"--dtype: unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}")
        models = default_models(device, self.quick) if self.models is None else self.models
        for m in models:
            get_config(m)  # an unknown name raises with the closest known ones
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1; got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1; got {self.threads}")
        return device, [DTYPES[d] for d in names], models


def run(cfg: BenchConfig) -> dict:
    """Run the benchmarks of ``cfg``; writes ``results.json`` as rows come in, then ``report.md`` and the plots
    into ``cfg.out``; returns the results."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: BenchConfig) -> dict:
    device, dtypes, models = cfg.resolve()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    start = time.perf_counter()
    budget = Budget(cfg.budget_s)
    timer = Timer(device, cfg.quick)
    os.makedirs(cfg.out, exist_ok=True)
    env = environment()
    env["git_commit"] = env["git_commit"] or os.environ.get("VIT_FAST_GIT_COMMIT")  # a tree copied without .git
    env["device"] = device_info(device)
    notes = []
    if device.type == "cpu":
        notes.append("No GPU in this run: the Triton and CUDA kernels need a CUDA device, so on CPU vit_fast runs its "
                     "reference backend (PyTorch's own CPU kernels). These numbers say nothing about the kernels.")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if load > (os.cpu_count() or 1):
            notes.append(f"The machine was busy (load average {load:.1f} on {os.cpu_count()} cores): CPU timings are "
                         "unreliable, multi-threaded ones most (--threads 1 steadies them).")
    results = {"schema": SCHEMA, "environment": env, "notes": notes, "peaks": {}, "rows": [], "violations": [],
               "config": {"quick": cfg.quick, "ops": cfg.ops, "models": models,
                          "dtypes": [dtype_name(d) for d in dtypes], "device": str(device),
                          "timer": timer.description, "compile": cfg.compile,
                          "budget_s": cfg.budget_s, "elapsed_s": 0.0,
                          "cpu_working_set_bytes": CPU_WORKING_SET if device.type == "cpu" else None}}
    json_path = os.path.join(cfg.out, "results.json")

    def save() -> None:
        results["config"]["elapsed_s"] = time.perf_counter() - start
        add_speedups(results["rows"])
        results["violations"] = [
            f"{r['name']} {r['mode']} {r['dtype']} {r['shape_label']} {r['provider']}: "
            f"{_pct(r['frac_peak_flops'])} of the FLOP/s peak, {_pct(r['frac_peak_bw'])} of the bandwidth peak"
            for r in results["rows"] if r.get("exceeds_peak")]
        atomic_write(json_path, json.dumps(results, indent=1, default=str))

    op_plan = []
    for name in cfg.ops:
        op = OP_BENCHES[name]
        provs = op_providers(op, device, quick=cfg.quick, allow_compile=cfg.compile)
        # --quick compiles at the first shape of each op only: each new shape is a new compile
        later = [p if not p.compile or p.skip else dataclasses.replace(
            p, skip="compiled at the first shape of each op only in --quick (compile time)") for p in provs]
        for dtype in dtypes:
            for i, shape in enumerate(op.shapes(cfg.quick, device.type == "cuda")):
                op_plan.append((op, shape, dtype, later if cfg.quick and i else provs))
    model_dtype = dtypes[0]
    mprovs = model_providers(device, model_dtype, quick=cfg.quick, allow_compile=cfg.compile)
    total = sum(len(p) * len(OP_MODES) for *_, p in op_plan) + len(models) * len(mprovs) * len(MODEL_MODES)
    bar = _progress(total + 1, cfg.progress)
    results["peaks"] = measure_peaks(device, timer, dtypes)
    bar.update(1)
    save()

    def on_row(row: dict) -> None:
        results["rows"].append(row)
        bar.update(1)

    try:
        for name in models:
            batch = cfg.batch_size or default_batch(name, device, cfg.quick)
            for mode in MODEL_MODES:
                bar.set_description(f"{name} B{batch} {mode}")
                bench_model(name, batch, model_dtype, device, mprovs, (mode,), timer, results["peaks"], budget,
                            on_row)
                save()
        for op, shape, dtype, provs in op_plan:
            bar.set_description(f"{op.name} {op.label(shape)} {dtype_name(dtype)}")
            bench_op_case(op, shape, dtype, device, provs, OP_MODES, timer, results["peaks"], budget, on_row)
            save()
    except KeyboardInterrupt:  # a time limit from outside: keep what was measured, still write the report
        results["interrupted"] = True
        results["notes"].append("Interrupted: the rows missing from this run were not measured.")
    finally:
        bar.close()
        save()
    if cfg.compare:
        with open(cfg.compare) as f:
            results["comparison"] = compare_results(json.load(f), results)
    try:
        results["plots"] = write_plots(results, cfg.out)
    except ImportError as e:
        results["notes"].append(f"No plots: matplotlib is not installed ({e}); pip install 'vit_fast[bench]'.")
    except Exception as e:  # noqa: BLE001 - a failed plot must not cost the report: recorded instead
        results["notes"].append(f"No plots: {type(e).__name__}: {e}")
    save()
    atomic_write(os.path.join(cfg.out, "report.md"), render_report(results))
    return results


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool | None) -> object:
    """A tqdm bar (on a terminal unless ``enabled`` says otherwise); nothing when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="peaks", unit="row", disable=None if enabled is None else not enabled,
                dynamic_ncols=True)


def main(args: argparse.Namespace) -> int:
    """``vit-fast bench``: exit status 1 when one of vit_fast's providers failed (crashed or disagreed with
    the reference; a baseline that fails is reported, not fatal), 130 when interrupted."""
    ops_, models = parse_list(args.ops), parse_list(args.models)
    cfg = BenchConfig(quick=args.quick, ops=[] if ops_ == ["none"] else ops_ or list(OPS),
                      models=None if args.models is None else [] if models == ["none"] else models,
                      dtypes=parse_list(args.dtype) or None, device=args.device, out=args.out,
                      batch_size=args.batch_size, compile=not args.no_compile, budget_s=args.budget_s,
                      compare=args.compare, progress=False if args.no_progress else None, threads=args.threads)
    results = run(cfg)
    print(summary_table(results))
    if results.get("comparison"):
        print(format_comparison(results["comparison"]))
    for t in target_status(results):
        print(f"target {t['target']}: {t['status']}" + (f" ({t['measured']})" if t["measured"] != "-" else ""))
    print(f"wrote {os.path.join(cfg.out, 'results.json')}, report.md and {len(results.get('plots', []))} plots "
          f"in {results['config']['elapsed_s']:.0f} s")
    if results.get("interrupted"):
        return 130
    return 1 if any(r["status"] == "failed" and r["provider_kind"] == "vit_fast" for r in results["rows"]) else 0


# ----------------------------------------------------------------------------------------- pytest-benchmark


@dataclass(frozen=True)
class PytestCase:
    """One pytest-benchmark test: an op (or model), a shape, dtype, mode and provider on the local device."""

    kind: str
    name: str
    shape: tuple[tuple[str, int], ...]
    dtype: str
    mode: str
    provider: str

    def __str__(self) -> str:
        return f"{self.name}-{self.mode}-{self.dtype}-{'-'.join(f'{k}{v}' for k, v in self.shape)}-{self.provider}"


def _local_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_cases(name: str) -> list[PytestCase]:
    """The quick shapes and the quick run's providers of an op, or of the quick model (``name='model'``)."""
    device = _local_device()
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    if name == "model":
        provs = model_providers(device, DTYPES[dtype], quick=True)
        return [PytestCase("model", m, (("B", default_batch(m, device, True)),), dtype, mode, p.name)
                for m in default_models(device, True) for mode in MODEL_MODES for p in provs]
    op = OP_BENCHES[name]
    provs = op_providers(op, device, quick=True)
    return [PytestCase("op", name, tuple(s.items()), dtype, mode, p.name)
            for s in op.shapes(True, device.type == "cuda") for mode in OP_MODES for p in provs]


def pytest_benchmark(benchmark: object, case: PytestCase) -> None:
    """Check ``case``'s provider against the reference (skip with the reason when it cannot run), then time
    it with pytest-benchmark's ``benchmark`` fixture."""
    import pytest

    device, dtype, shape = _local_device(), DTYPES[case.dtype], dict(case.shape)
    timer = _PytestTimer(benchmark, device)
    peaks = {"matmul_tflops": {case.dtype: math.inf}, "bandwidth_gbps": math.inf}  # fractions: vit-fast bench's job
    if case.kind == "model":
        provs = [p for p in model_providers(device, dtype, quick=True) if p.name == case.provider]
        rows = bench_model(case.name, shape["B"], dtype, device, provs, (case.mode,), timer, peaks)
    else:
        op = OP_BENCHES[case.name]
        provs = [p for p in op_providers(op, device, quick=True) if p.name == case.provider]
        rows = bench_op_case(op, shape, dtype, device, provs, (case.mode,), timer, peaks)
    row = rows[0]
    benchmark.group = f"{case.name} {case.mode} {case.dtype} {row['shape_label']}"
    if row["status"] == "skipped":
        pytest.skip(row["reason"])
    assert row["status"] == "ok", f"{case.provider}: {row['reason']}"
    benchmark.extra_info.update({k: row[k] for k in ("flop", "bytes", "agreement") if row.get(k) is not None})


class _PytestTimer:
    """Adapts pytest-benchmark's fixture to the :class:`Timer` interface: it does the timing and the stats."""

    quick = True

    def __init__(self, benchmark: object, device: torch.device) -> None:
        self.benchmark, self.device = benchmark, device

    def time(self, fn: Callable[[], object], *, heavy: bool = False) -> Timing:
        def call() -> None:
            fn()
            _sync(self.device)

        t0 = time.perf_counter()
        self.benchmark(call)
        stats = getattr(self.benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: one call, timed here
            ms = (time.perf_counter() - t0) * 1e3
            return Timing(ms, ms, ms, ms, repeats=1)
        st = stats.stats
        return Timing(st.min * 1e3, st.q1 * 1e3, st.median * 1e3, st.q3 * 1e3, repeats=st.rounds)
