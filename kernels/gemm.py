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

On sm_90 :func:`gemm` takes ``_gemm_tma_kernel`` instead where the operands allow it (16-bit, a contiguous
last dim, 16-byte aligned strides): A, B and C move by TMA (tensor descriptors) and one program per SM loops over
the tiles; the epilogue is the same function. Fixed (untuned) configs are chosen per epilogue (:data:`FIXED_FROM`).

A and B may have any strides (B is usually an nn.Linear weight seen as (K, N) through ``.t()``); both share one
dtype: the caller casts, so the kernel never converts an operand. fp32 operands use IEEE fp32 dot products unless
PyTorch's TF32 switch for matmul is on (:func:`vit_fast.kernels.fp32_tf32`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import vit_fast.kernels as kernels
from vit_fast.kernels import fp32_tf32, interpreting, launch, smem_limit

EPI_NONE = 0  # acc (+ bias) (+ residual)
EPI_GELU = 1  # gelu(acc + bias), optionally storing acc + bias (the pre-activation)
EPI_GELU_BWD = 2  # acc * gelu'(pre), optionally storing gelu(pre) and per-BIAS_GRAD_ROWS column sums

# Row granularity of the bias-gradient partial sums: independent of the tile shape the autotuner picks, so the
# result is bitwise the same whatever config runs. Every BLOCK_M is a multiple of it.
BIAS_GRAD_ROWS = 32


@triton.jit
def _tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile index -> (row block, column block) in grouped order: GROUP_M row blocks sweep the column blocks
    together, so B tiles are reused from L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % group) % group_m, (tile % group) // group_m


@triton.jit
def _epilogue(acc, rows, offs_n, mask_m, mask_n, pid_m, M, N, bias_ptr, res_ptr, pre_ptr, h_ptr, dbias_ptr,
              stride_res_m, stride_pre_m, stride_h_m, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              EPILOGUE: tl.constexpr, STORE_AUX: tl.constexpr, BIAS_GRAD: tl.constexpr, BIAS_GRAD_ROWS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The fused edges on the fp32 accumulator of one (BLOCK_M, BLOCK_N) tile (module docstring), shared by the
    pointer and the TMA kernels; returns what goes to C."""
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
    return acc


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
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

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

    acc = _epilogue(acc, rows, offs_n, mask_m, mask_n, pid_m, M, N, bias_ptr, res_ptr, pre_ptr, h_ptr, dbias_ptr,
                    stride_res_m, stride_pre_m, stride_h_m, HAS_BIAS, HAS_RESIDUAL, EPILOGUE, STORE_AUX, BIAS_GRAD,
                    BIAS_GRAD_ROWS, BLOCK_M, BLOCK_N)
    c_mask = mask_m[:, None] & mask_n[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit(do_not_specialize=["m_bucket"])
def _gemm_tma_kernel(
    a_desc,  # (M, K) tensor descriptor, block (BLOCK_M, BLOCK_K)
    b_desc,  # B_KN: (K, N), block (BLOCK_K, BLOCK_N); else (N, K) (an nn.Linear weight), block (BLOCK_N, BLOCK_K)
    c_desc,  # (M, N), block (BLOCK_M, BLOCK_N)
    bias_ptr,  # (N,)                                   HAS_BIAS
    res_ptr,  # (M, N), last dim contiguous             HAS_RESIDUAL
    pre_ptr,  # (M, N), last dim contiguous             EPI_GELU stores it (STORE_AUX), EPI_GELU_BWD reads it
    h_ptr,  # (M, N), last dim contiguous               EPI_GELU_BWD stores gelu(pre) (STORE_AUX)
    dbias_ptr,  # (cdiv(M, BIAS_GRAD_ROWS), N) fp32      EPI_GELU_BWD with BIAS_GRAD
    M,
    N,
    K,
    m_bucket,  # the autotuning key, as in _gemm_kernel; unused
    num_programs,  # the grid: one program per SM, each walking tiles num_programs apart
    stride_res_m,
    stride_pre_m,
    stride_h_m,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EPILOGUE: tl.constexpr,
    STORE_AUX: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    BIAS_GRAD_ROWS: tl.constexpr,
    B_KN: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """sm_90's GEMM: A, B and C move by TMA (tensor descriptors: the copy engine fills shared memory and masks
    the edges, no address math in registers) and each program loops over tiles (persistent), so one tile's
    epilogue overlaps the next one's loads. The epilogue is :func:`_epilogue`, the pointer kernel's."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # TMA reads the K tail past K as zeros
            a = a_desc.load([off_m, k0])
            if B_KN:
                b = b_desc.load([k0, off_n])
            else:
                b = b_desc.load([off_n, k0]).T
            acc = tl.dot(a, b, acc)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        acc = _epilogue(acc, offs_m.to(tl.int64), offs_n, offs_m < M, offs_n < N, pid_m, M, N, bias_ptr, res_ptr,
                        pre_ptr, h_ptr, dbias_ptr, stride_res_m, stride_pre_m, stride_h_m, HAS_BIAS, HAS_RESIDUAL,
                        EPILOGUE, STORE_AUX, BIAS_GRAD, BIAS_GRAD_ROWS, BLOCK_M, BLOCK_N)
        c_desc.store([off_m, off_n], acc.to(c_desc.dtype))  # TMA drops the rows and columns past M and N


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

# The fixed (untuned) config of each epilogue: the first config from this index of CONFIGS on that the pruning keeps,
# chosen as the largest tile that compiles with no register spills for that epilogue on sm_80 and sm_90
# (`vit-fast kernels` marks these rows; tests/suites/test_kernel_resources.py checks them).
FIXED_FROM = {EPI_NONE: 0, EPI_GELU: 0, EPI_GELU_BWD: 0}


def fixed_config(kept: list[triton.Config], flags: dict) -> triton.Config:
    """The fixed config among ``kept`` (the pruning's list) for a launch with these constexpr ``flags``."""
    start = FIXED_FROM[flags["EPILOGUE"]]
    return next((c for c in kept if CONFIGS.index(c) >= start), kept[-1])


def _fixed(args: tuple, kwargs: dict) -> triton.Config:
    return fixed_config(kernels.kept_configs(_gemm_tuned, args, kwargs), kwargs)


# One fixed small tile under the interpreter: autotuning there would time numpy.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}



def _tma_blocks(nargs: dict) -> None:
    """A TMA config's pre-hook: the descriptors' block shapes are the config's tiles."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bk, bn] if nargs["B_KN"] else [bn, bk]
    nargs["c_desc"].block_shape = [bm, bn]


def _tma_config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages, pre_hook=_tma_blocks)


# The TMA kernel's tiles: Hopper's wgmma tiles, largest first; C's tile is staged in shared memory for its TMA store.
TMA_CONFIGS = [
    _tma_config(128, 256, 64, 8, 3),
    _tma_config(128, 128, 64, 8, 4),
    _tma_config(128, 128, 64, 4, 4),
    _tma_config(128, 64, 64, 4, 4),
    _tma_config(64, 128, 64, 4, 4),
]


def prune_tma_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """:func:`prune_configs` for the TMA kernel: its A and B stages plus C's tile twice (the TMA store's staging
    buffer and the epilogue's layout conversion, as the sm_90 compiles of ``vit-fast kernels`` measure) must fit."""
    a, c = named_args["a_desc"].base, named_args["c_desc"].base
    m, n = named_args["M"], named_args["N"]
    budget = smem_limit(a.device)
    fits = [
        cfg for cfg in configs
        if (cfg.kwargs["BLOCK_M"] + cfg.kwargs["BLOCK_N"]) * cfg.kwargs["BLOCK_K"] * a.element_size() * cfg.num_stages
        + 2 * cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] * c.element_size() <= budget
    ]
    sized = [
        cfg for cfg in fits
        if cfg.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))
        and cfg.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))
    ]
    return sized or fits or configs[-1:]


_gemm_tma_tuned = triton.autotune(
    configs=TMA_CONFIGS,
    key=["m_bucket", "N", "K", "EPILOGUE", "HAS_RESIDUAL", "STORE_AUX", "B_KN"],
    prune_configs_by={"early_config_prune": prune_tma_configs},
)(_gemm_tma_kernel)
kernels.use_shortlist(_gemm_tuned, _gemm_tma_tuned)


def _b_operand(b: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """B as the TMA kernel reads it: (K, N) itself when its rows are contiguous (B_KN), else its (N, K) transpose
    when that is (an nn.Linear weight seen through .t()); None when neither is."""
    if b.stride(1) == 1:
        return b, True
    if b.stride(0) == 1:
        return b.t(), False
    return None


def tma_reason(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> str | None:
    """Why :func:`gemm` cannot take its TMA kernel for these operands, or None."""
    if a.dtype == torch.float32:
        return "fp32 operands: the pointer kernel (its IEEE or TF32 dot follows PyTorch's switch)"
    operand = _b_operand(b)
    if operand is None:
        return f"B with strides {b.stride()}: neither its rows nor its columns are contiguous"
    return kernels.tma_reason(a, operand[0], c)


def _launch_tma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, epilogue_args: tuple, flags: dict) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = a.shape
    n = c.shape[1]
    b_view, b_kn = _b_operand(b)
    descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16]) for t in (a, b_view, c)]
    programs = kernels.num_programs(a.device)
    flags = {k_: v for k_, v in flags.items() if k_ != "FP32_PRECISION"}
    args = (*descs, *epilogue_args[:5], m, n, k, triton.next_power_of_2(m), programs, *epilogue_args[5:])
    grid = lambda meta: (min(programs, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)
    fixed = triton.Config(_INTERPRETER_CONFIG, pre_hook=_tma_blocks) if interpreting() else None
    launch(_gemm_tma_tuned, grid, args, {**flags, "B_KN": b_kn, "WARP_SPECIALIZE": False}, fixed=fixed)


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
    # TMA by default on a GPU that has it; the interpreter runs the pointer kernel unless a test forces TMA
    variant = kernels.pick_variant("gemm", "tma" if a.is_cuda else "pointer",
                                   lambda v: None if v == "pointer" else tma_reason(a, b, c))
    if variant == "tma":
        _launch_tma(a, b, c, (args[3], res, pre_t, h_t, args[7], res.stride(0), pre_t.stride(0), h_t.stride(0)),
                    flags)
        return
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    fixed = triton.Config(_INTERPRETER_CONFIG) if interpreting() else _fixed  # read at launch: tests patch it
    launch(_gemm_tuned, grid, args, flags, fixed=fixed)
