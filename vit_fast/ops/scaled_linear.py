"""Quantized Linear layers as ops, so ``explain`` and ``backends.trace`` see them: the FP8 GEMM, the kernels
that produce its e4m3 input, and the CPU int8 GEMM.

- ``scaled_linear``: ``y = (x_q * x_scale) @ (w_q * w_scale)^T + bias`` with e4m3 operands, per-row (token)
  activation scales and per-output-channel weight scales, through ``torch._scaled_mm`` (cuBLASLt on CUDA; it
  also runs on CPU, slowly, which is what makes the FP8 numerics testable without a GPU). The activation may
  instead carry one scale per row and group of columns (x_scale (M, G)): what ``attention_fp8`` emits, one
  per (token, head). cuBLASLt has no such scaling at these group sizes: the Triton kernel runs it, and the
  reference dequantizes and multiplies in fp32.
- ``attention_fp8``: the attention forward leaving as the proj GEMM's e4m3 input, one scale per (token, head)
  (Triton: the ``OUT_FP8`` variant of the attention forward kernel).
- ``layer_norm_fp8``: LayerNorm whose output leaves as e4m3 plus one fp32 scale per row (Triton: the
  ``QUANT_FP8`` variant of the LayerNorm forward kernel).
- ``quantize_rows``: dynamic per-row e4m3 quantization, optionally of ``gelu(x)`` (Triton: one pass).
- ``int8_linear``: PyTorch's dynamic int8 Linear (fbgemm / x86 engine) on prepacked per-channel int8 weights.

These ops are inference only (no autograd). ``vit_fast.ops`` imports this module, so they are declared at
import with the model's four ops: the dispatcher's registry does not change when a model is first quantized.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.backends import Facts, Limits, dtype_name
from vit_fast.ops import _checks
from vit_fast.ops._custom_op import KernelOp, register_backend, triton_kernels
from vit_fast.ops.attention import _bucket as _attention_bucket
from vit_fast.ops.attention import _facts as _attention_facts
from vit_fast.ops.attention import _validate as _validate_attention
from vit_fast.ops.attention import attention_ref

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
FP8 = torch.float8_e4m3fn
FP8_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with FP8 tensor cores


# ---- references ---------------------------------------------------------------------------------------------------


def quantize_rows_ref(x: torch.Tensor, *, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) float rows (of ``gelu(x)`` with ``gelu``) -> (e4m3 (M, C), fp32 scale (M,)), ``q * scale ~= x``."""
    x = x.float()
    if gelu:
        x = F.gelu(x)
    scale = x.abs().amax(dim=1).clamp_min(1e-12) / E4M3_MAX  # (M,)
    return (x / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), scale


def layer_norm_fp8_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of the (M, C) rows in fp32, then :func:`quantize_rows_ref`."""
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return quantize_rows_ref(y)


def attention_fp8_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention (B, H, N, D) in q's dtype, then each (token, head) row of D values quantized:
    (e4m3 (B * N, H * D), fp32 scale (B * N, H)), the token-major rows the proj GEMM reads."""
    B, H, N, D = q.shape
    o = attention_ref(q, k, v, scale=scale)
    out, out_scale = quantize_rows_ref(o.transpose(1, 2).reshape(B * N * H, D))
    return out.view(B * N, H * D), out_scale.view(B * N, H)


def _fp8_product(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor,
                 weight_scale: torch.Tensor) -> torch.Tensor:
    """``(x_q * x_scale) @ (weight_q * weight_scale)^T`` in fp32, per group of columns: the e4m3 operands go into
    the matmul unscaled, so their products are exact (4 significant bits each, even on TF32 tensor cores) and
    the scales apply to the fp32 partial sums."""
    m, k = x_q.shape
    n = weight_q.shape[0]
    groups = (x_scale.unsqueeze(1) if x_scale.dim() == 1 else x_scale).float()  # (M, G); reshape(m, -1) fails at M = 0
    g = groups.shape[1]
    xg = x_q.float().view(m, g, k // g).transpose(0, 1)  # (G, M, K/G)
    wg = weight_q.float().view(n, g, k // g).permute(1, 2, 0)  # (G, K/G, N)
    return (torch.bmm(xg, wg) * groups.t()[..., None]).sum(0) * weight_scale.float()[None, :]


def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes row-wise scales (torch 2.11's takes per-tensor ones only)."""
    a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


# Probed once at import (a 16 x 16 product, under a millisecond): no release note says which torch added it, and
# a probe inside the op would be traced by torch.compile.
_CPU_ROWWISE = _cpu_rowwise_scaled_mm()


def scaled_linear_ref(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None, *, out_dtype: torch.dtype, upcast: bool = False) -> torch.Tensor:
    """The FP8 GEMM through ``torch._scaled_mm``. It takes the fp32 product of the e4m3 operands instead for
    per-group activation scales (x_scale (M, G), G > 1: no cuBLASLt scaling mode has 64-column groups), for an
    output other than bf16 on a GPU (cuBLASLt's row-wise FP8 GEMM writes bf16; fp32 only without a bias, and
    only on some GPUs), on a CPU whose ``_scaled_mm`` takes per-tensor scales only, and with ``upcast=True`` (the
    tests' oracle for how the scales are applied)."""
    grouped = x_scale.dim() == 2 and x_scale.shape[1] > 1
    if (upcast or grouped or (x_q.device.type == "cuda" and out_dtype != torch.bfloat16)
            or (x_q.device.type == "cpu" and not _CPU_ROWWISE)):
        y = _fp8_product(x_q, x_scale, weight_q, weight_scale)
        return (y if bias is None else y + bias.float()).to(out_dtype)
    # Row-wise scaling: (M, 1) for the activations, (1, N) for the weights; mat2 is column-major (w_q^T).
    return torch._scaled_mm(x_q, weight_q.t(), scale_a=_row_major(x_scale, (x_scale.numel(), 1)),
                            scale_b=_row_major(weight_scale, (1, weight_scale.numel())),
                            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)


def _row_major(scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``scale`` as ``shape`` with row-major strides, copied only when it has others: _scaled_mm checks them even
    on a size-1 dimension, where ``.contiguous()`` keeps whatever stride the view had."""
    scale = scale.reshape(shape)
    return scale if scale.stride() == (shape[1], 1) else scale.clone(memory_format=torch.contiguous_format)


def int8_linear_ref(x: torch.Tensor, packed: object, *, reduce_range: bool) -> torch.Tensor:
    """fbgemm's dynamic int8 Linear: ``x`` (M, K) float32 is quantized per call, the int8 GEMM accumulates in
    int32 and the result comes back float32 with the bias added. A row of ``x`` holding a NaN gives a NaN row,
    as the float Linear does (fbgemm's quantizer would read the NaN as a finite int8 value); so does a row holding
    both +inf and -inf, where the float Linear's sums are mostly NaN too."""
    out = torch.ops.quantized.linear_dynamic(x, packed, reduce_range)
    # One summing pass finds the NaN rows (isnan(x).any() writes and rereads an (M, K) mask), and the fresh
    # output is patched in place only when there are some: copying it cost as much as the int8 GEMM.
    nan_rows = torch.isnan(x.sum(-1))
    if nan_rows.any():
        out[nan_rows] = float("nan")
    return out


# ---- declarations -------------------------------------------------------------------------------------------------


def _width_facts(x: torch.Tensor, *args: object, **kwargs: object) -> Facts:
    return Facts(width=x.shape[-1])


def _gemm_facts(x_q: torch.Tensor, *args: object, **kwargs: object) -> Facts:
    return Facts(gemm_dtype=x_q.dtype)


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


_M, _C = 64 * 197, 768  # ViT-B/16 tokens at batch 64


def _example_quantize_rows(dtype: torch.dtype) -> tuple[tuple, dict]:
    return (_meta(_M, 4 * _C, dtype=dtype),), {"gelu": True}


def _example_layer_norm_fp8(dtype: torch.dtype) -> tuple[tuple, dict]:
    return (_meta(_M, _C, dtype=dtype), _meta(_C, dtype=dtype), _meta(_C, dtype=dtype)), {"eps": 1e-6}


def _example_scaled_linear(dtype: torch.dtype) -> tuple[tuple, dict]:
    f32 = torch.float32
    return ((_meta(_M, _C, dtype=FP8), _meta(_M, dtype=f32), _meta(3 * _C, _C, dtype=FP8), _meta(3 * _C, dtype=f32),
             _meta(3 * _C, dtype=dtype)), {"out_dtype": dtype})


def _example_attention_fp8(dtype: torch.dtype) -> tuple[tuple, dict]:
    q = _meta(64, 12, 197, 64, dtype=dtype)  # ViT-B/16 at batch 64: (B, H, N, D)
    return (q, q, q), {"scale": None}


def _example_int8_linear(dtype: torch.dtype) -> tuple[tuple, dict]:
    return (_meta(_M, _C, dtype=torch.float32), None), {"reduce_range": True}


def _rows_bucket(x: torch.Tensor, *args: object, **kwargs: object) -> tuple[int, ...]:
    return backends.size_bucket(x.shape[-1]), backends.size_bucket(x.shape[0])


def _gemm_bucket(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor, *args: object,
                 **kwargs: object) -> tuple[int, ...]:
    n, k = weight_q.shape
    return backends.size_bucket(n), backends.size_bucket(k), backends.size_bucket(x_q.shape[0])


backends.declare("quantize_rows", quantize_rows_ref, _width_facts, _example_quantize_rows, _rows_bucket)
backends.declare("layer_norm_fp8", layer_norm_fp8_ref, _width_facts, _example_layer_norm_fp8, _rows_bucket)
backends.declare("scaled_linear", scaled_linear_ref, _gemm_facts, _example_scaled_linear, _gemm_bucket)
backends.declare("attention_fp8", attention_fp8_ref, _attention_facts, _example_attention_fp8, _attention_bucket)
backends.declare("int8_linear", int8_linear_ref, lambda *a, **k: Facts(), _example_int8_linear, _rows_bucket)


# ---- kernel backends: inference-only custom ops, vit_fast::{op}_{backend} ------------------------------------------


# The fakes take the schemas' arguments (register_fake calls them positionally).
def _fp8_rows_fake(x: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[:1], dtype=torch.float32)


def _scaled_linear_fake(x_q, x_scale, weight_q, weight_scale, bias, out_dtype) -> torch.Tensor:  # noqa: ANN001
    return x_q.new_empty((x_q.shape[0], weight_q.shape[0]), dtype=out_dtype)


def _attention_fp8_fake(q, k, v, scale) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    B, H, N, D = q.shape
    return q.new_empty((B * N, H * D), dtype=FP8), q.new_empty((B * N, H), dtype=torch.float32)


def _attention_fp8_public(fwd_op: Callable) -> Callable:  # the scale's default depends on the head dim
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None):
        return fwd_op(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale))

    return run


# The public signatures (each spec's last lambda) are the ops': dispatch calls them with the user's keywords.
LAYER_NORM_FP8 = KernelOp("layer_norm_fp8", "(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor)",
                          _fp8_rows_fake, lambda op: lambda x, weight, bias, *, eps=1e-6: op(x, weight, bias, eps))
QUANTIZE_ROWS = KernelOp("quantize_rows", "(Tensor x, bool gelu) -> (Tensor, Tensor)",
                         _fp8_rows_fake, lambda op: lambda x, *, gelu=False: op(x, gelu))
SCALED_LINEAR = KernelOp("scaled_linear", "(Tensor x_q, Tensor x_scale, Tensor weight_q, Tensor weight_scale, "
                         "Tensor? bias, ScalarType out_dtype) -> Tensor",
                         _scaled_linear_fake, lambda op: lambda *tensors, out_dtype: op(*tensors, out_dtype))
ATTENTION_FP8 = KernelOp("attention_fp8", "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)",
                         _attention_fp8_fake, _attention_fp8_public)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


_ln = triton_kernels("layer_norm")
_qr = triton_kernels("quantize_rows")
if _ln is not None and _qr is not None:

    def _layer_norm_fp8_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        return _ln.layer_norm_fwd_fp8(_unit_stride(x), weight.contiguous(), bias.contiguous(), eps)

    def _quantize_rows_triton(x: torch.Tensor, gelu: bool):
        return _qr.quantize_rows_fwd(_unit_stride(x), gelu)

    _FP8_LIMITS = Limits(devices=("cuda", "cpu"), max_width=_qr.MAX_C, width_note="rows are held in registers",
                         min_capability=FP8_CAPABILITY)
    register_backend(LAYER_NORM_FP8, "triton", _FP8_LIMITS, fwd=_layer_norm_fp8_triton)
    register_backend(QUANTIZE_ROWS, "triton", _FP8_LIMITS, fwd=_quantize_rows_triton)

_sg = triton_kernels("scaled_gemm")
if _sg is not None:

    def _scaled_linear_triton(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor,
                              weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype):
        return _sg.scaled_gemm(_unit_stride(x_q), x_scale, _unit_stride(weight_q), weight_scale, bias, out_dtype)

    # fp32 accumulation: no float64 output or bias
    register_backend(SCALED_LINEAR, "triton",
                     Limits(devices=("cuda", "cpu"), dtypes=(FP8, torch.float32, torch.float16, torch.bfloat16),
                            min_capability=FP8_CAPABILITY),
                     fwd=_scaled_linear_triton)

_at = triton_kernels("attention")
if _at is not None:
    register_backend(ATTENTION_FP8, "triton",
                     Limits(devices=("cuda", "cpu"), head_dims=range(16, 129), min_capability=FP8_CAPABILITY),
                     fwd=_at.attention_fwd_fp8)


# ---- public functions ---------------------------------------------------------------------------------------------


def _rows(name: str, x: object) -> torch.Tensor:
    _checks.tensor(name, x, ndim=2)
    return x


def quantize_rows(x: torch.Tensor, *, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row e4m3 quantization.

    Args:
        x: (M, C) float.
        gelu: quantize ``gelu(x)`` (exact, erf) instead: the GELU and the quantization are one pass.

    Returns:
        q (M, C) float8_e4m3fn and scale (M,) float32, with ``q * scale[:, None] ~= x``.
    """
    return backends.dispatch("quantize_rows", _rows("x", x), gelu=gelu)


def layer_norm_fp8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm whose output is the e4m3 input of an FP8 GEMM.

    Args:
        x: (M, C) float; weight, bias: (C,).

    Returns:
        q (M, C) float8_e4m3fn and scale (M,) float32: ``q * scale[:, None] ~= layer_norm(x)``.
    """
    _rows("x", x)
    _checks.shape("weight", _checks.tensor("weight", weight, ndim=1), (x.shape[1],), "(the last dimension of x)")
    _checks.shape("bias", _checks.tensor("bias", bias, ndim=1), (x.shape[1],), "(the last dimension of x)")
    _checks.same_device(x=x, weight=weight, bias=bias)
    if not eps > 0:
        raise ValueError(f"eps must be positive; got {eps!r}")
    return backends.dispatch("layer_norm_fp8", x, weight, bias, eps=eps)


def scaled_linear(x_q: torch.Tensor, x_scale: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, *, out_dtype: torch.dtype) -> torch.Tensor:
    """FP8 Linear: ``(x_q * x_scale[:, None]) @ (weight_q * weight_scale[:, None])^T + bias``.

    Args:
        x_q: (M, K) float8_e4m3fn; x_scale: (M,) float32, one scale per row, or (M, G), one per row and group
            of K / G consecutive columns (K / G a multiple of 16).
        weight_q: (N, K) float8_e4m3fn (nn.Linear layout); weight_scale: (N,) float32.
        bias: (N,) or None. On CUDA, K and N must be multiples of 16 (cuBLASLt).
        out_dtype: the output's dtype (bfloat16 on CUDA: row-wise scaling gives bf16).

    Returns:
        (M, N) in ``out_dtype``.
    """
    for name, t, dtype in (("x_q", x_q, FP8), ("weight_q", weight_q, FP8), ("x_scale", x_scale, torch.float32),
                           ("weight_scale", weight_scale, torch.float32)):
        if _checks.tensor(name, t).dtype != dtype:  # _scaled_mm's row-wise scaling takes exactly these
            raise TypeError(f"{name} must be {dtype_name(dtype)}; got {_checks.describe(t)}")
    m, k = _checks.tensor("x_q", x_q, ndim=2).shape
    _checks.shape("weight_q", weight_q, (None, k), "(N, K): nn.Linear layout with K = x_q's columns")
    if x_scale.dim() == 2 and x_scale.shape[0] == m and x_scale.shape[1] > 1:
        g = x_scale.shape[1]
        if k % g or (k // g) % 16:
            raise ValueError(f"x_scale (M, G) = {tuple(x_scale.shape)} needs G to divide K = {k} into groups of a "
                             f"multiple of 16 columns")
    else:
        _checks.shape("x_scale", x_scale, (m,), "(M,): one scale per row of x_q, or (M, G): per group of columns")
    _checks.shape("weight_scale", weight_scale, (weight_q.shape[0],), "(N,): one scale per output channel")
    if _checks.optional("bias", bias) is not None:
        _checks.shape("bias", bias, (weight_q.shape[0],), "(N,): one per output channel")
    _checks.same_device(x_q=x_q, x_scale=x_scale, weight_q=weight_q, weight_scale=weight_scale, bias=bias)
    return backends.dispatch("scaled_linear", x_q, x_scale, weight_q, weight_scale, bias, out_dtype=out_dtype)


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention whose output leaves as the e4m3 input of the FP8 proj GEMM (inference).

    Args:
        q, k, v: (B, H, N, D), one float dtype and device, any strides (views of the qkv projection).
        scale: multiplies q k^T; defaults to D ** -0.5.

    Returns:
        out (B * N, H * D) float8_e4m3fn, token-major, and out_scale (B * N, H) float32, one scale per
        (token, head): ``out[t, h*D:(h+1)*D] * out_scale[t, h]`` ~= the attention output of head h at token t.
        Pass both to :func:`scaled_linear`.
    """
    _validate_attention(q, k, v, scale, 0.0)
    return backends.dispatch("attention_fp8", q, k, v, scale=scale)


def int8_linear(x: torch.Tensor, packed: object, *, reduce_range: bool) -> torch.Tensor:
    """Dynamic int8 Linear on CPU.

    Args:
        x: (M, K) float32.
        packed: ``torch.ops.quantized.linear_prepack(per-channel qint8 weight (N, K), float32 bias (N,))``.
        reduce_range: 7-bit activations (what fbgemm's x86 kernels need to avoid int16 overflow).

    Returns:
        (M, N) float32.
    """
    _checks.tensor("x", x, ndim=2)
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"x must be float32 on CPU (int8_linear runs fbgemm's float32-activation kernels); "
                        f"got {_checks.describe(x)}")
    if not isinstance(packed, torch.ScriptObject):
        raise TypeError(f"packed must be torch.ops.quantized.linear_prepack's result; got {type(packed).__name__}")
    return backends.dispatch("int8_linear", x, packed, reduce_range=reduce_range)


__all__ = ["E4M3_MAX", "FP8", "FP8_CAPABILITY", "attention_fp8", "attention_fp8_ref", "int8_linear", "int8_linear_ref",
           "layer_norm_fp8", "layer_norm_fp8_ref", "quantize_rows", "quantize_rows_ref", "scaled_linear",
           "scaled_linear_ref"]
