"""The GPU check, in one go, from the repository root on a machine with an NVIDIA GPU:

    python benchmarks/gpu_check.py --plan     # the steps, what each verifies and its derived budget (any machine)
    python benchmarks/gpu_check.py            # OUT=/some/dir python benchmarks/gpu_check.py to collect elsewhere
    python benchmarks/gpu_check.py --commit 1a2b3c4   # in a copy of the tree without .git

It decides everything in 7 minutes (``--deadline-s``, 420 s by default), the most valuable facts first, so that a
run cut short still settles the most (the plan, its budgets and the deadline logic: :mod:`gpu_plan`):

1. the environment: GPU, driver, torch, triton, CUDA, nvcc, git commit;
2. build: ``pip install --no-deps --no-build-isolation -e .`` (vit_fast._C when a CUDA toolkit is found) while
   Triton precompiles the shortlisted configs for this GPU in parallel (``kernels/shortlist.py``); should
   vit_fast not import as installed, the later steps run from the source tree;
3. per op, in order of value (LN+MLP, attention, the fp8 ops, patch embedding, LayerNorm): correctness of every
   backend against the fp32 oracle (:mod:`vit_fast.tolerance`) on fixed kernel configs (``VIT_FAST_AUTOTUNE=0``),
   asserting through ``vit_fast.backends.trace()`` that the backend under test really launched; then
   ``vit-fast tune`` at ViT-B's shapes: each backend (and triton variant) against eager and torch.compile, the
   policy rows of this GPU;
4. ``compute-sanitizer`` memcheck, then racecheck, on the CUDA attention (N=197, D=80, strided q/k/v and the
   packed entry point) and patch embedding (P=14), forward and backward;
5. the model rows: ``vit-fast bench --quick --ops none`` at ViT-B (timm eager and compiled, vit_fast eager,
   compiled, graphed, fp8), then the regression check against the newest committed run of the same GPU;
6. the full GPU test suite, ``pytest -m cuda``; a failure (or a collection error) is reported, never hidden.

The policy rows of step 3 are merged into the policy file of this GPU; the output says which file to commit where.
Everything (JSON results, policy, logs, plots, summary) goes to ``benchmarks/results/<date>_<gpu>_<commit>/``;
with OUT set (a remote GPU machine that returns only a few files) the folder is written elsewhere and delivered
as ``$OUT/<name>.tar.gz`` plus ``summary.md``, ``results.json`` and the policy file, refreshed after every step.
A step that overruns its limit gets SIGINT and keeps what it measured; the next step runs all the same. A summary
table comes last. Without a GPU, the GPU steps are skipped with a message. Exit status 1 when a step failed.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.abspath(__file__)

sys.path.insert(0, os.path.dirname(THIS))
import gpu_plan  # noqa: E402 - beside this script, which runs as a file, not a module


def _capture(cmd: Sequence[str], timeout: float = 30) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# Probed in a child process: this one never holds a CUDA context while the steps run.
_PROBE = """
import json, torch
env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
try:
    import triton
    env["triton"] = triton.__version__
except Exception as e:
    env["triton"] = f"unavailable ({type(e).__name__}: {e})"
if env["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
               gpu_count=torch.cuda.device_count())
print(json.dumps(env))
"""


def environment(commit: str | None = None) -> dict:
    probe = _capture([sys.executable, "-c", _PROBE], timeout=120)
    env = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        **(json.loads(probe.splitlines()[-1]) if probe else {"torch": "unavailable", "torch_cuda": None,
                                                              "cuda_available": False, "triton": "unknown"}),
        "git_commit": commit or _capture(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_capture(["git", "status", "--porcelain", "--untracked-files=no"])),
    }
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
    version = _capture([nvcc, "--version"]) if nvcc else None
    env["nvcc"] = f"{nvcc}: {version.splitlines()[-1]}" if version else "not found"
    if env["cuda_available"]:
        env["driver"] = _capture(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return env


def run_dir(env: dict) -> str:
    """``benchmarks/results/<date>_<gpu>_<commit>``, or a folder of that name in a temporary place when OUT is
    set (see :func:`deliver`)."""
    base = tempfile.mkdtemp(prefix="gpu_check_") if os.environ.get("OUT") else os.path.join(REPO, "benchmarks",
                                                                                          "results")
    gpu = re.sub(r"[^a-z0-9]+", "-", env.get("gpu", "no-gpu").lower()).strip("-")
    name = f"{env['time'][:10]}_{gpu}_{env['git_commit'] or 'unknown-commit'}{'-dirty' if env['git_dirty'] else ''}"
    path = os.path.join(base, name)
    os.makedirs(path, exist_ok=True)
    return path


def policy_files(out: str) -> list[str]:
    """The policy files step 6 wrote into the run folder."""
    return sorted(glob.glob(os.path.join(out, "policy", "*.json")))


def deliver(out: str) -> None:
    """With OUT set: the run folder as ``$OUT/<name>.tar.gz`` (unpack it under benchmarks/results/ to commit),
    plus summary.md, results.json and the policy file beside it: a remote machine returns a few files, not a
    folder tree."""
    dest = os.environ.get("OUT")
    if not dest:
        return
    name = os.path.basename(out)
    os.makedirs(dest, exist_ok=True)
    # by hand, not vit_fast's atomic_write: this parent process runs before vit_fast is known to import
    tmp = os.path.join(dest, f".{name}.tar.gz.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=name)
    os.replace(tmp, os.path.join(dest, f"{name}.tar.gz"))
    keep = [os.path.join(out, k) for k in ("summary.md", "results.json")] + policy_files(out)
    for path in keep:
        if os.path.exists(path):
            shutil.copyfile(path, os.path.join(dest, os.path.basename(path)))


def run_logged(cmd: Sequence[str], log: str, timeout: float, env: dict | None = None,
               cwd: str = REPO) -> tuple[int | None, float]:
    """Run ``cmd`` (in the repository root by default) with its output in ``log``; (exit status or None on
    timeout, seconds). On timeout the process group gets SIGINT first, so a step saves what it has."""
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    return rc, time.perf_counter() - start


def tail(log: str, n: int = 20) -> str:
    with open(log, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def pytest_summary(log: str) -> str:
    with open(log, errors="replace") as f:
        lines = [ln.strip() for ln in f if re.match(r"^=+ .* in [\d.]+s", ln.strip())]
    return lines[-1].strip("= ") if lines else "no pytest summary line (see tests.log)"


def status_of(rc: int | None, ok: Sequence[int] = (0,)) -> str:
    return "PASS" if rc in ok else "TIMEOUT" if rc is None else "FAIL"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deadline-s", type=float, default=gpu_plan.DEADLINE_S,
                        help=f"time for the whole check (default {gpu_plan.DEADLINE_S:.0f})")
    parser.add_argument("--plan", action="store_true", help="print the steps and their derived budgets, run nothing")
    parser.add_argument("--commit", default=None,
                        help="the short commit of this tree, when it is a copy without .git (names the folder and "
                        "is recorded in results.json)")
    parser.add_argument("--child", choices=["correctness", "sanitize", "precompile", "merge-policy"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--ops", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plan:
        print(gpu_plan.format_plan(gpu_plan.plan(), args.deadline_s))
        return 0
    if args.child:
        return {"correctness": lambda: correctness(args.json, ops=args.ops), "sanitize": sanitize_target,
                "precompile": lambda: precompile(args.json), "merge-policy": lambda: merge_policy(args.json)}[
            args.child]()
    start = time.perf_counter()
    env = environment(args.commit)
    out = run_dir(env)
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(env, f, indent=1)
    first = {"step": "environment", "status": "PASS", "seconds": round(time.perf_counter() - start, 1),
             "detail": f"{env.get('gpu', 'no GPU')}, driver {env.get('driver')}, torch {env['torch']} (CUDA "
                       f"{env['torch_cuda']}), triton {env['triton']}, nvcc {env['nvcc']}, commit "
                       f"{env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}"}
    print(f"[PASS] environment: {first['detail']}\nwriting to {out}", flush=True)

    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if env["git_commit"]:
        child_env["VIT_FAST_GIT_COMMIT"] = env["git_commit"]
    for name in ("TRITON_INTERPRET", "VIT_FAST_AUTOTUNE", "VIT_FAST_BACKEND", "VIT_FAST_POLICY"):
        child_env.pop(name, None)
    steps = gpu_plan.plan()
    deadline = gpu_plan.Deadline(args.deadline_s - (time.perf_counter() - start),
                                 record=lambda results: write_summary(out, env, [first, *results], start))
    if not env["cuda_available"]:
        msg = ("no CUDA device visible (torch.cuda.is_available() is False): skipping build, correctness, "
               "compute-sanitizer, benchmarks, policy, GPU tests")
        print(msg, flush=True)
        deadline.run(steps, lambda step, limit: ("SKIP", 0.0, msg))
    else:
        deadline.run(steps, GpuSteps(out, child_env).run)
    text = write_summary(out, env, [first, *deadline.results], start)
    print("\n" + text, flush=True)
    return 1 if any(s["status"] in ("FAIL", "TIMEOUT") for s in deadline.results) else 0


def write_summary(out: str, env: dict, steps: list[dict], start: float) -> str:
    """summary.md and summary.json of the steps so far, delivered (after every step: a run cut short keeps them)."""
    table = ["| step | status | seconds | limit | detail |", "|---|---|---|---|---|"]
    table += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s.get('limit_s', '')} | {s['detail']} |"
              for s in steps]
    total = time.perf_counter() - start
    lines = [f"# GPU check: {env.get('gpu', 'no GPU')}, commit {env['git_commit']}, {env['time']}", "", *table, ""]
    lines += [commit_line(p) for p in policy_files(out)]
    text = "\n".join([*lines, f"total {total:.0f} s; everything in {out}"])
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"environment": env, "steps": steps, "total_s": total,
                   "policy": [os.path.basename(p) for p in policy_files(out)]}, f, indent=1)
    deliver(out)
    return text


def commit_line(policy_path: str) -> str:
    name = os.path.basename(policy_path)
    return (f"policy: commit {name} (in the run folder's policy/, and in $OUT when set) as vit_fast/policies/{name}: "
            "auto follows it on this kind of GPU from then on")


def source_overlay() -> str:
    """A folder holding ``vit_fast/`` as an install lays it out (links to the tree's ``vit_fast/*`` plus
    ``kernels/`` as ``vit_fast/kernels``): the way to run from the source tree when the install failed."""
    root = tempfile.mkdtemp(prefix="vit_fast_src_")
    pkg = os.path.join(root, "vit_fast")
    os.mkdir(pkg)
    for name in os.listdir(os.path.join(REPO, "vit_fast")):
        if name == "kernels":  # a tree that links kernels/ there already: the one below stands
            continue
        os.symlink(os.path.join(REPO, "vit_fast", name), os.path.join(pkg, name))
    os.symlink(os.path.join(REPO, "kernels"), os.path.join(pkg, "kernels"))
    return root


def find_sanitizer() -> str | None:
    """compute-sanitizer from PATH, beside nvcc, in the CUDA toolkit, or from the pip package."""
    found = shutil.which("compute-sanitizer")
    nvcc = shutil.which("nvcc")
    places = [os.path.join(os.path.dirname(nvcc), "compute-sanitizer")] if nvcc else []
    places += ["/usr/local/cuda/bin/compute-sanitizer", *glob.glob("/usr/local/cuda-*/bin/compute-sanitizer"),
               *glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "*",
                                       "compute-sanitizer", "compute-sanitizer"))]
    return found or next((p for p in places if os.access(p, os.X_OK)), None)


class GpuSteps:
    """What each step of :func:`gpu_plan.plan` runs on a GPU: :meth:`run` (step, limit) -> (status, seconds,
    detail). Each later step runs even when an earlier one failed: a GPU run is too rare to stop early."""

    def __init__(self, out: str, env: dict) -> None:
        self.out, self.env, self.cwd = out, env, REPO
        self.parts = os.path.join(out, "policy_parts")
        os.makedirs(self.parts, exist_ok=True)

    def run(self, step: gpu_plan.Step, limit: float) -> tuple[str, float, str]:
        start = time.perf_counter()
        action = {"build": self.build, "sanitizer": self.sanitizer, "model": self.model, "tests": self.tests}.get(
            step.name, lambda lim: self.op_step(step.name, lim))
        status, detail = action(limit)
        return status, time.perf_counter() - start, detail

    def _log(self, name: str) -> str:
        return os.path.join(self.out, f"{name}.log")

    def build(self, limit: float) -> tuple[str, str]:
        # Triton compiles the shortlisted configs of this GPU from the source tree while pip builds vit_fast._C.
        overlay = source_overlay()
        pre_env = {**self.env, "PYTHONPATH": os.pathsep.join(filter(None, [overlay, self.env.get("PYTHONPATH")]))}
        pre_log = open(self._log("precompile"), "w")  # noqa: SIM115 - closed below, after the child ends
        pre = subprocess.Popen([sys.executable, THIS, "--child", "precompile", "--json",
                                os.path.join(self.out, "precompile.json")], cwd=overlay, env=pre_env,
                               stdout=pre_log, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.perf_counter()
        rc, _ = run_logged([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                            "-e", "."], self._log("build"), limit, self.env)
        try:
            pre_rc = pre.wait(timeout=max(1.0, limit - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            os.killpg(pre.pid, signal.SIGINT)
            pre_rc = None
            pre.wait()
        pre_log.close()
        # The package must import as installed (vit_fast.kernels included) from outside the tree; if not, the
        # later steps run from the source tree through a folder that lays it out the same way.
        probe = [sys.executable, "-c", "import vit_fast.kernels, vit_fast.bench; print(vit_fast.__file__)"]
        ok, _ = run_logged(probe, self._log("import"), 60, self.env, cwd=tempfile.gettempdir())
        if ok != 0:
            self.cwd = overlay
            self.env = pre_env
        run_logged([sys.executable, "-m", "vit_fast.cli", "info"], self._log("info"), 60, self.env, self.cwd)
        detail = ("pip install -e . (build.log)" if rc == 0 else
                  f"pip install -e . {'timed out' if rc is None else f'exited {rc}'}: see build.log")
        detail += f"; precompile {'done' if pre_rc == 0 else 'cut' if pre_rc is None else f'exited {pre_rc}'}"
        if ok != 0:
            detail += "; vit_fast did not import as installed: the later steps run from the source tree"
        return ("PASS" if rc == 0 and ok == 0 else status_of(rc, ())), detail

    def op_step(self, name: str, limit: float) -> tuple[str, str]:
        ops = dict(gpu_plan.OP_STEPS)[name]
        start = time.perf_counter()
        tuned = [op for op in ops if op in gpu_plan.TUNE_PROVIDERS]
        verdicts = os.path.join(self.out, f"correctness_{name}.json")
        share = limit * (gpu_plan.correctness_cases(ops) * gpu_plan.CHECK_S + gpu_plan.PROCESS_S) / max(
            1.0, next(s.budget_s for s in gpu_plan.plan() if s.name == name))
        fixed = {**self.env, "VIT_FAST_AUTOTUNE": "0"}  # fixed kernel configs: the facts do not depend on tuning
        rc, _ = run_logged([sys.executable, THIS, "--child", "correctness", "--json", verdicts, "--ops", *ops],
                           self._log(f"correctness_{name}"), share, fixed, self.cwd)
        statuses, details = [status_of(rc)], [_correctness_detail(verdicts)]
        for i, op in enumerate(tuned):  # timed as users run: autotuned; the time left shared by the ops left
            left = (limit - (time.perf_counter() - start)) / (len(tuned) - i)
            rc, _ = run_logged([sys.executable, "-m", "vit_fast.cli", "tune", "--quick", "--no-progress", "--ops", op,
                                "--models", *gpu_plan.TUNE_MODELS, "--batch-sizes", str(gpu_plan.TUNE_BATCH),
                                "--out", os.path.join(self.parts, f"{op}.json"), "--budget-s",
                                str(max(5, int(left - 15)))], self._log(f"tune_{op}"), left, self.env, self.cwd)
            statuses.append(status_of(rc))
            details.append(f"tune {op}: {tail(self._log(f'tune_{op}'), 1).strip()}")
        if tuned:
            run_logged([sys.executable, THIS, "--child", "merge-policy", "--json", self.parts],
                       self._log("merge_policy"), 60, {**self.env, "VIT_FAST_POLICY": os.path.join(self.out, "policy")
                                                       + os.sep}, self.cwd)
        worst = next((s for s in ("FAIL", "TIMEOUT", "WARN") if s in statuses), "PASS")
        return worst, "; ".join(details)

    def sanitizer(self, limit: float) -> tuple[str, str]:
        sanitizer = find_sanitizer()
        if sanitizer is None:
            return "SKIP", "compute-sanitizer not found (CUDA toolkit or pip nvidia-cuda-sanitizer-api)"
        statuses, details = [], []
        for tool in ("memcheck", "racecheck"):
            log = self._log(f"sanitizer_{tool}")
            fixed = {**self.env, "VIT_FAST_AUTOTUNE": "0"}
            # without the caching allocator every tensor is its own allocation, so an access past one is caught
            tool_env = {**fixed, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else fixed
            rc, _ = run_logged([sanitizer, "--tool", tool, "--error-exitcode", "3", "--print-limit", "30",
                                sys.executable, THIS, "--child", "sanitize"], log, limit / 2, tool_env, self.cwd)
            summary = [ln.strip() for ln in tail(log, 40).splitlines() if "ERROR SUMMARY" in ln or "RACECHECK" in ln]
            statuses.append({0: "PASS", 4: "SKIP"}.get(rc, status_of(rc)))
            details.append(f"{tool}: " + ("; ".join(summary) or f"exit {rc}: see {os.path.basename(log)}"))
        return next((s for s in ("FAIL", "TIMEOUT", "SKIP") if s in statuses), "PASS"), "; ".join(details)

    def model(self, limit: float) -> tuple[str, str]:
        rc, _ = run_logged([sys.executable, "-m", "vit_fast.cli", "bench", "--quick", "--ops", "none", "--models",
                            *gpu_plan.TUNE_MODELS, "--out", self.out, "--no-progress", "--budget-s",
                            str(max(10, int(limit - 20)))], self._log("bench"), limit, self.env, self.cwd)
        results = os.path.join(self.out, "results.json")
        if not os.path.exists(results):
            return status_of(rc), "no results.json: see bench.log"
        cmp_rc, _ = run_logged([sys.executable, os.path.join(REPO, "benchmarks", "compare.py"), results],
                               self._log("regression"), 30, self.env, self.cwd)
        return status_of(rc), f"{_bench_detail(results)}; regression check: {tail(self._log('regression'), 1).strip()}"

    def tests(self, limit: float) -> tuple[str, str]:
        log = self._log("tests")
        rc, _ = run_logged([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
                            "--continue-on-collection-errors", f"--junitxml={os.path.join(self.out, 'tests.xml')}",
                            os.path.join(REPO, "tests")], log, limit, self.env, self.cwd)
        status = {0: "PASS", 5: "WARN", None: "TIMEOUT"}.get(rc, "FAIL")
        return status, "no test marked cuda was collected" if rc == 5 else pytest_summary(log)


def _bench_detail(path: str) -> str:
    with open(path) as f:
        res = json.load(f)
    rows = res["rows"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    heads = [f"{r['name']} {r['mode']} {r['provider']} {r['images_per_s']:,.0f} img/s" for r in rows
             if r["kind"] == "model" and r["status"] == "ok"]
    detail = f"{counts['ok']} rows measured, {counts['skipped']} skipped, {counts['failed']} failed"
    if res.get("violations"):
        detail += f"; {len(res['violations'])} above a peak"
    return detail + ("; " + "; ".join(heads) if heads else "")


def _correctness_detail(path: str) -> str:
    if not os.path.exists(path):
        return "no correctness.json: see correctness.log"
    with open(path) as f:
        rows = json.load(f)["rows"]
    count = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    bad = sorted({f"{r['op']}/{r['backend']}" for r in rows if r["status"] == "FAIL"})
    return (f"{count['PASS']} passed, {count['FAIL']} failed{' (' + ', '.join(bad) + ')' if bad else ''}, "
            f"{count['SKIP']} skipped (correctness.json)")


# ---- the children: what steps 3 and 4 run in their own process (run with vit_fast importable) ----------------

def correctness(json_path: str, device: str = "cuda", dtypes: Sequence[str] = gpu_plan.CHECK_DTYPES,
                shapes: dict[str, list[dict[str, int]]] | None = None,
                backend_names: Sequence[str] = gpu_plan.BACKENDS, ops: Sequence[str] | None = None,
                fp32_first: bool = True) -> int:
    """Every op (of ``ops``) x shape x dtype x backend, and fp32 on each op's first shape (``fp32_first``):
    forward and every gradient against the fp32 oracle by the one tolerance rule, and the launch records proving
    the backend ran (fwd and bwd for a kernel backend). An op that is not a bench case yet gets a SKIP row. Rows
    go to ``json_path`` as they come (a run cut short keeps them); exit status 1 when one failed."""
    import torch

    import vit_fast
    from vit_fast import backends
    from vit_fast.bench.cases import OP_BENCHES, Inputs, run_once, seed
    from vit_fast.bench.measure import verdict
    from vit_fast.fileio import atomic_write

    rows: list[dict] = []
    dev = torch.device(device)
    declared = gpu_plan.fixed_shapes() if shapes is None else shapes
    table = {op: ss for op, ss in declared.items() if ops is None or op in ops}
    for op in [op for op in table if op not in OP_BENCHES]:
        rows.append({"op": op, "backend": "-", "dtype": "-", "shape": "-", "status": "SKIP",
                     "detail": "not a bench case (vit_fast.bench.cases) yet: its pytest -m cuda tests cover it"})
    # dtype outermost: a run cut short has every op in the first dtype; then fp32 on each op's first shape
    cases = [(d, op, s) for d in dtypes for op, ss in table.items() if op in OP_BENCHES for s in ss]
    cases += [("float32", op, ss[0]) for op, ss in table.items() if op in OP_BENCHES and fp32_first]
    for dtype_name, op, shape in cases:
        bench, dtype = OP_BENCHES[op], getattr(torch, dtype_name)
        seed("gpu_check", op, shape, dtype_name)
        base = bench.make(shape, dtype, dev)
        mode, agree = verdict(bench, shape, base, dtype, ["out", *(f"grad {n}" for n in base.grad_names)])
        entries = [(op, bench.public(), base)]
        if op == "attention":  # the model's entry point: kernels of their own, the qkv gradient written in place
            packed = Inputs(base.tensors, base.grad_names, lambda t, d=shape["D"]: ((t["qkv"],), {"scale": d**-0.5}),
                            base.grad_out)
            entries.append(("attention_packed", vit_fast.ops.attention_packed, packed))
        phases = {"fwd"} if mode == "fwd" else {"fwd", "bwd"}
        for (entry, public, inputs), backend in itertools.product(entries, backend_names):
            row = {"op": entry, "backend": backend, "dtype": dtype_name, "shape": bench.label(shape)}
            want = {(entry, p) for p in ({"fwd"} if backend == "reference" else phases)}
            try:
                with vit_fast.set_backend(backend), backends.trace() as launches:
                    out, grads = run_once(public, inputs, mode)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                ran = {(r.op, r.phase) for r in launches if r.backend == backend}
                ratio, where = agree([out, *grads])
                missing = sorted(want - ran)
                row.update(worst=ratio, launched=sorted(ran), detail=where)
                if missing:
                    row.update(status="FAIL", detail=f"did not launch {missing} (a silent fallback)")
                else:
                    row["status"] = "PASS" if ratio <= 1 else "FAIL"
            except backends.BackendUnavailableError as e:
                row.update(status="SKIP", detail=str(e).splitlines()[0])
            except Exception as e:  # noqa: BLE001 - a crash is this backend's verdict; the others go on
                row.update(status="FAIL", detail=f"{type(e).__name__}: {str(e).strip()[:300]}")
            rows.append(row)
            print(f"{row['status']:<4} {entry:<16} {backend:<9} {dtype_name:<8} {row['shape']:<22} "
                  f"{row['detail']}", flush=True)
            atomic_write(json_path, json.dumps({"device": str(dev), "rows": rows}, indent=1))
    atomic_write(json_path, json.dumps({"device": str(dev), "rows": rows}, indent=1))
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


def precompile(json_path: str, jobs: int = gpu_plan.COMPILE_WORKERS) -> int:
    """Compile this GPU's shortlisted Triton configs into Triton's cache (``vit-fast kernels --shortlisted`` for
    its arch), so the later steps' first launches find them; the rows (registers, spills, TMA) go to
    ``json_path``. A launch whose specialization differs from the report's compiles on first use, as before."""
    import dataclasses

    import torch

    from vit_fast import kernel_resources
    from vit_fast.fileio import atomic_write

    major, minor = torch.cuda.get_device_capability(0)
    arch = f"sm_{major}{minor}"
    if arch not in kernel_resources.LIMITS:
        print(f"no shortlist for {arch}: the kernels compile on first use", flush=True)
        return 0
    rows = kernel_resources.triton_rows(arch, "shortlist", jobs)
    atomic_write(json_path, json.dumps({"arch": arch, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    print(f"precompiled {len(rows)} {arch} variants", flush=True)
    return 0


def merge_policy(folder: str) -> int:
    """The per-op policy files tune wrote in ``folder``, as one policy for this GPU where $VIT_FAST_POLICY
    points (each op was measured in a run of its own, so that a cut step loses only its op)."""
    import torch

    from vit_fast import policy

    docs = [policy.read(p) for p in sorted(glob.glob(os.path.join(folder, "*.json")))]
    if not docs:
        return 0
    merged = {**docs[0], "entries": [e for d in docs for e in d["entries"]],
              "notes": list(dict.fromkeys(n for d in docs for n in d.get("notes", []))),
              "command": "; ".join(d.get("command", "") for d in docs)}
    policy.write(policy.default_path(policy.device_kind(torch.device("cuda", 0))), merged)
    return 0


def sanitize_target(device: str = "cuda", backend: str = "cuda") -> int:
    """What compute-sanitizer watches: the CUDA attention at N=197, D=80 on strided q/k/v views of one packed
    qkv tensor and on that tensor itself (attention_packed, as the model calls it), and the patch embedding at
    P=14, forward and backward. Exit 4: the backend is unavailable."""
    import torch

    import vit_fast
    from vit_fast import backends, ops

    why = backends.unavailable(backend)
    if why:
        print(f"SKIP: the {backend} backend is unavailable: {why}", flush=True)
        return 4
    dev = torch.device(device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    qkv = torch.randn(2, 197, 3, 2, 80, device=dev, dtype=dt, requires_grad=True)  # (B, N, 3, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), strided views: no copy
    images = torch.randn(2, 3, 56, 56, device=dev, dtype=dt)
    weight = (0.05 * torch.randn(64, 3, 14, 14, device=dev, dtype=dt)).requires_grad_()
    bias, cls, pos = ((0.02 * torch.randn(*s, device=dev, dtype=dt)).requires_grad_()
                      for s in ((64,), (1, 1, 64), (1, 17, 64)))
    with vit_fast.set_backend(backend), backends.trace() as launches:
        ops.attention(q, k, v).float().square().sum().backward()
        # the model's path: the packed entry point has kernels of its own (its backward writes dqkv in place)
        ops.attention_packed(qkv).float().square().sum().backward()
        ops.patch_embed(images, weight, bias, cls_token=cls, pos_embed=pos).float().square().sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    ran = {(r.op, r.phase) for r in launches if r.backend == backend}
    want = {(op, phase) for op in ("attention", "attention_packed", "patch_embed") for phase in ("fwd", "bwd")}
    want = {w for w in want if w[1] == "fwd"} if backend == "reference" else want
    if not want <= ran:
        print(f"FAIL: the {backend} backend did not launch {sorted(want - ran)}", flush=True)
        return 1
    print(f"ran {sorted(ran)} on {backend}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
