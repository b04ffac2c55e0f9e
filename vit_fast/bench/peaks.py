"""The ceilings of the benchmarked machine, measured at the start of the same run as the figures."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from vit_fast import cpu_features
from vit_fast.backends import dtype_name
from vit_fast.bench.timing import CPU_WORKING_SET, Timer


def measure_peaks(device: torch.device, timer: Timer, dtypes: Sequence[torch.dtype]) -> dict:
    """The ceilings of this machine, measured now. Each is the fastest repeat: a peak is what the machine can
    reach.

    - FLOP/s: a large matmul per dtype of the run, and bf16 on CUDA and on CPUs with native bf16 (AMX or
      AVX-512 BF16: the bf16 rows of the CPU model benchmark are fractions of it); per dtype because the dtypes
      differ by several times (tensor cores, AMX). On CPU the faster of that and a patch-embedding
      convolution, which oneDNN runs faster than MKL's matmul. A CPU without native bf16 gets no bf16 peak (its
      emulated bf16 matmul is 60x slower than fp32 on an AVX2 EPYC: minutes at this size), and ``peaks_skipped``
      says so. The quantized models' rows have their own: on CPU the faster of fbgemm's dynamic int8 Linear (its
      per-call activation quantization is O(n^2) beside the O(n^3) GEMM) and, on CPUs with an int8 dot-product
      unit (AMX-INT8, VNNI), oneDNN's s8 x s8 -> s32 ``torch._int_mm`` that PT2E's kernels use; on a GPU with
      FP8 tensor cores the e4m3 ``_scaled_mm``.
    - Bandwidth: the best of a large copy (bytes read + written), a large reduction (bytes read) and, on CPU,
      a copy from the rotated working set into a small buffer that stays in cache: an op's fresh output
      usually lands in a recently freed, cached block while its rotated inputs come from memory, and this
      copy has that same pattern. CUDA: 1 GiB, far beyond any L2 (do_bench flushes the L2 anyway); CPU: the
      working set the ops rotate through.
    """
    cuda = device.type == "cuda"
    n = 8192 if cuda else (1024 if timer.quick else 2048)
    matmul, skipped = {}, {}
    features = None if cuda else cpu_features.cpu_features()
    wanted = [*([torch.bfloat16] if cuda or features.native_bf16 else []), *dtypes]
    for dt in dict.fromkeys(wanted):
        if not cuda and dt in (torch.bfloat16, torch.float16) and not features.native_bf16:
            skipped[dtype_name(dt)] = features.why_no_bf16()
            continue
        a, b = (torch.randn(n, n, device=device, dtype=dt) for _ in range(2))
        ms = timer.best_ms(lambda a=a, b=b: torch.mm(a, b))
        matmul[dtype_name(dt)] = 2 * n**3 / (ms * 1e-3) / 1e12
        if not cuda:
            matmul[dtype_name(dt)] = max(matmul[dtype_name(dt)], _conv_peak(timer, dt))
    matmul.update(_quantized_peaks(device, timer, n, features))
    nbytes = 2**30 if cuda else CPU_WORKING_SET
    bandwidth = _bandwidth_peaks(device, timer, nbytes)
    if cuda:
        torch.cuda.empty_cache()
    return {"matmul_tflops": matmul, "matmul": f"{n}x{n}x{n}", "peaks_skipped": skipped, "bandwidth": bandwidth,
            "bandwidth_of": f"{nbytes // 2**20} MiB {'device memory' if cuda else 'working set'}",
            "bandwidth_gbps": max(bandwidth.values())}


def _conv_peak(timer: Timer, dtype: torch.dtype) -> float:
    """TFLOP/s of patch-embedding convolutions (ViT-Ti/16's and ViT-B/16's): on CPU oneDNN's strided
    convolution beats MKL's ``torch.mm`` by up to 1.7x on one thread (measured here), so a matmul alone is no
    ceiling for the rows that run it. The best of the two shapes."""
    best = 0.0
    for images, size, width in ((2, 224, 192), (4, 448, 768)):
        x = torch.randn(images, 3, size, size, dtype=dtype)
        w = torch.randn(width, 3, 16, 16, dtype=dtype)
        ms = timer.best_ms(lambda x=x, w=w: torch.nn.functional.conv2d(x, w, stride=16))
        best = max(best, 2 * images * (size // 16) ** 2 * (3 * 16 * 16) * width / (ms * 1e-3) / 1e12)
    return best


def peak_key(row: dict) -> str:
    """The ``matmul_tflops`` entry a row's FLOP/s is a fraction of: the row's own ``peak_key`` where it sets one
    (the CPU path search's row: its pick's), else its quantization format (int8 PT2E under bf16 autocast runs its
    GEMMs in int8), else a bf16 the provider names (OpenVINO's bf16 hint takes fp32 inputs), else its dtype."""
    if row.get("peak_key"):
        return row["peak_key"]
    fmt = str(row.get("provider", "")).rpartition(":")[2]
    if fmt.startswith("int8"):
        return "int8"
    return {"fp8": "fp8", "bf16": "bfloat16"}.get(fmt, row["dtype"])


def _quantized_peaks(device: torch.device, timer: Timer, n: int, features: object | None) -> dict[str, float]:
    from vit_fast import quantization

    formats = quantization.supported_formats(device)
    out = {}
    if device.type == "cpu" and formats["int8"] is None:
        linear = quantization.Int8Linear.from_linear(torch.nn.Linear(n, n))
        packed, x = linear._pack(), torch.randn(n, n)
        ms = timer.best_ms(lambda: torch.ops.quantized.linear_dynamic(x, packed, linear.reduce_range))
        out["int8"] = 2 * n**3 / (ms * 1e-3) / 1e12
        if features.int8_dot:  # without VNNI/AMX, torch._int_mm is a slow reference loop (8 s at 1024 here)
            a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8) for _ in range(2))
            ms = timer.best_ms(lambda: torch._int_mm(a, b))
            out["int8"] = max(out["int8"], 2 * n**3 / (ms * 1e-3) / 1e12)
    if device.type == "cuda" and formats["fp8"] is None:
        a, b = (torch.randn(n, n, device=device).to(torch.float8_e4m3fn) for _ in range(2))
        one = torch.ones((), device=device)
        ms = timer.best_ms(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        out["fp8"] = 2 * n**3 / (ms * 1e-3) / 1e12
    return out


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
