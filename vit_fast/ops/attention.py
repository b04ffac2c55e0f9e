"""Attention: softmax(q k^T * scale) v over (B, H, N, D) tensors, non-causal, no mask.

Two entry points of one dispatcher op: :func:`attention` on q, k, v, and :func:`attention_packed` on the packed
(B, N, 3, H, D) projection the model makes. The second has custom ops of its own whose backward returns the packed
gradient: the Triton and the CUDA kernels write dq, dk, dv into its slices, so the model's autograd graph holds
no stack/cat/copy of three gradients. Both take the backend :mod:`vit_fast.backends` picks for ``attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.backends import HALF, Facts, Limits
from vit_fast.ops import _checks
from vit_fast.ops._checks import upcast_dtype
from vit_fast.ops._custom_op import KernelOp, register_backend, triton_kernels

_kernels = triton_kernels("attention")  # None when the Triton kernels cannot load: the reason is recorded


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference attention through ``F.scaled_dot_product_attention``; differentiable, any device.

    With ``upcast=True`` the math runs in float32 (float64 stays float64) and the result keeps that dtype:
    it is the test oracle.

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


def _facts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0, **_: object) -> Facts:
    return Facts(gemm_dtype=_checks.matmul_dtype(q), head_dim=q.shape[-1], dropout_p=dropout_p)


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    q = torch.empty(2, 12, 197, 64, device="meta", dtype=dtype)  # ViT-B/16: (B, H, N, D)
    return (q, q, q), {"scale": None, "dropout_p": 0.0}


def _bucket(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: object) -> tuple[int, ...]:
    # the head dim picks the kernel variant, N its tiling, B * H how many tiles fill the GPU
    B, H, N, D = q.shape
    return D, backends.size_bucket(N), backends.size_bucket(B * H)


backends.declare("attention", attention_ref, _facts, _example, _bucket)


# ---- the kernel contract: forward (q, k, v, scale) -> (out, lse), backward -> (dq, dk, dv) ---------------------
#
# out and every gradient are (B, H, N, D) over (B, N, H, D) memory (so the model's transpose + reshape to
# (B, N, H*D) is a view); lse (B, H, N) is fp32, a saved statistic that is not differentiable.

FWD_SCHEMA = "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)"
BWD_SCHEMA = (
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
    "-> (Tensor, Tensor, Tensor)"
)


def _bhnd_over_bnhd(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like ``t`` (B, H, N, D), laid out as the kernels write: (B, N, H, D) memory."""
    B, H, N, D = t.shape
    return t.new_empty((B, N, H, D)).transpose(1, 2)  # (B, H, N, D)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward_for(bwd_op):
    def backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple:
        q, k, v, out, lse = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        if not (need_q or need_k or need_v):
            return None, None, None, None
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, ctx.scale)
        return (dq if need_q else None), (dk if need_k else None), (dv if need_v else None), None

    return backward


def _public_for(fwd_op):
    def run(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, dropout_p: float = 0.0
    ) -> torch.Tensor:
        dt = _checks.matmul_dtype(q)  # custom ops do not see autocast: cast as it would for SDPA
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        out, _lse = fwd_op(q, k, v, float(q.shape[-1] ** -0.5 if scale is None else scale))
        return out

    return run


# The fakes take the schemas' arguments (register_fake calls them positionally).
def _fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, _D = q.shape
    return _bhnd_over_bnhd(q), q.new_empty((B, H, N), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bhnd_over_bnhd(q), _bhnd_over_bnhd(q), _bhnd_over_bnhd(q)


ATTENTION = KernelOp(
    "attention", FWD_SCHEMA, _fwd_fake, _public_for, BWD_SCHEMA, _bwd_fake, _setup_context, _backward_for
)

TRITON_LIMITS = Limits(devices=("cuda", "cpu"), head_dims=range(16, 129), auto_gemm_dtypes=HALF)
CUDA_LIMITS = Limits(head_dims=(64, 80, 128), gemm_dtypes=HALF)  # the head dims the C++ kernels are instantiated for
if _kernels is not None:
    register_backend(ATTENTION, "triton", TRITON_LIMITS, fwd=_kernels.attention_fwd, bwd=_kernels.attention_bwd)
register_backend(ATTENTION, "cuda", CUDA_LIMITS)


# ---- the packed entry point: forward (qkv, scale) -> (out, lse), backward -> dqkv --------------------------------
#
# qkv is (B, N, 3, H, D), any strides; out and lse as above; dqkv (B, N, 3, H, D) contiguous, the gradient of qkv
# itself (the three unbind views' gradients are never stacked).

PACKED_FWD_SCHEMA = "(Tensor qkv, float scale) -> (Tensor, Tensor)"
PACKED_BWD_SCHEMA = "(Tensor dout, Tensor qkv, Tensor out, Tensor lse, float scale) -> Tensor"


def unpack_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (B, H, N, D) views of a packed (B, N, 3, H, D) tensor: no copy."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
    return q, k, v


def attention_packed_ref(qkv: torch.Tensor, *, scale: float | None = None, dropout_p: float = 0.0,
                         upcast: bool = False) -> torch.Tensor:
    """:func:`attention_ref` of the q, k, v views of ``qkv`` (B, N, 3, H, D)."""
    return attention_ref(*unpack_qkv(qkv), scale=scale, dropout_p=dropout_p, upcast=upcast)


def _packed_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    qkv, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _packed_backward_for(bwd_op):
    def backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple:
        qkv, out, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return bwd_op(dout, qkv, out, lse, ctx.scale), None

    return backward


def _packed_public_for(fwd_op):
    def run(qkv: torch.Tensor, *, scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
        qkv = qkv.to(_checks.matmul_dtype(qkv))  # custom ops do not see autocast: cast as it would for SDPA
        out, _lse = fwd_op(qkv, float(qkv.shape[-1] ** -0.5 if scale is None else scale))
        return out

    return run


def _packed_fwd_fake(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_fake(*unpack_qkv(qkv), scale)


def _packed_bwd_fake(dout, qkv, out, lse, scale) -> torch.Tensor:
    return qkv.new_empty(qkv.shape)  # (B, N, 3, H, D), contiguous


ATTENTION_PACKED = KernelOp(
    "attention_packed", PACKED_FWD_SCHEMA, _packed_fwd_fake, _packed_public_for, PACKED_BWD_SCHEMA, _packed_bwd_fake,
    _packed_setup_context, _packed_backward_for, variant_of="attention",
)
backends.register_variant("attention", "attention_packed", "reference", attention_packed_ref)
if _kernels is not None:
    register_backend(ATTENTION_PACKED, "triton", TRITON_LIMITS, fwd=_kernels.attention_fwd_packed,
                     bwd=_kernels.attention_bwd_packed)
register_backend(ATTENTION_PACKED, "cuda", CUDA_LIMITS)


def attention_packed(qkv: torch.Tensor, *, scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention of the packed projection the model makes, non-causal, no mask.

    Args:
        qkv: (B, N, 3, H, D), any strides: q, k, v = ``qkv[:, :, i].transpose(1, 2)`` for i = 0, 1, 2 (the qkv
            Linear's (B, N, 3 * H * D) output viewed so).
        scale: multiplies q k^T; defaults to D ** -0.5.
        dropout_p: attention-probability dropout (training only; the fused kernels take 0).

    Returns:
        (B, H, N, D), as :func:`attention` of those q, k, v, from the backend it would pick. The gradient of
        ``qkv`` comes back as one (B, N, 3, H, D) tensor (written in place by the Triton and CUDA kernels).
    """
    _checks.tensor("qkv", qkv, ndim=5)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, H, D); got {_checks.describe(qkv)}")
    q, k, v = unpack_qkv(qkv)
    _validate(q, k, v, scale, dropout_p)
    kwargs = {"scale": scale, "dropout_p": dropout_p}
    return backends.dispatch_variant("attention", "attention_packed", (q, k, v), kwargs, qkv, **kwargs)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
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
    return backends.dispatch("attention", q, k, v, scale=scale, dropout_p=dropout_p)
