"""The e4m3 format's facts the FP8 ops share, its per-row quantization in PyTorch (their references'), and the
benchmark of the ops that write quantized rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from vit_fast.ops.spec import Bench

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
FP8 = torch.float8_e4m3fn
FP8_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with FP8 tensor cores


def quantize_rows_ref(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) float rows (of ``gelu(x)`` with ``gelu``) -> (e4m3 (M, C), fp32 scale (M,)), ``q * scale ~= x``."""
    x = x.float()
    if gelu:
        x = F.gelu(x)
    scale = x.abs().amax(dim=1).clamp_min(1e-12) / E4M3_MAX  # (M,)
    return (x / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), scale


def rows_bench(quick_width: tuple[int, int], model_width: Callable[[Mapping[str, int]], int],
               params: int = 0, gpu_check: tuple[Mapping, ...] = (), **dims: object) -> Bench:
    """The benchmark of an op that reads (B * N, C) rows in the input dtype and writes them in e4m3 with a scale
    per row, forward only, on a GPU by default: ``quick_width`` the ``--quick`` C (GPU, CPU), ``model_width(dims)``
    C in a model, ``params`` how many C-long parameter vectors it also reads, ``gpu_check`` the GPU check's
    shapes, ``dims`` what its cases add."""
    gpu_c, cpu_c = quick_width
    return Bench(
        "GB/s", ("B", "N", "C"), (({"B": 64, "N": 197, "C": gpu_c},), ({"B": 8, "N": 65, "C": cpu_c},)),
        model_shape=lambda d: {"N": d["N"], "C": model_width(d)}, flops=lambda s, mode: 0,
        bytes=lambda s, mode, elem: s["B"] * s["N"] * (s["C"] * (elem + 1) + 4) + params * s["C"] * elem,
        baselines=lambda: [], compiled=None, modes=("fwd",), gpu_only=True, gpu_check=gpu_check,
        to_dims=lambda s: {"M": s["B"] * s["N"], "C": s["C"], **dims})
