"""The GPU check's plan and deadline: which steps run, in which order, what each verifies, and how long each may take.

Budgets are derived, never declared: the compile step's from the CPU seconds ``vit-fast kernels --cold`` measured
for the shortlisted configs (``kernels/shortlist.py``'s COMPILE_S), shared by the GPU machine's compiler workers;
every other step's from what it launches, counted from its case lists (each op's ``gpu_check`` shapes, declared in
its spec, the tune and bench cases, the GPU tests), times a per-launch cost stated here with its reason.
``python benchmarks/gpu_check.py --plan`` prints the plan on any machine. :class:`Deadline` runs the steps: each
gets its budget, never more than the time left less what the later steps need at least, is cut (SIGINT, then its
partial results are kept) when it overruns, and the next step runs all the same.

The check's parent process runs this before vit_fast is built: it imports vit_fast's op specs from the source tree
(pure Python over torch, about 3 s, no extension and no CUDA context) and nothing else of it.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import math
import os
import re
import sys
import time
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 420.0  # 7 of the 15 minutes a lent GPU gives: the rest is start-up and one rerun
FLOOR_S = 8.0  # what a later step keeps at least, whatever the earlier ones took
ARCH = "sm_90"  # the reference machines (H100, H200)

# Stated per-launch costs on the reference machine (H100/H200, 16 CPU cores), each with the reason.
COMPILE_WORKERS = 12  # of the 16 cores: the CUDA build (ninja) takes the rest while Triton precompiles
NVCC_TU_S = 45.0  # one csrc translation unit for sm_80 + sm_90 (+PTX); ninja builds them in parallel
PROCESS_S = 6.0  # a child's start: python, import torch + vit_fast, CUDA context
CHECK_S = 0.25  # one correctness case: the fp32 oracle, the same-dtype reference and the backend, fwd+bwd,
#                 at B = 2 on fixed, precompiled configs (Python and launch overhead dominate at these sizes)
TIME_S = 0.45  # one timed measurement: the first call checked, then do_bench --quick (10 ms warm-up, 60 ms)
INDUCTOR_S = 12.0  # torch.compile of one op graph (fwd or fwd+bwd) by inductor, the compiled verdict's baseline
MODEL_ROW_S = 4.0  # one model row of bench --quick: build, warm-up, 60 ms of steps (compile rows add INDUCTOR_S)
SANITIZED_S = 4.0  # one op pass under compute-sanitizer (it slows launches 10-100x)
GPU_TEST_S = 1.5  # one `pytest -m cuda` test at small shapes (its kernels mostly compiled by the earlier steps)

FP8_OPS = ("scaled_linear", "attention_fp8", "layer_norm_fp8", "quantize_rows")
# The op steps, most valuable first (the MLP GEMMs carry about 64 % of ViT-B's FLOPs); the fp8 ops share one step.
OP_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (("layernorm_mlp", ("layernorm_mlp",)),
                                                    ("attention", ("attention",)), ("fp8", FP8_OPS),
                                                    ("patch_embed", ("patch_embed",)), ("layer_norm", ("layer_norm",)))
CHECK_DTYPES = ("bfloat16", "float16")  # and fp32 on each op's first shape
BACKENDS = ("triton", "cuda", "reference")
TUNE_MODELS = ("vit_base_patch16_224",)  # the 7-minute run tunes ViT-B at batch 64; a full tune is a run of its own
TUNE_BATCH = 64
# the providers tune times per op (reference, triton, cuda, the triton variants of the op's kernel families; the
# fp8 ops: reference, triton, compiled reference). The fp8 row ops (layer_norm_fp8, quantize_rows: memory-bound, a
# few percent of an fp8 step) are checked but not timed here: their inductor graphs would not fit the deadline.
TUNE_PROVIDERS = {"attention": 6, "layernorm_mlp": 4, "patch_embed": 3, "layer_norm": 3, "scaled_linear": 3,
                  "attention_fp8": 3}
FWD_ONLY = FP8_OPS  # inference ops: tune times their forward alone
MODEL_ROWS = 8  # bench --quick --ops none at ViT-B: timm, vit_fast eager/compiled/graphed, fp8 (x modes)
MODEL_COMPILED_ROWS = 3


@dataclasses.dataclass
class Step:
    """One step of the check: ``count`` launches of ``per_s`` seconds each, plus ``overhead_s``."""

    name: str
    verifies: str
    count: int
    per_s: float
    overhead_s: float
    basis: str

    @property
    def budget_s(self) -> float:
        return math.ceil(self.overhead_s + self.count * self.per_s)


def shortlist_compile(arch: str = ARCH, path: str | None = None) -> tuple[int, float]:
    """(variant rows, CPU seconds) ``vit-fast kernels --cold`` measured for ``arch``'s shortlisted configs, read
    from kernels/shortlist.py without importing it (the parent process has no vit_fast yet)."""
    found: dict = {}
    with open(path or os.path.join(REPO, "kernels", "shortlist.py")) as f:
        exec(compile(f.read(), "shortlist.py", "exec"), found)  # noqa: S102 - the module `vit-fast kernels` writes
    per = found.get("COMPILE_S", {}).get(arch, {})
    return sum(int(v["rows"]) for v in per.values()), sum(float(v["seconds"]) for v in per.values())


@functools.cache
def fixed_shapes() -> dict[str, tuple[dict, ...]]:
    """Per op, the shapes its correctness step checks on fixed configs: each spec's ``Bench.gpu_check``."""
    if importlib.util.find_spec("vit_fast") is None:  # the parent before the build: the source tree, appended so
        sys.path.append(REPO)  # that its top-level kernels/ shadows no installed package of that name
    from vit_fast.bench.cases import OP_BENCHES

    return {op: b.spec.bench.gpu_check for op, b in OP_BENCHES.items() if b.spec.bench.gpu_check}


def gpu_test_count() -> int:
    """The tests marked cuda: one per mark (a parametrized one counts once: most parameters skip early)."""
    count = 0
    for path in glob.glob(os.path.join(REPO, "tests", "**", "test_*.py"), recursive=True):
        with open(path) as f:
            count += len(re.findall(r"@pytest\.mark\.cuda\b", f.read()))
    return count


def correctness_cases(ops: tuple[str, ...]) -> int:
    """Correctness checks of ``ops``: shapes x dtypes (+ fp32 on the first shape) x backends, attention twice
    (its packed entry point, the one the model calls)."""
    total = 0
    for op in ops:
        shapes = fixed_shapes()[op]
        entries = 2 if op == "attention" else 1
        total += (len(shapes) * len(CHECK_DTYPES) + 1) * len(BACKENDS) * entries
    return total


def plan(arch: str = ARCH) -> list[Step]:
    """The steps in order of value, each with its derived budget."""
    rows, cpu_s = shortlist_compile(arch)
    units = len(glob.glob(os.path.join(REPO, "csrc", "*.cu"))) + len(glob.glob(os.path.join(REPO, "csrc", "*.cpp")))
    build_s = math.ceil(units / COMPILE_WORKERS) * NVCC_TU_S
    steps = [Step("build", "pip install -e . (vit_fast._C) while Triton precompiles the shortlisted configs", 1,
                  max(build_s, cpu_s / COMPILE_WORKERS), PROCESS_S,
                  f"max({units} csrc units x {NVCC_TU_S:g} s / {COMPILE_WORKERS} in parallel = {build_s:g} s, {rows} "
                  f"shortlisted variants: {cpu_s:.0f} CPU s (vit-fast kernels --cold) / {COMPILE_WORKERS} workers)")]
    for name, ops in OP_STEPS:
        cases = correctness_cases(ops)
        timed = [op for op in ops if op in TUNE_PROVIDERS]
        modes = {op: 1 if op in FWD_ONLY else 2 for op in timed}  # fwd, and fwd+bwd where the op has a backward
        measurements = sum(modes[op] * TUNE_PROVIDERS[op] for op in timed)
        compiles = sum(modes.values())  # inductor: one graph per op and mode
        cost = cases * CHECK_S + measurements * TIME_S + compiles * INDUCTOR_S
        verifies = (f"{', '.join(ops)}: every backend against the fp32 oracle on fixed configs, asserting it "
                    "launched" + (f"; {', '.join(timed)} timed against eager and torch.compile (policy rows)"
                                  if timed else ""))
        steps.append(Step(name, verifies, 1, cost, PROCESS_S * (2 if timed else 1),
                          f"{cases} checks x {CHECK_S:g} s + {measurements} timings x {TIME_S:g} s + {compiles} "
                          f"inductor graphs x {INDUCTOR_S:g} s"))
    steps.append(Step("sanitizer", "compute-sanitizer memcheck and racecheck on the CUDA attention and patch "
                      "embedding", 2 * 3, SANITIZED_S, 2 * PROCESS_S,
                      f"2 tools x 3 op passes (attention, attention_packed, patch_embed) x {SANITIZED_S:g} s"))
    steps.append(Step("model", "ViT-B: timm eager/compiled, vit_fast eager/compiled/graphed, fp8 (bench --quick)",
                      MODEL_ROWS, MODEL_ROW_S, PROCESS_S + MODEL_COMPILED_ROWS * INDUCTOR_S,
                      f"{MODEL_ROWS} rows x {MODEL_ROW_S:g} s + {MODEL_COMPILED_ROWS} compiled models x "
                      f"{INDUCTOR_S:g} s"))
    # The whole GPU suite is last: it gets what the steps before it leave, never less than its process start. Where
    # that is under its estimate, the deadline cuts it, and the tests it did not reach are reported as not run.
    tests = gpu_test_count()
    left = DEADLINE_S - sum(step.budget_s for step in steps)
    wanted = PROCESS_S + tests * GPU_TEST_S
    given = max(PROCESS_S, min(wanted, left))
    basis = f"{tests} cuda-marked tests x {GPU_TEST_S:g} s = {math.ceil(wanted)} s"
    if given < wanted:
        basis += f", {math.floor(given)} s left by the steps before it: the deadline cuts the rest"
    steps.append(Step("tests", "pytest -m cuda: the whole GPU suite, failures reported", 1, given - PROCESS_S,
                      PROCESS_S, basis))
    return steps


def format_plan(steps: list[Step], deadline_s: float = DEADLINE_S) -> str:
    lines = ["| step | budget s | verifies | derived from |", "|---|---:|---|---|"]
    lines += [f"| {s.name} | {s.budget_s:.0f} | {s.verifies} | {s.basis} |" for s in steps]
    total = sum(s.budget_s for s in steps)
    fits = "fits" if total <= deadline_s else "DOES NOT FIT"
    return "\n".join([*lines, "", f"total {total:.0f} s of the {deadline_s:.0f} s deadline: {fits}"])


Runner = Callable[[Step, float], tuple[str, float, str]]  # (step, limit) -> (status, seconds, detail)


class Deadline:
    """Runs steps inside one deadline. ``clock``: seconds, monotonic (tests pass a fake one). ``record`` is called
    after each step with the results so far (the run folder is written and delivered there)."""

    def __init__(self, deadline_s: float, clock: Callable[[], float] = time.perf_counter,
                 record: Callable[[list[dict]], None] | None = None) -> None:
        self.clock = clock
        self.start = clock()
        self.deadline_s = deadline_s
        self.record = record
        self.results: list[dict] = []

    def left(self) -> float:
        return self.deadline_s - (self.clock() - self.start)

    def limit(self, steps: list[Step], i: int) -> float:
        """Step ``i``'s limit: its budget, less nothing unless the time left minus the later steps' floors is
        shorter; never below :data:`FLOOR_S`."""
        later = sum(min(s.budget_s, FLOOR_S) for s in steps[i + 1:])
        return max(FLOOR_S, min(steps[i].budget_s, self.left() - later))

    def run(self, steps: list[Step], runner: Runner) -> list[dict]:
        for i, step in enumerate(steps):
            limit = self.limit(steps, i)
            status, seconds, detail = runner(step, limit)
            self.results.append({"step": step.name, "status": status, "seconds": round(seconds, 1),
                                 "limit_s": round(limit, 1), "budget_s": step.budget_s, "detail": detail})
            print(f"[{status}] {step.name} ({seconds:.0f} s of {limit:.0f}): {detail}", flush=True)
            if self.record:
                self.record(self.results)
        return self.results
