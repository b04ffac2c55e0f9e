"""The low-latency serving path: :func:`optimize_for_inference` wraps a model (plain or quantized) in a
:class:`Predictor` that runs it in eval mode and the chosen dtype, with every kernel warmed up, and on CUDA
replays one CUDA graph per batch-size bucket.

At small batch a ViT forward is ~150 kernel launches whose CPU-side cost exceeds the GPU work; a CUDA graph
replays them all with one launch. Graphs have static shapes and addresses, so each bucket owns a static input
buffer: a batch is copied into the smallest bucket that holds it (the rows past it are left as they are: a ViT
computes every image independently, so they cannot change the real rows) and its outputs are sliced off the
static output. Batches larger than the largest bucket run in chunks of it.

Warm-up runs each bucket eagerly before capture, so Triton's autotuning (which times kernels and so cannot
run inside a capture) is done and recorded outside it. The graphs share one memory pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

DEFAULT_BUCKETS: tuple[int, ...] = (1, 8, 32)
_WARMUP_CALLS = 3  # the first call autotunes, the next ones settle allocator and cuBLAS workspaces


def _images_shape(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    h, w = model.patch_embed.img_size
    return cfg.in_chans, h, w


class Predictor:
    """``predictor(images (B, C, H, W)) -> outputs (B, ...)``: the model's forward, graphed per bucket on CUDA.

    ``graphed`` says whether CUDA graphs replay the forward; ``why_not_graphed`` says why not when they don't.
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype, batch_sizes: Sequence[int],
                 cuda_graphs: bool) -> None:
        if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers; got {list(batch_sizes)}")
        self.model = model
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self.buckets = tuple(sorted({int(b) for b in batch_sizes}))
        self.image_shape = _images_shape(model)
        self.why_not_graphed = self._why_not(cuda_graphs)
        self.graphed = self.why_not_graphed is None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._static_in: dict[int, torch.Tensor] = {}
        self._static_out: dict[int, torch.Tensor] = {}
        self._warm_up()
        if self.graphed:
            self._capture()

    def _why_not(self, cuda_graphs: bool) -> str | None:
        if not cuda_graphs:
            return "cuda_graphs=False: the forward runs eagerly"
        if self.device.type != "cuda":
            return (f"CUDA graphs need a CUDA device; the model is on {self.device.type}, where the forward runs "
                    "eagerly (launch overhead is a GPU problem: CPU kernels run in the calling thread)")
        return None

    @torch.no_grad()
    def _warm_up(self) -> None:
        for b in self.buckets:
            x = torch.randn(b, *self.image_shape, device=self.device, dtype=self.dtype)
            for _ in range(_WARMUP_CALLS if self.device.type == "cuda" else 1):
                self.model(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # capture needs a side stream; warm it up there too, as PyTorch advises
            for b in reversed(self.buckets):  # the largest first: the smaller graphs reuse its pool blocks
                static_in = torch.randn(b, *self.image_shape, device=self.device, dtype=self.dtype)
                self.model(static_in)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    static_out = self.model(static_in)
                self._graphs[b], self._static_in[b], self._static_out[b] = graph, static_in, static_out
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def bucket_for(self, n: int) -> int:
        """The smallest bucket that holds ``n`` images (the largest when none does: the batch is chunked)."""
        return next((b for b in self.buckets if b >= n), self.buckets[-1])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images must be (B, {', '.join(map(str, self.image_shape))}); got {tuple(images.shape)}")
        images = images.to(self.device, self.dtype)
        if not self.graphed:
            return self.model(images)
        n, top = images.shape[0], self.buckets[-1]
        if n > top:
            return torch.cat([self(images[i : i + top]) for i in range(0, n, top)])
        b = self.bucket_for(n)
        self._static_in[b][:n].copy_(images)
        self._graphs[b].replay()
        return self._static_out[b][:n].clone()  # the static output is overwritten by the next replay

    def __repr__(self) -> str:
        how = "CUDA graphs" if self.graphed else f"eager ({self.why_not_graphed})"
        return (f"Predictor({type(self.model).__name__}, dtype={str(self.dtype).replace('torch.', '')}, "
                f"buckets={list(self.buckets)}, device={self.device}, {how})")


def optimize_for_inference(model: nn.Module, *, dtype: torch.dtype | None = None,
                           batch_sizes: Sequence[int] = DEFAULT_BUCKETS, cuda_graphs: bool = True) -> Predictor:
    """A :class:`Predictor` for ``model`` on its device: eval mode, no gradients, ``dtype``, kernels warmed up per
    bucket, and on CUDA one CUDA graph per batch-size bucket (``predictor.graphed``; on CPU, or with
    ``cuda_graphs=False``, the forward runs eagerly and ``predictor.why_not_graphed`` says so).

    Args:
        model: a vit_fast ViT (plain or :func:`vit_fast.quantize`-d), moved to its device first.
        dtype: of the model and its inputs. Default: the model's (a quantized model keeps its quantized
            weights through the cast).
        batch_sizes: the buckets; a batch runs in the smallest that holds it, larger ones in chunks of the largest.
        cuda_graphs: capture CUDA graphs on CUDA.

    The model itself is put in eval mode and cast (not copied).
    """
    model.eval().requires_grad_(False)
    if dtype is None:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    elif getattr(model, "quantization", {}).get("format") == "int8" and dtype != torch.float32:
        raise ValueError(f"an int8-quantized model runs float32 activations; got dtype={dtype}")
    model.to(dtype)
    return Predictor(model, dtype=dtype, batch_sizes=batch_sizes, cuda_graphs=cuda_graphs)


__all__ = ["DEFAULT_BUCKETS", "Predictor", "optimize_for_inference"]
