"""Quantized inference: ``quantize(model, "fp8" | "int8")`` turns a vit_fast ViT's Linear layers (qkv, proj,
fc1, fc2; the head on request) into FP8 or int8 GEMMs, and :func:`save_quantized` / :func:`load_quantized`
keep a quantized model with its scales in one safetensors file.

fp8 (CUDA compute capability >= 8.9; on CPU too, slowly, to check numerics): weights e4m3 with one fp32 scale
per output channel, activations e4m3 with one dynamic scale per token, GEMMs through ``torch._scaled_mm``
(cuBLASLt), outputs in the model's dtype (bfloat16 on CUDA). The GEMM inputs are produced quantized: the
LayerNorms before qkv and fc1 write e4m3 + scales (``layer_norm_fp8``), and fc1's output goes through one
GELU-and-quantize pass (``quantize_rows(gelu=True)``). The attention output leaves as e4m3 too (``attention_fp8``):
from the Triton kernel with one scale per (token, head), which proj takes through ``scaled_linear``'s per-group
Triton GEMM (each attention program sees one head of a token, so it cannot make the token's row-wise scale);
from the reference with one scale per token (one quantizing pass), which proj takes through cuBLASLt's row-wise
FP8 GEMM. Which one runs is the dispatcher's pick for ``attention_fp8``, as for any op.

int8 (CPU): weights int8 per output channel (symmetric), activations quantized dynamically per call by
PyTorch's fbgemm/x86 dynamic Linear (``torch.ops.quantized.linear_dynamic``): one scale per GEMM input
tensor, not per token, which is what that kernel supports. It is the fast CPU path measured here; torchao's
per-token int8 (Int8DynamicActivationInt8WeightConfig) runs through ``torch._int_mm``, which is 5x slower than
fp32 on this CPU in eager mode.

The quantized model is the same :class:`~vit_fast.VisionTransformer`, running the same forward: quantization
swaps modules, not the blocks' code. In every block the Linear layers become :class:`Fp8Linear` or
:class:`Int8Linear`, the MLP branch a :class:`QuantizedMlp` (its GEMMs are separate, where the float model fuses
the branch into one op), and with fp8 the norms become :class:`Fp8LayerNorm` (they emit their GEMM's e4m3
input) and the attention core an :class:`Fp8AttentionCore` (it emits proj's). Module and parameter names stay
(``blocks.0.attn.qkv.weight`` is now e4m3 or int8, next to ``blocks.0.attn.qkv.weight_scale``). Inference only.
"""

from __future__ import annotations

import copy
import json
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit_fast import ops
from vit_fast.config import ViTConfig
from vit_fast.model import AttentionCore, Block, VisionTransformer
from vit_fast.ops._fp8 import E4M3_MAX, FP8
from vit_fast.ops.attention import unpack_qkv
from vit_fast.ops.int8_linear import REDUCE_RANGE_ENGINES, pack_weight, quantize_weight

FORMATS: tuple[str, ...] = ("fp8", "int8")
_INT8_ENGINES = ("x86", "fbgemm", "onednn")


class UnsupportedFormatError(RuntimeError):
    """The requested quantization format cannot run on the model's device."""


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
        self.register_buffer("weight", torch.zeros(n, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.ones(n, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(n, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        if linear.in_features % 16:
            raise ValueError(f"fp8 needs in_features divisible by 16 (cuBLASLt); got {linear.in_features}")
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, device=w.device)
        scale = _channel_scales(w, E4M3_MAX)
        n = linear.out_features
        m.weight[:n] = (w.float() / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
        m.weight_scale[:n] = scale
        m.bias = m.bias.to(w.dtype)
        if linear.bias is not None:
            m.bias[:n] = linear.bias.detach()
        return m

    def forward(self, x: torch.Tensor | QuantizedRows, gelu: bool = False) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            rows = x.reshape(-1, x.shape[-1])  # (M, K)
            q, scale = ops.quantize_rows(rows, gelu=gelu)
            x = QuantizedRows(q, scale, tuple(x.shape), x.dtype)
        elif gelu:
            raise ValueError("gelu=True needs the float activation, not QuantizedRows")
        y = ops.scaled_linear(x.q, x.scale, self.weight, self.weight_scale, self.bias, out_dtype=x.dtype)
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
        self.reduce_range = torch.backends.quantized.engine in REDUCE_RANGE_ENGINES

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        m = cls(linear.in_features, linear.out_features, device=linear.weight.device)
        weight_q, scale = quantize_weight(linear.weight)
        m.weight.copy_(weight_q)
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    def _pack(self) -> object:
        if self._packed is None:
            self._packed = pack_weight(self.weight, self.weight_scale, self.bias)
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
        y = ops.int8_linear(rows, self._pack(), reduce_range=self.reduce_range)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


_LINEARS: dict[str, type[_QuantizedLinear]] = {"fp8": Fp8Linear, "int8": Int8Linear}


class Fp8LayerNorm(nn.LayerNorm):
    """LayerNorm whose output is the next FP8 GEMM's e4m3 input (:class:`QuantizedRows`); same parameters."""

    def forward(self, x: torch.Tensor) -> QuantizedRows:
        rows = x.reshape(-1, x.shape[-1])  # (M, C)
        q, scale = ops.layer_norm_fp8(rows, self.weight, self.bias, eps=self.eps)
        return QuantizedRows(q, scale, tuple(x.shape), x.dtype)


def _fp8_norm(norm: nn.LayerNorm) -> Fp8LayerNorm:
    out = Fp8LayerNorm(norm.normalized_shape, eps=norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
    out.load_state_dict(norm.state_dict())
    return out


class Fp8AttentionCore(AttentionCore):
    """The attention core whose output is proj's e4m3 input (:class:`QuantizedRows`), from ``attention_fp8``:
    one scale per (token, head) from its Triton kernel, one per token from its reference."""

    def forward(self, qkv: torch.Tensor) -> QuantizedRows:  # (B, N, 3, H, D) -> rows (B * N, H * D)
        B, N, _, H, D = qkv.shape
        out, scale = ops.attention_fp8(*unpack_qkv(qkv), scale=self.scale)
        return QuantizedRows(out, scale, (B, N, H * D), qkv.dtype)


def _fp8_core(core: AttentionCore) -> Fp8AttentionCore:
    return Fp8AttentionCore(core.scale, core.dropout_p)


class QuantizedMlp(nn.Module):
    """The MLP branch with quantized fc1 and fc2, given the block's norm (``Mlp``'s call): fc2's input is
    ``gelu(fc1(norm(x)))``, with fp8 quantized in the same pass as the GELU."""

    def __init__(self, mlp: nn.Module, fmt: str) -> None:
        super().__init__()
        self.fc1 = _LINEARS[fmt].from_linear(mlp.fc1)
        self.fc2 = _LINEARS[fmt].from_linear(mlp.fc2)

    def forward(self, x: torch.Tensor, norm: nn.Module, *, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = self.fc2(self.fc1(norm(x)), gelu=True)
        return out if residual is None else residual + out


def _quantize_block(block: Block, fmt: str) -> None:
    """Swap ``block``'s modules for their ``fmt`` forms, in place; its forward stays the float model's."""
    attn = block.attn
    attn.qkv, attn.proj = _LINEARS[fmt].from_linear(attn.qkv), _LINEARS[fmt].from_linear(attn.proj)
    block.mlp = QuantizedMlp(block.mlp, fmt)
    if fmt == "fp8":
        block.norm1, block.norm2 = _fp8_norm(block.norm1), _fp8_norm(block.norm2)
        if attn.head_dim % 16 == 0:  # the e4m3 rows of a head are proj's K groups: multiples of 16
            attn.core = _fp8_core(attn.core)


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
        for block in out.blocks:
            _quantize_block(block, fmt)
        if head and isinstance(out.head, nn.Linear):
            out.head = _LINEARS[fmt].from_linear(out.head)
    out.quantization = {"format": fmt, "head": bool(head and isinstance(out.head, _QuantizedLinear))}
    return out


def save_quantized(model: VisionTransformer, path: str | os.PathLike) -> None:
    """Write a quantized model (weights, their scales, and what rebuilds it: config, format) as safetensors,
    atomically: a failed write (a full disk) leaves any earlier file at ``path`` whole."""
    from safetensors.torch import save

    from vit_fast.fileio import atomic_write

    info = getattr(model, "quantization", None)
    if not info:
        raise ValueError("model is not quantized: save it with safetensors.torch.save_file(model.state_dict())")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, save(tensors, metadata={"config": json.dumps(model.config.to_dict()),
                                               "quantization": json.dumps(info)}))


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


__all__ = ["FORMATS", "Fp8AttentionCore", "Fp8LayerNorm", "Fp8Linear", "Int8Linear", "QuantizedMlp", "QuantizedRows",
           "UnsupportedFormatError", "check_supported", "load_quantized", "quantize", "save_quantized",
           "supported_formats"]
