"""What is benchmarked per op: the shapes, fresh random inputs, the analytic FLOP and byte counts (the useful
work, counted the same for every provider) and the PyTorch ways of computing the same thing."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vit_fast import ops
from vit_fast.config import ViTConfig, get_config

OP_MODES: tuple[str, ...] = ("fwd", "fwd+bwd")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SEQ_LENS: tuple[int, ...] = (65, 197, 257, 577, 1025)  # CIFAR/4, /16 at 224, /14 at 224, /16 at 384, /16 at 512


def seed(*parts: object) -> None:
    """A seed of its own per case: fresh inputs for every case, the same ones on a rerun."""
    torch.manual_seed(zlib.crc32(repr(parts).encode()))


def patch_size(cfg: ViTConfig) -> int:
    return cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]


@dataclass
class Inputs:
    """An op's inputs: base tensors (fresh random), which of them get gradients, and how they are assembled
    into the op's ``(args, kwargs)`` (attention takes strided views of one packed qkv tensor)."""

    tensors: dict[str, torch.Tensor]
    grad_names: tuple[str, ...]
    assemble: Callable[[dict[str, torch.Tensor]], tuple[tuple, dict]]
    grad_out: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for n in self.grad_names:
            self.tensors[n].requires_grad_(True)

    def nbytes(self) -> int:
        ts = [*self.tensors.values(), *([self.grad_out] if self.grad_out is not None else [])]
        return sum(t.numel() * t.element_size() for t in ts)

    def to(self, dtype: torch.dtype) -> Inputs:
        tensors = {k: v.detach().to(dtype) for k, v in self.tensors.items()}
        grad_out = None if self.grad_out is None else self.grad_out.to(dtype)
        return Inputs(tensors, self.grad_names, self.assemble, grad_out)

    def replicas(self, n: int) -> list[Inputs]:
        """``n`` copies (this one first), each tensor's copies carved from one allocation: thousands of small
        allocations would each cost page faults."""
        named = {**self.tensors, **({"__grad_out": self.grad_out} if self.grad_out is not None else {})}
        bufs = {k: v.detach().expand(n - 1, *v.shape).contiguous() for k, v in named.items()}
        out = [self]
        for i in range(n - 1):
            tensors = {k: bufs[k][i].detach() for k in self.tensors}
            grad_out = bufs["__grad_out"][i] if self.grad_out is not None else None
            out.append(Inputs(tensors, self.grad_names, self.assemble, grad_out))
        return out

    def leaves(self) -> list[torch.Tensor]:
        return [self.tensors[n] for n in self.grad_names]


def run_once(fn: Callable, inputs: Inputs, mode: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One forward (without autograd) or one forward+backward; the backward returns the gradients of the
    inputs' leaves for ``grad_out`` without accumulating them into ``.grad``."""
    if mode == "fwd":
        with torch.no_grad():
            args, kwargs = inputs.assemble(inputs.tensors)
            return fn(*args, **kwargs), ()
    args, kwargs = inputs.assemble(inputs.tensors)
    out = fn(*args, **kwargs)
    return out, torch.autograd.grad(out, inputs.leaves(), inputs.grad_out)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _layer_norm_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _mlp_eager(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, fc1_weight: torch.Tensor,
               fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, *, eps: float,
               residual: torch.Tensor) -> torch.Tensor:
    """What a PyTorch ViT block does: LayerNorm -> Linear -> GELU -> Linear, plus the residual."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    return residual + F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def _patch_embed_eager(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, cls_token: torch.Tensor,
                       pos_embed: torch.Tensor) -> torch.Tensor:
    """What timm does: conv, flatten, transpose, cat the class token, add the position embedding."""
    x = F.conv2d(images, weight, bias, stride=weight.shape[-2:]).flatten(2).transpose(1, 2)  # (B, N, E)
    return torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_embed  # (B, 1+N, E)


def preset_dims(name: str) -> dict[str, int]:
    """The sizes of preset ``name`` that the ops' shapes are made of (:meth:`OpBench.model_shape`)."""
    cfg = get_config(name)
    return {"N": cfg.num_patches + cfg.num_prefix_tokens, "C": cfg.embed_dim, "H": cfg.num_heads,
            "D": cfg.head_dim, "hidden": cfg.mlp_hidden_dim, "P": patch_size(cfg),
            "img": cfg.grid_size[0] * patch_size(cfg), "in_chans": cfg.in_chans}


# Presets whose token shapes the per-op benchmarks take (ViT-S/B/L/H at 224 and 384, CIFAR size).
GPU_PRESETS = ("vit_tiny_patch4_32", "vit_small_patch16_224", "vit_small_patch16_384", "vit_base_patch16_224",
               "vit_base_patch16_384", "vit_large_patch16_224", "vit_large_patch16_384", "vit_huge_patch14_224")
CPU_PRESETS = ("vit_tiny_patch4_32", "vit_small_patch4_32", "vit_tiny_patch16_224")
GPU_BATCHES = (8, 64, 256)
CPU_BATCHES = (1, 8)


class OpBench:
    """One op's benchmark: its shapes, inputs, analytic counts and the PyTorch ways of computing it."""

    name: str
    metric: str  # "TFLOP/s" (compute-bound work) or "GB/s" (memory-bound)
    shape_keys: tuple[str, ...]

    def shapes(self, quick: bool, gpu: bool) -> list[dict[str, int]]:
        raise NotImplementedError

    def tokens(self, shape: dict[str, int]) -> int:
        """The sequence length, the x axis of the plots."""
        return shape["N"]

    def make(self, shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
        raise NotImplementedError

    def flops(self, shape: dict[str, int], mode: str) -> int:
        raise NotImplementedError

    def bytes(self, shape: dict[str, int], mode: str, elem: int) -> int:
        raise NotImplementedError

    def reference(self) -> Callable:
        return getattr(ops, f"{self.name}_ref")

    def public(self) -> Callable:
        return getattr(ops, self.name)

    def baselines(self) -> list[tuple[str, Callable, Callable[[], contextlib.AbstractContextManager]]]:
        """(name, function with the op's signature, context it runs in) for each eager PyTorch way."""
        raise NotImplementedError

    def compiled_baseline(self) -> tuple[str, Callable]:
        raise NotImplementedError

    def peers(self) -> list[tuple[str, str, Callable[[], Callable]]]:
        """(name, module that must be importable, factory of a function with the op's signature)."""
        return []

    def note(self, shapes: list[dict[str, int]]) -> str | None:
        """A line for the op's section of the report about the measured ``shapes`` (None: nothing to add)."""
        return None

    def label(self, shape: dict[str, int]) -> str:
        return " ".join(f"{k}{shape[k]}" for k in self.shape_keys)

    def model_shape(self, dims: dict[str, int]) -> dict[str, int]:
        """The op's shape, less the batch, in a model of :func:`preset_dims` ``dims`` (what tune measures)."""
        raise NotImplementedError

    def _from_presets(self, quick: bool, gpu: bool, quick_gpu: list[dict],
                      quick_cpu: list[dict]) -> list[dict[str, int]]:
        if quick:
            return quick_gpu if gpu else quick_cpu
        out = []
        for name in GPU_PRESETS if gpu else CPU_PRESETS:
            for b in GPU_BATCHES if gpu else CPU_BATCHES:
                s = {"B": b, **self.model_shape(preset_dims(name))}
                if s not in out:
                    out.append(s)
        return out


class AttentionBench(OpBench):
    name, metric, shape_keys = "attention", "TFLOP/s", ("B", "H", "N", "D")

    def shapes(self, quick: bool, gpu: bool) -> list[dict[str, int]]:
        if quick:
            if gpu:  # the shapes of the attention targets: ViT-B heads and ViT-H/14 heads at 197, 257, 577 tokens
                return [{"B": 64, "H": h, "N": n, "D": d} for h, d in ((12, 64), (16, 80)) for n in (197, 257, 577)]
            return [{"B": 4, "H": 3, "N": 65, "D": 64}, {"B": 1, "H": 3, "N": 197, "D": 64}]
        heads = ((12, 64), (16, 80)) if gpu else ((3, 64), (3, 80))  # ViT-B and ViT-H/14 (ViT-Ti heads on CPU)
        seqs = SEQ_LENS if gpu else SEQ_LENS[:3]
        return [{"B": b, "H": h, "N": n, "D": d} for h, d in heads for n in seqs
                for b in (GPU_BATCHES if gpu else CPU_BATCHES)]

    def model_shape(self, dims: dict[str, int]) -> dict[str, int]:
        return {"H": dims["H"], "N": dims["N"], "D": dims["D"]}

    def make(self, shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
        B, H, N, D = (shape[k] for k in "BHND")
        qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype)  # the qkv projection's output, as in the model

        def assemble(t: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
            q, k, v = t["qkv"].permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), strided views (no copy)
            return (q, k, v), {"scale": D**-0.5}

        return Inputs({"qkv": qkv}, ("qkv",), assemble)

    def flops(self, shape: dict[str, int], mode: str) -> int:
        # forward: q k^T and p v, 2 * N * N * D each per head; backward: dV = P^T dO, dP = dO V^T, dQ = dS K,
        # dK = dS^T Q, twice the forward. The recomputation of P that FlashAttention-style kernels do is not
        # counted: it is not useful work, and every provider is credited the same.
        fwd = 4 * shape["B"] * shape["H"] * shape["N"] ** 2 * shape["D"]
        return fwd if mode == "fwd" else 3 * fwd

    def bytes(self, shape: dict[str, int], mode: str, elem: int) -> int:
        # forward reads q, k, v and writes o; the backward at least reads q, k, v, dO and writes dq, dk, dv.
        t = shape["B"] * shape["H"] * shape["N"] * shape["D"] * elem
        return 4 * t if mode == "fwd" else 11 * t

    def note(self, shapes: list[dict[str, int]]) -> str | None:
        # Tiles cover N in blocks and D in power-of-two parts: the rest of each tile is masked work. 64 x 64 is the
        # smallest forward tile the autotuner tries: the fraction is an upper bound for the configs it picks.
        try:
            from vit_fast.kernels.attention import useful_fraction
        except ImportError:
            return None
        pairs = sorted({(s["N"], s["D"]) for s in shapes})
        if not pairs:
            return None
        cells = ", ".join(f"N={n} D={d} {useful_fraction(n, d, 64, 64):.0%}" for n, d in pairs)
        return f"Useful score-matrix work of the Triton kernels (useful / computed entries, 64 x 64 tiles): {cells}."

    def baselines(self) -> list[tuple[str, Callable, Callable[[], contextlib.AbstractContextManager]]]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def forced(backend: SDPBackend) -> Callable[[], contextlib.AbstractContextManager]:
            return lambda: sdpa_kernel([backend])

        kinds = (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                 ("math", "MATH"))
        return [(f"sdpa:{short}", _sdpa, forced(getattr(SDPBackend, attr)))
                for short, attr in kinds if hasattr(SDPBackend, attr)]

    def compiled_baseline(self) -> tuple[str, Callable]:
        return "compiled:reference", ops.attention_ref

    def peers(self) -> list[tuple[str, str, Callable[[], Callable]]]:
        def flash_attn() -> Callable:
            from flash_attn import flash_attn_func

            def fn(q, k, v, *, scale):  # flash_attn takes (B, N, H, D)
                return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       softmax_scale=scale).transpose(1, 2)

            return fn

        def xformers() -> Callable:
            from xformers.ops import memory_efficient_attention

            def fn(q, k, v, *, scale):  # xformers takes (B, N, H, D)
                return memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  scale=scale).transpose(1, 2)

            return fn

        return [("peer:flash_attn", "flash_attn", flash_attn), ("peer:xformers", "xformers", xformers)]


class LayerNormBench(OpBench):
    name, metric, shape_keys = "layer_norm", "GB/s", ("B", "N", "C")

    def shapes(self, quick: bool, gpu: bool) -> list[dict[str, int]]:
        return self._from_presets(quick, gpu, [{"B": 256, "N": 197, "C": 768}],
                                  [{"B": 8, "N": 65, "C": 192}, {"B": 2, "N": 197, "C": 384}])

    def model_shape(self, dims: dict[str, int]) -> dict[str, int]:
        return {"N": dims["N"], "C": dims["C"]}

    def make(self, shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
        B, N, C = shape["B"], shape["N"], shape["C"]
        t = {"x": torch.randn(B, N, C, device=device, dtype=dtype),
             "weight": 1 + 0.1 * torch.randn(C, device=device, dtype=dtype),
             "bias": 0.1 * torch.randn(C, device=device, dtype=dtype)}
        return Inputs(t, ("x", "weight", "bias"), lambda t: ((t["x"], t["weight"], t["bias"]), {"eps": 1e-6}))

    def flops(self, shape: dict[str, int], mode: str) -> int:
        # about 8 per element forward (mean, variance, normalize, affine) and 12 backward; memory-bound
        m = shape["B"] * shape["N"] * shape["C"]
        return 8 * m if mode == "fwd" else 20 * m

    def bytes(self, shape: dict[str, int], mode: str, elem: int) -> int:
        # forward reads x, weight, bias and writes y; the backward reads x, dy, weight and writes dx, dweight,
        # dbias (per-row statistics, M * 8 bytes, left out: a kernel may recompute them).
        mc, c = shape["B"] * shape["N"] * shape["C"], shape["C"]
        fwd = (2 * mc + 2 * c) * elem
        return fwd if mode == "fwd" else fwd + (3 * mc + 3 * c) * elem

    def baselines(self) -> list[tuple[str, Callable, Callable[[], contextlib.AbstractContextManager]]]:
        return [("eager:F.layer_norm", _layer_norm_eager, contextlib.nullcontext)]

    def compiled_baseline(self) -> tuple[str, Callable]:
        return "compiled:F.layer_norm", _layer_norm_eager

    def peers(self) -> list[tuple[str, str, Callable[[], Callable]]]:
        def liger() -> Callable:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            return lambda x, w, b, *, eps: LigerLayerNormFunction.apply(x, w, b, eps)

        return [("peer:liger", "liger_kernel", liger)]


class LayerNormMlpBench(OpBench):
    name, metric, shape_keys = "layernorm_mlp", "TFLOP/s", ("B", "N", "C", "hidden")

    def shapes(self, quick: bool, gpu: bool) -> list[dict[str, int]]:
        return self._from_presets(
            quick, gpu,
            [{"B": 64, "N": 197, "C": 768, "hidden": 3072}],
            [{"B": 8, "N": 65, "C": 192, "hidden": 384}, {"B": 2, "N": 197, "C": 192, "hidden": 768}])

    def model_shape(self, dims: dict[str, int]) -> dict[str, int]:
        return {"N": dims["N"], "C": dims["C"], "hidden": dims["hidden"]}

    def make(self, shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
        B, N, C, Hd = shape["B"], shape["N"], shape["C"], shape["hidden"]

        def r(*s: int, scale: float = 1.0) -> torch.Tensor:
            return scale * torch.randn(*s, device=device, dtype=dtype)

        t = {"x": r(B, N, C), "ln_weight": 1 + r(C, scale=0.1), "ln_bias": r(C, scale=0.1),
             "fc1_weight": r(Hd, C, scale=C**-0.5), "fc1_bias": r(Hd, scale=0.1),
             "fc2_weight": r(C, Hd, scale=Hd**-0.5), "fc2_bias": r(C, scale=0.1)}
        names = tuple(t)
        # the model's call: the residual is the block's input itself
        return Inputs(t, names, lambda t: (tuple(t[n] for n in names), {"eps": 1e-6, "residual": t["x"]}))

    def flops(self, shape: dict[str, int], mode: str) -> int:
        # forward: fc1 and fc2, 2 * M * C * hidden each; backward: input and weight gradients of both, twice
        # the forward. LayerNorm, GELU, bias and residual (O(M * hidden)) are left out.
        fwd = 4 * shape["B"] * shape["N"] * shape["C"] * shape["hidden"]
        return fwd if mode == "fwd" else 3 * fwd

    def bytes(self, shape: dict[str, int], mode: str, elem: int) -> int:
        # forward reads x (also the residual) and the parameters, writes the output; the hidden activation
        # need not leave the chip. The backward reads dout, x and the weights, writes dx and the parameter
        # gradients.
        mc, c, hd = shape["B"] * shape["N"] * shape["C"], shape["C"], shape["hidden"]
        params = 2 * c * hd + hd + 3 * c
        fwd = (2 * mc + params) * elem
        return fwd if mode == "fwd" else fwd + (3 * mc + 2 * c * hd + params) * elem

    def baselines(self) -> list[tuple[str, Callable, Callable[[], contextlib.AbstractContextManager]]]:
        return [("eager", _mlp_eager, contextlib.nullcontext)]

    def compiled_baseline(self) -> tuple[str, Callable]:
        return "compiled", _mlp_eager


class PatchEmbedBench(OpBench):
    name, metric, shape_keys = "patch_embed", "TFLOP/s", ("B", "img", "P", "E")

    def shapes(self, quick: bool, gpu: bool) -> list[dict[str, int]]:
        return self._from_presets(
            quick, gpu,
            [{"B": 256, "in_chans": 3, "img": 224, "P": 16, "E": 768}],
            [{"B": 8, "in_chans": 3, "img": 32, "P": 4, "E": 192},
             {"B": 2, "in_chans": 3, "img": 224, "P": 16, "E": 192}])

    def model_shape(self, dims: dict[str, int]) -> dict[str, int]:
        return {"in_chans": dims["in_chans"], "img": dims["img"], "P": dims["P"], "E": dims["C"]}

    def tokens(self, shape: dict[str, int]) -> int:
        return (shape["img"] // shape["P"]) ** 2 + 1

    def make(self, shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Inputs:
        B, Ci, img, P, E = shape["B"], shape["in_chans"], shape["img"], shape["P"], shape["E"]
        n = (img // P) ** 2
        t = {"images": torch.randn(B, Ci, img, img, device=device, dtype=dtype),
             "weight": torch.randn(E, Ci, P, P, device=device, dtype=dtype) * (Ci * P * P) ** -0.5,
             "bias": 0.02 * torch.randn(E, device=device, dtype=dtype),
             "cls_token": 0.02 * torch.randn(1, 1, E, device=device, dtype=dtype),
             "pos_embed": 0.02 * torch.randn(1, 1 + n, E, device=device, dtype=dtype)}
        # the images need no gradient, as in the model
        return Inputs(t, ("weight", "bias", "cls_token", "pos_embed"), lambda t: (
            (t["images"], t["weight"], t["bias"]), {"cls_token": t["cls_token"], "pos_embed": t["pos_embed"]}))

    def flops(self, shape: dict[str, int], mode: str) -> int:
        # a GEMM of (B * N) x (C * P * P) x E; the backward computes the weight gradient only
        n = (shape["img"] // shape["P"]) ** 2
        fwd = 2 * shape["B"] * n * shape["in_chans"] * shape["P"] ** 2 * shape["E"]
        return fwd if mode == "fwd" else 2 * fwd

    def bytes(self, shape: dict[str, int], mode: str, elem: int) -> int:
        # forward reads images, weight, bias, class token, position embedding and writes the tokens; the
        # backward reads dout and the images and writes the four parameter gradients.
        B, img, E = shape["B"], shape["img"], shape["E"]
        n1 = (img // shape["P"]) ** 2 + 1
        images, weight = B * shape["in_chans"] * img * img, E * shape["in_chans"] * shape["P"] ** 2
        params = weight + 2 * E + n1 * E
        fwd = (images + params + B * n1 * E) * elem
        return fwd if mode == "fwd" else fwd + (B * n1 * E + images + params) * elem

    def baselines(self) -> list[tuple[str, Callable, Callable[[], contextlib.AbstractContextManager]]]:
        return [("eager", _patch_embed_eager, contextlib.nullcontext)]

    def compiled_baseline(self) -> tuple[str, Callable]:
        return "compiled", _patch_embed_eager


OP_BENCHES: dict[str, OpBench] = {b.name: b for b in (AttentionBench(), LayerNormBench(), LayerNormMlpBench(),
                                                        PatchEmbedBench())}
OPS: tuple[str, ...] = tuple(OP_BENCHES)
