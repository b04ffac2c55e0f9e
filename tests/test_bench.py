"""The benchmarks: `vit-fast bench --quick` writes its files, every provider agrees with the reference (and a
wrong one is caught), derived figures stay under the measured peaks, the analytic counts, the regression
check, the README table generator and the GPU check script's flow."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from vit_fast import bench
from vit_fast.config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {"kind", "name", "provider", "provider_kind", "compiled", "mode", "dtype", "shape", "shape_label", "status",
            "reason", "best_baseline", "speedup"}
OK_KEYS = {"median_ms", "p20_ms", "p80_ms", "min_ms", "spread", "flop", "bytes", "tflops", "gbps", "frac_peak_flops",
           "frac_peak_bw", "exceeds_peak", "agreement"}


def _load(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[str, dict, str]:
    """One `vit-fast bench --quick` run on CPU (every op, one model), from the installed console script."""
    out = str(tmp_path_factory.mktemp("bench"))
    exe = os.path.join(os.path.dirname(sys.executable), "vit-fast")
    proc = subprocess.run([exe, "bench", "--quick", "--device", "cpu", "--threads", "1", "--out", out],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f), proc.stdout


def test_quick_run_writes_results_report_and_plots(quick):
    out, res, stdout = quick
    assert res["schema"] == bench.SCHEMA
    env = res["environment"]
    for key in ("torch", "triton", "cuda_runtime", "git_commit", "time", "vit_fast"):
        assert key in env
    assert env["device"]["type"] == "cpu" and env["device"]["name"]
    assert res["config"]["quick"] and res["config"]["dtypes"] == ["float32"]
    assert set(res["peaks"]["matmul_tflops"]) == {"float32"} and res["peaks"]["bandwidth_gbps"] > 0
    for row in res["rows"]:
        assert ROW_KEYS <= set(row), row
        if row["status"] == "ok":
            assert OK_KEYS <= set(row), row
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        else:
            assert row["reason"], row
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    for op in bench.OPS:  # every op, both modes, beside at least one PyTorch baseline
        for mode in bench.OP_MODES:
            mine = [r for r in ok if r["name"] == op and r["mode"] == mode]
            assert {r["provider_kind"] for r in mine} >= {"vit_fast", "baseline"}, (op, mode)
    models = [r for r in ok if r["kind"] == "model"]
    assert {r["mode"] for r in models} == {"inference", "train"}
    assert {r["provider"] for r in models} >= {"vit_fast:reference", "timm:eager"}
    assert all(r["images_per_s"] > 0 for r in models)
    skipped = {r["provider"]: r["reason"] for r in res["rows"] if r["status"] == "skipped"}
    assert "Triton" in skipped["vit_fast:triton"] and "sdpa:efficient" in skipped
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    for needle in ("## Targets", "## Models", "## attention", "## layer_norm", "## layernorm_mlp", "## patch_embed",
                   "## Not measured", "No GPU in this run"):
        assert needle in report, needle
    assert sorted(res["plots"]) == sorted([f"{op}_speedup.png" for op in bench.OPS] + ["models.png"])
    for name in res["plots"]:
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert "best PyTorch" in stdout and "images/s" in stdout and "not measured" in stdout


def test_every_provider_agrees_with_the_reference(quick):
    _, res, _ = quick
    assert not [r for r in res["rows"] if r["status"] == "failed"]
    assert all(0 <= r["agreement"] <= 1 for r in res["rows"] if r["status"] == "ok")


def test_a_wrong_provider_is_caught_and_not_timed():
    op = bench.OP_BENCHES["layer_norm"]
    wrong = bench.Provider("wrong", "peer", lambda x, w, b, *, eps: 1.001 * bench._layer_norm_eager(x, w, b, eps=eps))
    right = bench.Provider("right", "baseline", bench._layer_norm_eager)
    timer = bench.Timer(torch.device("cpu"), quick=True)
    peaks = {"matmul_tflops": {"float32": 1.0}, "bandwidth_gbps": 1.0}
    rows = bench.bench_op_case(op, {"B": 2, "N": 5, "C": 16}, torch.float32, torch.device("cpu"), [wrong, right],
                               bench.OP_MODES, timer, peaks)
    by = {(r["provider"], r["mode"]): r for r in rows}
    for mode in bench.OP_MODES:
        assert by["wrong", mode]["status"] == "failed" and "disagrees" in by["wrong", mode]["reason"]
        assert "median_ms" not in by["wrong", mode]
        assert by["right", mode]["status"] == "ok", by["right", mode]


def test_derived_figures_stay_under_the_measured_peaks(quick):
    _, res, _ = quick
    assert res["violations"] == []
    peaks = res["peaks"]
    for r in res["rows"]:
        if r["status"] != "ok":
            continue
        s = r["median_ms"] * 1e-3
        assert r["tflops"] == pytest.approx(r["flop"] / s / 1e12)
        assert r["frac_peak_flops"] == pytest.approx(r["tflops"] / peaks["matmul_tflops"][r["dtype"]])
        assert r["frac_peak_flops"] <= 1
        if r["gbps"] is not None:
            assert r["gbps"] == pytest.approx(r["bytes"] / s / 1e9) and r["frac_peak_bw"] <= 1
    row = {"dtype": "float32"}
    bench._derive(row, bench.Timing(1.0, 1.0, 1.0, 1.0, 1), 2 * 10**9, 10, {"matmul_tflops": {"float32": 1.0},
                                                                             "bandwidth_gbps": 1.0})
    assert row["tflops"] == pytest.approx(2.0) and row["exceeds_peak"]


def test_analytic_counts():
    assert bench.model_flops(get_config("vit_base_patch16_224"), "inference") / 1e9 == pytest.approx(35.1, abs=0.05)
    cfg = get_config("vit_base_patch16_224")
    patch = 2 * 196 * 3 * 16 * 16 * 768
    assert bench.model_flops(cfg, "train") == 3 * bench.model_flops(cfg, "inference") - patch
    att, ln = bench.OP_BENCHES["attention"], bench.OP_BENCHES["layer_norm"]
    s = {"B": 2, "H": 12, "N": 197, "D": 64}
    assert att.flops(s, "fwd") == 4 * 2 * 12 * 197 * 197 * 64 and att.flops(s, "fwd+bwd") == 3 * att.flops(s, "fwd")
    assert ln.bytes({"B": 2, "N": 197, "C": 768}, "fwd", 2) == (2 * 2 * 197 * 768 + 2 * 768) * 2
    mlp = bench.OP_BENCHES["layernorm_mlp"]
    assert mlp.flops({"B": 1, "N": 197, "C": 768, "hidden": 3072}, "fwd") == 2 * 2 * 197 * 768 * 3072


def test_regression_check_flags_an_injected_slowdown(quick, tmp_path):
    _, res, _ = quick
    assert bench.compare_results(res, res)["flagged"] == []
    slower = copy.deepcopy(res)
    row = next(r for r in slower["rows"] if r["status"] == "ok" and r["kind"] == "op")
    row["median_ms"] *= 1.5 + row["spread"]
    cmp = bench.compare_results(res, slower)
    assert [f["key"] for f in cmp["flagged"]] == [" | ".join(str(k) for k in bench.row_key(row))]
    other = copy.deepcopy(res)
    other["environment"]["device"]["name"] = "another CPU"
    assert bench.compare_results(other, slower)["warning"]
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    new.write_text(json.dumps(slower))
    old.write_text(json.dumps(res))
    compare = _load(os.path.join(REPO, "benchmarks", "compare.py"))
    assert compare.main([str(new), str(old)]) == 1
    assert compare.main([str(old), str(old)]) == 0


def _fake_gpu_run(res: dict) -> dict:
    """The quick CPU run dressed as an H200 run with ViT-B/16 rows, for the README generator."""
    gpu = copy.deepcopy(res)
    gpu["environment"]["device"] = {"type": "cuda", "name": "NVIDIA H200"}
    gpu["peaks"]["matmul_tflops"] = {"bfloat16": 790.0}
    base = {"kind": "model", "name": "vit_base_patch16_224", "shape_label": "B256", "batch": 256, "dtype": "bfloat16",
            "status": "ok", "precision": "bfloat16 weights", "frac_peak_flops": 0.5, "spread": 0.01}
    gpu["rows"] = [r for r in gpu["rows"] if r["kind"] == "op"] + [
        {**base, "mode": "inference", "provider": p, "provider_kind": k, "median_ms": 256e3 / ips, "images_per_s": ips}
        for p, k, ips in (("vit_fast:triton", "vit_fast", 18000), ("timm:eager", "baseline", 12000),
                          ("compiled:timm", "baseline", 16000))]
    gpu["environment"]["time"] = "2099-01-01T00:00:00+00:00"
    bench.add_speedups(gpu["rows"])
    return gpu


def test_readme_table_comes_from_the_newest_committed_gpu_run(quick, tmp_path):
    _, res, _ = quick
    results = tmp_path / "results"
    (results / "2026-01-01_cpu_abc").mkdir(parents=True)
    (results / "2026-01-01_cpu_abc" / "results.json").write_text(json.dumps(res))
    text = bench.readme_table(str(results), str(tmp_path))
    assert "No GPU run is committed yet" in text and "not measured" in text  # CPU runs never feed the table
    (results / "2099-01-01_nvidia-h200_def").mkdir()
    (results / "2099-01-01_nvidia-h200_def" / "results.json").write_text(json.dumps(_fake_gpu_run(res)))
    text = bench.readme_table(str(results), str(tmp_path))
    assert "results/2099-01-01_nvidia-h200_def/results.json" in text and "NVIDIA H200" in text
    assert "18,000" in text and "1.12" in text  # images/s and the speedup over the fastest timm provider
    status = {t["target"]: t["status"] for t in bench.target_status(_fake_gpu_run(res))}
    assert status[bench.TARGETS[0].what].startswith("missed") and "-2% on the ratio to compiled:timm" in \
        status[bench.TARGETS[0].what]
    assert status[bench.TARGETS[1].what] == "not measured"
    readme = "intro\n" + bench.README_BEGIN + "\nold\n" + bench.README_END + "\nrest\n"
    assert bench.update_readme(readme, text) == "intro\n" + bench.README_BEGIN + "\n" + text + "\n" + \
        bench.README_END + "\nrest\n"
    gen = _load(os.path.join(REPO, "benchmarks", "readme_table.py"))
    assert gen.main(["--check"]) == 0, "README.md is out of date: run python benchmarks/readme_table.py"


def test_timer_takes_quantiles_from_do_bench_on_cuda():
    timer = bench.Timer(torch.device("cpu"), quick=True)
    calls = []

    def fake_do_bench(fn, warmup, rep, quantiles):
        fn()
        calls.append((warmup, rep, quantiles))
        return [1.0, 2.0, 3.0, 4.0]

    timer._do_bench = fake_do_bench
    t = timer.time(lambda: None)
    assert (t.min_ms, t.p20_ms, t.median_ms, t.p80_ms) == (1.0, 2.0, 3.0, 4.0) and t.spread == pytest.approx(2 / 3)
    timer.time(lambda: None, heavy=True)
    assert calls[0][2] == [0.0, 0.2, 0.5, 0.8] and calls[1][1] > calls[0][1]


def test_bad_arguments_name_the_flag():
    exe = os.path.join(os.path.dirname(sys.executable), "vit-fast")
    out = subprocess.run([exe, "bench", "--ops", "attention,nope"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--ops" in out.stderr and "nope" in out.stderr
    out = subprocess.run([exe, "bench", "--models", "vit_bsae_patch16_224"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "vit_base_patch16_224" in out.stderr


def test_gpu_check_without_a_gpu_skips_the_gpu_steps(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py")], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "skipping build, GPU tests, benchmarks" in out.stdout
    assert out.stdout.rstrip().splitlines()[-1].startswith("total")  # the summary table comes last
    (run,) = os.listdir(tmp_path)
    assert "no-gpu" in run and {"env.json", "summary.md", "summary.json"} <= set(os.listdir(tmp_path / run))


@pytest.mark.parametrize("installed", [True, False])
def test_gpu_check_flow_on_a_gpu(tmp_path, monkeypatch, capsys, installed):
    """The GPU branch with the GPU faked: the steps in order, limits inside the deadline, statuses, and the
    run from the source tree when the package does not import as installed."""
    gc = _load(os.path.join(REPO, "benchmarks", "gpu_check.py"))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setattr(gc, "environment", lambda commit=None: {
        "time": "2026-01-01T00:00:00+00:00", "python": "3", "torch": "2.11", "torch_cuda": "13.0",
        "cuda_available": True, "git_commit": "abc1234", "git_dirty": False, "triton": "3.6", "nvcc": "13.0",
        "gpu": "NVIDIA H200", "driver": "580"})
    ran = []

    def fake_run(cmd, log, timeout, env=None, cwd=gc.REPO):
        ran.append((cmd, timeout, env, cwd))
        text = "$ fake\n"
        if "pytest" in cmd:
            text += "1 failed, 3 passed in 2.0s\n===== 1 failed, 3 passed in 2.00s =====\n"
        with open(log, "w") as f:
            f.write(text)
        if "bench" in cmd:
            with open(os.path.join(cmd[cmd.index("--out") + 1], "results.json"), "w") as f:
                json.dump({"rows": [], "violations": []}, f)
        if "-c" in cmd:
            return (0 if installed else 1), 1.0
        return (1 if "pytest" in cmd else 0), 1.0

    monkeypatch.setattr(gc, "run_logged", fake_run)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(gc.tempfile, "tempdir", str(tmp_path / "tmp"))  # the overlay folder goes there
    assert gc.main(["--deadline-s", "420"]) == 1  # a failing GPU test fails the check
    text = capsys.readouterr().out
    steps = [" ".join(c[:6]) for c, *_ in ran]
    assert "pip install --no-deps --no-build-isolation" in steps[0] and "import vit_fast.kernels" in steps[1]
    assert "vit_fast.cli info" in steps[2] and "-m pytest -m cuda" in steps[3]
    assert "vit_fast.cli bench --quick" in steps[4] and "compare.py" in steps[5]
    assert all(t <= 420 for _, t, *_ in ran)
    bench_cmd, bench_limit = ran[4][0], ran[4][1]
    assert float(bench_cmd[bench_cmd.index("--budget-s") + 1]) < bench_limit
    assert "| 3 GPU tests | FAIL |" in text and "1 failed, 3 passed" in text
    assert os.path.isdir(tmp_path / "out" / "2026-01-01_nvidia-h200_abc1234")
    cwds = {cwd for *_, cwd in ran[2:]}
    if installed:
        assert cwds == {gc.REPO} and "| 2 build | PASS |" in text
    else:  # every later step ran from a folder laying out vit_fast as installed, kernels included
        (overlay,) = cwds
        assert os.path.isfile(os.path.join(overlay, "vit_fast", "kernels", "__init__.py"))
        assert all(env["PYTHONPATH"].split(os.pathsep)[0] == overlay for _, _, env, _ in ran[2:])
        assert "| 2 build | FAIL |" in text and "source tree" in text
