"""The fastest verified inference path on this CPU, found by measurement and cached: what
:func:`vit_fast.optimize_for_inference` runs on CPU.

The candidates (:func:`candidates`), each built on its own copy of the model, never on the caller's:

- ``fp32``: the model as it is, eager (the reference every other candidate is checked against);
- ``bf16``: the model cast to bfloat16, eager; only where the CPU has native bf16 (AMX-BF16 or AVX-512 BF16);
- ``int8``: :func:`vit_fast.quantize`'s fbgemm dynamic int8 Linear layers, eager;
- ``compiled:fp32`` / ``compiled:bf16``: ``torch.compile`` with inductor freezing (weights folded into the graph
  and prepacked for oneDNN) and C++ wrapper code (:func:`inductor_freezing`), one static graph per batch size;
  bf16 only with native bf16;
- ``pt2e:int8`` / ``pt2e:int8+bf16``: the exported graph quantized by torchao's X86 Inductor quantizer and
  compiled by inductor to oneDNN int8 kernels (AMX or VNNI where the CPU has them), the second under bf16
  autocast (:mod:`vit_fast.pt2e`); they need the ``cpu`` extra (torchao).

The search (:func:`search`) checks each candidate against fp32 on the model's own input size (relative error and
top-1 agreement within an :class:`AccuracyBudget`), times it at each requested batch size, times those within
``RUNOFF`` of the fastest again in interleaved rounds (a slow spell of a shared machine during one candidate's
timing must not decide), and picks the fastest per batch size. The patch embedding of a vit_fast model never reaches
oneDNN's bf16 convolution (wrong on AMX for some patch grids, torch 2.14): in 16 bits on CPU it is a GEMM on the
flattened patches (``vit_fast.ops.patch_embed``), eager and compiled alike, and the check would catch it if it did.
A candidate that cannot be built or compiled is reported and skipped, never raised. The search is bounded
(``budget_s``); what it did not reach is reported as not measured.

The result (:class:`CpuPick`) is cached per model config, CPU model and flags, thread count, batch sizes, accuracy
budget, torch version and the optional packages found, in ``$XDG_CACHE_HOME/vit_fast/cpu_paths/`` (beside the
GPU policies), so the next call times nothing: it builds the picked candidate and checks it against fp32 on
the model it is given (weights differ between models of one config), falling back to the next fastest when
that check fails.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from vit_fast import cpu_features as features_mod
from vit_fast import policy
from vit_fast.fileio import atomic_write

SCHEMA = "vit_fast.cpu_pick/1"
DEFAULT_BUDGET_S = 90.0  # a start deadline: with the last candidate and the run-off, ~3 min for ViT-S on 2 AMX cores
TIE = 0.02  # a later candidate displaces the pick only when faster by more than this (the timing's noise)
RUNOFF, _RUNOFF_ROUNDS = 1.5, 5  # who is timed again, interleaved, before the pick (a slow spell can cost 40 %)
_MIN_REPS, _MAX_REPS, _MIN_TIME_S = 3, 10, 0.3
_RECOMPILE_LIMIT = 64  # one static graph per batch size and compiled candidate share VisionTransformer.forward's


@dataclass(frozen=True)
class AccuracyBudget:
    """How far a candidate may be from fp32 and still be picked.

    ``rel_error``: ``||out - fp32|| / ||fp32||`` over all outputs. ``top1``: the fraction of check images whose
    top-1 class is fp32's; a row also agrees when fp32 itself scores the candidate's class within ``tie`` times
    the row's largest |logit| of its top one (on random inputs a random model's top classes are near-ties, 0.1 %
    apart for ViT-S/16; a trained model's are not).
    """

    rel_error: float = 0.1
    top1: float = 0.99
    tie: float = 0.02

    def __post_init__(self) -> None:
        for name in ("rel_error", "tie"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"accuracy.{name} must be a finite number >= 0; got {getattr(self, name)}")
        if not 0 <= self.top1 <= 1:
            raise ValueError(f"accuracy.top1 must be a fraction in [0, 1]; got {self.top1}")


def agreement(out: torch.Tensor, ref: torch.Tensor, budget: AccuracyBudget) -> tuple[float, float | None, str | None]:
    """``(relative error, top-1 agreement or None for outputs without classes, why it misses the budget or None)``."""
    out, ref = out.double(), ref.double()
    if out.shape != ref.shape:
        return math.inf, None, f"output shape {tuple(out.shape)} != fp32's {tuple(ref.shape)}"
    if not torch.isfinite(out).all():
        return math.inf, None, f"non-finite outputs at {int((~torch.isfinite(out)).sum())} positions"
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    top1 = None
    if out.dim() == 2 and out.shape[1] > 1:
        chosen = ref.gather(1, out.argmax(1, keepdim=True)).squeeze(1)
        best = ref.amax(1)
        top1 = (chosen >= best - budget.tie * ref.abs().amax(1)).double().mean().item()
    if rel > budget.rel_error:
        return rel, top1, f"relative error {rel:.3g} > the budget's {budget.rel_error:.3g}"
    if top1 is not None and top1 < budget.top1:
        return rel, top1, f"top-1 agrees with fp32 on {top1:.1%} of the check images < the budget's {budget.top1:.1%}"
    return rel, top1, None


# ---- candidates ------------------------------------------------------------------------------------------------


class Runner:
    """A built candidate: fp32 images in, fp32 outputs out. ``static_shapes``: compiled for the batch sizes it was
    warmed up at only, so callers pad a batch up to one of them."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype, *, static_shapes: bool = False,
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.fn, self.dtype, self.static_shapes, self.context = fn, dtype, static_shapes, context

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with self.context():
            return self.fn(images.to(self.dtype)).float()


@dataclass
class Candidate:
    """One way of running the model: ``build(model, calibration)`` makes a :class:`Runner` from a copy of it."""

    name: str
    what: str
    build: Callable[[nn.Module, list[torch.Tensor] | None], Runner]
    skip: str | None = None


@contextlib.contextmanager
def inductor_freezing(*, cpp_wrapper: bool = False) -> Iterator[None]:
    """Inductor freezing (weights folded and prepacked) for the compiles inside, and room for one static graph per
    batch size and compiled candidate on the model's forward.

    ``cpp_wrapper``: the compiled graph calls its kernels from generated C++ rather than Python. For ViT-S/16 in
    bf16 on a 2-core AMX Xeon that saved ~150 Python calls per forward: 2.5 % at batch 8 and 5 % at batch 1
    (interleaved, 30 rounds), for ~10 s more compile per graph."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)
    with inductor_config.patch(freezing=True, cpp_wrapper=cpp_wrapper), dynamo_config.patch(recompile_limit=limit):
        yield


def _eager(dtype: torch.dtype) -> Callable:
    def build(model: nn.Module, calibration: list[torch.Tensor] | None) -> Runner:
        return Runner(copy.deepcopy(model).to(dtype), dtype)

    return build


def _int8(model: nn.Module, calibration: list[torch.Tensor] | None) -> Runner:
    from vit_fast.quantization import quantize

    return Runner(quantize(model, "int8"), torch.float32)  # quantize works on a copy


def compiled_build(dtype: torch.dtype, *, cpp_wrapper: bool = True) -> Callable:
    """The ``compiled:*`` candidates' builder; ``cpp_wrapper=False`` gives PyTorch's default inductor settings (the
    benchmarks' baseline)."""

    def build(model: nn.Module, calibration: list[torch.Tensor] | None) -> Runner:
        net = torch.compile(copy.deepcopy(model).to(dtype), dynamic=False, fullgraph=True)
        return Runner(net, dtype, static_shapes=True,
                      context=functools.partial(inductor_freezing, cpp_wrapper=cpp_wrapper))

    return build


def _pt2e(bf16: bool) -> Callable:
    def build(model: nn.Module, calibration: list[torch.Tensor] | None) -> Runner:
        from vit_fast import pt2e

        net = pt2e.quantize_pt2e(model, calibration)

        def context() -> contextlib.AbstractContextManager:
            stack = contextlib.ExitStack()
            stack.enter_context(inductor_freezing())
            if bf16:
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            return stack

        return Runner(net, torch.float32, static_shapes=True, context=context)

    return build


def candidates() -> list[Candidate]:
    """Every candidate for this CPU, each with the reason it is not tried (``skip``) where it is not. Ordered as they
    are tried: fp32 first (the reference), then the likeliest winners on this kind of CPU, so that a search cut
    short by its budget has measured those."""
    features = features_mod.cpu_features()
    no_bf16 = features.why_no_bf16()
    from vit_fast.quantization import supported_formats

    no_int8 = supported_formats("cpu")["int8"]
    from vit_fast import pt2e

    no_pt2e = pt2e.unavailable()
    found = {
        "fp32": Candidate("fp32", "the model in fp32, eager", _eager(torch.float32)),
        "bf16": Candidate("bf16", "the model cast to bf16, eager", _eager(torch.bfloat16), skip=no_bf16),
        "int8": Candidate("int8", "quantize(model, 'int8'): fbgemm dynamic int8 Linear, eager", _int8, skip=no_int8),
        "compiled:fp32": Candidate("compiled:fp32", "torch.compile, inductor freezing, C++ wrapper, fp32",
                                   compiled_build(torch.float32)),
        "compiled:bf16": Candidate("compiled:bf16", "torch.compile, inductor freezing, C++ wrapper, bf16 weights",
                                   compiled_build(torch.bfloat16), skip=no_bf16),
        "pt2e:int8": Candidate("pt2e:int8", "PT2E int8 (torchao X86 Inductor quantizer), compiled", _pt2e(False),
                               skip=no_pt2e),
        "pt2e:int8+bf16": Candidate("pt2e:int8+bf16", "PT2E int8 compiled under bf16 autocast", _pt2e(True),
                                    skip=no_bf16 or no_pt2e),  # the CPU's reason outlasts a pip install
    }
    order = (["fp32", "compiled:bf16", "pt2e:int8+bf16", "bf16", "int8", "pt2e:int8", "compiled:fp32"]
             if features.native_bf16 else ["fp32", "int8", "pt2e:int8", "compiled:fp32", "bf16", "compiled:bf16",
                                           "pt2e:int8+bf16"])
    return [found[n] for n in order]


# ---- the result ------------------------------------------------------------------------------------------------


@dataclass
class Trial:
    """What happened to one candidate: ``status`` is ``ok`` (verified and timed), ``skipped`` (not tried here),
    ``failed`` (could not be built, compiled or run), ``inaccurate`` (outside the budget) or ``not measured``
    (the search budget ran out first)."""

    name: str
    status: str
    reason: str | None = None
    ms: dict[int, float] = field(default_factory=dict)  # batch size -> median milliseconds per call
    rel_error: float | None = None
    top1: float | None = None
    build_s: float | None = None


@dataclass
class CpuPick:
    """Per batch size, the candidate that runs, and every candidate's trial: what :func:`search` found."""

    picks: dict[int, str]
    trials: list[Trial]
    cpu: dict
    threads: int
    how: str
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    source: str = "measured now"

    def trial(self, name: str) -> Trial | None:
        return next((t for t in self.trials if t.name == name), None)

    def ranking(self, bucket: int) -> list[str]:
        """The verified candidates timed at ``bucket``, fastest first (fp32 is always among them)."""
        timed = [t for t in self.trials if t.status == "ok" and bucket in t.ms]
        return [t.name for t in sorted(timed, key=lambda t: t.ms[bucket])]

    def why_lost(self, t: Trial) -> str:
        if t.status != "ok":
            return f"{t.status}: {t.reason}"
        behind = [f"{t.ms[b] / self.trial(name).ms[b]:.2f}x {name}'s time at batch {b}"
                  for b, name in sorted(self.picks.items()) if name != t.name and b in t.ms]
        return "slower: " + ", ".join(behind) if behind else "picked"

    def describe(self) -> str:
        """What runs per batch size, how it was measured, and why each other candidate lost."""
        cpu = self.cpu
        feats = ", ".join(cpu.get("features", [])) or "none of AVX2/AVX-512/AMX"
        lines = [f"CPU inference path on {cpu['name']} ({feats}), {self.threads} threads, torch {torch.__version__}: "
                 f"{self.source}; {self.how}"]
        fp32 = self.trial("fp32")
        for b, name in sorted(self.picks.items()):
            t = self.trial(name)
            speed = f", {fp32.ms[b] / t.ms[b]:.2f}x fp32" if fp32 and b in fp32.ms and b in t.ms else ""
            lines.append(f"  batch {b}: {name} ({t.ms.get(b, math.nan):.3g} ms per call{speed})")
        lines.append("  candidates:")
        for t in self.trials:
            times = ", ".join(f"B{b} {ms:.3g} ms" for b, ms in sorted(t.ms.items()))
            acc = "" if t.rel_error is None else f"; rel. error {t.rel_error:.2g}" + (
                "" if t.top1 is None else f", top-1 {t.top1:.1%}")
            verdict = "picked" if t.name in self.picks.values() else self.why_lost(t)
            lines.append(f"    {t.name:<15} {verdict}" + (f" [{times}{acc}]" if times or acc else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        trials = [{**asdict(t), "ms": {str(b): v for b, v in t.ms.items()}} for t in self.trials]
        return {"picks": {str(b): n for b, n in self.picks.items()}, "trials": trials,
                "cpu": self.cpu, "threads": self.threads, "how": self.how, "notes": self.notes,
                "elapsed_s": self.elapsed_s}

    @classmethod
    def from_json(cls, d: dict, source: str) -> CpuPick:
        trials = [Trial(**{**t, "ms": {int(b): v for b, v in t["ms"].items()}}) for t in d["trials"]]
        return cls({int(b): n for b, n in d["picks"].items()}, trials, d["cpu"], d["threads"], d["how"],
                   list(d["notes"]), d["elapsed_s"], source)


# ---- check, time, search ---------------------------------------------------------------------------------------


def run_chunked(runner: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, bucket: int) -> torch.Tensor:
    """``runner`` over ``images`` in chunks of exactly ``bucket`` images (the last one padded with zeros)."""
    outs = []
    for i in range(0, len(images), bucket):
        chunk = images[i : i + bucket]
        if len(chunk) < bucket:
            chunk = torch.cat([chunk, chunk.new_zeros(bucket - len(chunk), *chunk.shape[1:])])
        outs.append(runner(chunk)[: len(images) - i])
    return torch.cat(outs)


def _median_ms(fn: Callable[[], object], *, warm: bool = True, min_time_s: float = _MIN_TIME_S) -> float:
    if warm:
        fn()  # caches, allocator
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < _MAX_REPS and (len(times) < _MIN_REPS or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


class _Inputs:
    """Seeded images for the check (at the largest batch size, or the caller's calibration images) and timing."""

    def __init__(self, model: nn.Module, buckets: Sequence[int], calibration: list[torch.Tensor] | None) -> None:
        self.shape = (model.config.in_chans, *model.patch_embed.img_size)
        gen = torch.Generator().manual_seed(0)
        self.calibration = calibration
        self.check_bucket = buckets[-1]
        self.check = (torch.cat(calibration) if calibration else
                      torch.randn(max(self.check_bucket, 16), *self.shape, generator=gen))
        self.timing = {b: torch.randn(b, *self.shape, generator=gen) for b in buckets}


def _verify(c: Candidate, model: nn.Module, inputs: _Inputs, ref: torch.Tensor, budget: AccuracyBudget,
            trial: Trial) -> Runner | None:
    """Build ``c`` and check it against fp32; fills ``trial``; the runner, or None when it failed or missed."""
    t0 = time.perf_counter()
    try:
        runner = c.build(model, inputs.calibration)
        out = run_chunked(runner, inputs.check, inputs.check_bucket)
    except Exception as e:  # noqa: BLE001 - a candidate that cannot be built or compiled is reported, not raised
        trial.status, trial.reason = "failed", _first_line(e)
        return None
    trial.build_s = time.perf_counter() - t0
    trial.rel_error, trial.top1, why = agreement(out, ref, budget)
    if why is not None:
        trial.status, trial.reason = "inaccurate", why
        return None
    return runner


def _time_buckets(runner: Runner, trial: Trial, inputs: _Inputs, buckets: Sequence[int],
                  deadline: float | None) -> bool:
    """Fill ``trial.ms`` per batch size (past ``deadline`` no new size is started); False when a call failed."""
    for b in buckets:
        if deadline is not None and trial.ms and time.perf_counter() > deadline:
            trial.reason = f"timed at batch {', '.join(map(str, trial.ms))} only: the search budget ran out"
            break
        try:
            trial.ms[b] = _median_ms(lambda b=b: runner(inputs.timing[b]))
        except Exception as e:  # noqa: BLE001 - e.g. a compile that fails at one batch size only
            trial.status, trial.reason, trial.ms = "failed", f"at batch {b}: {_first_line(e)}", {}
            return False
    return True


def _close_to_fastest(trials: list[Trial], indices: Iterable[int], b: int) -> list[int]:
    """The verified candidates among ``indices`` timed at batch ``b`` within RUNOFF of the fastest of them."""
    timed = [i for i in indices if trials[i].status == "ok" and b in trials[i].ms]
    fastest = min((trials[i].ms[b] for i in timed), default=math.inf)
    return [i for i in timed if trials[i].ms[b] <= fastest * RUNOFF]


def _run_off(trials: list[Trial], built: dict[int, Runner], inputs: _Inputs, buckets: Sequence[int]) -> None:
    """Per batch size, time the candidates within RUNOFF of the fastest again, in interleaved rounds (a fresh order
    each; every runner is warm by now, so a round is its median of _MIN_REPS calls): the machine's speed drifts by
    10 % or more within a minute on a shared host, and a candidate timed during a slow spell would otherwise lose to
    a slower one. Each one's time becomes the median of its rounds; one that fails here is out."""
    rng = random.Random(0)
    for b in buckets:
        close = _close_to_fastest(trials, built, b)
        if len(close) < 2:
            continue
        rounds: dict[int, list[float]] = {i: [] for i in close}
        for _ in range(_RUNOFF_ROUNDS):
            rng.shuffle(close)
            for i in close:
                if trials[i].status != "ok":
                    continue
                try:
                    rounds[i].append(_median_ms(lambda i=i, b=b: built[i](inputs.timing[b]), warm=False, min_time_s=0))
                except Exception as e:  # noqa: BLE001 - reported like a failure in the first timing
                    trials[i].status, trials[i].reason, trials[i].ms = "failed", f"at batch {b}: {_first_line(e)}", {}
        for i, times in rounds.items():
            if trials[i].status == "ok":
                trials[i].ms[b] = statistics.median(times)
    for i in [i for i in built if trials[i].status != "ok"]:
        del built[i]


def search(model: nn.Module, batch_sizes: Sequence[int], *, accuracy: AccuracyBudget | None = None,
           calibration: Sequence[torch.Tensor] | None = None, budget_s: float = DEFAULT_BUDGET_S,
           cands: Sequence[Candidate] | None = None) -> tuple[CpuPick, dict[int, Runner]]:
    """Check and time every candidate (in :func:`candidates`' order, until ``budget_s`` has passed); returns the
    pick and, per batch size, its built runner."""
    start = time.perf_counter()
    budget = accuracy or AccuracyBudget()
    buckets = sorted({int(b) for b in batch_sizes})
    inputs = _Inputs(model, buckets, list(calibration) if calibration else None)
    cands = list(cands) if cands is not None else candidates()
    if not cands or cands[0].name != "fp32":
        raise ValueError(f"the candidates must start with fp32, the reference; got {[c.name for c in cands]}")
    trials: list[Trial] = []
    built: dict[int, Runner] = {}  # index in trials -> the runner of a verified, timed candidate
    ref = None
    for c in cands:
        trial = Trial(c.name, "ok")
        trials.append(trial)
        if c.skip:
            trial.status, trial.reason = "skipped", c.skip
            continue
        if ref is not None and time.perf_counter() - start > budget_s:
            trial.status, trial.reason = "not measured", f"the search budget ({budget_s:.0f} s) was used up first"
            continue
        if ref is None:  # fp32: the reference itself
            runner = c.build(model, inputs.calibration)
            ref = run_chunked(runner, inputs.check, inputs.check_bucket)
            trial.rel_error, trial.top1, _ = agreement(ref, ref, budget)
        else:
            runner = _verify(c, model, inputs, ref, budget, trial)
            if runner is None:
                continue
        if _time_buckets(runner, trial, inputs, buckets, None if trial is trials[0] else start + budget_s):
            built[len(trials) - 1] = runner  # only a candidate that ran at every size it was timed at competes
            # hold on only to the runners a run-off may still pick, and fp32's: the pick if every other one fails
            keep = {0}.union(*(_close_to_fastest(trials, built, b) for b in buckets))
            built = {i: r for i, r in built.items() if i in keep}
    _run_off(trials, built, inputs, buckets)
    best = {}
    for b in buckets:
        for i in built:  # in the candidates' order: a later one displaces the pick only when faster by TIE
            ms = trials[i].ms.get(b)
            if ms is not None and (b not in best or ms < trials[best[b]].ms[b] * (1 - TIE)):
                best[b] = i
    runners = {b: built[i] for b, i in best.items()}
    picks = {b: trials[i].name for b, i in best.items()}
    notes = []
    if all(n == "fp32" for n in picks.values()) and any(t.status == "inaccurate" for t in trials):
        notes.append("no candidate but fp32 met the accuracy budget: fp32 eager runs")
    features = features_mod.cpu_features()
    how = (f"each candidate checked against fp32 on {len(inputs.check)} "
           f"{'calibration' if calibration else 'random'} images at {inputs.shape[1]}x{inputs.shape[2]} "
           f"(relative error <= {budget.rel_error:g}, top-1 >= {budget.top1:.0%}), then timed per batch size "
           f"(median of {_MIN_REPS}-{_MAX_REPS} calls after a warm-up; those within {RUNOFF:g}x of the fastest "
           f"timed again in {_RUNOFF_ROUNDS} interleaved rounds, each one's median kept; a later candidate must be "
           f"{TIE:.0%} faster)")
    pick = CpuPick(picks, trials, features.as_dict(), torch.get_num_threads(), how, notes,
                   time.perf_counter() - start)
    return pick, runners


# ---- the cache -------------------------------------------------------------------------------------------------


def cache_key(model: nn.Module, batch_sizes: Sequence[int], accuracy: AccuracyBudget, calibrated: bool) -> dict:
    """What a cached pick is valid for."""
    features = features_mod.cpu_features()
    optional = {m: importlib.util.find_spec(m) is not None for m in ("torchao",)}
    return {"schema": SCHEMA, "config": model.config.to_dict(), "cpu": features.name, "flags": sorted(features.flags),
            "threads": torch.get_num_threads(), "batch_sizes": sorted({int(b) for b in batch_sizes}),
            "torch": torch.__version__, "vit_fast": policy.versions()["vit_fast"], "accuracy": asdict(accuracy),
            "calibrated": calibrated, "optional": optional}


def cache_path(key: dict) -> str:
    name = f"{features_mod.slug(key['cpu'])}-{features_mod.key_digest(key)}.json"
    return os.path.join(features_mod.cache_dir(), name)


def _rebuild(pick: CpuPick, model: nn.Module, buckets: Sequence[int], accuracy: AccuracyBudget,
             calibration: list[torch.Tensor] | None) -> dict[int, Runner]:
    """The cached pick's runners, each checked on this model; a bucket whose pick fails takes the next fastest."""
    by_name = {c.name: c for c in candidates()}
    inputs = _Inputs(model, buckets, calibration)
    ref = run_chunked(by_name["fp32"].build(model, calibration), inputs.check, inputs.check_bucket)
    built: dict[str, Runner | None] = {}
    runners = {}
    for b in buckets:
        for name in [pick.picks[b], *pick.ranking(b)]:
            if name not in built:
                trial = Trial(name, "ok")
                c = by_name.get(name)
                built[name] = None if c is None or c.skip else _verify(c, model, inputs, ref, accuracy, trial)
                if built[name] is None:
                    pick.notes.append(f"the cached pick {name} failed on this model ({trial.status}: {trial.reason})")
            if built[name] is not None:
                pick.picks[b], runners[b] = name, built[name]
                break
    for b, r in runners.items():  # compile the static shapes now, not at the first request
        if r.static_shapes:
            r(inputs.timing[b])
    return runners


def _calibration(model: nn.Module, calibration: Sequence[torch.Tensor] | torch.Tensor | None
                 ) -> list[torch.Tensor] | None:
    if calibration is None:
        return None
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    shape = (model.config.in_chans, *model.patch_embed.img_size)
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.dim() != 4 or tuple(b.shape[1:]) != shape or not len(b):
            got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"calibration must be batches of images (B, {', '.join(map(str, shape))}); "
                             f"batch {i} is {got}")
    return [b.detach().float().cpu() for b in batches] or None


def choose(model: nn.Module, batch_sizes: Sequence[int], *, accuracy: AccuracyBudget | None = None,
           calibration: Sequence[torch.Tensor] | None = None, budget_s: float = DEFAULT_BUDGET_S,
           cache: bool = True, verbose: bool = True) -> tuple[CpuPick, dict[int, Runner]]:
    """The cached pick for this model, CPU and settings when there is one (rebuilt and checked), else a
    :func:`search`, written to the cache. ``verbose`` prints a one-line summary (and why bf16 is not tried)."""
    accuracy = accuracy or AccuracyBudget()
    buckets = sorted({int(b) for b in batch_sizes})
    calibration = _calibration(model, calibration)
    key = cache_key(model, buckets, accuracy, calibration is not None)
    path = cache_path(key)
    entry = features_mod.read_cached(path, key) if cache else None
    if entry is not None:
        pick = CpuPick.from_json(entry["pick"], f"cached ({path}), measured in {entry['pick']['elapsed_s']:.0f} s")
        runners = _rebuild(pick, model, buckets, accuracy, calibration)
    else:
        pick, runners = search(model, buckets, accuracy=accuracy, calibration=calibration, budget_s=budget_s)
        if cache:
            atomic_write(path, json.dumps({"key": key, "pick": pick.to_json()}, indent=1, default=str) + "\n")
    if verbose:
        summary = ", ".join(f"batch {b}: {n}" for b, n in sorted(pick.picks.items()))
        bf16 = pick.trial("bf16")
        why = f"; bf16 not tried: {bf16.reason}" if bf16 is not None and bf16.status == "skipped" else ""
        print(f"vit_fast: CPU inference path {summary} ({pick.source}){why}", file=sys.stderr)
    _PICKS.append(pick)
    del _PICKS[:-_KEEP_PICKS]
    return pick, runners


_PICKS: list[CpuPick] = []  # the picks made in this process, newest last (at most _KEEP_PICKS), for explain()
_KEEP_PICKS = 8


def explain_picks() -> str:
    """What :func:`vit_fast.optimize_for_inference` picked on CPU in this process, and why ("" when nothing was)."""
    return "\n".join(p.describe() for p in _PICKS)


__all__ = ["AccuracyBudget", "Candidate", "CpuPick", "Runner", "Trial", "agreement", "candidates", "choose",
           "compiled_build", "explain_picks", "inductor_freezing", "search"]
