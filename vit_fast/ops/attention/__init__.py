"""Attention: softmax(q k^T * scale) v over (B, H, N, D) tensors, non-causal, no mask, in three entry points:

- :func:`attention` on q, k, v;
- :func:`attention_packed` on the packed (B, N, 3, H, D) projection the model makes: custom ops of its own whose
  backward writes dq, dk, dv into one packed gradient (the model's autograd graph holds no stack of three), and
  the policy rows of ``attention`` (the same computation);
- :func:`attention_fp8` (inference): the output leaves as the e4m3 input of the FP8 proj GEMM.

The suites' data of all three (inputs, layouts, NaN and bad cases, the strategies, the benchmark) is in
:mod:`vit_fast.ops.attention.cases`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.backends import HALF, Call, Facts, Limits
from vit_fast.ops import _checks
from vit_fast.ops._checks import upcast_dtype
from vit_fast.ops._fp8 import FP8, FP8_CAPABILITY, quantize_rows_ref
from vit_fast.ops._inputs import meta
from vit_fast.ops.spec import Contract, OpSpec, declare, register_backend, triton_kernels

_kernels = triton_kernels("attention")  # None when the Triton kernels cannot load: the reason is recorded


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                  dropout_p: float = 0.0, *, upcast: bool = False) -> torch.Tensor:
    """Reference attention through ``F.scaled_dot_product_attention``; differentiable, any device.

    With ``upcast=True`` the math runs in float32 (float64 stays float64) and the result keeps that dtype.

    NaN follows the formula: a NaN (or inf) in row i of q makes output row i NaN, one in any row of k makes
    every output row of that (batch, head) NaN, one in column d of a row of v makes column d of every output
    row NaN. PyTorch's CPU flash kernel (its math kernel does not) returns finite rows for a NaN or inf in q
    when the keys fit in its scalar tail (N below the vector width: 8 fp32 lanes on AVX2, 16 on AVX-512) and at
    many lengths in fp16/bf16, and drops a NaN of q or k when there is a single key; there a term of value zero
    carries it through. The term is one pass over q, about 1 % of the attention at ViT lengths in fp32, so
    fp32 and fp64 pay it only below 32 keys.
    """
    if upcast:
        dt = upcast_dtype(q.dtype)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if q.device.type == "cpu":
        n = k.shape[-2]
        if n == 1:  # the one score decides: exp(s - s) is NaN exactly when s is not finite
            out = out + (q * k).sum(-1, keepdim=True) * 0
        elif n < 32 or q.dtype in (torch.float16, torch.bfloat16):
            out = out + q.sum(-1, keepdim=True) * 0
    return out


def unpack_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (B, H, N, D) views of a packed (B, N, 3, H, D) tensor: no copy."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
    return q, k, v


def attention_packed_ref(qkv: torch.Tensor, scale: float | None = None, dropout_p: float = 0.0, *,
                         upcast: bool = False) -> torch.Tensor:
    """:func:`attention_ref` of the q, k, v views of ``qkv`` (B, N, 3, H, D)."""
    return attention_ref(*unpack_qkv(qkv), scale, dropout_p, upcast=upcast)


def attention_fp8_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention (B, H, N, D) in q's dtype, then each token's row of H * D values quantized: (e4m3 (B * N, H * D),
    fp32 scale (B * N,)): the row-wise input of cuBLASLt's FP8 GEMM (one quantizing pass, as a kernel would not
    leave the attention output in e4m3 by itself)."""
    B, H, N, D = q.shape
    o = attention_ref(q, k, v, scale)
    return quantize_rows_ref(o.transpose(1, 2).reshape(B * N, H * D))


# ---- validation and calls ---------------------------------------------------------------------------------------


def _validate(q: object, k: object, v: object, scale: float | None, dropout_p: float) -> None:
    _checks.tensor("q", q, ndim=4)
    _checks.tensor("k", k, ndim=4)
    _checks.tensor("v", v, ndim=4)
    _checks.same_device(q=q, k=k, v=v)
    _checks.same_dtype(q=q, k=k, v=v)
    _checks.shape("k", k, tuple(q.shape), "(the shape of q, (B, H, N, D))")
    _checks.shape("v", v, tuple(q.shape), "(the shape of q, (B, H, N, D))")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None; got {scale!r}")
    _checks.probability("dropout_p", dropout_p)


def _scale(d: int, scale: float | None) -> float:
    return float(d**-0.5 if scale is None else scale)


def _call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
          dropout_p: float = 0.0) -> Call:
    dt = _checks.matmul_dtype(q)  # custom ops do not see autocast: cast as it would for SDPA
    return Call((q.to(dt), k.to(dt), v.to(dt), _scale(q.shape[-1], scale)), extras={"dropout_p": dropout_p})


def _packed_call(qkv: torch.Tensor, *, scale: float | None = None, dropout_p: float = 0.0) -> Call:
    return Call((qkv.to(_checks.matmul_dtype(qkv)), _scale(qkv.shape[-1], scale)), extras={"dropout_p": dropout_p})


def _fp8_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> Call:
    return Call((q, k, v, _scale(q.shape[-1], scale)))


def _facts(call: Call) -> Facts:
    q = call.args[0]
    return Facts(gemm_dtype=q.dtype, head_dim=q.shape[-1], dropout_p=call.extras.get("dropout_p", 0.0))


def _bucket(call: Call) -> tuple[int, ...]:
    # the head dim picks the kernel variant, N its tiling, B * H how many tiles fill the GPU
    B, H, N, D = call.args[0].shape
    return D, backends.size_bucket(N), backends.size_bucket(B * H)


def _packed_bucket(call: Call) -> tuple[int, ...]:
    B, N, _, H, D = call.args[0].shape
    return D, backends.size_bucket(N), backends.size_bucket(B * H)


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    q = meta(2, 12, 197, 64, dtype=dtype)  # ViT-B/16 heads: (B, H, N, D)
    return (q, q, q), {"scale": None}


# ---- the kernel contracts ---------------------------------------------------------------------------------------
#
# attention: forward (q, k, v, scale) -> (out, lse), backward -> (dq, dk, dv); packed: forward (qkv, scale) ->
# (out, lse), backward -> dqkv. out and every gradient of q, k, v are (B, H, N, D) over (B, N, H, D) memory (so the
# model's transpose + reshape to (B, N, H*D) is a view); dqkv is (B, N, 3, H, D) contiguous; lse (B, H, N) is fp32,
# a saved statistic that is not differentiable. fp8: forward (q, k, v, scale) -> (e4m3 (B*N, H*D), fp32 (B*N, H)).


def _bhnd_over_bnhd(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like ``t`` (B, H, N, D), laid out as the kernels write: (B, N, H, D) memory."""
    B, H, N, D = t.shape
    return t.new_empty((B, N, H, D)).transpose(1, 2)  # (B, H, N, D)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    *tensors, scale = inputs
    out, lse = output
    ctx.save_for_backward(*tensors, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward_for(bwd_op):
    def backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple:
        q, k, v, out, lse = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if not any(need):
            return None, None, None, None
        grads = bwd_op(dout, q, k, v, out, lse, ctx.scale)
        return (*(g if n else None for g, n in zip(grads, need, strict=True)), None)

    return backward


def _packed_backward_for(bwd_op):
    def backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple:
        qkv, out, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return bwd_op(dout, qkv, out, lse, ctx.scale), None

    return backward


# The fakes take the schemas' arguments (register_fake calls them positionally).
def _fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, _D = q.shape
    return _bhnd_over_bnhd(q), q.new_empty((B, H, N), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bhnd_over_bnhd(q), _bhnd_over_bnhd(q), _bhnd_over_bnhd(q)


def _packed_fwd_fake(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_fake(*unpack_qkv(qkv), scale)


def _packed_bwd_fake(dout, qkv, out, lse, scale) -> torch.Tensor:
    return qkv.new_empty(qkv.shape)  # (B, N, 3, H, D), contiguous


def _fp8_fake(q, k, v, scale) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    B, H, N, D = q.shape
    return q.new_empty((B * N, H * D), dtype=FP8), q.new_empty((B * N, H), dtype=torch.float32)


CONTRACT = Contract("(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)", _fwd_fake, result=0,
                    bwd_schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
                               "-> (Tensor, Tensor, Tensor)",
                    bwd_fake=_bwd_fake, setup_context=_setup_context, backward=_backward_for)
PACKED_CONTRACT = Contract("(Tensor qkv, float scale) -> (Tensor, Tensor)", _packed_fwd_fake, result=0,
                           bwd_schema="(Tensor dout, Tensor qkv, Tensor out, Tensor lse, float scale) -> Tensor",
                           bwd_fake=_packed_bwd_fake, setup_context=_setup_context,
                           backward=_packed_backward_for)
FP8_CONTRACT = Contract("(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)", _fp8_fake)


# ---- public functions -------------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention, non-causal, no mask.

    Args:
        q, k, v: (B, H, N, D), one dtype and device, any strides (views of a packed qkv projection
            output are read in place).
        scale: multiplies q k^T; defaults to D ** -0.5.
        dropout_p: attention-probability dropout (training only; the fused kernels take 0).

    Returns:
        (B, H, N, D) = softmax(q k^T * scale) v, in q's dtype. A NaN in row i of q gives NaN in output row i;
        one in k, every row of that (batch, head); one in column d of v, column d of every row; in every backend.
    """
    _validate(q, k, v, scale, dropout_p)
    return backends.dispatch("attention", _call(q, k, v, scale=scale, dropout_p=dropout_p))


def attention_packed(qkv: torch.Tensor, *, scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention of the packed projection the model makes, non-causal, no mask.

    Args:
        qkv: (B, N, 3, H, D), any strides: q, k, v = ``qkv[:, :, i].transpose(1, 2)`` for i = 0, 1, 2 (the qkv
            Linear's (B, N, 3 * H * D) output viewed so).
        scale: multiplies q k^T; defaults to D ** -0.5.
        dropout_p: attention-probability dropout (training only; the fused kernels take 0).

    Returns:
        (B, H, N, D), as :func:`attention` of those q, k, v. The gradient of ``qkv`` comes back as one
        (B, N, 3, H, D) tensor (written in place by the Triton and CUDA kernels).
    """
    _checks.tensor("qkv", qkv, ndim=5)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, H, D); got {_checks.describe(qkv)}")
    _validate(*unpack_qkv(qkv), scale, dropout_p)
    return backends.dispatch("attention_packed", _packed_call(qkv, scale=scale, dropout_p=dropout_p))


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention whose output leaves as the e4m3 input of the FP8 proj GEMM (inference): the route from the
    attention to proj, whichever backend runs it.

    Args:
        q, k, v: (B, H, N, D), one float dtype and device, any strides (views of the qkv projection).
        scale: multiplies q k^T; defaults to D ** -0.5.

    Returns:
        out (B * N, H * D) float8_e4m3fn, token-major, and its scales: (B * N, H) float32, one per (token, head),
        from the Triton kernel (each of its programs sees one head of a token), or (B * N,), one per token, from the
        reference (attention, then one quantizing pass). ``out[t, h*D:(h+1)*D] * scale[t, h]`` (or ``scale[t]``)
        ~= the attention output of head h at token t. Pass both to :func:`~vit_fast.ops.scaled_linear`: its
        per-group kernel takes the first, cuBLASLt's row-wise FP8 GEMM the second.
    """
    _validate(q, k, v, scale, 0.0)
    return backends.dispatch("attention_fp8", _fp8_call(q, k, v, scale=scale))


# ---- the declarations and the kernel backends -------------------------------------------------------------------

from vit_fast.ops.attention import cases as _cases  # noqa: E402 - the cases read the references above

ATTENTION = declare(OpSpec("attention", attention, attention_ref, _call, _facts, _bucket, _example, CONTRACT,
                           _cases.ATTENTION, _cases.BENCH))
ATTENTION_PACKED = declare(OpSpec(
    "attention_packed", attention_packed, attention_packed_ref, _packed_call,
    lambda call: _facts(Call(unpack_qkv(call.args[0]), extras=call.extras)), _packed_bucket,
    lambda dtype: ((meta(2, 197, 3, 12, 64, dtype=dtype),), {"scale": None}), PACKED_CONTRACT,
    _cases.ATTENTION_PACKED, policy_op="attention"))
ATTENTION_FP8 = declare(OpSpec("attention_fp8", attention_fp8, attention_fp8_ref, _fp8_call, _facts, _bucket,
                               _example, FP8_CONTRACT, _cases.ATTENTION_FP8, _cases.FP8_BENCH))

TRITON_LIMITS = Limits(devices=("cuda", "cpu"), head_dims=range(16, 129), auto_gemm_dtypes=HALF)
CUDA_LIMITS = Limits(head_dims=(64, 80, 128), gemm_dtypes=HALF)  # the head dims the C++ kernels are instantiated for
if _kernels is not None:
    register_backend(ATTENTION, "triton", TRITON_LIMITS, fwd=_kernels.attention_fwd, bwd=_kernels.attention_bwd)
    register_backend(ATTENTION_PACKED, "triton", TRITON_LIMITS, fwd=_kernels.attention_fwd_packed,
                     bwd=_kernels.attention_bwd_packed)
    register_backend(ATTENTION_FP8, "triton", Limits(devices=("cuda", "cpu"), head_dims=range(16, 129),
                                                     min_capability=FP8_CAPABILITY), fwd=_kernels.attention_fwd_fp8)
register_backend(ATTENTION, "cuda", CUDA_LIMITS)
register_backend(ATTENTION_PACKED, "cuda", CUDA_LIMITS)
