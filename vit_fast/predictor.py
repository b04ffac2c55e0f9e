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

On CPU the fast path depends on the CPU (AMX, AVX-512 BF16, VNNI, or none of these), so it is measured: a float32
model with no ``dtype`` asked for gets the fastest of fp32, bf16 (native bf16 only), ``torch.compile`` with
freezing and int8 (fbgemm's module swap, or PT2E with torchao) per bucket, each verified against fp32 first
(:mod:`vit_fast.cpu_paths`; the pick is cached, ``predictor.explain()`` says what runs and why the others lost).
A compiled pick has static shapes: a batch is padded up to its bucket, as for a CUDA graph.

A predictor may be called from several threads: calls are serialised by a lock (the CUDA graphs' and the
compiled paths' static buffers are shared, and a CPU forward already uses every core).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import torch.nn as nn

from vit_fast import cpu_paths
from vit_fast.cpu_paths import AccuracyBudget, CpuPick, Runner

DEFAULT_BUCKETS: tuple[int, ...] = (1, 8, 32)
_WARMUP_CALLS = 3  # the first call autotunes, the next ones settle allocator and cuBLAS workspaces


def _images_shape(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    h, w = model.patch_embed.img_size
    return cfg.in_chans, h, w


class Predictor:
    """``predictor(images (B, C, H, W)) -> outputs (B, ...)``: the model's forward, graphed per bucket on CUDA, the
    measured fastest CPU path per bucket on CPU. Safe to call from several threads (calls are serialised).

    ``graphed`` says whether CUDA graphs replay the forward; ``why_not_graphed`` says why not when they don't.
    ``pick`` (CPU search only) is the :class:`~vit_fast.cpu_paths.CpuPick`: per bucket the path that runs, every
    candidate's check and times; :meth:`explain` says it in words.
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype, batch_sizes: Sequence[int],
                 cuda_graphs: bool, runners: dict[int, Runner] | None = None, pick: CpuPick | None = None) -> None:
        if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers; got {list(batch_sizes)}")
        self.model = model
        self.dtype = dtype
        self.device = next(model.parameters()).device
        self.buckets = tuple(sorted({int(b) for b in batch_sizes}))
        self.image_shape = _images_shape(model)
        self.pick = pick
        self._runners = runners or {}
        self.why_not_graphed = self._why_not(cuda_graphs)
        self.graphed = self.why_not_graphed is None
        self._lock = threading.Lock()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._static_in: dict[int, torch.Tensor] = {}
        self._static_out: dict[int, torch.Tensor] = {}
        if self._runners:  # built, checked and timed (so warm) by the search
            for b in self.buckets:
                if self._runners[b].static_shapes:
                    self._static_in[b] = torch.zeros(b, *self.image_shape, dtype=self.dtype)
            return
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
        with self._lock:
            return self._run(images)

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        n, top = images.shape[0], self.buckets[-1]
        if self._runners:
            runner = self._runners[self.bucket_for(n)]
            if not runner.static_shapes:
                return runner(images)
        elif not self.graphed:
            return self.model(images)
        if n > top:
            return torch.cat([self._run(images[i : i + top]) for i in range(0, n, top)])
        b = self.bucket_for(n)
        if self._runners and n == b:  # a full bucket is the compiled shape already: no copy into the padded buffer
            return self._runners[b](images.contiguous())
        self._static_in[b][:n].copy_(images)
        if self._runners:  # a static-shape compiled path: the rows past n hold an earlier batch, never read back
            return self._runners[b](self._static_in[b])[:n]
        self._graphs[b].replay()
        return self._static_out[b][:n].clone()  # the static output is overwritten by the next replay

    def explain(self) -> str:
        """What runs per bucket and why: the CPU pick (how it was measured, why the other paths lost), or CUDA
        graphs, or eager with the reason."""
        if self.pick is not None:
            return self.pick.describe()
        return repr(self)

    def __repr__(self) -> str:
        if self.pick is not None:
            how = "measured CPU paths " + ", ".join(f"B{b}: {n}" for b, n in sorted(self.pick.picks.items()))
        else:
            how = "CUDA graphs" if self.graphed else f"eager ({self.why_not_graphed})"
        return (f"Predictor({type(self.model).__name__}, dtype={str(self.dtype).replace('torch.', '')}, "
                f"buckets={list(self.buckets)}, device={self.device}, {how})")


def optimize_for_inference(model: nn.Module, *, dtype: torch.dtype | None = None,
                           batch_sizes: Sequence[int] = DEFAULT_BUCKETS, cuda_graphs: bool = True,
                           search: bool | None = None, accuracy: AccuracyBudget | None = None,
                           calibration: Sequence[torch.Tensor] | None = None,
                           search_budget_s: float = cpu_paths.DEFAULT_BUDGET_S, cache: bool = True,
                           verbose: bool = True) -> Predictor:
    """A :class:`Predictor` for ``model`` on its device: eval mode, no gradients, kernels warmed up per bucket; on
    CUDA one CUDA graph per batch-size bucket (``predictor.graphed``); on CPU the fastest verified path per bucket,
    measured on this CPU (``predictor.explain()``).

    Args:
        model: a vit_fast ViT (plain or :func:`vit_fast.quantize`-d), moved to its device first.
        dtype: of the model and its inputs. Default: the model's (a quantized model keeps its quantized
            weights through the cast). Given on CPU, it runs as asked, eagerly, with no search.
        batch_sizes: the buckets; a batch runs in the smallest that holds it, larger ones in chunks of the largest.
        cuda_graphs: capture CUDA graphs on CUDA.
        search: measure the CPU paths (:mod:`vit_fast.cpu_paths`). Default: on CPU for a float32 model that is
            not quantized and when no ``dtype`` is given.
        accuracy: how far from fp32 a CPU path may be (:class:`~vit_fast.cpu_paths.AccuracyBudget`; default
            relative error 0.1, top-1 agreement 99 %). A budget only fp32 meets gives fp32, and says so.
        calibration: a few batches of real images (B, C, H, W): the PT2E int8 path takes its static activation
            scales from them (without them, dynamic ones), and every path is checked on them instead of on
            random images.
        search_budget_s: the search stops starting candidates after this long (the whole search takes about 3
            minutes for ViT-S on 2 cores); what it did not reach is reported.
        cache: read and write the measured pick (``$XDG_CACHE_HOME/vit_fast/cpu_paths/``), keyed by model config,
            CPU model and flags, threads, batch sizes, accuracy budget and versions.
        verbose: print the pick in one line (and why bf16 is not tried on a CPU without it).

    Without a search the model itself is put in eval mode and cast (not copied); the search leaves it as it is and
    runs copies.
    """
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers; got {list(batch_sizes)}")
    quantized = getattr(model, "quantization", None)
    device = next(model.parameters()).device
    if search is None:
        search = (device.type == "cpu" and dtype is None and not quantized
                  and next(p.dtype for p in model.parameters() if p.is_floating_point()) == torch.float32)
    if search:
        if device.type != "cpu" or quantized or dtype not in (None, torch.float32):
            raise ValueError("search=True measures the CPU paths of a float32, unquantized model on CPU; got a "
                             f"{'quantized ' if quantized else ''}model on {device} with dtype={dtype}")
        pick, runners = cpu_paths.choose(model, batch_sizes, accuracy=accuracy, calibration=calibration,
                                         budget_s=search_budget_s, cache=cache, verbose=verbose)
        return Predictor(model, dtype=torch.float32, batch_sizes=batch_sizes, cuda_graphs=cuda_graphs,
                         runners=runners, pick=pick)
    model.eval().requires_grad_(False)
    if dtype is None:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    elif getattr(model, "quantization", {}).get("format") == "int8" and dtype != torch.float32:
        raise ValueError(f"an int8-quantized model runs float32 activations; got dtype={dtype}")
    model.to(dtype)
    return Predictor(model, dtype=dtype, batch_sizes=batch_sizes, cuda_graphs=cuda_graphs)


__all__ = ["DEFAULT_BUCKETS", "Predictor", "optimize_for_inference"]
