"""FP8 GEMM with block-scaled activations: ``y = (x_q * x_scale) @ (w_q * w_scale)^T + bias``.

x_q (M, K) e4m3 carries one fp32 scale per row and per group of ``K / G`` columns (x_scale (M, G)); w_q (N, K)
e4m3 one scale per output channel. G = 1 is the row-wise scaling cuBLASLt runs; G = H is what the attention
kernel emits for the proj GEMM, one scale per (token, head), since each of its programs sees one head of a
token and cannot know the token's other heads.

One K loop over blocks of BLOCK_K columns (BLOCK_K divides a group), which Triton software-pipelines: with G > 1
each block's product is scaled by its group's row scales as it is added (``acc += dot(x, w) * s[g]``, the scale
loaded per K block); with G = 1 the row scales wait for the epilogue. Hopper's fp8 wgmma keeps its accumulator
in reduced precision until promoted to fp32: ``max_num_imprecise_acc = BLOCK_K`` promotes after every K block
(Triton's sm_90 default never promotes within a dot chain, which over fc2's K = 3072 loses bits). The weight
scales and the bias come in the epilogue.

Two kernels: pointer loads (every GPU with e4m3, the interpreter, any row stride) and, on sm_90, TMA loads and
stores through tensor descriptors with a persistent tile loop (:func:`_scaled_gemm_tma_kernel`).

Inference only: there is no backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import vit_fast.kernels as kernels
from vit_fast.kernels import empty, interpreting, launch, on_inputs_device, smem_limit
from vit_fast.kernels.gemm import _tile

_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}


@triton.jit
def _accumulate(acc, x, w_t, X_SCALE, rows, mask_m, k0, GROUPS: tl.constexpr, GROUP_K: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
    """acc + x @ w_t for one K block starting at column k0, scaled by its group's row scales when G > 1; the dot
    is promoted to fp32 after its BLOCK_K columns."""
    if GROUPS == 1:
        return tl.dot(x, w_t, acc, max_num_imprecise_acc=BLOCK_K)
    s = tl.load(X_SCALE + rows * GROUPS + k0 // GROUP_K, mask=mask_m, other=0.0)
    return acc + tl.dot(x, w_t, max_num_imprecise_acc=BLOCK_K) * s[:, None]


@triton.jit
def _finish(acc, X_SCALE, W_SCALE, BIAS, rows, cols, mask_m, mask_n, GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The epilogue on the fp32 accumulator: row scales (G = 1), weight scales, bias."""
    if GROUPS == 1:
        acc = acc * tl.load(X_SCALE + rows, mask=mask_m, other=0.0)[:, None]
    acc = acc * tl.load(W_SCALE + cols, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit(do_not_specialize=["m_bucket"])
def _scaled_gemm_kernel(
    X,  # (M, K) e4m3, unit column stride
    X_SCALE,  # (M, G) fp32, contiguous
    W,  # (N, K) e4m3, unit column stride
    W_SCALE,  # (N,) fp32
    BIAS,  # (N,) any float, or a dummy when not HAS_BIAS
    OUT,  # (M, N), unit column stride
    M, N, K,
    m_bucket,  # next power of two of M: the autotuning key (a new batch size reuses its bucket's config); unused
    stride_xm, stride_wn, stride_om,
    GROUPS: tl.constexpr,  # G: activation scales per row
    GROUP_K: tl.constexpr,  # K / G columns share one scale
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides GROUP_K
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped program order: GROUP_M row blocks share each column block while it is in L2.
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * blocks_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rows < M, cols < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + cols[:, None] * stride_wn + offs_k[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K: no mask along K
        x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        acc = _accumulate(acc, x, tl.trans(w), X_SCALE, rows, mask_m, k0, GROUPS, GROUP_K, BLOCK_K)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = _finish(acc, X_SCALE, W_SCALE, BIAS, rows, cols, mask_m, mask_n, GROUPS, HAS_BIAS)
    out_ptrs = OUT + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])



@triton.jit(do_not_specialize=["m_bucket"])
def _scaled_gemm_tma_kernel(
    x_desc,  # (M, K) e4m3 tensor descriptor, block (BLOCK_M, BLOCK_K)
    X_SCALE,  # (M, G) fp32, contiguous
    w_desc,  # (N, K) e4m3, block (BLOCK_N, BLOCK_K)
    W_SCALE,  # (N,) fp32
    BIAS,  # (N,) any float, or a dummy when not HAS_BIAS
    out_desc,  # (M, N), block (BLOCK_M, BLOCK_N)
    M, N, K,
    m_bucket,  # the autotuning key, as in _scaled_gemm_kernel; unused
    num_programs,  # the grid: one program per SM, each walking tiles num_programs apart
    GROUPS: tl.constexpr,
    GROUP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """sm_90's FP8 GEMM: the pointer kernel's K loop and epilogue with x, w and the output moved by TMA, and a
    persistent tile loop."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
        pid_m, pid_n = _tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rows < M, cols < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([pid_m * BLOCK_M, k0])
            w = w_desc.load([pid_n * BLOCK_N, k0])
            acc = _accumulate(acc, x, w.T, X_SCALE, rows, mask_m, k0, GROUPS, GROUP_K, BLOCK_K)
        acc = _finish(acc, X_SCALE, W_SCALE, BIAS, rows, cols, mask_m, mask_n, GROUPS, HAS_BIAS)
        out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(out_desc.dtype))


# (BLOCK_M, BLOCK_N, warps, stages); GROUP_M 8 throughout
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, w, s in ((128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 3))
]

_scaled_gemm_tuned = triton.autotune(CONFIGS, key=["m_bucket", "N", "K", "GROUPS"])(_scaled_gemm_kernel)


def _tma_blocks(nargs: dict) -> None:
    """A TMA config's pre-hook: the descriptors' block shapes are the config's tiles."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["out_desc"].block_shape = [bm, bn]


def _prune_tma(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """TMA configs whose e4m3 stages plus the output's tile twice (staging buffer and layout conversion) fit."""
    out = named_args["out_desc"].base
    budget = smem_limit(out.device)
    bk = kwargs["BLOCK_K"]
    fits = [c for c in configs if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * bk * c.num_stages
            + 2 * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * out.element_size() <= budget]
    return fits or configs[-1:]


TMA_CONFIGS = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_tma_blocks)
               for c in CONFIGS]
_scaled_gemm_tma_tuned = triton.autotune(TMA_CONFIGS, key=["m_bucket", "N", "K", "GROUPS"],
                                         prune_configs_by={"early_config_prune": _prune_tma})(_scaled_gemm_tma_kernel)
kernels.use_shortlist(_scaled_gemm_tuned, _scaled_gemm_tma_tuned)


def block_k(group_k: int) -> int:
    """The K step: the largest of 64, 32, 16 that divides a scale group (fp8 tl.dot needs K >= 16)."""
    for b in (64, 32, 16):
        if group_k % b == 0:
            return b
    raise ValueError(f"scale groups of {group_k} columns: need a multiple of 16")


@on_inputs_device
def scaled_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``(x_q * x_scale) @ (w_q * w_scale)^T + bias`` in ``out_dtype``.

    Args:
        x_q: (M, K) float8_e4m3fn, unit column stride; x_scale: (M, G) or (M,) fp32, G dividing K with
            K / G a multiple of 16.
        w_q: (N, K) float8_e4m3fn, unit column stride; w_scale: (N,) fp32; bias: (N,) or None.
    """
    m, k = x_q.shape
    n = w_q.shape[0]
    scales = x_scale.reshape(m, -1).contiguous()
    groups = scales.shape[1]
    out = empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    flags = {"GROUPS": groups, "GROUP_K": k // groups, "HAS_BIAS": bias is not None, "BLOCK_K": block_k(k // groups)}
    w_scale, bias_t = w_scale.contiguous(), w_scale if bias is None else bias.contiguous()
    variant = kernels.pick_variant("scaled_gemm", "tma" if x_q.is_cuda else "pointer",
                                   lambda v: None if v == "pointer" else kernels.tma_reason(x_q, w_q, out))
    if variant == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16]) for t in (x_q, w_q, out)]
        programs = kernels.num_programs(x_q.device)
        fixed = triton.Config(_INTERPRET_CONFIG, pre_hook=_tma_blocks) if interpreting() else None
        launch(
            _scaled_gemm_tma_tuned,
            lambda meta: (min(programs, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),),
            (descs[0], scales, descs[1], w_scale, bias_t, descs[2], m, n, k, triton.next_power_of_2(m), programs),
            flags, fixed=fixed,
        )
        return out
    fixed = triton.Config(_INTERPRET_CONFIG) if interpreting() else None
    launch(
        _scaled_gemm_tuned,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        (x_q, scales, w_q, w_scale, bias_t, out, m, n, k, triton.next_power_of_2(m), x_q.stride(0), w_q.stride(0),
         out.stride(0)),
        flags, fixed=fixed,
    )
    return out


__all__ = ["CONFIGS", "block_k", "scaled_gemm"]
