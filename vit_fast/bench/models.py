"""The end-to-end benchmark: inference and a training step of whole models, vit_fast per backend and
compiled, against timm's same model, eager and compiled; on CPU also vit_fast's measured pick, PT2E int8, bf16 and
torch.compile with freezing, ONNX Runtime and OpenVINO (:mod:`vit_fast.bench.cpu_rows`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import importlib.util
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F

import vit_fast
from vit_fast.backends import dtype_name
from vit_fast.bench import cpu_rows
from vit_fast.bench.cases import patch_size, seed
from vit_fast.bench.measure import Budget, check_and_time, compiled, derive, new_row
from vit_fast.bench.providers import Provider, backend_providers, compile_skip
from vit_fast.bench.timing import Timer
from vit_fast.config import ViTConfig, get_config
from vit_fast.explanation import explain

MODEL_MODES: tuple[str, ...] = ("inference", "train")
CHECK_PARAMS = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "head.weight")


def model_flops(cfg: ViTConfig, mode: str) -> int:
    """Analytic FLOPs per image (a multiply-add is 2). Forward: patch embedding 2 * Np * (C * P * P) * E; per
    block qkv 2 * N * E * 3E, attention 4 * N * N * E (q k^T and p v over all heads), proj 2 * N * E * E,
    MLP 4 * N * E * hidden; head 2 * E * classes. Norms, softmax, GELU and adds are left out. A training
    step is the forward plus a backward of twice the forward, except the patch embedding's input gradient
    (images need none). ViT-B/16 at 224: 35.1 GFLOP forward."""
    p = patch_size(cfg)
    n, e = cfg.num_patches + cfg.num_prefix_tokens, cfg.embed_dim
    patch = 2 * cfg.num_patches * cfg.in_chans * p * p * e
    block = 2 * n * e * 3 * e + 4 * n * n * e + 2 * n * e * e + 4 * n * e * cfg.mlp_hidden_dim
    fwd = patch + cfg.depth * block + 2 * e * cfg.num_classes
    return fwd if mode == "inference" else 3 * fwd - patch


def default_models(device: torch.device, quick: bool) -> list[str]:
    if device.type == "cuda":
        return ["vit_base_patch16_224"] if quick else ["vit_small_patch16_224", "vit_base_patch16_224",
                                                        "vit_base_patch16_384", "vit_large_patch16_224"]
    return ["vit_tiny_patch4_32"] if quick else ["vit_tiny_patch4_32", "vit_small_patch4_32", "vit_tiny_patch16_224"]


def default_batch(name: str, device: torch.device, quick: bool) -> int:
    if device.type != "cuda":
        return 8 if quick else 16
    cfg = get_config(name)
    return 256 if cfg.num_patches * cfg.embed_dim <= 196 * 768 else 64


def timm_model(cfg: ViTConfig) -> torch.nn.Module:
    """timm's ``VisionTransformer`` with the same architecture (and so the same parameter names)."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    kw = cfg.to_dict()
    eps = kw.pop("norm_eps")
    return TimmViT(**kw, norm_layer=partial(torch.nn.LayerNorm, eps=eps))


def _timm_copy(cfg: ViTConfig, base: torch.nn.Module) -> torch.nn.Module:
    model = timm_model(cfg)
    model.load_state_dict(base.state_dict())
    return model.to(next(base.parameters()).device)


def _ours(cfg: ViTConfig, base: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(base)


INFERENCE_ONLY = "inference only: quantized and graphed models do not train"


def _quantized(fmt: str) -> Callable[[ViTConfig, torch.nn.Module], torch.nn.Module]:
    def build(cfg: ViTConfig, base: torch.nn.Module) -> torch.nn.Module:
        from vit_fast.quantization import quantize

        return quantize(base, fmt)  # a copy

    return build


def _graphed(fmt: str | None) -> Callable[[ViTConfig, torch.nn.Module], torch.nn.Module]:
    """The serving path: optimize_for_inference, one CUDA graph for the case's batch (the dtype is the case's:
    the predictor is made on the first call, when the case has cast the model)."""

    class Graphed(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model, self.predictor = model, None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.predictor is None:
                self.predictor = vit_fast.optimize_for_inference(self.model, dtype=x.dtype, batch_sizes=(len(x),))
            return self.predictor(x)

    def build(cfg: ViTConfig, base: torch.nn.Module) -> torch.nn.Module:
        return Graphed(_quantized(fmt)(cfg, base) if fmt else copy.deepcopy(base))

    return build


def _reduce_overhead(cfg: ViTConfig, base: torch.nn.Module) -> torch.nn.Module:
    torch._dynamo.reset()
    return torch.compile(copy.deepcopy(base), mode="reduce-overhead", dynamic=False)


def inference_providers(device: torch.device, dtype: torch.dtype, *, allow_compile: bool = True) -> list[Provider]:
    """Quantized (int8 on CPU, fp8 on CUDA) and low-latency (CUDA graphs, compile's reduce-overhead) inference."""
    from vit_fast.quantization import supported_formats

    formats = supported_formats(device)
    fp8_skip = ("fp8 on CPU runs torch._scaled_mm's slow CPU path: a numerics check (vit-fast eval --quantize fp8), "
               "not a speed path") if device.type == "cpu" else None
    if device.type == "cuda" and dtype != torch.bfloat16:
        fp8_skip = "fp8 rows run with --dtype bfloat16 (row-wise scaled cuBLASLt FP8 GEMMs write bf16)"
    no_graphs = None if device.type == "cuda" else "CUDA graphs need a CUDA device (on CPU the forward runs eagerly)"
    out = [Provider("vit_fast:int8", "vit_fast", _quantized("int8"), skip=formats["int8"], train_skip=INFERENCE_ONLY),
           Provider("vit_fast:fp8", "vit_fast", _quantized("fp8"), skip=formats["fp8"] or fp8_skip,
                    train_skip=INFERENCE_ONLY),
           Provider("graphed:vit_fast", "vit_fast", _graphed(None), skip=no_graphs, train_skip=INFERENCE_ONLY),
           Provider("graphed:vit_fast:fp8", "vit_fast", _graphed("fp8"), skip=no_graphs or formats["fp8"] or fp8_skip,
                    train_skip=INFERENCE_ONLY)]
    ro_skip = None if allow_compile else "torch.compile disabled (--no-compile)"
    out.append(Provider("compiled:vit_fast:reduce-overhead", "vit_fast", _reduce_overhead,
                        skip=no_graphs or ro_skip, train_skip=INFERENCE_ONLY))
    return out


def model_providers(device: torch.device, dtype: torch.dtype, *, quick: bool, allow_compile: bool = True,
                    ) -> list[Provider]:
    """vit_fast per backend, ``auto`` when it mixes backends, vit_fast compiled, timm eager and compiled."""
    out = backend_providers(_ours, device)
    with vit_fast.set_backend("auto"):
        picked = set(explain(device, dtype).picked.values())
    same = f"auto picks {next(iter(picked))} for every op: the same as vit_fast:{next(iter(picked))}"
    out.append(Provider("vit_fast:auto", "vit_fast", _ours, lambda: vit_fast.set_backend("auto"),
                        skip=same if len(picked) == 1 else None))
    cskip = compile_skip(device, quick, allow_compile)
    # compiling a whole training step costs minutes on a GPU too: the full run measures it
    ctrain = "compiled training step skipped in --quick (compile time); the full run measures it" \
        if quick and device.type == "cuda" else None
    out.append(Provider("compiled:vit_fast", "vit_fast", _ours, lambda: vit_fast.set_backend("auto"), compile=True,
                        skip=cskip, train_skip=ctrain))
    tskip = None if importlib.util.find_spec("timm") else "timm is not installed (pip install timm)"
    out.append(Provider("timm:eager", "baseline", _timm_copy, skip=tskip))
    out.append(Provider("compiled:timm", "baseline", _timm_copy, compile=True, skip=tskip or cskip,
                        train_skip=ctrain))
    cpu = cpu_rows.cpu_providers(device, quick=quick, allow_compile=allow_compile, timm_copy=_timm_copy,
                                 timm_skip=tskip)
    return out + inference_providers(device, dtype, allow_compile=allow_compile) + cpu


def _autocast(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 2 and logits.shape[-1] > 1:
        return F.cross_entropy(logits.float(), labels % logits.shape[-1])
    return logits.float().square().mean()  # no classifier head (num_classes=0): any scalar of the features


def _train_grads(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 amp: torch.dtype | None) -> list[torch.Tensor]:
    with _autocast(images.device, amp):
        loss = _loss(model(images), labels)
    loss.backward()
    named = dict(getattr(model, "_orig_mod", model).named_parameters())  # a compiled module prefixes the names
    grads = [named[n].grad.detach().clone() for n in CHECK_PARAMS if n in named]
    model.zero_grad(set_to_none=True)
    return grads


class _ModelCase:
    """One model, batch, dtype and mode: the inputs, what a provider must agree with, and how a provider's
    model is prepared and stepped."""

    def __init__(self, cfg: ViTConfig, base: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 mode: str, dtype: torch.dtype) -> None:
        self.cfg, self.base, self.images, self.labels, self.mode, self.dtype = cfg, base, images, labels, mode, dtype
        self.amp = None if dtype == torch.float32 else dtype
        oracle_dtype = torch.float64 if dtype == torch.float32 else torch.float32
        with vit_fast.set_backend("reference"):
            if mode == "inference":
                with torch.no_grad():
                    oracle = [copy.deepcopy(base).to(oracle_dtype).eval()(images.to(oracle_dtype))]
                    same = [copy.deepcopy(base).to(dtype).eval()(images.to(dtype))]
            else:
                oracle = _train_grads(copy.deepcopy(base).to(oracle_dtype).train(), images.to(oracle_dtype), labels,
                                      None)
                same = _train_grads(copy.deepcopy(base).train(), images, labels, self.amp)
        self.expect = (same, oracle)
        self._quantized_expect: dict[str, tuple] = {}

    def expect_for(self, p: Provider, kind: str | None = None) -> tuple:
        """What a provider is checked against. A quantized model is held to its own error: the same quantized
        model on the reference backend is the "same dtype" result the scale-aware rule measures from. The CPU
        rows in bf16 or PT2E int8 have theirs (``kind``, :func:`cpu_rows.expect_kind`)."""
        kind = kind or cpu_rows.expect_kind(p)
        if kind is not None and kind != "fp32" and self.mode == "inference" and not p.skip:
            if kind == "int8":
                return self.expect_for(dataclasses.replace(p, name="vit_fast:int8"))
            if kind not in self._quantized_expect:
                with vit_fast.set_backend("reference"):
                    self._quantized_expect[kind] = ([cpu_rows.yardstick(kind, self.base, self.images)],
                                                    self.expect[1])
            return self._quantized_expect[kind]
        fmt = next((f for f in ("int8", "fp8") if p.name.endswith(f":{f}")), None)
        if fmt is None or self.mode != "inference" or p.skip:
            return self.expect
        if fmt not in self._quantized_expect:
            with vit_fast.set_backend("reference"), torch.no_grad():
                model = _quantized(fmt)(self.cfg, self.base).to(self.dtype)
                self._quantized_expect[fmt] = ([model(self.images.to(self.dtype))], self.expect[1])
        return self._quantized_expect[fmt]

    def precision(self) -> str:
        if self.mode == "inference":
            return f"{dtype_name(self.dtype)} weights"
        return f"autocast {dtype_name(self.amp)}" if self.amp else "float32"

    def prepare(self, p: Provider) -> tuple[Callable[[], list[torch.Tensor]], Callable[[], None]]:
        """(first call: the outputs or gradients to check, one timed step) for the provider's model."""
        model = p.fn(self.cfg, self.base)
        if self.mode == "inference":
            dtype = p.dtype or self.dtype
            net = compiled(model.to(dtype).eval(), p)
            x = self.images.to(dtype)

            def infer() -> list[torch.Tensor]:
                with torch.no_grad():
                    return [net(x)]

            return infer, infer
        net = compiled(model.train(), p)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step() -> None:
            with _autocast(self.images.device, self.amp):
                loss = _loss(net(self.images), self.labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return (lambda: _train_grads(net, self.images, self.labels, self.amp)), train_step


def _searched(p: Provider, row: dict, base: torch.nn.Module, batch: int, budget: Budget | None
              ) -> tuple[Provider, str | None]:
    """The CPU path search's row: search at the case's batch (its time recorded apart, as compile time is), then
    the provider that runs the pick and the kind of yardstick the pick is checked against."""
    if budget is not None and budget.left() < 120:
        return dataclasses.replace(p, skip="time budget (--budget-s) used up"), None
    t0 = time.perf_counter()
    try:
        pick, fn = p.fn(base, batch)  # cpu_rows.search_pick with the run's --quick and --no-compile
    except Exception as e:  # noqa: BLE001 - recorded as the row's failure, the run goes on
        return dataclasses.replace(p, fn=_raise(e)), None
    chosen = pick.picks[batch]
    row.update(pick=chosen, search_s=time.perf_counter() - t0, search=pick.to_json(), peak_key=_peak_of(chosen),
               precision=f"picked: {chosen}")
    return dataclasses.replace(p, fn=fn), cpu_rows.PICK_KIND.get(chosen)


def _peak_of(pick: str) -> str:
    return "int8" if "int8" in pick else "bfloat16" if "bf16" in pick else "float32"


def _raise(e: BaseException) -> Callable:
    def fn(cfg: ViTConfig, base: torch.nn.Module) -> torch.nn.Module:
        raise e

    return fn


def bench_model(name: str, batch: int, dtype: torch.dtype, device: torch.device, providers: Sequence[Provider],
                modes: Sequence[str], timer: Timer, peaks: dict, budget: Budget | None = None,
                on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Inference (weights in ``dtype``) and a training step (fp32 weights, autocast ``dtype`` unless fp32,
    forward + backward + AdamW) per provider: images/s, TFLOP/s, peak memory, compile time separately."""
    cfg = get_config(name)
    seed(name, batch, dtype_name(dtype))
    base = vit_fast.VisionTransformer(cfg).to(device)
    images = torch.randn(batch, cfg.in_chans, *(g * patch_size(cfg) for g in cfg.grid_size), device=device)
    labels = torch.randint(0, max(1, cfg.num_classes), (batch,), device=device)
    rows = []
    for mode in modes:
        case = _ModelCase(cfg, base, images, labels, mode, dtype)
        for p in providers:
            row = new_row("model", name, p, mode, p.dtype or dtype, {"B": batch}, f"B{batch}")
            row.update(batch=batch, precision=cpu_rows.PRECISION.get(p.name) or (
                case.precision() if p.dtype is None else f"{dtype_name(p.dtype)} weights"))
            kind = cpu_rows.expect_kind(p)
            if p.name == cpu_rows.OPTIMIZED and mode == "inference" and not p.skip:
                p, kind = _searched(p, row, base, batch, budget)
            try:
                expect = case.expect_for(p, kind)
            except Exception as e:  # noqa: BLE001 - a yardstick that cannot be built fails its row, not the run
                expect = None
                row.update(status="failed", reason=f"its yardstick failed: {type(e).__name__}: "
                                                   f"{(str(e).strip().splitlines() or [''])[0][:200]}")
            timing = None if expect is None else check_and_time(
                row, p, partial(case.prepare, p), expect, cpu_rows.check_dtype(kind, dtype), timer, budget,
                skip=p.train_skip if mode == "train" else None, reserve_s=120 if p.compile else 5, heavy=True)
            gc.collect()  # the provider's model and optimizer are gone: give their memory back
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if timing is not None:
                derive(row, timing, model_flops(cfg, mode) * batch, None, peaks)
                row["images_per_s"] = batch / (row["median_ms"] * 1e-3)
            rows.append(row)
            if on_row:
                on_row(row)
    return rows
