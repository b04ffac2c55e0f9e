"""One GEMM with fused edges: ``C = epilogue(A @ B)``, the building block of layernorm_mlp's forward and backward.

``_gemm_kernel`` loads A and B tiles straight from memory and hands them to ``tl.dot`` unchanged: no elementwise
work sits between a load and the dot, so on sm_90 Triton stages both operands through shared memory and emits
its Hopper (wgmma) pipeline, and the tiles can be as large as the device's shared memory allows (up to 128x256
and 256x128). All per-element work happens in the epilogue, on the fp32 accumulator, before the one store:

- ``HAS_BIAS``: ``acc += bias[n]`` (fc1, fc2 and the recomputed fc1 pre-activation);
- ``EPILOGUE == EPI_GELU``: exact (erf) GELU, optionally storing the pre-activation first (``STORE_AUX``);
- ``EPILOGUE == EPI_GELU_BWD``: ``acc *= gelu'(pre)`` reading the saved pre-activation, optionally storing
  ``gelu(pre)`` (``STORE_AUX``) and the column sums of the result per ``BIAS_GRAD_ROWS`` rows (``BIAS_GRAD``):
  the bias gradient's partial sums, the same whatever tile the autotuner picks;
- ``HAS_RESIDUAL``: ``acc += residual[m, n]``.

A and B may have any strides (B is usually an nn.Linear weight seen as (K, N) through ``.t()``); both share one
dtype: the caller casts, so the kernel never converts an operand. fp32 operands use IEEE fp32 dot products unless
PyTorch's TF32 switch for matmul is on (:func:`vit_fast.kernels.fp32_tf32`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vit_fast.kernels import fp32_tf32, interpreting, launch, smem_limit

EPI_NONE = 0  # acc (+ bias) (+ residual)
EPI_GELU = 1  # gelu(acc + bias), optionally storing acc + bias (the pre-activation)
EPI_GELU_BWD = 2  # acc * gelu'(pre), optionally storing gelu(pre) and per-BIAS_GRAD_ROWS column sums

# Row granularity of the bias-gradient partial sums: independent of the tile shape the autotuner picks, so the
# result is bitwise the same whatever config runs. Every BLOCK_M is a multiple of it.
BIAS_GRAD_ROWS = 32


@triton.jit(do_not_specialize=["m_bucket"])
def _gemm_kernel(
    a_ptr,  # (M, K), any strides
    b_ptr,  # (K, N), any strides, a_ptr's dtype
    c_ptr,  # (M, N), rows strided by stride_cm, last dim contiguous
    bias_ptr,  # (N,)                                   HAS_BIAS
    res_ptr,  # (M, N), last dim contiguous             HAS_RESIDUAL
    pre_ptr,  # (M, N), last dim contiguous             EPI_GELU stores it (STORE_AUX), EPI_GELU_BWD reads it
    h_ptr,  # (M, N), last dim contiguous               EPI_GELU_BWD stores gelu(pre) (STORE_AUX)
    dbias_ptr,  # (cdiv(M, BIAS_GRAD_ROWS), N) fp32      EPI_GELU_BWD with BIAS_GRAD
    M,
    N,
    K,
    m_bucket,  # next power of two of M: the autotuning key (a new batch size reuses its bucket's config); unused
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_res_m,
    stride_pre_m,
    stride_h_m,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EPILOGUE: tl.constexpr,
    STORE_AUX: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    BIAS_GRAD_ROWS: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row blocks sweep the column blocks together, so B tiles are reused from L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if a_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(a, b, acc, input_precision=FP32_PRECISION)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:
        if STORE_AUX:
            tl.store(pre_ptr + rows[:, None] * stride_pre_m + offs_n[None, :], acc.to(pre_ptr.dtype.element_ty),
                     mask=c_mask)
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    if EPILOGUE == 2:
        pre = tl.load(pre_ptr + rows[:, None] * stride_pre_m + offs_n[None, :], mask=c_mask, other=0.0)
        pre = pre.to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
        if STORE_AUX:
            tl.store(h_ptr + rows[:, None] * stride_h_m + offs_n[None, :], (pre * cdf).to(h_ptr.dtype.element_ty),
                     mask=c_mask)
        pdf = tl.exp(-0.5 * pre * pre) * 0.3989422804014327  # 1 / sqrt(2 pi)
        acc = acc * (cdf + pre * pdf)
        if BIAS_GRAD:
            SLOTS: tl.constexpr = BLOCK_M // BIAS_GRAD_ROWS
            part = tl.sum(tl.reshape(tl.where(c_mask, acc, 0.0), (SLOTS, BIAS_GRAD_ROWS, BLOCK_N)), axis=1)
            slot = pid_m * SLOTS + tl.arange(0, SLOTS)
            slot_mask = (slot < tl.cdiv(M, BIAS_GRAD_ROWS))[:, None] & mask_n[None, :]
            tl.store(dbias_ptr + slot.to(tl.int64)[:, None] * N + offs_n[None, :], part, mask=slot_mask)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * stride_res_m + offs_n[None, :], mask=c_mask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(c_ptr + rows[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


# Shapes that matter: ViT's M = batch * 197 (or 257, 577) tokens, N/K in {384, 768, 1024, 1280} x {1, 4}. The
# large tiles (two warpgroups, 128 fp32 accumulators per thread) are Hopper's; the small ones cover A100's shared
# memory, fp32 operands and small problems. The first one the pruning keeps is the untuned (fixed) config.
CONFIGS = [
    _config(128, 256, 64, 8, 3),
    _config(256, 128, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 128, 64, 4, 3),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(64, 64, 32, 4, 5),
]


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Drop tiles far larger than the problem and pipelines whose A and B tiles do not fit in the device's shared
    memory (each operand counted in its own dtype: the same rule holds if a caller ever mixes them)."""
    a, b = named_args["a_ptr"], named_args["b_ptr"]
    m, n = named_args["M"], named_args["N"]
    budget = smem_limit(a.device)
    fits = [
        c for c in configs
        if (c.kwargs["BLOCK_M"] * a.element_size() + c.kwargs["BLOCK_N"] * b.element_size()) * c.kwargs["BLOCK_K"]
        * c.num_stages <= budget
    ]
    sized = [
        c for c in fits
        if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))
        and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))
    ]
    return sized or fits or configs[-1:]


_gemm_tuned = triton.autotune(
    configs=CONFIGS,
    key=["m_bucket", "N", "K", "EPILOGUE", "HAS_RESIDUAL", "STORE_AUX"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_gemm_kernel)

# One fixed small tile under the interpreter: autotuning there would time numpy.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    dbias: torch.Tensor | None = None,
    epilogue: int = EPI_NONE,
    store_aux: bool = False,
) -> None:
    """``c = epilogue(a @ b)`` into ``c``: a (M, K) and b (K, N) of one dtype, any strides; c (M, N) with a
    contiguous last dim, any dtype (the fp32 accumulator is cast on the store).

    ``residual``, ``pre`` and ``h`` are (M, N) with contiguous last dims; ``dbias`` is
    (cdiv(M, BIAS_GRAD_ROWS), N) fp32 and contiguous. What each does is in the module docstring. The caller sets
    the device (layernorm_mlp's launchers are :func:`vit_fast.kernels.on_inputs_device`).
    """
    m, k = a.shape
    n = b.shape[1]
    assert b.shape[0] == k and c.shape == (m, n) and a.dtype == b.dtype, "gemm: a (M, K), b (K, N), c (M, N)"
    dummy = c  # stands in for the pointers a variant does not touch
    res = residual if residual is not None else dummy
    pre_t = pre if pre is not None else dummy
    h_t = h if h is not None else dummy
    args = (
        a, b, c, bias if bias is not None else dummy, res, pre_t, h_t, dbias if dbias is not None else dummy,
        m, n, k, triton.next_power_of_2(m),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), res.stride(0), pre_t.stride(0),
        h_t.stride(0),
    )
    flags = {
        "HAS_BIAS": bias is not None,
        "HAS_RESIDUAL": residual is not None,
        "EPILOGUE": epilogue,
        "STORE_AUX": store_aux,
        "BIAS_GRAD": dbias is not None,
        "BIAS_GRAD_ROWS": BIAS_GRAD_ROWS,
        # fp32 inputs follow PyTorch's own switch, so fp32 results match torch.matmul's precision.
        "FP32_PRECISION": "tf32" if fp32_tf32("matmul") else "ieee",
    }
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    fixed = triton.Config(_INTERPRETER_CONFIG) if interpreting() else None  # read at launch: tests patch it
    launch(_gemm_tuned, grid, args, flags, fixed=fixed)
