"""The measured CPU inference path: the feature probe (faked, so both the native-bf16 and the AVX2-only branch run on
any CPU), the accuracy check, the search (fastest verified candidate per batch size, failures and budget reported,
fp32 when nothing else fits), the cache, the PT2E artifact and the training precision probe."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import pytest
import torch

import vit_fast
from vit_fast import cpu_features, cpu_paths, pt2e
from vit_fast.config import ViTConfig
from vit_fast.cpu_features import CpuFeatures
from vit_fast.cpu_paths import AccuracyBudget, Candidate, Runner

AMX = CpuFeatures("Fake Xeon with AMX", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                                                   "amx_int8", "amx_tile"}), source="test")
AVX2 = CpuFeatures("Fake AVX2 CPU", frozenset({"avx2", "fma"}), source="test")


def tiny(num_classes: int = 5) -> vit_fast.VisionTransformer:
    cfg = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=num_classes)
    return vit_fast.VisionTransformer(cfg).eval()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "vit_fast" / "cpu_paths"


def fake_cpu(monkeypatch, features: CpuFeatures) -> None:
    monkeypatch.setattr(cpu_features, "cpu_features", lambda: features)


# ---- the probe -------------------------------------------------------------------------------------------------


def test_probe_reads_this_machines_flags():
    found = cpu_features.probe()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            line = next(ln for ln in f if ln.startswith("flags"))
        assert found.flags == frozenset(line.split(":", 1)[1].split()) and found.source == "/proc/cpuinfo"
    assert found.native_bf16 == bool({"amx_bf16", "avx512_bf16"} & found.flags)


def test_features_of_faked_cpus():
    assert AMX.native_bf16 and AMX.int8_dot and AMX.why_no_bf16() is None
    assert {"AMX-BF16", "AVX-512 BF16", "AMX-INT8", "AVX-512 VNNI"} <= set(AMX.present)
    assert not AVX2.native_bf16 and not AVX2.int8_dot
    assert "Fake AVX2 CPU has no native bf16" in AVX2.why_no_bf16()
    assert AVX2.as_dict() == {"name": "Fake AVX2 CPU", "features": ["AVX2", "FMA"], "native_bf16": False,
                              "int8_dot": False, "source": "test"}


@pytest.mark.parametrize("features", [AMX, AVX2], ids=["amx", "avx2"])
def test_candidates_follow_the_probe(monkeypatch, features):
    fake_cpu(monkeypatch, features)
    cands = {c.name: c for c in cpu_paths.candidates()}
    assert list(cands)[0] == "fp32" and set(cands) == {"fp32", "bf16", "int8", "compiled:fp32", "compiled:bf16",
                                                        "pt2e:int8", "pt2e:int8+bf16"}
    bf16 = ("bf16", "compiled:bf16")
    if features.native_bf16:
        assert all(cands[n].skip is None for n in bf16) and list(cands)[1] == "compiled:bf16"
    else:
        assert all(cands[n].skip == AVX2.why_no_bf16() for n in (*bf16, "pt2e:int8+bf16"))
    assert cands["pt2e:int8"].skip == pt2e.unavailable()


def test_pt2e_says_when_torchao_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    assert "torchao is not installed" in pt2e.unavailable()
    with pytest.raises(RuntimeError, match="torchao is not installed"):
        pt2e.quantize_pt2e(tiny())


# ---- the check -------------------------------------------------------------------------------------------------


def test_agreement():
    budget = AccuracyBudget(rel_error=0.05, top1=0.99, tie=0.01)
    ref = torch.tensor([[4.0, 1.0, 0.0], [2.0, 1.99, 0.0]])
    assert cpu_paths.agreement(ref, ref, budget)[2] is None
    flipped_tie = torch.tensor([[4.0, 1.0, 0.0], [1.99, 2.0, 0.0]])  # row 2: fp32's classes 0 and 1 are a tie
    rel, top1, why = cpu_paths.agreement(flipped_tie, ref, budget)
    assert why is None and top1 == 1.0 and 0 < rel < 0.05
    flipped = torch.tensor([[1.0, 4.0, 0.0], [2.0, 1.99, 0.0]])  # row 1: a confident class changed
    assert "relative error" in cpu_paths.agreement(flipped, ref, budget)[2]
    loose = AccuracyBudget(rel_error=2.0, tie=0.01)
    assert "top-1 agrees with fp32 on 50.0%" in cpu_paths.agreement(flipped, ref, loose)[2]
    assert "non-finite" in cpu_paths.agreement(ref.clone().fill_(float("nan")), ref, budget)[2]
    assert "shape" in cpu_paths.agreement(ref[:1], ref, budget)[2]
    with pytest.raises(ValueError, match="accuracy.top1"):
        AccuracyBudget(top1=1.5)
    with pytest.raises(ValueError, match="accuracy.rel_error"):
        AccuracyBudget(rel_error=float("nan"))
    with pytest.raises(ValueError, match="accuracy.tie"):
        AccuracyBudget(tie=-1)


# ---- the search, with candidates whose speed and accuracy the test sets ---------------------------------------


class Clock:
    """Deterministic timing for the search's logic on a shared machine: each fake runner says what a call costs,
    and the search's timer reads that instead of the wall clock."""

    def __init__(self, monkeypatch) -> None:
        self.cost, self.timing = 0.0, False
        monkeypatch.setattr(cpu_paths, "_median_ms", self.median_ms)

    def median_ms(self, fn, **timer) -> float:
        self.timing = True
        try:
            fn()
        finally:
            self.timing = False
        return self.cost

    def costing(self, ms: float, fn):
        def run(x):
            self.cost = ms
            return fn(x)

        return run


def fake_candidates(clock: Clock, fast_noise: float = 0.0, built: list | None = None) -> list[Candidate]:
    def fp32(model, calibration):
        return Runner(clock.costing(4.0, model), torch.float32)

    def fast(model, calibration):
        if built is not None:
            built.append("fast")
        return Runner(clock.costing(1.0, lambda x: model(x) * (1 + fast_noise)), torch.float32)

    def broken(model, calibration):
        raise RuntimeError("C++ compile failed\nlong log")

    def noisy(model, calibration):
        return Runner(clock.costing(0.5, lambda x: model(x) + torch.randn_like(model(x))), torch.float32)

    return [Candidate("fp32", "reference", fp32), Candidate("fast", "4x faster", fast),
            Candidate("broken", "raises", broken), Candidate("noisy", "wrong", noisy),
            Candidate("absent", "not here", fast, skip="this CPU lacks it")]


def test_the_timer_takes_the_median_of_several_calls():
    calls = []
    ms = cpu_paths._median_ms(lambda: calls.append(time.sleep(0.001)))
    assert 4 <= len(calls) <= 11 and ms >= 1.0


def test_search_picks_the_fastest_verified_candidate_and_says_why_the_others_lost(monkeypatch):
    fake_cpu(monkeypatch, AVX2)
    model = tiny()
    pick, runners = cpu_paths.search(model, (1, 4), cands=fake_candidates(Clock(monkeypatch)))
    assert pick.picks == {1: "fast", 4: "fast"}
    status = {t.name: (t.status, t.reason) for t in pick.trials}
    assert status["broken"] == ("failed", "RuntimeError: C++ compile failed")
    assert status["noisy"][0] == "inaccurate" and "relative error" in status["noisy"][1]
    assert status["absent"] == ("skipped", "this CPU lacks it") and status["fp32"][0] == "ok"
    assert pick.trial("fp32").ms[4] > pick.trial("fast").ms[4] and pick.ranking(4) == ["fast", "fp32"]
    text = pick.describe()
    assert "batch 4: fast" in text and "Fake AVX2 CPU" in text and "fast's time at batch 4" in text
    assert "failed: RuntimeError: C++ compile failed" in text and "skipped: this CPU lacks it" in text
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(runners[4](x), model(x))
    assert json.loads(json.dumps(pick.to_json())) == pick.to_json()
    assert cpu_paths.CpuPick.from_json(pick.to_json(), "x").picks == pick.picks


def test_a_run_off_undoes_a_slow_spell(monkeypatch):
    """A candidate first timed during a slow spell of the machine (1.4 against fast's 1.0) but faster in fact (0.8)
    wins the interleaved run-off; one more than RUNOFF times slower than the fastest is not timed again."""
    fake_cpu(monkeypatch, AVX2)
    clock = Clock(monkeypatch)
    timed = {"spell": 0, "slow": 0}

    def counted(name: str, cost: Callable[[int], float]) -> Callable:
        def build(model, calibration):
            def run(x):
                timed[name] += clock.timing
                clock.cost = cost(timed[name])
                return model(x)

            return Runner(run, torch.float32)

        return build

    cands = fake_candidates(clock)[:2] + [
        Candidate("spell", "timed in a slow spell", counted("spell", lambda n: 1.4 if n <= 2 else 0.8)),
        Candidate("slow", "2x slower than fast", counted("slow", lambda n: 2.0))]
    pick, runners = cpu_paths.search(tiny(), (1, 4), cands=cands)
    assert pick.picks == {1: "spell", 4: "spell"} and pick.trial("spell").ms == {1: 0.8, 4: 0.8}
    assert timed == {"spell": 2 + 2 * cpu_paths._RUNOFF_ROUNDS, "slow": 2} and pick.trial("slow").ms[4] == 2.0
    assert pick.ranking(4) == ["spell", "fast", "slow", "fp32"] and "interleaved rounds" in pick.how
    assert runners[1] is runners[4]  # the one built runner of the pick serves both batch sizes


def test_no_path_but_fp32_meets_the_budget(monkeypatch):
    fake_cpu(monkeypatch, AVX2)
    pick, _ = cpu_paths.search(tiny(), (2,), cands=fake_candidates(Clock(monkeypatch), fast_noise=0.5),
                               accuracy=AccuracyBudget(rel_error=0.01))
    assert pick.picks == {2: "fp32"} and pick.trial("fast").status == "inaccurate"
    assert any("no candidate but fp32 met the accuracy budget" in n for n in pick.notes)


def test_the_search_is_bounded(monkeypatch):
    fake_cpu(monkeypatch, AVX2)
    pick, _ = cpu_paths.search(tiny(), (1, 2), cands=fake_candidates(Clock(monkeypatch)), budget_s=0.0)
    assert pick.picks == {1: "fp32", 2: "fp32"}
    assert pick.trial("fast").status == "not measured" and "search budget (0 s)" in pick.trial("fast").reason
    with pytest.raises(ValueError, match="start with fp32"):
        cpu_paths.search(tiny(), (1,), cands=fake_candidates(Clock(monkeypatch))[1:])


def test_real_eager_candidates_on_a_faked_amx_cpu(monkeypatch):
    """bf16 is tried where the probe says the CPU has it (here emulated, so only its numerics mean anything) and
    int8 runs through quantize(); both are checked against fp32 before they are timed."""
    fake_cpu(monkeypatch, AMX)
    cands = [c for c in cpu_paths.candidates() if c.name in ("fp32", "bf16", "int8")]
    pick, _ = cpu_paths.search(tiny(), (2,), cands=cands)
    for name in ("bf16", "int8"):
        t = pick.trial(name)
        assert t.status == "ok" and 0 < t.rel_error < 0.1 and t.ms[2] > 0, (name, t)
    assert pick.cpu["name"] == "Fake Xeon with AMX" and "AMX-BF16" in pick.cpu["features"]


# ---- the cache -------------------------------------------------------------------------------------------------


def test_the_pick_is_cached_and_the_next_call_measures_nothing(monkeypatch, cache):
    fake_cpu(monkeypatch, AVX2)
    built: list[str] = []
    clock = Clock(monkeypatch)
    monkeypatch.setattr(cpu_paths, "candidates", lambda: fake_candidates(clock, built=built))
    model = tiny()
    pick, _ = cpu_paths.choose(model, (1, 4), verbose=False)
    files = list(cache.glob("fake-avx2-cpu-*.json"))
    assert len(files) == 1 and pick.source == "measured now"
    entry = json.loads(files[0].read_text())
    assert entry["key"]["config"] == model.config.to_dict() and entry["key"]["batch_sizes"] == [1, 4]
    assert entry["key"]["cpu"] == "Fake AVX2 CPU" and entry["key"]["flags"] == ["avx2", "fma"]
    assert entry["key"]["torch"] == torch.__version__ and entry["key"]["threads"] == torch.get_num_threads()

    def no_search(*a, **k):
        raise AssertionError("the cached pick was measured again")

    monkeypatch.setattr(cpu_paths, "search", no_search)
    built.clear()
    again, runners = cpu_paths.choose(tiny(), (4, 1), verbose=False)  # another model of the same config
    assert again.picks == pick.picks and again.source.startswith("cached") and built == ["fast"]
    x = torch.randn(4, 3, 16, 16)
    assert runners[4](x).shape == (4, 5)
    with pytest.raises(AssertionError, match="measured again"):  # other batch sizes: another key
        cpu_paths.choose(tiny(), (2,), verbose=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        with pytest.raises(AssertionError, match="measured again"):  # another thread count: another key
            cpu_paths.choose(tiny(), (1, 4), verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert "fast" in cpu_paths.explain_picks()


def test_a_cached_pick_that_fails_on_this_model_falls_back(monkeypatch, cache):
    fake_cpu(monkeypatch, AVX2)
    clock = Clock(monkeypatch)
    monkeypatch.setattr(cpu_paths, "candidates", lambda: fake_candidates(clock))
    cpu_paths.choose(tiny(), (2,), verbose=False)
    monkeypatch.setattr(cpu_paths, "candidates", lambda: fake_candidates(clock, fast_noise=0.5))  # "fast" is wrong
    pick, runners = cpu_paths.choose(tiny(), (2,), verbose=False)
    assert pick.picks == {2: "fp32"} and any("cached pick fast failed on this model" in n for n in pick.notes)


def test_calibration_must_be_image_batches():
    with pytest.raises(ValueError, match=r"calibration must be batches of images \(B, 3, 16, 16\); batch 1"):
        cpu_paths.choose(tiny(), (1,), calibration=[torch.randn(2, 3, 16, 16), torch.randn(3, 16, 16)], cache=False)


# ---- the compiled and PT2E candidates --------------------------------------------------------------------------


def test_compiled_bf16_candidate_traces_no_convolution():
    """What torch.compile hands inductor for a bf16 vit_fast model on CPU: the patch embedding is a GEMM, never
    the oneDNN bf16 convolution that is wrong on AMX for some patch grids (torch 2.14)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    net = torch.compile(tiny().to(torch.bfloat16), backend=record, fullgraph=True, dynamic=False)
    with torch.no_grad():
        net(torch.randn(2, 3, 16, 16, dtype=torch.bfloat16))
    code = "\n".join(g.code for g in graphs)
    assert "linear" in code and "conv" not in code


@pytest.mark.skipif(pt2e.unavailable() is not None, reason=pt2e.unavailable() or "")
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_pt2e_artifact_agrees_with_fp32(static):
    model = tiny()
    calibration = [torch.randn(4, 3, 16, 16) for _ in range(2)] if static else None
    q = pt2e.quantize_pt2e(model, calibration, compile=False)
    code = q.code
    assert "quantize_per_tensor" in code and ("choose_qparams" in code) == (not static)
    x = torch.randn(6, 3, 16, 16)  # another batch size than exported with: the batch dimension is dynamic
    with torch.no_grad():
        rel, _, why = cpu_paths.agreement(q(x), model(x), AccuracyBudget())
    assert why is None and rel > 0


@pytest.mark.slow
@pytest.mark.skipif(pt2e.unavailable() is not None, reason=pt2e.unavailable() or "")
def test_full_search_with_compiled_and_pt2e_candidates(monkeypatch, cache):
    fake_cpu(monkeypatch, AMX)  # the bf16 candidates run emulated here: their numerics are checked, not their speed
    model = tiny()
    pick, runners = cpu_paths.search(model, (1, 4))
    for t in pick.trials:
        assert t.status == "ok" and set(t.ms) == {1, 4}, (t.name, t.reason)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert cpu_paths.agreement(runners[4](x), model(x), AccuracyBudget())[2] is None


# ---- training: --precision auto ---------------------------------------------------------------------------------


def test_training_precision_without_native_bf16_measures_nothing(monkeypatch, capsys):
    fake_cpu(monkeypatch, AVX2)
    monkeypatch.setattr(cpu_features, "measure_training_precision", lambda *a, **k: pytest.fail("measured"))
    assert cpu_features.training_precision(tiny(), 4, 3, 16) == "fp32"
    assert "Fake AVX2 CPU has no native bf16" in capsys.readouterr().out


@pytest.mark.parametrize("bf16_faster", [True, False])
def test_training_precision_follows_the_measurement_and_caches_it(monkeypatch, cache, bf16_faster):
    fake_cpu(monkeypatch, AMX)
    calls = []

    def measured(model, shape, steps=5):
        calls.append(shape)
        return {"fp32_ms": 10.0, "bf16_ms": 5.0 if bf16_faster else 9.9, "why": "faked",
                "precision": "bf16" if bf16_faster else "fp32"}

    monkeypatch.setattr(cpu_features, "measure_training_precision", measured)
    want = "bf16" if bf16_faster else "fp32"
    assert cpu_features.training_precision(tiny(), 4, 3, 16, verbose=False) == want
    assert cpu_features.training_precision(tiny(), 4, 3, 16, verbose=False) == want
    assert calls == [(4, 3, 16, 16)]  # the second call read the cache
    cpu_features.training_precision(tiny(), 8, 3, (16, 16), verbose=False)
    assert len(calls) == 2 and len(list(cache.glob("train-*.json"))) == 2


def test_training_probe_measures_and_leaves_the_random_stream_alone():
    model = tiny().train()
    before = torch.get_rng_state()
    out = cpu_features.measure_training_precision(model, (2, 3, 16, 16), steps=1)
    assert torch.equal(torch.get_rng_state(), before) and model.training
    assert out["precision"] in ("bf16", "fp32") and out["fp32_ms"] > 0 and out["bf16_ms"] > 0
    assert out["precision"] == ("bf16" if out["bf16_ms"] < 0.95 * out["fp32_ms"] else "fp32")
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("features", [AMX, AVX2], ids=["amx", "avx2"])
def test_train_precision_auto_on_cpu_takes_the_measured_choice(monkeypatch, cache, tmp_path, features):
    from vit_fast.train import build_parser, train

    fake_cpu(monkeypatch, features)
    monkeypatch.setattr(cpu_features, "measure_training_precision", lambda *a, **k: {
        "fp32_ms": 2.0, "bf16_ms": 1.0, "precision": "bf16", "why": "faked: bf16 2x"})
    threads = torch.get_num_threads()
    try:
        summary = train(build_parser().parse_args([
            "--out", str(tmp_path / "run"), "--no-progress", "--epochs", "1", "--workers", "0", "--batch-size", "256",
            "--override", "depth=1", "--override", "embed_dim=16", "--override", "num_heads=2"]))
    finally:
        torch.set_num_threads(threads)
    assert summary["precision"] == ("bf16" if features.native_bf16 else "fp32")


@pytest.mark.slow
def test_digits_model_keeps_its_top1_on_the_measured_path(monkeypatch, cache, tmp_path):
    """Acceptance: a digits model trained on CPU here, served by optimize_for_inference with default arguments on a
    faked AMX CPU (every candidate tried; bf16 emulated here, so only numerics are meant), agrees with fp32 on the
    top-1 of at least 99 % of the 360 test images."""
    from torch.utils.data import DataLoader

    from vit_fast.train import build_parser, train
    from vit_fast.train.data import Augmentation, load_datasets

    fake_cpu(monkeypatch, AMX)
    threads = torch.get_num_threads()
    try:
        train(build_parser().parse_args(["--out", str(tmp_path / "run"), "--no-progress", "--epochs", "20",
                                         "--precision", "fp32"]))
    finally:
        torch.set_num_threads(threads)
    model = vit_fast.create_model("vit_nano_patch2_8", num_classes=10, in_chans=1,
                                  checkpoint_path=str(tmp_path / "run" / "model.safetensors")).eval()
    _, test, _ = load_datasets("digits", None, 8, Augmentation(crop="none"))
    images = torch.cat([x for x, _ in DataLoader(test, batch_size=360)])
    predictor = vit_fast.optimize_for_inference(model, search_budget_s=300)
    with torch.no_grad():
        agree = (predictor(images).argmax(1) == model(images).argmax(1)).float().mean().item()
    assert agree >= 0.99, (agree, predictor.explain())
