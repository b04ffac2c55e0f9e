"""The GPU check, in one go, from the repository root on a machine with an NVIDIA GPU:

    python benchmarks/gpu_check.py            # OUT=/some/dir python benchmarks/gpu_check.py to collect elsewhere
    python benchmarks/gpu_check.py --commit 1a2b3c4   # in a copy of the tree without .git

1. the environment: GPU, driver, torch, triton, CUDA, nvcc, git commit;
2. build: ``pip install --no-deps --no-build-isolation -e .`` (vit_fast._C when csrc/ has sources and a CUDA
   toolkit is found), then ``vit-fast info``; should vit_fast then not import as installed, the later steps
   run from the source tree (the step is still reported as failed);
3. the GPU tests: ``pytest -m cuda``; a failure (or a collection error) is reported, never hidden;
4. the quick benchmarks: ``vit-fast bench --quick``, then the regression check against the newest run of the
   same GPU committed under benchmarks/results/;
5. everything (results.json, report.md, plots, logs, summary) in ``benchmarks/results/<date>_<gpu>_<commit>/``;
   when OUT is set (a remote GPU machine that returns only a few files), the folder is written elsewhere and
   delivered as ``$OUT/<name>.tar.gz`` plus ``$OUT/summary.md`` and ``$OUT/results.json``, refreshed after every
   step so that a run cut short still returns what it did; a summary table last.

Without a GPU, steps 2-4 are skipped with a message, so the script can be tried anywhere first. Each step
has a time limit taken from one deadline (``--deadline-s``, 7 minutes by default) so that the whole run
ends well inside 8 minutes on an H200; the benchmark gets whatever the build and the tests leave, stops
starting measurements in time, and keeps every row it measured. Exit status 1 when a step failed.

After a GPU run: commit its folder under benchmarks/results/, then ``python benchmarks/readme_table.py``.
"""

from __future__ import annotations

import argparse
import datetime
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


def deliver(out: str) -> None:
    """With OUT set: the run folder as ``$OUT/<name>.tar.gz`` (unpack it under benchmarks/results/ to commit),
    plus summary.md and results.json beside it: a remote machine returns a few files, not a folder tree."""
    dest = os.environ.get("OUT")
    if not dest:
        return
    name = os.path.basename(out)
    os.makedirs(dest, exist_ok=True)
    tmp = os.path.join(dest, f".{name}.tar.gz.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=name)
    os.replace(tmp, os.path.join(dest, f"{name}.tar.gz"))
    for keep in ("summary.md", "results.json"):
        if os.path.exists(os.path.join(out, keep)):
            shutil.copyfile(os.path.join(out, keep), os.path.join(dest, keep))


def run_logged(cmd: Sequence[str], log: str, timeout: float, env: dict | None = None,
               cwd: str = REPO) -> tuple[int | None, float]:
    """Run ``cmd`` (in the repository root by default) with its output in ``log``; (exit status or None on
    timeout, seconds). On timeout the process group gets SIGINT first, so a benchmark saves what it has."""
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


class Check:
    def __init__(self, deadline_s: float) -> None:
        self.start = time.perf_counter()
        self.deadline_s = deadline_s
        self.steps: list[dict] = []
        self.out: str | None = None  # the run folder, delivered after every step

    def left(self) -> float:
        return self.deadline_s - (time.perf_counter() - self.start)

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
    args = parser.parse_args(argv)
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
    child_env.pop("TRITON_INTERPRET", None)
    if not env["cuda_available"]:
        msg = "no CUDA device visible (torch.cuda.is_available() is False): skipping build, GPU tests, benchmarks"
        print(msg, flush=True)
        for step in ("2 build", "3 GPU tests", "4 benchmarks"):
            check.record(step, "SKIP", 0.0, msg)
    else:
        gpu_steps(check, out, child_env)

    failed = [s for s in check.steps if s["status"] in ("FAIL", "TIMEOUT")]
    table = ["| step | status | seconds | detail |", "|---|---|---|---|"]
    table += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['detail']} |" for s in check.steps]
    total = time.perf_counter() - check.start
    text = "\n".join([f"# GPU check: {env.get('gpu', 'no GPU')}, commit {env['git_commit']}, {env['time']}", "",
                      *table, "", f"total {total:.0f} s; everything in {out}"])
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"environment": env, "steps": check.steps, "total_s": total}, f, indent=1)
    deliver(out)
    print("\n" + text, flush=True)
    return 1 if failed else 0


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


def gpu_steps(check: Check, out: str, env: dict) -> None:
    """Steps 2-4. Each later step runs even when an earlier one failed: a GPU run is too rare to stop early."""
    build_log = os.path.join(out, "build.log")
    rc, secs = run_logged([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "-e", "."], build_log, min(240.0, check.left() - 240), env)
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
    check.record("2 build", "PASS" if rc == 0 and ok == 0 else "TIMEOUT" if rc is None else "FAIL", secs, detail)

    tests_log = os.path.join(out, "tests.log")
    rc, secs = run_logged([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", f"--junitxml={os.path.join(out, 'tests.xml')}",
                           os.path.join(REPO, "tests")], tests_log, min(150.0, check.left() - 180), env, cwd)
    if rc not in (0, 5):
        print(tail(tests_log, 40), flush=True)
    check.record("3 GPU tests", {0: "PASS", 5: "WARN", None: "TIMEOUT"}.get(rc, "FAIL"), secs,
                 "no test marked cuda was collected" if rc == 5 else pytest_summary(tests_log))

    bench_log = os.path.join(out, "bench.log")
    limit = check.left() - 15
    rc, secs = run_logged([sys.executable, "-m", "vit_fast.cli", "bench", "--quick", "--out", out, "--no-progress",
                           "--budget-s", str(max(30, int(limit - 75)))], bench_log, limit, env, cwd)
    print(tail(bench_log, 45), flush=True)
    results = os.path.join(out, "results.json")
    check.record("4 benchmarks", "PASS" if rc == 0 else "TIMEOUT" if rc is None else "FAIL", secs,
                 _bench_detail(results) if os.path.exists(results) else "no results.json: see bench.log")
    if os.path.exists(results):
        cmp_log = os.path.join(out, "regression.log")
        rc, secs = run_logged([sys.executable, os.path.join(REPO, "benchmarks", "compare.py"), results], cmp_log, 60,
                              env, cwd)
        check.record("4 regression check", {0: "PASS", 1: "WARN"}.get(rc, "FAIL"), secs, tail(cmp_log, 1).strip())


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


if __name__ == "__main__":
    sys.exit(main())
