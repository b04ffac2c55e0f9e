"""Attention: softmax(q k^T * scale) v over (B, H, N, D) tensors, non-causal, no mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit_fast import backends
from vit_fast.ops import _checks
from vit_fast.ops._checks import upcast_dtype


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
    """
    if upcast:
        dt = upcast_dtype(q.dtype)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


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


def _example(dtype: torch.dtype) -> tuple[tuple, dict]:
    q = torch.empty(2, 12, 197, 64, device="meta", dtype=dtype)  # ViT-B/16: (B, H, N, D)
    return (q, q, q), {"scale": None, "dropout_p": 0.0}


backends.declare("attention", _example)
backends.register("attention", "reference")(attention_ref)


# ---- Triton: custom ops, fakes, the shared autograd rule, the backend entry -------------------------------------
#
# The forward op returns (out, lse): out (B, H, N, D) over (B, N, H, D) memory, lse (B, H, N) fp32. The backward
# op returns (dq, dk, dv), each (B, H, N, D) over (B, N, H, D) memory. Another backend registering ops
# ``vit_fast::attention_fwd`` / ``attention_bwd`` with the same signatures reuses _setup_context and
# _backward_for.


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
    """The autograd backward of a forward op (q, k, v, scale) -> (out, lse), given its backward op
    (dout, q, k, v, out, lse, scale) -> (dq, dk, dv). lse is a saved statistic, not differentiable."""

    def backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple:
        q, k, v, out, lse = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        if not (need_q or need_k or need_v):
            return None, None, None, None
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, ctx.scale)
        return (dq if need_q else None), (dk if need_k else None), (dv if need_v else None), None

    return backward


def _resolve_scale(q: torch.Tensor, scale: float | None) -> float:
    return float(q.shape[-1] ** -0.5 if scale is None else scale)


def _fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake of every backend's forward op: out (B, H, N, D) over (B, N, H, D) memory, lse (B, H, N) fp32."""
    B, H, N, _D = q.shape
    return _bhnd_over_bnhd(q), q.new_empty((B, H, N), dtype=torch.float32)


def _bwd_fake(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake of every backend's backward op: dq, dk, dv (B, H, N, D) over (B, N, H, D) memory."""
    return _bhnd_over_bnhd(q), _bhnd_over_bnhd(q), _bhnd_over_bnhd(q)


def _public_for(fwd_op):
    """The public op's signature over a backend's forward op."""

    def run(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, dropout_p: float = 0.0
    ) -> torch.Tensor:
        dt = _checks.matmul_dtype(q)  # custom ops do not see autocast: cast as it would for SDPA
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        out, _lse = fwd_op(q, k, v, _resolve_scale(q, scale))
        return out

    return run


try:
    from vit_fast.kernels import attention as _kernels
except Exception as e:  # any import failure (no triton, a broken install, an old triton) disables the backend
    backends.mark_unavailable("triton", f"vit_fast.kernels.attention failed to import: {e}")
else:

    @torch.library.custom_op("vit_fast::attention_fwd_triton", mutates_args=())
    def _attention_fwd_triton(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _kernels.attention_fwd(q, k, v, scale)

    _attention_fwd_triton.register_fake(_fwd_fake)

    @torch.library.custom_op("vit_fast::attention_bwd_triton", mutates_args=())
    def _attention_bwd_triton(
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _kernels.attention_bwd(dout, q, k, v, out, lse, scale)

    _attention_bwd_triton.register_fake(_bwd_fake)

    torch.library.register_autograd(
        "vit_fast::attention_fwd_triton",
        _backward_for(torch.ops.vit_fast.attention_bwd_triton),
        setup_context=_setup_context,
    )

    def _triton_check(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, dropout_p: float = 0.0
    ) -> list[str]:
        why = []
        if dropout_p > 0:
            why.append("dropout_p > 0 not supported")
        if not 16 <= q.shape[-1] <= 128:
            why.append(f"head dim {q.shape[-1]} outside 16..128")
        return why

    _attention_triton = backends.register("attention", "triton", check=_triton_check)(
        _public_for(torch.ops.vit_fast.attention_fwd_triton)
    )


# ---- CUDA C++ backend (vit_fast._C): same fakes and autograd rule as Triton's ----------------------------------

_CUDA_HEAD_DIMS = (64, 80, 128)  # the head dims the tensor-core kernels are instantiated for

if hasattr(torch.ops.vit_fast, "attention_fwd"):  # the extension loaded and defined the ops
    torch.library.register_fake("vit_fast::attention_fwd", _fwd_fake)
    torch.library.register_fake("vit_fast::attention_bwd", _bwd_fake)
    torch.library.register_autograd(
        "vit_fast::attention_fwd", _backward_for(torch.ops.vit_fast.attention_bwd), setup_context=_setup_context
    )

    def _cuda_check(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, dropout_p: float = 0.0
    ) -> list[str]:
        why = []
        if dropout_p > 0:
            why.append("dropout_p > 0 not supported")
        if q.shape[-1] not in _CUDA_HEAD_DIMS:
            why.append(f"head dim {q.shape[-1]} not in {', '.join(map(str, _CUDA_HEAD_DIMS))}")
        return why + _checks.tensor_core_reasons(_checks.matmul_dtype(q))

    _attention_cuda = backends.register("attention", "cuda", check=_cuda_check)(
        _public_for(torch.ops.vit_fast.attention_fwd)
    )


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
        (B, H, N, D) = softmax(q k^T * scale) v, in q's dtype.
    """
    _validate(q, k, v, scale, dropout_p)
    return backends.select("attention", q, k, v, scale=scale, dropout_p=dropout_p)(
        q, k, v, scale=scale, dropout_p=dropout_p
    )
