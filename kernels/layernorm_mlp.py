"""Fused LayerNorm + MLP: ``fc2(gelu(fc1(layer_norm(x)))) (+ residual)``, forward and backward.

Kernels, in order:

- ``_layernorm_mlp_stats_kernel``: the LayerNorm pre-pass, per-row mean and rstd in fp32.
- ``_layernorm_mlp_gemm_kernel``: ``C = epilogue(prologue(A) @ B^T)``, the one GEMM of this op. Its
  constexpr variants make every GEMM the op needs:
    * forward fc1: the prologue normalizes A (= x) while loading it, the epilogue adds fc1's bias and applies
      exact GELU, and (training) also stores the pre-activation;
    * forward fc2: bias and residual in the epilogue;
    * backward dH = dout @ fc2_weight: the epilogue multiplies by GELU'(pre-activation), giving d(pre-activation),
      stores GELU(pre-activation) for fc2's weight gradient and fc1's bias gradient as per-32-row partial sums;
    * backward d(LayerNorm output) = d(pre-activation) @ fc1_weight: plain.
- ``_layernorm_mlp_bwd_kernel``: the per-row LayerNorm backward; it also writes the LayerNorm output for fc1's
  weight gradient and per-program partial sums of the LayerNorm's weight and bias gradients (no atomics).

Launchers: ``layernorm_mlp_fwd`` and ``layernorm_mlp_bwd``. The weight-gradient GEMMs run through
``torch.matmul`` (cuBLAS): whether a Triton GEMM with a fused prologue beats it is to be measured on a GPU.

What the forward saves: x, mean, rstd and the pre-GELU activation (M, hidden). The backward needs GELU' of the
pre-activation, which the post-GELU activation cannot give back (GELU is not invertible), so saving only the
post-GELU one would cost a recomputed fc1 GEMM in the backward. Saving the pre-activation costs one extra
(M, hidden) store in the training forward and one in the backward (GELU recomputed in the dH epilogue for
fc2's weight gradient): memory traffic in compute-bound GEMM epilogues, cheaper than a GEMM. Without grad the
forward writes the activation once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vit_fast.kernels import empty, fp32_tf32, interpreting, launch, on_inputs_device, smem_limit
from vit_fast.kernels.layer_norm import layer_norm_dx, load_row_vector

# The GEMM kernel's epilogues.
EPI_NONE = 0  # acc (+ bias) (+ residual)
EPI_GELU = 1  # gelu(acc + bias), optionally storing acc + bias (the pre-activation)
EPI_GELU_BWD = 2  # acc * gelu'(pre), optionally storing gelu(pre) and per-32-row column sums

# Row granularity of the bias-gradient partial sums: independent of the tile shape the autotuner picks, so the
# result is bitwise the same whatever config runs. Every BLOCK_M is a multiple of it.
BIAS_GRAD_ROWS = 32

# Whole rows live in registers in the row kernels.
MAX_C = 16384


@triton.jit
def _layernorm_mlp_stats_kernel(
    x_ptr,  # (M, C), rows strided by stride_xm, last dim contiguous
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    C,
    stride_xm,
    eps,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(d * d, axis=0) / C
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, 1.0 / tl.sqrt(var + eps))


@triton.jit(do_not_specialize=["m_bucket"])
def _layernorm_mlp_gemm_kernel(
    a_ptr,  # (M, K), any strides
    b_ptr,  # (N, K), any strides: C = A @ B^T
    c_ptr,  # (M, N), rows strided by stride_cm, last dim contiguous
    bias_ptr,  # (N,)                                   HAS_BIAS
    res_ptr,  # (M, N), last dim contiguous             HAS_RESIDUAL
    pre_ptr,  # (M, N), last dim contiguous             EPI_GELU stores it (STORE_AUX), EPI_GELU_BWD reads it
    h_ptr,  # (M, N), last dim contiguous               EPI_GELU_BWD stores gelu(pre) (STORE_AUX)
    dbias_ptr,  # (cdiv(M, BIAS_GRAD_ROWS), N) fp32      EPI_GELU_BWD with BIAS_GRAD
    mean_ptr,  # (M,) fp32                              LN_A
    rstd_ptr,  # (M,) fp32                              LN_A
    ln_w_ptr,  # (K,)                                   LN_A
    ln_b_ptr,  # (K,)                                   LN_A
    M,
    N,
    K,
    m_bucket,  # next power of two of M: the autotuning key (a new batch size reuses its bucket's config); unused
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_res_m,
    stride_pre_m,
    stride_h_m,
    LN_A: tl.constexpr,
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
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk
    if LN_A:
        mean = tl.load(mean_ptr + offs_m, mask=mask_m, other=0.0)
        rstd = tl.load(rstd_ptr + offs_m, mask=mask_m, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if LN_A:
            # Masked-off k columns get weight 0 and bias 0, so they stay 0 after normalizing.
            w = tl.load(ln_w_ptr + k0 + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            bb = tl.load(ln_b_ptr + k0 + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * w[None, :] + bb[None, :]
        a = a.to(b_ptr.dtype.element_ty)
        if b_ptr.dtype.element_ty == tl.float32:
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
            pre_ptrs = pre_ptr + rows[:, None] * stride_pre_m + offs_n[None, :]
            tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=c_mask)
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


@triton.jit
def _layernorm_mlp_bwd_kernel(
    dy_ptr,  # (M, C) fp32, the gradient of the LayerNorm output, contiguous          HAS_DY
    x_ptr,  # (M, C), rows strided by stride_xm, last dim contiguous
    ln_w_ptr,  # (C,)
    ln_b_ptr,  # (C,)
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    dx_ptr,  # (M, C), contiguous                                                   HAS_DY
    ln_out_ptr,  # (M, C) the LayerNorm output in the GEMM dtype, contiguous          STORE_LN
    dw_part_ptr,  # (num_programs, C) fp32 partial sums of the weight gradient       HAS_DY
    db_part_ptr,  # (num_programs, C) fp32 partial sums of the bias gradient         HAS_DY
    M,
    C,
    stride_xm,
    rows_per_program,
    HAS_DY: tl.constexpr,
    STORE_LN: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols, mask, w = load_row_vector(ln_w_ptr, C, BLOCK_C)
    b = tl.load(ln_b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = pid.to(tl.int64) * rows_per_program + i
        in_range = row < M
        row_mask = mask & in_range
        x = tl.load(x_ptr + row * stride_xm + cols, mask=row_mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row, mask=in_range, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=in_range, other=0.0)
        xhat = tl.where(row_mask, (x - mean) * rstd, 0.0)
        if STORE_LN:
            tl.store(ln_out_ptr + row * C + cols, (xhat * w + b).to(ln_out_ptr.dtype.element_ty), mask=row_mask)
        if HAS_DY:
            dy = tl.load(dy_ptr + row * C + cols, mask=row_mask, other=0.0)
            dx = layer_norm_dx(xhat, w * dy, rstd, C, 0)
            tl.store(dx_ptr + row * C + cols, dx.to(dx_ptr.dtype.element_ty), mask=row_mask)
            dw_acc += dy * xhat
            db_acc += dy
    if HAS_DY:
        tl.store(dw_part_ptr + pid.to(tl.int64) * C + cols, dw_acc, mask=mask)
        tl.store(db_part_ptr + pid.to(tl.int64) * C + cols, db_acc, mask=mask)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


# Shapes that matter: ViT's M = batch * 197 (or 257, 577) tokens, N/K in {384, 768, 1024, 1280} x {1, 4}.
_GEMM_CONFIGS = [
    _config(128, 256, 64, 8, 3),
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 64, 4, 4),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(64, 64, 32, 4, 5),
]


def _prune_gemm_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Drop tiles far larger than the problem and pipelines whose A and B tiles (each in its own dtype: the
    LayerNorm prologue loads an fp32 x next to bf16 weights) do not fit in the device's shared memory."""
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


_layernorm_mlp_gemm_tuned = triton.autotune(
    configs=_GEMM_CONFIGS,
    key=["m_bucket", "N", "K", "LN_A", "EPILOGUE", "HAS_RESIDUAL", "STORE_AUX"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)(_layernorm_mlp_gemm_kernel)

# One fixed small tile under the interpreter: autotuning there would time numpy.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (rows, last dim) with a contiguous last dim; a view whenever the strides allow it."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    dbias: torch.Tensor | None = None,
    ln: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    epilogue: int = EPI_NONE,
    store_aux: bool = False,
) -> None:
    """``c = epilogue(prologue(a) @ b.T)``: a (M, K), b (N, K) (any strides), c (M, N) with a contiguous last dim.

    ``ln = (mean, rstd, ln_weight, ln_bias)`` normalizes ``a`` while loading it.
    """
    m, k = a.shape
    n = b.shape[0]
    mean, rstd, ln_w, ln_b = ln if ln is not None else (c, c, c, c)
    dummy = c  # stands in for the pointers a variant does not touch
    res = residual if residual is not None else dummy
    pre_t = pre if pre is not None else dummy
    h_t = h if h is not None else dummy
    args = (
        a, b, c, bias if bias is not None else dummy, res, pre_t, h_t, dbias if dbias is not None else dummy,
        mean, rstd, ln_w, ln_b, m, n, k, triton.next_power_of_2(m),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), res.stride(0), pre_t.stride(0),
        h_t.stride(0),
    )
    flags = {
        "LN_A": ln is not None,
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
    launch(_layernorm_mlp_gemm_tuned, grid, args, flags, fixed=fixed)


def _row_warps(block_c: int) -> int:
    return min(max(block_c // 256, 1), 8)


@on_inputs_device
def layernorm_mlp_fwd(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    residual: torch.Tensor | None,
    eps: float,
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward. x (..., C) with a contiguous last dim (rows may be strided); GEMMs run in fc1_weight's dtype.

    Returns ``(out, mean, rstd, pre)``: out (..., C_out) in the GEMM dtype promoted with the residual's, mean and
    rstd (M,) fp32, and pre (M, hidden) the pre-GELU activation in the GEMM dtype when ``save_pre`` else (0,).
    """
    c = x.shape[-1]
    hidden, c_out = fc1_weight.shape[0], fc2_weight.shape[0]
    cdt = fc1_weight.dtype
    x2 = _rows(x)
    m = x2.shape[0]
    out_dtype = cdt if residual is None else torch.promote_types(cdt, residual.dtype)
    dev = x.device

    mean = empty((m,), dtype=torch.float32, device=dev)
    rstd = empty((m,), dtype=torch.float32, device=dev)
    block_c = triton.next_power_of_2(c)
    _layernorm_mlp_stats_kernel[(m,)](x2, mean, rstd, c, x2.stride(0), eps, BLOCK_C=block_c,
                                      num_warps=_row_warps(block_c))

    h = empty((m, hidden), dtype=cdt, device=dev)
    pre = empty((m, hidden) if save_pre else (0,), dtype=cdt, device=dev)
    _gemm(x2, fc1_weight, h, bias=fc1_bias, pre=pre if save_pre else None, ln=(mean, rstd, ln_weight, ln_bias),
          epilogue=EPI_GELU, store_aux=save_pre)

    out = empty((*x.shape[:-1], c_out), dtype=out_dtype, device=dev)
    _gemm(h, fc2_weight, out.view(m, c_out), bias=fc2_bias, residual=None if residual is None else _rows(residual))
    return out, mean, rstd, pre


# The parameters repeat layernorm_mlp_fwd's: the custom op's schema passes every tensor explicitly.
@on_inputs_device
def layernorm_mlp_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    pre: torch.Tensor,
    grad_ln: bool,
    grad_fc1: bool,
    grad_fc2: bool,
) -> tuple[torch.Tensor, ...]:
    """Backward. Returns ``(dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias)``.

    ``grad_ln`` (x, ln_weight, ln_bias), ``grad_fc1`` and ``grad_fc2`` say which gradients to compute; the others
    come back as empty (0,) tensors. ``pre`` is the forward's saved pre-activation, or (0,) to recompute it.
    """
    c = x.shape[-1]
    hidden = fc1_weight.shape[0]
    cdt = fc1_weight.dtype
    dev = x.device
    x2 = _rows(x)
    m = x2.shape[0]
    dout2 = _rows(dout)
    nothing = torch.empty((0,), dtype=cdt, device=dev)
    dx = dln_w = dln_b = dw1 = db1 = dw2 = db2 = None
    ln = (mean, rstd, ln_weight, ln_bias)

    if pre.numel() == 0:  # the forward ran without saving it: recompute fc1 (its LN prologue, bias, no GELU)
        pre = empty((m, hidden), dtype=cdt, device=dev)
        _gemm(x2, fc1_weight, pre, bias=fc1_bias, ln=ln)

    h = None
    if grad_ln or grad_fc1:
        # dH = dout @ fc2_weight; the epilogue turns it into d(pre-activation) and, on the way, recomputes the
        # GELU output for fc2's weight gradient and fc1's bias gradient as partial column sums.
        da1 = empty((m, hidden), dtype=cdt, device=dev)
        h = empty((m, hidden), dtype=cdt, device=dev) if grad_fc2 else None
        db1_part = None
        if grad_fc1:
            db1_part = empty((triton.cdiv(m, BIAS_GRAD_ROWS), hidden), dtype=torch.float32, device=dev)
        _gemm(dout2, fc2_weight.t(), da1, pre=pre, h=h, dbias=db1_part, epilogue=EPI_GELU_BWD, store_aux=grad_fc2)
        if grad_fc1:
            db1 = db1_part.sum(0).to(fc1_bias.dtype)
    if grad_fc2:
        if h is None:
            h = torch.nn.functional.gelu(pre.float()).to(cdt)
        # Weight gradients through cuBLAS (torch.matmul); a fused Triton alternative is to be measured on GPU.
        dw2 = torch.matmul(dout2.to(cdt).t(), h)  # (C_out, hidden)
        db2 = dout2.sum(0, dtype=torch.float32).to(cdt)

    if grad_ln or grad_fc1:
        block_c = triton.next_power_of_2(c)
        programs = min(m, 1024)
        rows_per_program = triton.cdiv(m, programs)
        programs = triton.cdiv(m, rows_per_program)
        ln_out = empty((m, c), dtype=cdt, device=dev) if grad_fc1 else nothing
        dy = nothing
        dx_t = dw_part = db_part = nothing
        if grad_ln:
            dy = empty((m, c), dtype=torch.float32, device=dev)
            _gemm(da1, fc1_weight.t(), dy)  # d(LayerNorm output) = d(pre-activation) @ fc1_weight
            dx_t = empty(x.shape, dtype=x.dtype, device=dev)
            dw_part = empty((programs, c), dtype=torch.float32, device=dev)
            db_part = empty((programs, c), dtype=torch.float32, device=dev)
        _layernorm_mlp_bwd_kernel[(programs,)](
            dy, x2, ln_weight, ln_bias, mean, rstd, dx_t, ln_out, dw_part, db_part, m, c, x2.stride(0),
            rows_per_program, HAS_DY=grad_ln, STORE_LN=grad_fc1, BLOCK_C=block_c, num_warps=_row_warps(block_c),
        )
        if grad_ln:
            dx = dx_t
            dln_w = dw_part.sum(0).to(ln_weight.dtype)
            dln_b = db_part.sum(0).to(ln_bias.dtype)
        if grad_fc1:
            dw1 = torch.matmul(da1.t(), ln_out)  # (hidden, C), cuBLAS as for fc2's weight gradient

    # Skipped gradients come back as distinct empty tensors (outputs of a custom op may not alias each other).
    grads = (dx, dln_w, dln_b, dw1, db1, dw2, db2)
    dtypes = (x.dtype, ln_weight.dtype, ln_bias.dtype, cdt, fc1_bias.dtype, cdt, cdt)
    return tuple(
        g if g is not None else torch.empty((0,), dtype=d, device=dev) for g, d in zip(grads, dtypes, strict=True)
    )
