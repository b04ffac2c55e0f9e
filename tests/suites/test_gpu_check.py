"""benchmarks/gpu_check.py on CPU: the plan (derived budgets inside 7 minutes, every op listed, fp8 included), the
deadline logic with faked step durations (an overrunning step is cut, the next still runs, the results so far are
written), and the GPU flow with the GPU and its children faked."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name: str):
    path = os.path.join(REPO, "benchmarks", f"{name}.py")
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec = importlib.util.spec_from_file_location(f"_test_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(path))
    return module


@pytest.fixture
def gp():
    return _load("gpu_plan")


def test_the_plan_fits_the_deadline_and_lists_every_op(gp, capsys):
    gc = _load("gpu_check")
    assert gc.main(["--plan"]) == 0
    text = capsys.readouterr().out
    steps = gp.plan()
    assert sum(s.budget_s for s in steps) <= gp.DEADLINE_S == 420 and "fits" in text.splitlines()[-1]
    assert [s.name for s in steps] == ["build", "layernorm_mlp", "attention", "fp8", "patch_embed", "layer_norm",
                                       "sanitizer", "model", "tests"]  # in order of value
    for op in gp.fixed_shapes():  # every op, the fp8 ones included, with what its step verifies
        assert op in text, op
    for s in steps:
        assert f"| {s.name} | {s.budget_s:.0f} |" in text and s.verifies in text and s.basis in text


def test_budgets_are_derived_from_counts_and_measured_compile_times(gp, monkeypatch, tmp_path):
    """The compile budget moves with the CPU seconds vit-fast kernels measured; the op steps with their cases."""
    short = tmp_path / "shortlist.py"
    short.write_text('SHORTLIST = {}\nCOMPILE_S = {"sm_90": {"_gemm_kernel": {"rows": 10, "seconds": 1200.0}}}\n')
    assert gp.shortlist_compile("sm_90", str(short)) == (10, 1200.0)
    real = gp.shortlist_compile
    monkeypatch.setattr(gp, "shortlist_compile", lambda arch="sm_90": real(arch, str(short)))
    build = gp.plan()[0]
    assert build.budget_s == pytest.approx(gp.PROCESS_S + 1200.0 / gp.COMPILE_WORKERS, abs=1)
    assert "1200 CPU s" in build.basis
    attention = next(s for s in gp.plan() if s.name == "attention")
    before = attention.budget_s
    doubled = {**gp.fixed_shapes(), "attention": gp.fixed_shapes()["attention"] * 2}
    monkeypatch.setattr(gp, "fixed_shapes", lambda: doubled)
    assert next(s for s in gp.plan() if s.name == "attention").budget_s > before
    # 9 shapes x 2 dtypes + fp32 once, x 3 backends, x 2 entry points
    assert gp.correctness_cases(("attention",)) == (18 * 2 + 1) * 3 * 2


def test_every_checked_shape_is_declared_by_its_op_and_builds_on_cpu(gp, tmp_path):
    """Each op's ``gpu_check`` shapes are in its spec, every such op is in a step, and the correctness child runs
    each op's first shape in fp32 on the reference backend (a shape in the wrong terms fails here, not on the GPU)."""
    from vit_fast.bench.cases import OP_BENCHES

    shapes = gp.fixed_shapes()
    assert set(shapes) == set(OP_BENCHES)  # every benchmarked op is checked on the GPU
    assert set(shapes) == {op for _, ops in gp.OP_STEPS for op in ops}
    gc = _load("gpu_check")
    out = tmp_path / "correctness.json"
    assert gc.correctness(str(out), device="cpu", dtypes=(), backend_names=("reference",)) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == set(shapes) | {"attention_packed"}
    assert all(r["status"] == "PASS" for r in rows), [r for r in rows if r["status"] != "PASS"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_deadline_cuts_an_overrunning_step_runs_the_next_and_writes_what_it_has(gp, tmp_path):
    steps = [gp.Step(name, "x", 1, budget, 0.0, "test") for name, budget in (("a", 50), ("b", 100), ("c", 60))]
    takes = {"a": 30.0, "b": 500.0, "c": 20.0}  # b hangs: cut at its limit
    clock = FakeClock()
    written = []

    def record(results):
        path = tmp_path / "summary.json"
        path.write_text(json.dumps(results))
        written.append([r["step"] for r in json.loads(path.read_text())])

    def runner(step, limit):
        spent = min(takes[step.name], limit)
        clock.now += spent
        return ("TIMEOUT" if takes[step.name] > limit else "PASS"), spent, f"{step.name} done"

    results = gp.Deadline(200.0, clock=clock, record=record).run(steps, runner)
    assert [(r["step"], r["status"]) for r in results] == [("a", "PASS"), ("b", "TIMEOUT"), ("c", "PASS")]
    assert results[1]["seconds"] == results[1]["limit_s"] == 100  # its budget: the later step's floor still fits
    assert results[2]["limit_s"] == 60  # the next step got its whole budget after the overrun
    assert written == [["a"], ["a", "b"], ["a", "b", "c"]]  # the results so far, after every step


def test_a_late_step_keeps_its_floor_when_time_is_short(gp):
    clock = FakeClock()
    steps = [gp.Step(n, "x", 1, 100, 0.0, "t") for n in "abc"]
    deadline = gp.Deadline(50.0, clock=clock)
    assert deadline.limit(steps, 0) == 50 - 2 * gp.FLOOR_S  # the two later steps keep their floors
    clock.now += 60  # past the deadline: still a floor, never a negative limit
    assert deadline.limit(steps, 2) == gp.FLOOR_S


def _fake_gpu(gc, monkeypatch, tmp_path, fail: tuple[str, ...] = ()):
    """gpu_check with its GPU, children and environment faked; the steps named in ``fail`` (an op's correctness,
    "tests", "import": vit_fast not importable as installed) fail. Returns the commands run and started."""
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setattr(gc, "environment", lambda commit=None: {
        "time": "2026-01-01T00:00:00+00:00", "python": "3", "torch": "2.11", "torch_cuda": "13.0",
        "cuda_available": True, "git_commit": "abc1234", "git_dirty": False, "triton": "3.6", "nvcc": "13.0",
        "gpu": "NVIDIA H200", "driver": "580"})
    monkeypatch.setattr(gc, "find_sanitizer", lambda: "/cuda/bin/compute-sanitizer")
    ran, started = [], []

    class FakePopen:
        def __init__(self, cmd, **kw):
            started.append(cmd)
            self.pid = 0

        def wait(self, timeout=None):
            return 0

    def fake_run(cmd, log, timeout, env=None, cwd=gc.REPO):
        ran.append((cmd, timeout, env, cwd))
        text, rc = ("===== 1 failed, 2 passed in 2.00s =====\n", 1) if "pytest" in cmd and "tests" in fail else (
            "===== 3 passed in 2.00s =====\n" if "pytest" in cmd else "ok\n", 0)
        with open(log, "w") as f:
            f.write(text)
        if "merge-policy" in cmd:
            folder = env["VIT_FAST_POLICY"]
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "nvidia-h200-sm90.json"), "w") as f:
                f.write("{}")
        if "correctness" in cmd and cmd[cmd.index("--ops") + 1] in fail:
            with open(cmd[cmd.index("--json") + 1], "w") as f:
                json.dump({"rows": [{"op": "attention", "backend": "cuda", "status": "FAIL"}]}, f)
            rc = 1
        if "bench" in cmd:
            with open(os.path.join(cmd[cmd.index("--out") + 1], "results.json"), "w") as f:
                json.dump({"rows": []}, f)
        if "-c" in cmd and "import" in fail:
            rc = 1
        return rc, 1.0

    monkeypatch.setattr(gc, "run_logged", fake_run)
    monkeypatch.setattr(gc.subprocess, "Popen", FakePopen)
    return ran, started


def test_gpu_flow_with_the_gpu_faked(tmp_path, monkeypatch, capsys):
    """The GPU branch: steps in the plan's order, the facts on fixed configs, tune per op into policy parts merged
    into one policy, every step inside its limit."""
    gc = _load("gpu_check")
    ran, started = _fake_gpu(gc, monkeypatch, tmp_path)
    assert gc.main(["--deadline-s", "420"]) == 0
    text = capsys.readouterr().out
    assert started and "--child" in started[0] and "precompile" in started[0]  # beside the build
    steps = [" ".join(c[:8]) for c, *_ in ran]
    assert "pip install" in steps[0]
    order = [next(op for op in ("layernorm_mlp", "attention", "scaled_linear", "patch_embed", "layer_norm")
                  if op in s) for s in steps if "--child correctness" in s]
    assert order == ["layernorm_mlp", "attention", "scaled_linear", "patch_embed", "layer_norm"]
    correctness_envs = [e for c, _, e, _ in ran if "correctness" in c]
    assert all(e["VIT_FAST_AUTOTUNE"] == "0" for e in correctness_envs)
    tunes = [(c, t) for c, t, *_ in ran if "tune" in c]
    assert [c[c.index("--ops") + 1] for c, _ in tunes] == ["layernorm_mlp", "attention", "scaled_linear",
                                                           "attention_fp8", "patch_embed", "layer_norm"]
    assert all(float(c[c.index("--budget-s") + 1]) < t for c, t in tunes)  # tune stops before it is cut
    assert all("VIT_FAST_AUTOTUNE" not in e for c, _, e, _ in ran if "tune" in c)  # timed as users run
    (memcheck,) = [(c, e) for c, _, e, _ in ran if "memcheck" in c]
    assert memcheck[1]["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1" and memcheck[1]["VIT_FAST_AUTOTUNE"] == "0"
    assert any("racecheck" in c and c[-2:] == ["--child", "sanitize"] for c, *_ in ran)
    bench_at = next(i for i, (c, *_) in enumerate(ran) if "bench" in c)
    assert any("compare.py" in c[1] for c, *_ in ran[bench_at + 1:])  # the regression check reads its results
    assert "-m cuda" in " ".join(ran[-1][0])
    assert all(t <= 420 for _, t, *_ in ran)
    assert "| layernorm_mlp | PASS |" in text and "as vit_fast/policies/nvidia-h200-sm90.json" in text
    delivered = set(os.listdir(tmp_path / "out"))
    assert {"summary.md", "results.json", "nvidia-h200-sm90.json"} <= delivered and any(
        n.endswith(".tar.gz") for n in delivered), delivered


def test_gpu_flow_reports_each_failure_and_runs_every_later_step(tmp_path, monkeypatch, capsys):
    """A GPU run is too rare to stop early: a failing correctness step, a failed import as installed and failing
    GPU tests each get a FAIL row with its detail, every later step still runs (from the source tree once the
    install does not import), and the exit status is 1."""
    gc = _load("gpu_check")
    ran, _ = _fake_gpu(gc, monkeypatch, tmp_path, fail=("attention", "tests", "import"))
    assert gc.main(["--deadline-s", "420"]) == 1
    text = capsys.readouterr().out
    assert "| attention | FAIL |" in text and "1 failed (attention/cuda)" in text
    assert "| build | FAIL |" in text and "the later steps run from the source tree" in text
    assert "| tests | FAIL |" in text and "1 failed, 2 passed in 2.00s" in text
    assert "| layer_norm | PASS |" in text and "-m cuda" in " ".join(ran[-1][0])  # after the failures, still run
    pip_at = next(i for i, (c, *_) in enumerate(ran) if "pip" in c)
    later = ran[pip_at + 2:]  # after the build and its import probe
    overlay = later[0][3]
    assert overlay != gc.REPO and os.path.isfile(os.path.join(overlay, "vit_fast", "kernels", "__init__.py"))
    assert all(cwd == overlay and e["PYTHONPATH"].split(os.pathsep)[0] == overlay for _, _, e, cwd in later)
