"""Quantized inference: ``quantize(model, "fp8" | "int8")`` turns a vit_fast ViT's Linear layers (qkv, proj,
fc1, fc2; the head on request) into FP8 or int8 GEMMs, and :func:`save_quantized` / :func:`load_quantized`
keep a quantized model with its scales in one safetensors file.

fp8 (CUDA compute capability >= 8.9; on CPU too, slowly, to check numerics): weights e4m3 with one fp32 scale
per output channel, activations e4m3 with one dynamic scale per token, GEMMs through ``torch._scaled_mm``
(cuBLASLt), outputs in the model's dtype (bfloat16 on CUDA). The GEMM inputs are produced quantized: the
LayerNorms before qkv and fc1 write e4m3 + scales (``layer_norm_fp8``), and fc1's output goes through one
GELU-and-quantize pass (``quantize_rows(gelu=True)``). The attention output leaves the attention kernel as
e4m3 (``attention_fp8``) with one scale per (token, head), and proj runs as a GEMM with per-group activation
scales (``scaled_linear``'s Triton kernel): each attention program sees one head of a token, so it cannot make
the token's row-wise scale. Where the dispatcher would not run both of those on kernels (CPU under ``auto``,
a GPU before its policy measures them), the attention output goes through one quantize pass and proj through
cuBLASLt's row-wise FP8 GEMM instead.

int8 (CPU): weights int8 per output channel (symmetric), activations quantized dynamically per call by
PyTorch's fbgemm/x86 dynamic Linear (``torch.ops.quantized.linear_dynamic``): one scale per GEMM input
tensor, not per token, which is what that kernel supports. It is the fast CPU path measured here; torchao's
per-token int8 (Int8DynamicActivationInt8WeightConfig) runs through ``torch._int_mm``, which is 5x slower than
fp32 on this CPU in eager mode.

The quantized model is a :class:`~vit_fast.VisionTransformer` whose blocks are :class:`QuantizedBlock`: the
same module and parameter names (``blocks.0.attn.qkv.weight`` is now e4m3 or int8, next to
``blocks.0.attn.qkv.weight_scale``), inference only.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit_fast import backends, ops
from vit_fast.config import ViTConfig
from vit_fast.model import Block, VisionTransformer

FORMATS: tuple[str, ...] = ("fp8", "int8")
_INT8_ENGINES = ("x86", "fbgemm", "onednn")


class UnsupportedFormatError(RuntimeError):
    """The requested quantization format cannot run on the model's device."""


def _q():
    """The quantized ops' module (declared at import by ``vit_fast.ops``, like the model's ops)."""
    return ops.scaled_linear


def supported_formats(device: torch.device | str) -> dict[str, str | None]:
    """format -> None when it runs on ``device``, else why not."""
    device = torch.device(device)
    out: dict[str, str | None] = {}
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        out["fp8"] = None if cap >= (8, 9) else (
            f"fp8 needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper); this GPU is {cap[0]}.{cap[1]}")
        out["int8"] = ("int8 runs on CPU only (PyTorch's fbgemm/x86 int8 kernels); on CUDA use fp8 "
                       "(compute capability >= 8.9) or bfloat16")
    elif device.type == "cpu":
        out["fp8"] = None  # torch._scaled_mm runs on CPU (slowly): for tests and numerics checks
        engines = [e for e in torch.backends.quantized.supported_engines if e in _INT8_ENGINES]
        out["int8"] = None if engines else "no int8 engine (fbgemm/x86/onednn) in this PyTorch build"
    else:
        out = {f: f"device {device.type} not supported (cpu, cuda)" for f in FORMATS}
    return out


def check_supported(fmt: str, device: torch.device | str) -> None:
    """Raise :class:`UnsupportedFormatError` (saying what is supported) when ``fmt`` cannot run on ``device``."""
    if fmt not in FORMATS:
        raise ValueError(f"quantization format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    formats = supported_formats(device)
    if formats[fmt] is not None:
        runs = [f for f, why in formats.items() if why is None]
        raise UnsupportedFormatError(f"{formats[fmt]} (on {torch.device(device)} these run: "
                                     f"{', '.join(runs) or 'none'})")


# ---- layers -------------------------------------------------------------------------------------------------------


class QuantizedRows(NamedTuple):
    """An activation already quantized by the kernel that produced it: e4m3 rows with one scale per row."""

    q: torch.Tensor  # (M, C) float8_e4m3fn
    scale: torch.Tensor  # (M,) float32, or (M, G): one per row and group of C / G columns
    shape: tuple[int, ...]  # the activation's shape (..., C)
    dtype: torch.dtype  # the activation's dtype: the GEMM's output dtype


class _QuantizedLinear(nn.Module):
    """Shared by both formats: the quantized weight and its scales keep their dtypes through ``model.to(dtype)``
    (which would otherwise cast e4m3 weights and fp32 scales like any float tensor)."""

    _KEEP_DTYPE = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        kept = {n: getattr(self, n) for n in self._KEEP_DTYPE}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def _channel_scales(weight: torch.Tensor, qmax: float) -> torch.Tensor:
    return weight.detach().float().abs().amax(dim=1).clamp_min(1e-12) / qmax  # (N,)


class Fp8Linear(_QuantizedLinear):
    """``nn.Linear`` as an FP8 GEMM: e4m3 weight (N, K) with per-output-channel fp32 scales. Takes a float
    tensor (quantized per row on the way in, of ``gelu(x)`` with ``gelu=True``) or :class:`QuantizedRows`."""

    format = "fp8"

    def __init__(self, in_features: int, out_features: int, device: torch.device | None = None) -> None:
        super().__init__(in_features, out_features)
        # cuBLASLt wants N % 16 == 0: pad the output channels with zero rows, slice them off the output
        n = -(-out_features // 16) * 16
        self.register_buffer("weight", torch.zeros(n, in_features, dtype=_q().FP8, device=device))
        self.register_buffer("weight_scale", torch.ones(n, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(n, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        if linear.in_features % 16:
            raise ValueError(f"fp8 needs in_features divisible by 16 (cuBLASLt); got {linear.in_features}")
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, device=w.device)
        scale = _channel_scales(w, _q().E4M3_MAX)
        n = linear.out_features
        m.weight[:n] = (w.float() / scale[:, None]).clamp(-_q().E4M3_MAX, _q().E4M3_MAX).to(_q().FP8)
        m.weight_scale[:n] = scale
        m.bias = m.bias.to(w.dtype)
        if linear.bias is not None:
            m.bias[:n] = linear.bias.detach()
        return m

    def forward(self, x: torch.Tensor | QuantizedRows, gelu: bool = False) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            rows = x.reshape(-1, x.shape[-1])  # (M, K)
            q, scale = _q().quantize_rows(rows, gelu=gelu)
            x = QuantizedRows(q, scale, tuple(x.shape), x.dtype)
        elif gelu:
            raise ValueError("gelu=True needs the float activation, not QuantizedRows")
        y = _q().scaled_linear(x.q, x.scale, self.weight, self.weight_scale, self.bias, out_dtype=x.dtype)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(_QuantizedLinear):
    """``nn.Linear`` as fbgemm's dynamic int8 Linear: int8 weight (N, K) with per-output-channel scales,
    float32 bias; the packed form fbgemm runs is made on first use (and after a load)."""

    format = "int8"
    _KEEP_DTYPE = ("weight", "weight_scale", "bias")  # fbgemm takes float32 activations and bias

    def __init__(self, in_features: int, out_features: int, device: torch.device | None = None) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        self._packed: object | None = None
        self.reduce_range = torch.backends.quantized.engine in ("x86", "fbgemm")

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, device=w.device)
        scale = _channel_scales(w, 127.0)
        m.weight.copy_(torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8))
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    def _pack(self) -> object:
        if self._packed is None:
            zero = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # fbgemm's prepack still takes a quantized tensor, now deprecated
                warnings.simplefilter("ignore", UserWarning)
                qweight = torch._make_per_channel_quantized_tensor(self.weight.cpu(), self.weight_scale.double().cpu(),
                                                                   zero, 0)
                self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias.cpu())
        return self._packed

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001
        self._packed = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if gelu:
            x = F.gelu(x)
        rows = x.reshape(-1, x.shape[-1]).float()  # (M, K)
        y = _q().int8_linear(rows, self._pack(), reduce_range=self.reduce_range)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


_LINEARS: dict[str, type[_QuantizedLinear]] = {"fp8": Fp8Linear, "int8": Int8Linear}


class Fp8LayerNorm(nn.LayerNorm):
    """LayerNorm whose output is the next FP8 GEMM's e4m3 input (:class:`QuantizedRows`); same parameters."""

    def forward(self, x: torch.Tensor) -> QuantizedRows:
        rows = x.reshape(-1, x.shape[-1])  # (M, C)
        q, scale = _q().layer_norm_fp8(rows, self.weight, self.bias, eps=self.eps)
        return QuantizedRows(q, scale, tuple(x.shape), x.dtype)


def _fp8_norm(norm: nn.LayerNorm) -> Fp8LayerNorm:
    out = Fp8LayerNorm(norm.normalized_shape, eps=norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
    out.load_state_dict(norm.state_dict())
    return out


def _runs_on_kernels(op: str, args: tuple, kwargs: dict, device: torch.device) -> bool:
    """Whether the dispatcher would run ``op`` on these inputs (on ``device``) on a kernel, not the reference."""
    try:
        return backends.pick(op, args, kwargs, device=device, full=False).backend != "reference"
    except backends.BackendUnavailableError:
        return False


class QuantizedAttention(nn.Module):
    """qkv -> attention -> proj with quantized qkv and proj; the attention itself runs in the model's dtype.
    With fp8 the attention kernel can emit proj's e4m3 input itself (see the module's docstring)."""

    def __init__(self, attn: nn.Module, fmt: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.qkv = _LINEARS[fmt].from_linear(attn.qkv)
        self.proj = _LINEARS[fmt].from_linear(attn.proj)

    def _fp8_out(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> QuantizedRows | None:
        """The attention output as proj's e4m3 input, when both its producer and the per-(token, head) scaled
        GEMM run on kernels; None otherwise."""
        B, H, N, D = q.shape
        if self.proj.format != "fp8" or D % 16:
            return None
        if not _runs_on_kernels("attention_fp8", (q, k, v), {"scale": self.scale}, q.device):
            return None
        gemm = (torch.empty(B * N, H * D, dtype=_q().FP8, device="meta"), torch.empty(B * N, H, device="meta"),
                self.proj.weight.to("meta"), self.proj.weight_scale.to("meta"), self.proj.bias.to("meta"))
        if not _runs_on_kernels("scaled_linear", gemm, {"out_dtype": q.dtype}, q.device):
            return None
        out, scale = _q().attention_fp8(q, k, v, scale=self.scale)
        return QuantizedRows(out, scale, (B, N, H * D), q.dtype)

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, N, 3E)
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D)
        rows = self._fp8_out(q, k, v)
        if rows is not None:
            return self.proj(rows)
        o = ops.attention(q, k, v, scale=self.scale)
        return self.proj(o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))  # (B, N, E)


class QuantizedMlp(nn.Module):
    def __init__(self, mlp: nn.Module, fmt: str) -> None:
        super().__init__()
        self.fc1 = _LINEARS[fmt].from_linear(mlp.fc1)
        self.fc2 = _LINEARS[fmt].from_linear(mlp.fc2)

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        return self.fc2(self.fc1(x), gelu=True)  # fp8: the GELU and fc2's input quantization are one pass


class QuantizedBlock(nn.Module):
    """A pre-LN block (``x + attn(norm1(x))``, ``x + mlp(norm2(x))``) with quantized Linear layers; with fp8 the
    norms emit the GEMMs' e4m3 inputs. Inference only: dropout and stochastic depth are off."""

    def __init__(self, block: Block, fmt: str) -> None:
        super().__init__()
        self.format = fmt
        self.norm1 = _fp8_norm(block.norm1) if fmt == "fp8" else block.norm1
        self.attn = QuantizedAttention(block.attn, fmt)
        self.norm2 = _fp8_norm(block.norm2) if fmt == "fp8" else block.norm2
        self.mlp = QuantizedMlp(block.mlp, fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, E) -> (B, N, E)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ---- the model ----------------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def quantize(model: VisionTransformer, fmt: str, *, head: bool = False, dtype: torch.dtype | None = None,
             inplace: bool = False) -> VisionTransformer:
    """A copy of ``model`` (``model`` itself with ``inplace``) in eval mode whose Linear layers compute in ``fmt``.

    Args:
        model: a vit_fast :class:`~vit_fast.VisionTransformer`, on the device it will run on.
        fmt: ``"fp8"`` (CUDA compute capability >= 8.9, or CPU for checking numerics) or ``"int8"`` (CPU).
        head: quantize the classifier head too (off by default: it is a tiny share of the FLOPs and the
            logits are most sensitive to it).
        dtype: the dtype of everything else (embeddings, norms, attention, the GEMMs' outputs). Default:
            bfloat16 for fp8 on CUDA, float32 for int8, else the model's.

    Raises:
        UnsupportedFormatError: ``fmt`` cannot run on the model's device (the message says what can).
    """
    device = _model_device(model)
    check_supported(fmt, device)
    if getattr(model, "quantization", None):
        raise ValueError(f"model is already quantized ({model.quantization['format']})")
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(isinstance(b, Block) for b in blocks):
        raise TypeError("quantize takes a vit_fast VisionTransformer (its blocks must be vit_fast.model.Block)")
    if dtype is None:
        dtype = torch.float32 if fmt == "int8" else (torch.bfloat16 if device.type == "cuda" else None)
    if fmt == "int8" and dtype not in (None, torch.float32):
        raise ValueError(f"int8 runs float32 activations (fbgemm's dynamic Linear); got dtype={dtype}")
    out = model if inplace else copy.deepcopy(model)
    out.eval().requires_grad_(False)
    if dtype is not None:
        out.to(dtype)
    with torch.no_grad():
        for i, block in enumerate(out.blocks):
            out.blocks[i] = QuantizedBlock(block, fmt)
        if head and isinstance(out.head, nn.Linear):
            out.head = _LINEARS[fmt].from_linear(out.head)
    out.quantization = {"format": fmt, "head": bool(head and isinstance(out.head, _QuantizedLinear))}
    return out


def save_quantized(model: VisionTransformer, path: str | os.PathLike) -> None:
    """Write a quantized model (weights, their scales, and what rebuilds it: config, format) as safetensors."""
    from safetensors.torch import save_file

    info = getattr(model, "quantization", None)
    if not info:
        raise ValueError("model is not quantized: save it with safetensors.torch.save_file(model.state_dict())")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata={"config": json.dumps(model.config.to_dict()),
                                                 "quantization": json.dumps(info)})


def load_quantized(path: str | os.PathLike, device: torch.device | str = "cpu") -> VisionTransformer:
    """The model :func:`save_quantized` wrote, on ``device`` (checked to support its format first)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "quantization" not in meta or "config" not in meta:
        raise ValueError(f"{path} is not a quantized vit_fast model (no quantization/config metadata)")
    info, config = json.loads(meta["quantization"]), json.loads(meta["config"])
    check_supported(info["format"], device)
    state = load_file(os.fspath(path), device=str(device))
    dtype = next(v.dtype for k, v in state.items() if k.endswith("norm1.weight"))
    with torch.device("meta"):
        skeleton = VisionTransformer(ViTConfig(**config))
    skeleton = skeleton.to_empty(device=device).to(dtype)
    model = quantize(skeleton, info["format"], head=info["head"], dtype=dtype, inplace=True)
    model.load_state_dict(state, strict=True)
    return model


__all__ = ["FORMATS", "Fp8Linear", "Int8Linear", "QuantizedBlock", "QuantizedRows", "UnsupportedFormatError",
           "check_supported", "load_quantized", "quantize", "save_quantized", "supported_formats"]
