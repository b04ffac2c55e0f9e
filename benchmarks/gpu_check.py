"""The GPU check, in one go, from the repository root on a machine with an NVIDIA GPU:

    python benchmarks/gpu_check.py            # OUT=/some/dir python benchmarks/gpu_check.py to collect elsewhere
    python benchmarks/gpu_check.py --commit 1a2b3c4   # in a copy of the tree without .git

The decisive facts first, so that a run cut short still settles the most:

1. the environment: GPU, driver, torch, triton, CUDA, nvcc, git commit;
2. build: ``pip install --no-deps --no-build-isolation -e .`` (vit_fast._C when a CUDA toolkit is found), then
   ``vit-fast info``; should vit_fast not import as installed, the later steps run from the source tree;
3. correctness: every op on fixed ViT shapes, every backend, bf16 and fp16, forward and every gradient against
   the fp32 oracle (:mod:`vit_fast.tolerance`), on fixed kernel configs (``VIT_FAST_AUTOTUNE=0``), asserting
   through ``vit_fast.backends.trace()`` that the backend under test really launched (no silent fallback);
4. ``compute-sanitizer`` memcheck, then racecheck, on the CUDA attention (N=197, D=80, q/k/v as views of one
   packed qkv tensor, and the packed entry point the model calls) and patch embedding (P=14), forward and
   backward;
5. the quick benchmarks: ``vit-fast bench --quick``, then the regression check against the newest committed run
   of the same GPU;
6. ``vit-fast tune --quick``: the dispatch policy of this GPU (what ``auto`` will pick), from verified, measured
   rows; the output says which file to commit where;
7. the full GPU test suite, ``pytest -m cuda``; a failure (or a collection error) is reported, never hidden.

Everything (JSON results, policy, logs, plots, summary) goes to ``benchmarks/results/<date>_<gpu>_<commit>/``;
with OUT set (a remote GPU machine that returns only a few files) the folder is written elsewhere and delivered
as ``$OUT/<name>.tar.gz`` plus ``summary.md``, ``results.json`` and the policy file, refreshed after every step.
Each step's time limit comes from one deadline (``--deadline-s``, 7 minutes by default, so the run ends well
inside 8 minutes on an H200): a step gets at most its cap and never what the later steps need at least
(:data:`PLAN`); on its limit a step gets SIGINT and keeps what it measured. A summary table comes last.
Without a GPU, steps 2-7 are skipped with a message. Exit status 1 when a step failed.
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

# step -> (cap seconds, the least worth giving it). A step gets min(cap, time left - the later steps' least):
# a slow build squeezes the later steps instead of starving them.
PLAN: dict[str, tuple[float, float]] = {"build": (200, 60), "correctness": (80, 30), "memcheck": (45, 20),
                                        "racecheck": (45, 20), "bench": (95, 40), "tune": (75, 30),
                                        "tests": (150, 30)}
GPU_STEPS = ("2 build", "3 correctness", "4 compute-sanitizer", "5 benchmarks", "6 policy", "7 GPU tests")


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


class Check:
    def __init__(self, deadline_s: float) -> None:
        self.start = time.perf_counter()
        self.deadline_s = deadline_s
        self.steps: list[dict] = []
        self.out: str | None = None  # the run folder, delivered after every step

    def left(self) -> float:
        return self.deadline_s - (time.perf_counter() - self.start)

    def limit(self, step: str) -> float:
        """``step``'s time limit: its cap, less whatever the later steps need at least."""
        names = list(PLAN)
        later = sum(least for _, least in (PLAN[n] for n in names[names.index(step) + 1:]))
        return max(5.0, min(PLAN[step][0], self.left() - later))

    def record(self, step: str, status: str, seconds: float, detail: str) -> None:
        self.steps.append({"step": step, "status": status, "seconds": round(seconds, 1), "detail": detail})
        print(f"[{status}] {step} ({seconds:.0f} s): {detail}", flush=True)
        if self.out:
            deliver(self.out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deadline-s", type=float, default=420.0, help="time for the whole check (default 420)")
    parser.add_argument("--commit", default=None,
                        help="the short commit of this tree, when it is a copy without .git (names the folder and "
                        "is recorded in results.json)")
    parser.add_argument("--child", choices=["correctness", "sanitize"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "correctness":
        return correctness(args.json)
    if args.child == "sanitize":
        return sanitize_target()
    check = Check(args.deadline_s)

    t0 = time.perf_counter()
    env = environment(args.commit)
    out = check.out = run_dir(env)
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(env, f, indent=1)
    check.record("1 environment", "PASS", time.perf_counter() - t0,
                 f"{env.get('gpu', 'no GPU')}, driver {env.get('driver')}, torch {env['torch']} (CUDA "
                 f"{env['torch_cuda']}), triton {env['triton']}, nvcc {env['nvcc']}, commit {env['git_commit']}"
                 f"{' (dirty)' if env['git_dirty'] else ''}")
    print(f"writing to {out}", flush=True)

    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if env["git_commit"]:
        child_env["VIT_FAST_GIT_COMMIT"] = env["git_commit"]
    for name in ("TRITON_INTERPRET", "VIT_FAST_AUTOTUNE", "VIT_FAST_BACKEND", "VIT_FAST_POLICY"):
        child_env.pop(name, None)
    if not env["cuda_available"]:
        msg = ("no CUDA device visible (torch.cuda.is_available() is False): skipping build, correctness, "
               "compute-sanitizer, benchmarks, policy, GPU tests")
        print(msg, flush=True)
        for step in GPU_STEPS:
            check.record(step, "SKIP", 0.0, msg)
    else:
        gpu_steps(check, out, child_env)

    failed = [s for s in check.steps if s["status"] in ("FAIL", "TIMEOUT")]
    table = ["| step | status | seconds | detail |", "|---|---|---|---|"]
    table += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['detail']} |" for s in check.steps]
    total = time.perf_counter() - check.start
    lines = [f"# GPU check: {env.get('gpu', 'no GPU')}, commit {env['git_commit']}, {env['time']}", "", *table, ""]
    lines += [commit_line(p) for p in policy_files(out)]
    text = "\n".join([*lines, f"total {total:.0f} s; everything in {out}"])
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"environment": env, "steps": check.steps, "total_s": total,
                   "policy": [os.path.basename(p) for p in policy_files(out)]}, f, indent=1)
    deliver(out)
    print("\n" + text, flush=True)
    return 1 if failed else 0


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


def gpu_steps(check: Check, out: str, env: dict) -> None:
    """Steps 2-7. Each later step runs even when an earlier one failed: a GPU run is too rare to stop early."""
    build_log = os.path.join(out, "build.log")
    rc, secs = run_logged([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "-e", "."], build_log, check.limit("build"), env)
    # The package must import as installed (vit_fast.kernels included) from outside the tree; if not, the
    # later steps run from the source tree through a folder that lays it out the same way.
    probe = [sys.executable, "-c", "import vit_fast.kernels, vit_fast.bench; print(vit_fast.__file__)"]
    ok, _ = run_logged(probe, os.path.join(out, "import.log"), 120, env, cwd=tempfile.gettempdir())
    cwd = REPO
    if ok != 0:
        cwd = source_overlay()
        env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [cwd, env.get("PYTHONPATH")]))}
    info_log = os.path.join(out, "info.log")
    run_logged([sys.executable, "-m", "vit_fast.cli", "info"], info_log, 120, env, cwd)
    print(tail(info_log, 12), flush=True)
    if rc != 0:
        print(tail(build_log), flush=True)
    detail = ("pip install -e . (build.log); backends in info.log" if rc == 0 else
              f"pip install -e . {'timed out' if rc is None else f'exited {rc}'}: see build.log")
    if ok != 0:
        detail += "; vit_fast did not import as installed: the later steps ran from the source tree (import.log)"
    check.record("2 build", "PASS" if rc == 0 and ok == 0 else status_of(rc, ()), secs, detail)

    fixed = {**env, "VIT_FAST_AUTOTUNE": "0"}  # fixed kernel configs: the facts do not depend on a tuning run
    verdicts = os.path.join(out, "correctness.json")
    rc, secs = run_logged([sys.executable, THIS, "--child", "correctness", "--json", verdicts],
                          os.path.join(out, "correctness.log"), check.limit("correctness"), fixed, cwd)
    print(tail(os.path.join(out, "correctness.log"), 30), flush=True)
    check.record("3 correctness", status_of(rc), secs, _correctness_detail(verdicts))

    sanitizer = find_sanitizer()
    for tool in ("memcheck", "racecheck"):
        log = os.path.join(out, f"sanitizer_{tool}.log")
        if sanitizer is None:
            check.record(f"4 {tool}", "SKIP", 0.0, "compute-sanitizer not found (CUDA toolkit or "
                         "pip nvidia-cuda-sanitizer-api)")
            continue
        # without the caching allocator every tensor is its own allocation, so an access past one is caught
        tool_env = {**fixed, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else fixed
        rc, secs = run_logged([sanitizer, "--tool", tool, "--error-exitcode", "3", "--print-limit", "30",
                               sys.executable, THIS, "--child", "sanitize"], log, check.limit(tool), tool_env, cwd)
        summary = [ln.strip() for ln in tail(log, 40).splitlines() if "ERROR SUMMARY" in ln or "RACECHECK" in ln]
        status = {0: "PASS", 4: "SKIP"}.get(rc, status_of(rc))
        if rc != 0:
            print(tail(log, 30), flush=True)
        check.record(f"4 {tool}", status, secs, "; ".join(summary) or f"exit {rc}: see {os.path.basename(log)}")

    bench_log = os.path.join(out, "bench.log")
    limit = check.limit("bench")
    rc, secs = run_logged([sys.executable, "-m", "vit_fast.cli", "bench", "--quick", "--out", out, "--no-progress",
                           "--budget-s", str(max(20, int(limit - 60)))], bench_log, limit, env, cwd)
    print(tail(bench_log, 45), flush=True)
    results = os.path.join(out, "results.json")
    check.record("5 benchmarks", status_of(rc), secs,
                 _bench_detail(results) if os.path.exists(results) else "no results.json: see bench.log")
    if os.path.exists(results):
        cmp_log = os.path.join(out, "regression.log")
        rc, secs = run_logged([sys.executable, os.path.join(REPO, "benchmarks", "compare.py"), results], cmp_log, 60,
                              env, cwd)
        check.record("5 regression check", {0: "PASS", 1: "WARN"}.get(rc, "FAIL"), secs, tail(cmp_log, 1).strip())

    tune_log, folder = os.path.join(out, "tune.log"), os.path.join(out, "policy")
    os.makedirs(folder, exist_ok=True)
    limit = check.limit("tune")
    # VIT_FAST_POLICY names a folder: tune writes the file named for this GPU into it
    rc, secs = run_logged([sys.executable, "-m", "vit_fast.cli", "tune", "--quick", "--no-progress",
                           "--budget-s", str(max(10, int(limit - 30)))], tune_log, limit,
                          {**env, "VIT_FAST_POLICY": folder + os.sep}, cwd)
    print(tail(tune_log, 30), flush=True)
    written = policy_files(out)
    detail = "; ".join(commit_line(p) for p in written) or "no policy written: see tune.log"
    check.record("6 policy", status_of(rc) if written else "FAIL", secs, detail)

    tests_log = os.path.join(out, "tests.log")
    rc, secs = run_logged([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", f"--junitxml={os.path.join(out, 'tests.xml')}",
                           os.path.join(REPO, "tests")], tests_log, check.limit("tests"), env, cwd)
    if rc not in (0, 5):
        print(tail(tests_log, 40), flush=True)
    check.record("7 GPU tests", {0: "PASS", 5: "WARN", None: "TIMEOUT"}.get(rc, "FAIL"), secs,
                 "no test marked cuda was collected" if rc == 5 else pytest_summary(tests_log))


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

# Fixed configs at ViT shapes and odd ones: head dims 64/80/128 (ViT-B, ViT-H/14), N 197 and 7; patch 16 and 14.
FIXED_SHAPES: dict[str, list[dict[str, int]]] = {
    "attention": [{"B": 2, "H": 3, "N": 197, "D": 64}, {"B": 2, "H": 2, "N": 197, "D": 80},
                  {"B": 1, "H": 2, "N": 7, "D": 128}],
    "layer_norm": [{"B": 2, "N": 197, "C": 768}, {"B": 1, "N": 7, "C": 1280}],
    "layernorm_mlp": [{"B": 2, "N": 197, "C": 384, "hidden": 1536}],
    "patch_embed": [{"B": 2, "in_chans": 3, "img": 224, "P": 16, "E": 768},
                    {"B": 2, "in_chans": 3, "img": 56, "P": 14, "E": 80}],
}


def correctness(json_path: str, device: str = "cuda", dtypes: Sequence[str] = ("bfloat16", "float16"),
                shapes: dict[str, list[dict[str, int]]] | None = None,
                backend_names: Sequence[str] = ("triton", "cuda", "reference")) -> int:
    """Every op x shape x dtype x backend: forward and every gradient against the fp32 oracle by the one
    tolerance rule, and the launch records proving the backend ran (fwd and bwd for a kernel backend). Rows go
    to ``json_path`` as they come (a run cut short keeps them); exit status 1 when one failed."""
    import torch

    import vit_fast
    from vit_fast import backends
    from vit_fast.bench.cases import OP_BENCHES, Inputs, run_once, seed
    from vit_fast.fileio import atomic_write
    from vit_fast.tolerance import worst_excess

    rows: list[dict] = []
    dev = torch.device(device)
    # dtype outermost: a run cut short has every op in the first dtype
    cases = [(d, op, s) for d in dtypes for op, ss in (FIXED_SHAPES if shapes is None else shapes).items() for s in ss]
    for dtype_name, op, shape in cases:
        bench, dtype = OP_BENCHES[op], getattr(torch, dtype_name)
        seed("gpu_check", op, shape, dtype_name)
        base = bench.make(shape, dtype, dev)
        with torch.no_grad():
            args, kwargs = base.assemble(base.tensors)
            base.grad_out = torch.randn_like(bench.reference()(*args, **kwargs))
        oracle = run_once(bench.reference(), base.to(torch.float64 if dtype == torch.float32 else torch.float32),
                          "fwd+bwd")
        same = run_once(bench.reference(), base, "fwd+bwd")
        entries = [(op, bench.public(), base)]
        if op == "attention":  # the model's entry point: kernels of their own, the qkv gradient written in place
            packed = Inputs(base.tensors, base.grad_names, lambda t: ((t["qkv"],), {"scale": shape["D"] ** -0.5}),
                            base.grad_out)
            entries.append(("attention_packed", vit_fast.ops.attention_packed, packed))
        for (entry, public, inputs), backend in itertools.product(entries, backend_names):
            row = {"op": entry, "backend": backend, "dtype": dtype_name, "shape": bench.label(shape)}
            want = {(op, "fwd")} if backend == "reference" else {(op, "fwd"), (op, "bwd")}
            try:
                with vit_fast.set_backend(backend), backends.trace() as launches:
                    out, grads = run_once(public, inputs, "fwd+bwd")
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                ran = {(r.op, r.phase) for r in launches if r.backend == backend}
                ratio, where = worst_excess([out, *grads], [same[0], *same[1]], [oracle[0], *oracle[1]],
                                            ["out", *(f"grad {n}" for n in base.grad_names)])
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
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


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
    want = {(op, phase) for op in ("attention", "patch_embed") for phase in ("fwd", "bwd")}
    want = {w for w in want if w[1] == "fwd"} if backend == "reference" else want
    if not want <= ran:
        print(f"FAIL: the {backend} backend did not launch {sorted(want - ran)}", flush=True)
        return 1
    print(f"ran {sorted(ran)} on {backend}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
