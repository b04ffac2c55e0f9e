"""Check, then time: every provider's first call is compared with an oracle before it is timed, and a row
records what was measured, or why it was skipped or failed."""

from __future__ import annotations

import itertools
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vit_fast import backends
from vit_fast.backends import dtype_name
from vit_fast.bench.cases import Inputs, OpBench, run_once, seed
from vit_fast.bench.peaks import peak_key
from vit_fast.bench.providers import Provider
from vit_fast.bench.timing import CPU_WORKING_SET, Timer, Timing, sync
from vit_fast.tolerance import ATOL, excess, worst_excess

MAX_ROTATE_SETS = 4096


@dataclass
class Budget:
    """Stops new measurements once ``seconds`` have passed (the rest are recorded as skipped)."""

    seconds: float | None
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.perf_counter() - self.start)


def new_row(kind: str, name: str, provider: Provider, mode: str, dtype: torch.dtype, shape: dict, label: str) -> dict:
    return {"kind": kind, "name": name, "provider": provider.name, "provider_kind": provider.kind,
            "compiled": provider.compile, "mode": mode, "dtype": dtype_name(dtype), "shape": shape,
            "shape_label": label, "status": "ok", "reason": None}


def derive(row: dict, timing: Timing, flop: int | None, nbytes: int | None, peaks: dict) -> None:
    """Timing fields plus the derived figures and their fractions of the run's peaks."""
    s = timing.median_ms * 1e-3
    row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, min_ms=timing.min_ms,
               spread=timing.spread, repeats=timing.repeats, flop=flop, bytes=nbytes)
    row["tflops"] = flop / s / 1e12 if flop else None
    row["gbps"] = nbytes / s / 1e9 if nbytes else None
    peak = peaks["matmul_tflops"].get(peak_key(row))
    row["frac_peak_flops"] = row["tflops"] / peak if row["tflops"] is not None and peak else None
    row["frac_peak_bw"] = row["gbps"] / peaks["bandwidth_gbps"] if row["gbps"] is not None else None
    row["exceeds_peak"] = any(f is not None and f > 1.0 for f in (row["frac_peak_flops"], row["frac_peak_bw"]))


def _agreement(outs: Sequence[torch.Tensor], same: Sequence[torch.Tensor], oracle: Sequence[torch.Tensor],
               dtype: torch.dtype) -> tuple[float, str]:
    """The worst ``err / tol`` over the tensors (<= 1 passes) by :mod:`vit_fast.tolerance`'s rule. The
    absolute term is the case's dtype's: an autocast training step has fp32 gradients computed in bf16."""
    checks = [excess(o, s, r, atol=ATOL[dtype]) for o, s, r in zip(outs, same, oracle, strict=True)]
    i = max(range(len(checks)), key=lambda i: checks[i][0])
    return checks[i][0], f"tensor {i}: {checks[i][1]}"


def _close_rule(op: OpBench, shape: dict, base: Inputs) -> Callable[[Sequence[object]], tuple[float, str]]:
    """The check of an op judged by its own close rule (the quantized ones), against its float64 oracle on the very
    inputs the providers get, as the tests judge it. Their outputs are e4m3 codes with scales whose layout may
    differ between backends (one per token or one per head), which the generic rule cannot compare."""
    cases, dims = op.spec.cases, op.dims(shape)
    exact = cases.oracle(dims, {k: v.detach().double() for k, v in base.tensors.items()})
    inputs = base.assemble(base.tensors)

    def agree(outs: Sequence[object]) -> tuple[float, str]:
        try:
            cases.close(outs[0], exact, inputs, op.name)
        except AssertionError as e:
            return math.inf, str(e).splitlines()[0] if str(e) else "the op's close rule"
        return 0.0, "the op's close rule"

    return agree


def verdict(op: OpBench, shape: dict, base: Inputs, dtype: torch.dtype, names: Sequence[str] | None = None
            ) -> tuple[str, Callable[[Sequence[object]], tuple[float, str]]]:
    """How a result on ``base`` is judged, as the tests judge it: the mode the check runs and ``agree(outs) ->
    (worst err / tol, where)``, passing at <= 1. An op with its own close rule (the quantized ones) is judged by it,
    forward only, against its float64 oracle; every other op's output and gradients (fwd+bwd where the op is
    measured so) by the tolerance rule, against its reference in ``dtype`` and in float64 (float32 for a 16-bit
    ``dtype``). ``names`` names the output and gradients in the detail (else their positions)."""
    if op.spec.cases.close is not None:
        return "fwd", _close_rule(op, shape, base)
    checked = "fwd+bwd" if "fwd+bwd" in op.modes else "fwd"
    if checked == "fwd+bwd":
        with torch.no_grad():
            args, kwargs = base.assemble(base.tensors)
            base.grad_out = torch.randn_like(op.reference()(*args, **kwargs))
    oracle_out, oracle_grads = run_once(op.reference(), base.to(torch.float64 if dtype == torch.float32
                                                                 else torch.float32), checked)
    same_out, same_grads = run_once(op.reference(), base, checked)
    same, oracle = (same_out, *same_grads), (oracle_out, *oracle_grads)

    def agree(outs: Sequence[object]) -> tuple[float, str]:
        n = len(outs)  # a forward-only measurement of an op that has gradients
        if names is None:
            return _agreement(outs, same[:n], oracle[:n], dtype)
        return worst_excess(outs, same[:n], oracle[:n], names[:n], dtype=dtype)

    return checked, agree


def _classify_error(e: BaseException, provider: Provider, caught: Sequence[warnings.WarningMessage] = ()
                    ) -> tuple[str, str]:
    """(status, reason) for an exception on a provider's first call: 'skipped' when it cannot run these
    inputs (unavailable backend, unsupported SDPA kernel, out of memory, a peer's own error), else 'failed'.
    SDPA says why a forced kernel cannot run in warnings (``caught``): the first one joins the reason."""
    if isinstance(e, backends.BackendUnavailableError):
        return "skipped", _first_line(e)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "skipped", "out of memory at this shape"
    if provider.kind == "peer":
        return "skipped", f"{type(e).__name__}: {_first_line(e)}"
    if isinstance(e, RuntimeError) and re.search(r"no (viable|available) (backend|kernel)", str(e), re.I):
        why = next((str(w.message).strip() for w in caught), "")
        return "skipped", "this SDPA kernel cannot run these inputs" + (f": {why[:300]}" if why else "")
    return "failed", f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compiled(fn: Callable, provider: Provider) -> Callable:
    """``fn`` under ``torch.compile`` when the provider is a compiled one, with a fresh cache per case: no
    recompile limit reached, no stale graphs."""
    if not provider.compile:
        return fn
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# prepare() -> (first, step): first() computes what is checked (and compiles, autotunes, warms up); step() is
# what is timed.
Prepare = Callable[[], tuple[Callable[[], Sequence[torch.Tensor]], Callable[[], object]]]


def check_and_time(row: dict, p: Provider, prepare: Prepare, expect: tuple[Sequence[torch.Tensor], ...],
                   dtype: torch.dtype, timer: Timer, budget: Budget | None, *, skip: str | None = None,
                   reserve_s: float = 1.0, heavy: bool = False,
                   agree: Callable[[Sequence[object]], tuple[float, str]] | None = None) -> Timing | None:
    """Check the provider's first call against ``expect`` = (same-dtype reference, oracle), then time it.
    Returns the timing, or None with the row's status and reason saying why it was skipped or failed.
    ``reserve_s``: the budget a measurement needs left to start. ``heavy``: a model step, also measured for
    its peak memory. ``agree(outs) -> (ratio, detail)``: the check instead of ``expect``'s (an inference op's own
    close rule)."""
    if p.skip or skip:
        row.update(status="skipped", reason=p.skip or skip)
        return None
    if budget is not None and budget.left() < reserve_s:
        row.update(status="skipped", reason="time budget (--budget-s) used up")
        return None
    device, caught = timer.device, []
    try:
        first, step = prepare()
        with p.context(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # SDPA explains an unsupported input in a warning: kept for the reason
            t0 = time.perf_counter()
            outs = first()
            sync(device)
            first_s = time.perf_counter() - t0
            n = len(outs)
            ratio, detail = agree(outs) if agree else _agreement(outs, expect[0][:n], expect[1][:n], dtype)
            row.update(agreement=ratio)
            if not ratio <= 1.0:
                row.update(status="failed", reason=f"disagrees with the reference: {detail}")
                return None
            timing = timer.time(step, heavy=heavy)
            if heavy:
                row["peak_mem_bytes"] = _peak_memory(step, device)
    except Exception as e:  # noqa: BLE001 - recorded per provider; the run goes on
        status, reason = _classify_error(e, p, caught)
        row.update(status=status, reason=reason)
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if p.compile:
        row["compile_s"] = max(0.0, first_s - timing.median_ms * 1e-3)
    return timing


def _peak_memory(step: Callable[[], object], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None  # no allocator statistics on CPU
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _input_sets(base: Inputs, device: torch.device) -> list[Inputs]:
    if device.type == "cuda":
        return [base]  # do_bench flushes the L2 before every repeat
    return base.replicas(max(1, min(MAX_ROTATE_SETS, math.ceil(CPU_WORKING_SET / max(1, base.nbytes())))))


def bench_op_case(op: OpBench, shape: dict[str, int], dtype: torch.dtype, device: torch.device,
                  providers: Sequence[Provider], modes: Sequence[str], timer: Timer, peaks: dict,
                  budget: Budget | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Check, then time, every provider on one shape and dtype, in each mode. Returns one row per
    (provider, mode), measured, skipped (with the reason) or failed (with the reason)."""
    label = op.label(shape)
    seed(op.name, label, dtype_name(dtype))
    base = op.make(shape, dtype, device)
    _, agree = verdict(op, shape, base, dtype)
    sets = _input_sets(base, device)
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    for mode in (m for m in modes if m in op.modes):
        for p in providers:
            row = new_row("op", op.name, p, mode, dtype, shape, label)
            row["tokens"] = op.tokens(shape)

            def prepare(p: Provider = p, mode: str = mode) -> tuple[Callable, Callable]:
                fn = compiled(p.factory() if p.factory is not None else p.fn, p)
                cycle = itertools.cycle(sets)

                def first() -> list[torch.Tensor]:
                    out, grads = run_once(fn, sets[0], mode)
                    return [out, *grads]

                return first, lambda: run_once(fn, next(cycle), mode)

            timing = check_and_time(row, p, prepare, ((), ()), dtype, timer, budget,
                                    reserve_s=60 if p.compile else 1, agree=agree)
            if timing is not None:
                derive(row, timing, op.flops(shape, mode), op.bytes(shape, mode, elem), peaks)
            rows.append(row)
            if on_row:
                on_row(row)
    return rows
