"""`vit-fast tune`: on CPU (the reference wins, the Triton interpreter is never timed, and the file says why), the
ranking rule on synthetic measurements, one case per policy bucket, and a budget that runs out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vit_fast
import vit_fast.cli
from vit_fast import policy, tune
from vit_fast.bench.cases import default_ops


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(policy.ENV, raising=False)
    monkeypatch.setattr(policy, "SHIPPED_DIR", str(tmp_path / "shipped"))
    policy.reset()
    yield
    policy.reset()


@pytest.fixture(scope="module")
def quick_cpu(tmp_path_factory) -> tuple[int, dict, str, str]:
    """One `vit-fast tune --quick` on CPU, every op and both modes, written where auto looks for it."""
    cache = tmp_path_factory.mktemp("tune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        mp.delenv(policy.ENV, raising=False)
        import io
        from contextlib import redirect_stdout

        out = io.StringIO()
        with redirect_stdout(out):
            rc = vit_fast.cli.main(["tune", "--quick", "--no-progress"])
        path = str(cache / "vit_fast" / "policies" / policy.file_name(policy.device_kind("cpu")))
    return rc, json.loads(Path(path).read_text()), path, out.getvalue()


def test_quick_tune_on_cpu_writes_a_policy_where_auto_finds_it(quick_cpu):
    rc, doc, path, out = quick_cpu
    assert rc == 0, out
    assert policy.format_problems(doc) == [] and policy.stale_problems(doc, policy.device_kind("cpu")) == []
    cpu_ops = default_ops(torch.device("cpu"))  # the fp8 ops are GPU-only by default, forward-only when named
    assert set(cpu_ops) == set(tune.OPS) - {"scaled_linear", "attention_fp8", "layer_norm_fp8", "quantize_rows"}
    assert {(e["op"], e["mode"]) for e in doc["entries"]} == {(op, m) for op in cpu_ops for m in ("fwd", "fwd+bwd")}
    assert f"wrote {path}" in out and "vit_fast/policies/cpu-" in out and "auto picks" in out
    assert doc["command"].startswith("vit-fast tune --device cpu") and doc["rule"] == tune.RULE


def test_on_cpu_the_reference_wins_verified_and_the_file_says_why(quick_cpu):
    _, doc, _, _ = quick_cpu
    assert any("Triton interpreter" in n or "interpreter" in n for n in doc["notes"])
    for e in doc["entries"]:
        assert e["order"] == ["reference"], e
        ref = e["measured"]["reference"]
        assert ref["speedup"] == 1.0 and 0 <= ref["agreement"] <= 1 and ref["p20_ms"] <= ref["median_ms"]
        triton = e["measured"]["triton"]
        assert "median_ms" not in triton, "the Triton interpreter must never be timed"
        assert triton["status"] == "skipped" and ("interpreter" in triton["reason"] or "Triton" in triton["reason"])
        assert e["why"].startswith(tune.CPU_NOTE) and "triton skipped" in e["why"]


def test_explain_on_cpu_names_the_tuned_policy_and_the_reference_measured(quick_cpu, monkeypatch):
    _, doc, path, _ = quick_cpu
    monkeypatch.setenv("XDG_CACHE_HOME", str(Path(path).parents[2]))
    policy.reset()
    model = vit_fast.create_model(doc["models"][0], depth=1)
    images = torch.randn(doc["batch_sizes"][0], 3, *model.patch_embed.img_size)
    ex = vit_fast.explain(model, images)
    assert f"policy {path}" in ex.title
    attn = next(r for r in ex.rows if r["op"] == "attention_packed" and r["picked"])
    assert attn["backend"] == "reference" and attn["speedup"] == 1.0
    assert "the reference measured fastest" in attn["note"] and "On CPU auto runs the reference" in attn["note"]


def _row(backend: str, ms: float | None, spread: float = 0.01, status: str = "ok", mode: str = "fwd") -> dict:
    row = {"provider": f"vit_fast:{backend}", "mode": mode, "status": status, "reason": None if ms else "why not"}
    if ms is not None:
        row.update(median_ms=ms, p20_ms=ms * (1 - spread), p80_ms=ms * (1 + spread), agreement=0.5)
    return row


CASE = tune.Case("attention", {"B": 64, "H": 12, "N": 197, "D": 64}, torch.bfloat16, (64, 256, 1024), "test")
GPU = torch.device("cuda", 0)


@pytest.mark.parametrize("triton_ms, cuda_ms, spread, order", [
    (0.7, 0.8, 0.01, ["triton", "cuda", "reference"]),  # both faster beyond the noise, fastest first
    (0.99, None, 0.001, ["reference"]),  # 1% faster: under the margin
    (0.9, None, 0.08, ["reference"]),  # 10% faster, but the spreads overlap
    (1.2, 0.5, 0.01, ["cuda", "reference"]),  # slower than the reference: never ranked
])
def test_a_kernel_is_ranked_only_when_faster_than_the_reference_beyond_the_noise(triton_ms, cuda_ms, spread, order):
    rows = [_row("reference", 1.0, spread), _row("triton", triton_ms, spread),
            _row("cuda", cuda_ms, spread, status="ok" if cuda_ms else "skipped")]
    e = tune.entry(CASE, "fwd", rows, GPU)
    assert e["order"] == order and policy.format_problems({**policy.new_document({"type": "cuda", "name": "x",
                                                                                   "capability": "9.0"}),
                                                          "entries": [e]}) == []
    assert e["measured"]["triton"]["speedup"] == pytest.approx(1.0 / triton_ms)
    if cuda_ms is None:
        assert e["measured"]["cuda"] == {"status": "skipped", "reason": "why not"} and "cuda skipped" in e["why"]


def test_a_kernel_that_failed_its_check_or_a_missing_reference_ranks_nothing():
    failed = tune.entry(CASE, "fwd", [_row("reference", 1.0), _row("triton", None, status="failed")], GPU)
    assert failed["order"] == ["reference"] and failed["measured"]["triton"]["status"] == "failed"
    no_ref = tune.entry(CASE, "fwd", [_row("reference", None, status="skipped"), _row("triton", 0.5)], GPU)
    assert no_ref["order"] == ["reference"] and "the reference was not measured" in no_ref["why"]
    cpu = tune.entry(CASE, "fwd", [_row("reference", 1.0), _row("triton", 0.5)], torch.device("cpu"))
    assert cpu["order"] == ["reference"] and cpu["why"].startswith(tune.CPU_NOTE)


def test_the_plan_measures_each_policy_bucket_once():
    cases = tune.plan(["vit_base_patch16_224"], [64, 60, 256], [torch.bfloat16], ["attention", "layer_norm"])
    # B*H 768 and 720 share the bucket 1024; 64 * 197 and 60 * 197 rows share 16384: B 60 adds nothing
    assert [(c.op, c.source) for c in cases] == [("attention", "vit_base_patch16_224 B64"),
                                                  ("layer_norm", "vit_base_patch16_224 B64"),
                                                  ("attention", "vit_base_patch16_224 B256"),
                                                  ("layer_norm", "vit_base_patch16_224 B256")]
    assert cases[0].bucket == (64, 256, 1024) and cases[1].bucket == (768, 16384)


def test_bad_arguments_and_a_budget_that_runs_out(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert vit_fast.cli.main(["tune", "--device", "cuda:0", "--out", str(tmp_path / "p.json")]) == 2
        assert "no CUDA device is visible" in capsys.readouterr().err
    assert vit_fast.cli.main(["tune", "--models", "vit_no_such_model", "--device", "cpu"]) == 2
    out = tmp_path / "p.json"
    assert vit_fast.cli.main(["tune", "--quick", "--budget-s", "0", "--out", str(out), "--no-progress",
                              "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    assert doc["entries"] == [] and any("budget" in n for n in doc["notes"])


def test_an_interrupted_tune_keeps_every_case_it_measured(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py stops a step at its time limit with SIGINT: the file keeps the cases measured
    before it, and says the rest were not."""
    calls = []

    def bench_op_case(op, shape, dtype, device, providers, modes, *rest):
        calls.append(op)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return [_row("reference", 1.0, mode=m) for m in modes] + [_row("triton", None, status="skipped", mode=m)
                                                                  for m in modes]

    monkeypatch.setattr(tune, "bench_op_case", bench_op_case)
    out = tmp_path / "p.json"
    assert vit_fast.cli.main(["tune", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    assert len(calls) == 2 and [(e["op"], e["mode"]) for e in doc["entries"]] == [("attention", "fwd"),
                                                                                  ("attention", "fwd+bwd")]
    assert policy.format_problems(doc) == [] and any(n.startswith("Interrupted") for n in doc["notes"])


def _inductor(ms: float | None, status: str = "ok", mode: str = "fwd") -> dict:
    row = {**_row("reference", ms, mode=mode, status=status), "provider": "compiled:reference"}
    return row if ms is not None else {**row, "reason": "torch.compile skipped"}


@pytest.mark.parametrize("inductor_ms, compiled_order", [
    (0.9, ["triton", "reference"]),  # triton 0.7 ms beats inductor's 0.9 beyond the noise
    (0.72, ["reference"]),  # inductor nearly as fast: under compile the reference (inductor) runs
    (None, ["reference"]),  # not measured: unmeasured means the reference
])
def test_each_entry_holds_the_eager_and_the_compiled_verdict(inductor_ms, compiled_order):
    rows = [_row("reference", 1.0), _row("triton", 0.7), _inductor(inductor_ms, "ok" if inductor_ms else "skipped")]
    e = tune.entry(CASE, "fwd", rows, GPU)
    assert e["order"] == ["triton", "reference"] and e["compiled_order"] == compiled_order
    assert "inductor" in e["measured"] and "compiled:reference" not in e["measured"]
    if inductor_ms:
        assert e["measured"]["triton"]["compiled_speedup"] == pytest.approx(inductor_ms / 0.7)
    else:
        assert "not measured" in e["compiled_why"]
    assert policy.format_problems({**policy.new_document({"type": "cuda", "name": "x", "capability": "9.0"}),
                                   "entries": [e]}) == []


def test_triton_variants_are_timed_and_the_fastest_named_but_never_ranked_as_backends():
    rows = [_row("reference", 1.0), _row("triton", 0.8),
            {**_row("triton", 0.6), "provider": "vit_fast:triton@attention_bwd=fused"}]
    e = tune.entry(CASE, "fwd", rows, GPU)
    assert e["order"] == ["triton", "reference"] and e["kernel_variants"] == {"attention_bwd": "fused"}
    slower = [rows[0], rows[1], {**_row("triton", 0.9), "provider": "vit_fast:triton@attention_bwd=fused"}]
    assert tune.entry(CASE, "fwd", slower, GPU)["kernel_variants"] == {"attention_bwd": "default"}


def test_tune_times_the_op_under_torch_compile_and_each_triton_variant():
    from vit_fast.bench.cases import OP_BENCHES

    names = [p.name for p in tune.providers(OP_BENCHES["attention"], torch.device("cpu"), quick=False)]
    assert {"vit_fast:triton@attention_fwd=pointer", "vit_fast:triton@attention_bwd=fused"} <= set(names)
    assert any(n.startswith("compiled:") for n in names)
