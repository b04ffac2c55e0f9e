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
import tarfile

import pytest
import torch

from vit_fast import bench
from vit_fast.bench.cases import OP_BENCHES, default_ops
from vit_fast.bench.measure import derive, new_row
from vit_fast.bench.peaks import peak_key
from vit_fast.config import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
ROW_KEYS = {"kind", "name", "provider", "provider_kind", "compiled", "mode", "dtype", "shape", "shape_label", "status",
            "reason", "best_baseline", "speedup"}
OK_KEYS = {"median_ms", "p20_ms", "p80_ms", "min_ms", "spread", "flop", "bytes", "tflops", "gbps", "frac_peak_flops",
           "frac_peak_bw", "exceeds_peak", "agreement"}


def _load(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def scripts(monkeypatch):
    """Loads ``benchmarks/<name>.py`` as ``python benchmarks/<name>.py`` runs it: with benchmarks/ on sys.path,
    where its siblings (suite, readme_table) are found."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    return lambda name: _load(os.path.join(BENCHMARKS, f"{name}.py"))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """A cheap in-process quick run on CPU: one op (layer_norm), no model; with its report and plot."""
    out = str(tmp_path_factory.mktemp("bench-small"))
    return bench.run(bench.BenchConfig(quick=True, ops=["layer_norm"], models=[], device="cpu", out=out, threads=1,
                                       progress=False))


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


@pytest.mark.subprocess
def test_quick_run_writes_results_report_and_plots(quick):
    out, res, stdout = quick
    assert res["schema"] == bench.SCHEMA
    env = res["environment"]
    for key in ("torch", "triton", "cuda_runtime", "git_commit", "time", "vit_fast"):
        assert key in env
    assert env["device"]["type"] == "cpu" and env["device"]["name"]
    assert res["config"]["quick"] and res["config"]["dtypes"] == ["float32"]
    # the run's dtype, and the int8 engine's own peak for the quantized model rows
    # (and bf16 where the CPU has native bf16: the bf16 rows' fraction of peak)
    bf16 = {"bfloat16"} if env["devices"][0].get("native_bf16") else set()
    assert set(res["peaks"]["matmul_tflops"]) in ({"float32"} | bf16, {"float32", "int8"} | bf16)
    assert res["peaks"]["bandwidth_gbps"] > 0
    for row in res["rows"]:
        assert ROW_KEYS <= set(row), row
        if row["status"] == "ok":
            assert OK_KEYS <= set(row), row
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        else:
            assert row["reason"], row
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    cpu_ops = default_ops(torch.device("cpu"))  # the GPU-only ops (fp8) run on CPU only when named
    assert set(cpu_ops) < set(bench.OPS) and not {r["name"] for r in ok} & (set(bench.OPS) - set(cpu_ops))
    for op in cpu_ops:  # every op, each of its modes, beside at least one PyTorch baseline
        for mode in OP_BENCHES[op].spec.bench.modes:
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
    assert sorted(res["plots"]) == sorted([f"{op}_speedup.png" for op in cpu_ops] + ["models.png"])
    for name in res["plots"]:
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert "best PyTorch" in stdout and "images/s" in stdout and "not measured" in stdout


@pytest.mark.subprocess
def test_every_provider_agrees_with_the_reference(quick):
    _, res, _ = quick
    assert not [r for r in res["rows"] if r["status"] == "failed"]
    assert all(0 <= r["agreement"] <= 1 for r in res["rows"] if r["status"] == "ok")


def test_a_wrong_provider_is_caught_and_not_timed():
    op = bench.OP_BENCHES["layer_norm"]
    _, eager, _ = OP_BENCHES["layer_norm"].baselines()[0]  # F.layer_norm with the op's signature
    wrong = bench.Provider("wrong", "peer", lambda x, w, b, *, eps: 1.001 * eager(x, w, b, eps=eps))
    right = bench.Provider("right", "baseline", eager)
    timer = bench.Timer(torch.device("cpu"), quick=True)
    peaks = {"matmul_tflops": {"float32": 1.0}, "bandwidth_gbps": 1.0}
    rows = bench.bench_op_case(op, {"B": 2, "N": 5, "C": 16}, torch.float32, torch.device("cpu"), [wrong, right],
                               bench.OP_MODES, timer, peaks)
    by = {(r["provider"], r["mode"]): r for r in rows}
    for mode in bench.OP_MODES:
        assert by["wrong", mode]["status"] == "failed" and "disagrees" in by["wrong", mode]["reason"]
        assert "median_ms" not in by["wrong", mode]
        assert by["right", mode]["status"] == "ok", by["right", mode]


@pytest.mark.parametrize(("name", "shape"), [("scaled_linear", {"B": 2, "N": 5, "C": 32, "out": 16}),
                                           ("attention_fp8", {"B": 1, "H": 2, "N": 9, "D": 16}),
                                           ("layer_norm_fp8", {"B": 2, "N": 5, "C": 48}),
                                           ("quantize_rows", {"B": 2, "N": 5, "C": 48})])
def test_an_fp8_op_is_timed_forward_only_on_inputs_quantized_once_and_judged_by_its_close_rule(name, shape):
    import dataclasses

    op = bench.OP_BENCHES[name]  # an OpBench of its own: its spec may be swapped
    assert op.modes == ("fwd",) and name not in bench.cases.default_ops(torch.device("cpu"))
    quantized, view = [], op.spec.cases.view
    counted = dataclasses.replace(op.spec.cases, view=lambda dims, t: quantized.append(id(t)) or view(dims, t))
    op.spec = dataclasses.replace(op.spec, cases=counted)
    ref = op.reference()

    def off(*args, **kwargs):  # the e4m3 codes (or the GEMM's output) shifted: the op's own rule must refuse it
        out = ref(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0].float().mul(1.25).to(out[0].dtype), *out[1:])
        return out * 1.01
    provs = [bench.Provider("right", "baseline", ref), bench.Provider("off", "peer", off)]
    timer = bench.Timer(torch.device("cpu"), quick=True)
    peaks = {"matmul_tflops": {"float32": 1.0}, "bandwidth_gbps": 1.0}
    rows = bench.bench_op_case(op, shape, torch.float32, torch.device("cpu"), provs, bench.OP_MODES, timer, peaks)
    by = {r["provider"]: r for r in rows}
    assert [r["mode"] for r in rows] == ["fwd", "fwd"]
    assert by["right"]["status"] == "ok" and by["right"]["agreement"] == 0.0, by["right"]
    assert by["off"]["status"] == "failed" and "disagrees" in by["off"]["reason"], by["off"]
    # each set of tensors (the float64 oracle's, the base's, the rotated copies') was quantized once, not once per
    # timed call
    assert by["right"]["repeats"] > 1 and quantized and len(set(quantized)) == len(quantized)


def test_small_run_writes_results_report_and_plot(small):
    out = small["config"]
    assert small["schema"] == bench.SCHEMA and out["ops"] == ["layer_norm"] and out["models"] == []
    assert {r["name"] for r in small["rows"]} == {"layer_norm"} and small["plots"] == ["layer_norm_speedup.png"]
    ok = [r for r in small["rows"] if r["status"] == "ok"]
    assert {(r["mode"], r["provider_kind"]) for r in ok} >= {(m, k) for m in bench.OP_MODES
                                                             for k in ("vit_fast", "baseline")}
    assert small["violations"] == [] and all(0 <= r["agreement"] <= 1 for r in ok)
    assert all(r["speedup"] is not None for r in ok)
    report = bench.render_report(small)
    assert "## layer_norm" in report and "## Targets" in report and "## Not measured" in report
    assert "best PyTorch" in bench.summary_table(small)


def test_a_quantized_model_row_is_a_fraction_of_its_formats_peak():
    peaks = {"matmul_tflops": {"float32": 1.0, "int8": 4.0}, "bandwidth_gbps": 1.0}
    row = {"dtype": "float32", "provider": "vit_fast:int8"}
    derive(row, bench.Timing(1.0, 1.0, 1.0, 1.0, 1), 2 * 10**9, None, peaks)
    assert row["frac_peak_flops"] == pytest.approx(0.5) and not row["exceeds_peak"]
    row = {"dtype": "bfloat16", "provider": "vit_fast:fp8"}  # no fp8 peak measured here: no fraction claimed
    derive(row, bench.Timing(1.0, 1.0, 1.0, 1.0, 1), 2 * 10**9, None, peaks)
    assert row["frac_peak_flops"] is None and not row["exceeds_peak"]


def test_a_figure_above_the_peak_is_flagged():
    row = {"dtype": "float32"}
    derive(row, bench.Timing(1.0, 1.0, 1.0, 1.0, 1), 2 * 10**9, 10, {"matmul_tflops": {"float32": 1.0},
                                                                      "bandwidth_gbps": 1.0})
    assert row["tflops"] == pytest.approx(2.0) and row["exceeds_peak"]


@pytest.mark.subprocess
def test_derived_figures_stay_under_the_measured_peaks(quick):
    _, res, _ = quick
    assert res["violations"] == []
    peaks = res["peaks"]
    for r in res["rows"]:
        if r["status"] != "ok":
            continue
        s = r["median_ms"] * 1e-3
        assert r["tflops"] == pytest.approx(r["flop"] / s / 1e12)
        assert r["frac_peak_flops"] == pytest.approx(r["tflops"] / peaks["matmul_tflops"][peak_key(r)])
        assert r["frac_peak_flops"] <= 1
        if r["gbps"] is not None:
            assert r["gbps"] == pytest.approx(r["bytes"] / s / 1e9) and r["frac_peak_bw"] <= 1


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


def test_regression_check_flags_an_injected_slowdown(small, scripts, tmp_path):
    res = small
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
    compare = scripts("compare")
    assert compare.main([str(new), str(old)]) == 1
    assert compare.main([str(old), str(old)]) == 0


def _fake_gpu_run(res: dict) -> dict:
    """A quick CPU run dressed as an H200 run with ViT-B/16 rows, for the README generator."""
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


def test_readme_table_comes_from_the_newest_committed_gpu_run(small, scripts, tmp_path):
    res = small
    gen = scripts("readme_table")
    results = tmp_path / "results"
    (results / "2026-01-01_cpu_abc").mkdir(parents=True)
    (results / "2026-01-01_cpu_abc" / "results.json").write_text(json.dumps(res))
    text = gen.readme_table(str(results), str(tmp_path))
    assert "No GPU run is committed yet" in text and "not measured" in text  # CPU runs never feed the table
    (results / "2099-01-01_nvidia-h200_def").mkdir()
    (results / "2099-01-01_nvidia-h200_def" / "results.json").write_text(json.dumps(_fake_gpu_run(res)))
    text = gen.readme_table(str(results), str(tmp_path))
    assert "results/2099-01-01_nvidia-h200_def/results.json" in text and "NVIDIA H200" in text
    assert "18,000" in text and "1.12" in text  # images/s and the speedup over the fastest timm provider
    status = {t["target"]: t["status"] for t in bench.target_status(_fake_gpu_run(res))}
    assert status[bench.TARGETS[0].what].startswith("missed") and "-2% on the ratio to compiled:timm" in \
        status[bench.TARGETS[0].what]
    assert status[bench.TARGETS[1].what] == "not measured"
    readme = "intro\n" + gen.README_BEGIN + "\nold\n" + gen.README_END + "\nrest\n"
    assert gen.update_readme(readme, text) == "intro\n" + gen.README_BEGIN + "\n" + text + "\n" + \
        gen.README_END + "\nrest\n"
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


def test_bad_arguments_name_the_flag(capsys, tmp_path):
    from vit_fast.cli import main

    assert main(["bench", "--ops", "attention,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--ops" in err and "nope" in err
    assert main(["bench", "--models", "vit_bsae_patch16_224", "--out", str(tmp_path)]) == 2
    assert "vit_base_patch16_224" in capsys.readouterr().err


@pytest.mark.parametrize("name", [*bench.OPS, "model"])
def test_each_bench_file_is_its_part_of_the_suite_and_of_vit_fast_bench(scripts, monkeypatch, name):
    import vit_fast.cli

    module = scripts(f"bench_{name}")
    suite = scripts("suite")
    (mark,) = [m for m in getattr(module, f"test_{name}").pytestmark if m.name == "parametrize"]
    assert [str(c) for c in mark.args[1]] == [str(c) for c in suite.pytest_cases(name)] and mark.args[1]
    argv = []
    monkeypatch.setattr(vit_fast.cli, "main", lambda a: argv.append(a) or 0)
    assert suite.script(name, ["--quick"]) == 0
    only = ["--ops", "none"] if name == "model" else ["--ops", name, "--models", "none"]
    assert argv == [["bench", *only, "--quick"]]


@pytest.mark.subprocess
def test_gpu_check_without_a_gpu_skips_the_gpu_steps(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py")], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "skipping build, correctness, compute-sanitizer, benchmarks, policy, GPU tests" in out.stdout
    assert out.stdout.rstrip().splitlines()[-1].startswith("total")  # the summary table comes last
    # OUT gets the run folder as one tarball plus its summary (a remote machine returns a few files)
    delivered = set(os.listdir(tmp_path))
    (tarball,) = [f for f in delivered if f.endswith(".tar.gz")]
    assert "no-gpu" in tarball and delivered == {tarball, "summary.md"}
    run = tarball[: -len(".tar.gz")]
    with tarfile.open(tmp_path / tarball) as tar:
        names = set(tar.getnames())
    assert {f"{run}/env.json", f"{run}/summary.md", f"{run}/summary.json"} <= names


def test_gpu_check_children_run_on_cpu(tmp_path):
    """The code the GPU run executes in its children, run here on CPU: the correctness rows (with the launch
    proof) and the sanitizer's target."""
    from vit_fast import backends

    gc = _load(os.path.join(REPO, "benchmarks", "gpu_check.py"))
    small = {"attention": [{"B": 1, "H": 2, "N": 7, "D": 16}], "layer_norm": [{"B": 1, "N": 5, "C": 32}],
             "layernorm_mlp": [{"B": 1, "N": 5, "C": 16, "hidden": 32}],
             "patch_embed": [{"B": 1, "in_chans": 3, "img": 8, "P": 4, "E": 16}]}
    path = str(tmp_path / "correctness.json")
    assert gc.correctness(path, device="cpu", dtypes=("float32",), shapes=small) == 0
    with open(path) as f:
        rows = {(r["op"], r["backend"]): r for r in json.load(f)["rows"]}
    entries = {**{op: op for op in small}, "attention_packed": "attention_packed"}  # the model's entry point
    assert set(rows) == {(e, b) for e in entries for b in ("triton", "cuda", "reference")}
    for entry, op in entries.items():
        ref = rows[(entry, "reference")]
        assert ref["status"] == "PASS" and ref["launched"] == [[op, "fwd"]], ref
        assert rows[(entry, "cuda")]["status"] == "SKIP"
        triton = rows[(entry, "triton")]
        if triton["status"] != "SKIP":  # under the interpreter: forward and backward really launched
            assert triton["status"] == "PASS" and triton["launched"] == [[op, "bwd"], [op, "fwd"]], triton
    assert gc.sanitize_target(device="cpu", backend="reference") == 0
    if backends.unavailable("cuda"):
        assert gc.sanitize_target(device="cpu", backend="cuda") == 4  # a skip, with the reason printed


# ---------------------------------------------------------------------------------------------- op targets

H200 = {"type": "cuda", "name": "NVIDIA H200"}
PEAKS = {"matmul_tflops": {"bfloat16": 790.0}, "bandwidth_gbps": 4300.0}


def _case(op: str, mode: str, shape: dict, providers: dict) -> list[dict]:
    """The rows `vit-fast bench` writes for one bf16 case: provider -> median ms, or 'skipped' / 'failed'."""
    bench_op = bench.OP_BENCHES[op]
    rows = []
    for name, ms in providers.items():
        kind = "vit_fast" if name.startswith("vit_fast:") else "baseline"
        row = new_row("op", op, bench.Provider(name, kind), mode, torch.bfloat16, dict(shape), bench_op.label(shape))
        row["tokens"] = bench_op.tokens(shape)
        if isinstance(ms, str):
            row.update(status=ms, reason="for a reason")
        else:
            derive(row, bench.Timing(ms, ms, ms, ms, None), bench_op.flops(shape, mode), bench_op.bytes(shape, mode, 2),
                   PEAKS)
        rows.append(row)
    return rows


def _status(rows: list[dict], device: dict = H200) -> dict[str, dict]:
    bench.add_speedups(rows)
    return {t["target"]: t for t in bench.target_status({"environment": {"device": device}, "rows": rows})}


def _target(op: str, mode: str) -> str:
    (what,) = [t.what for t in bench.TARGETS if getattr(t, "op", None) == op and t.mode == mode]
    return what


ATTENTION_SHAPES = [(h, n, d) for h, d in ((12, 64), (16, 80)) for n in (197, 257, 577)]


def _attention(mode: str, ratio: dict, batch: int = 64, triton: float | str = 1.0, sdpa: str | None = None,
               shapes=ATTENTION_SHAPES) -> list[dict]:
    """Attention rows where vit_fast:triton takes 1 ms and the fastest SDPA kernel ``ratio[(N, D)]`` ms (1.5
    by default); the reference backend, sdpa:math and the compiled reference are faster still: none of them
    counts (ours is a kernel backend, the baseline an SDPA kernel)."""
    rows = []
    for h, n, d in shapes:
        r = ratio.get((n, d), 1.5)
        rows += _case("attention", mode, {"B": batch, "H": h, "N": n, "D": d}, {
            "vit_fast:reference": 0.1, "vit_fast:triton": triton, "vit_fast:cuda": "skipped",
            "sdpa:flash": sdpa or 1.1 * r, "sdpa:efficient": sdpa or r, "sdpa:cudnn": "skipped", "sdpa:math": 0.2,
            "compiled:reference": 0.3})
    return rows


def test_attention_targets_take_the_worst_shape_at_the_largest_batch():
    rows = _attention("fwd", {(577, 80): 1.35}) + _attention("fwd", {(197, 64): 0.5}, batch=8) \
        + _attention("fwd+bwd", {(257, 64): 1.1, (577, 80): 1.15})
    status = _status(rows)
    fwd, both = status[_target("attention", "fwd")], status[_target("attention", "fwd+bwd")]
    assert fwd["status"] == "met", fwd
    assert fwd["measured"] == "worst 1.35x sdpa:efficient (vit_fast:triton) at B64 H16 N577 D80 on NVIDIA H200"
    assert ">= 1.30x the fastest of sdpa:flash/sdpa:efficient/sdpa:cudnn" in fwd["required"]
    assert both["status"] == ("missed (-8% on the ratio to the fastest of sdpa:flash/sdpa:efficient/sdpa:cudnn "
                              "at B64 H12 N257 D64, 2 of 6 shapes below)"), both
    assert both["measured"].startswith("worst 1.10x sdpa:efficient (vit_fast:triton) at B64 H12 N257 D64")
    assert ">= 1.20x" in both["required"]


def test_attention_targets_not_measured():
    old_quick_grid = [(12, 197, 64), (12, 577, 64), (16, 257, 80)]
    t = _status(_attention("fwd", {}, shapes=old_quick_grid))[_target("attention", "fwd")]
    assert t["status"] == "not measured (shape not in this run)", t
    assert "not in this run: N257 D64, N197 D80, N577 D80" in t["measured"]
    every = "B64 H12 N197 D64, B64 H12 N257 D64, B64 H12 N577 D64, B64 H16 N197 D80, B64 H16 N257 D80, B64 H16 N577 D80"
    t = _status(_attention("fwd", {}, triton="skipped"))[_target("attention", "fwd")]
    assert t["status"] == ("not measured (no vit_fast kernel ran (vit_fast:triton skipped, vit_fast:cuda skipped) "
                           f"at {every})") and t["measured"] == "-", t
    t = _status(_attention("fwd", {}, sdpa="skipped"))[_target("attention", "fwd")]
    assert t["status"] == f"not measured (no sdpa:flash/sdpa:efficient/sdpa:cudnn row at {every})", t
    # a shape missed is a miss even when another is absent; a kernel that disagrees with the reference misses
    t = _status(_attention("fwd", {(197, 64): 1.0}, shapes=old_quick_grid))[_target("attention", "fwd")]
    assert t["status"].startswith("missed (-23% on the ratio") and "not in this run: N257 D64" in t["measured"], t
    t = _status(_attention("fwd", {}, triton="failed"))[_target("attention", "fwd")]
    assert t["status"] == f"missed (vit_fast:triton failed at {every})", t


def test_layernorm_mlp_patch_embed_and_layer_norm_targets():
    mlp = {"B": 64, "N": 197, "C": 768, "hidden": 3072}
    patch = {"B": 256, "in_chans": 3, "img": 224, "P": 16, "E": 768}
    ln = {"B": 256, "N": 197, "C": 768}
    ln_ms = bench.OP_BENCHES["layer_norm"].bytes(ln, "fwd", 2) / 3.5e12 * 1e3  # 3,500 GB/s
    rows = (_case("layernorm_mlp", "fwd", mlp, {"vit_fast:cuda": 1.0, "eager": 1.4, "compiled": 1.2})
            + _case("layernorm_mlp", "fwd+bwd", mlp, {"vit_fast:triton": 1.0, "eager": 1.4, "compiled": 1.0})
            + _case("patch_embed", "fwd", patch, {"vit_fast:triton": 1.0, "eager": 2.7, "compiled": 0.9})
            + _case("patch_embed", "fwd+bwd", patch, {"vit_fast:triton": 1.0, "eager": 2.0})
            + _case("layer_norm", "fwd", ln, {"vit_fast:reference": ln_ms / 2, "vit_fast:triton": ln_ms,
                                               "eager:F.layer_norm": ln_ms * 1.1}))
    status = _status(rows)
    t = status[_target("layernorm_mlp", "fwd")]
    assert t["status"] == "met" and t["measured"] == "1.40x eager (vit_fast:cuda) at B64 N197 C768 hidden3072; " \
        "1.20x compiled (vit_fast:cuda) at B64 N197 C768 hidden3072 on NVIDIA H200", t
    assert status[_target("layernorm_mlp", "fwd+bwd")]["status"] == \
        "missed (-9% on the ratio to compiled at B64 N197 C768 hidden3072)"
    t = status[_target("patch_embed", "fwd")]
    assert t["status"] == "missed (-10% on the ratio to eager at B256 img224 P16 E768)", t  # compiled is no bar
    t = status[_target("patch_embed", "fwd+bwd")]
    assert t["status"] == "reported (no target)" and t["measured"].startswith("2.00x eager (vit_fast:triton)"), t
    t = status[_target("layer_norm", "fwd")]
    assert t["status"] == "met" and t["measured"].startswith("3,500 GB/s (vit_fast:triton) at B256 N197 C768"), t
    assert t["required"] == ">= 3,300 GB/s"
    slow = _case("layer_norm", "fwd", ln, {"vit_fast:triton": ln_ms * 3.5 / 3.0, "eager:F.layer_norm": ln_ms})
    assert _status(slow)[_target("layer_norm", "fwd")]["status"] == "missed (-9% on GB/s at B256 N197 C768)"
    small = _case("layer_norm", "fwd", {"B": 8, "N": 197, "C": 768}, {"vit_fast:triton": 0.01, "eager:F.layer_norm": 1})
    assert _status(small)[_target("layer_norm", "fwd")]["status"] == "not measured (shape not in this run)"
    cpu = _status(rows, {"type": "cpu", "name": "a CPU"})
    assert all(t["status"] == "not measured" and t["measured"] == "-" for t in cpu.values())


def test_gpu_grids_hold_every_op_target_shape():
    for t in bench.TARGETS:
        if isinstance(t, bench.OpTarget):
            for quick in (True, False):
                shapes = bench.OP_BENCHES[t.op].shapes(quick, True)
                assert all(any(s.matches(shape) for shape in shapes) for s in t.shapes), (t.what, quick)
