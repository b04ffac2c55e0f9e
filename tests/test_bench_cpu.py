"""The CPU rows of `vit-fast bench` (issue 21): vit_fast's measured pick, bf16 and compiled PyTorch baselines, PT2E,
ONNX Runtime and OpenVINO; each checked before it is timed (a wrong one fails), the CPU's features in the results,
the bf16 peak only where the CPU has native bf16, and the CPU targets reported from the rows."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

import vit_fast
from vit_fast import bench, cpu_features, envinfo
from vit_fast.bench import cpu_rows, cpu_targets, peaks, report
from vit_fast.bench.models import bench_model, model_providers
from vit_fast.cpu_features import CpuFeatures

AMX = CpuFeatures("Fake Xeon with AMX", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                                                   "amx_int8"}), source="test")
AVX2 = CpuFeatures("Fake AVX2 CPU", frozenset({"avx2", "fma"}), source="test")
CPU = torch.device("cpu")
PEAKS = {"matmul_tflops": {"float32": 1.0, "int8": 1.0, "bfloat16": 1.0}, "bandwidth_gbps": 1.0}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def _rows(names, *, quick: bool, tweak=None) -> dict[str, dict]:
    provs = [p for p in model_providers(CPU, torch.float32, quick=quick) if p.name in names]
    if tweak:
        provs = [tweak(p) for p in provs]
    rows = bench_model("vit_nano_patch2_8", 4, torch.float32, CPU, provs, ("inference",),
                       bench.Timer(CPU, quick=True), PEAKS)
    return {r["provider"]: r for r in rows}


def test_cpu_rows_on_a_faked_amx_cpu_are_checked_then_timed(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_features", lambda: AMX)
    rows = _rows({"vit_fast:optimized", "timm:eager:bf16", "compiled:timm:freezing:bf16", "onnxruntime:fp32"},
                 quick=True)
    opt, bf16 = rows["vit_fast:optimized"], rows["timm:eager:bf16"]
    assert opt["status"] == "ok" and opt["pick"] in ("fp32", "bf16", "int8") and opt["images_per_s"] > 0
    assert opt["precision"] == f"picked: {opt['pick']}" and opt["search"]["trials"][0]["name"] == "fp32"
    assert {t["name"] for t in opt["search"]["trials"]} == {"fp32", "bf16", "int8"}  # --quick: eager paths only
    assert bf16["status"] == "ok" and bf16["dtype"] == "bfloat16" and 0 <= bf16["agreement"] <= 1
    assert rows["compiled:timm:freezing:bf16"]["status"] == "skipped"  # --quick on CPU: no compile
    assert "--quick" in rows["onnxruntime:fp32"]["reason"]


def test_bf16_rows_are_skipped_without_native_bf16(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_features", lambda: AVX2)
    provs = {p.name: p for p in model_providers(CPU, torch.float32, quick=False)}
    for name in ("timm:eager:bf16", "compiled:timm:freezing:bf16", "vit_fast:pt2e:int8+bf16", "openvino:bf16"):
        assert provs[name].skip == AVX2.why_no_bf16() or "not installed" in provs[name].skip, name


def test_a_wrong_bf16_baseline_fails_its_check_and_is_not_timed(monkeypatch):
    """As oneDNN's AMX bf16 convolution does for some patch grids: a baseline that is wrong in bf16 is caught."""
    monkeypatch.setattr(cpu_features, "cpu_features", lambda: AMX)

    def broken(p):
        def fn(cfg, base):
            model = p.fn(cfg, base)
            with torch.no_grad():
                model.patch_embed.proj.weight.mul_(1.5)
            return model

        return dataclasses.replace(p, fn=fn)

    row = _rows({"timm:eager:bf16"}, quick=True, tweak=broken)["timm:eager:bf16"]
    assert row["status"] == "failed" and "disagrees with the reference" in row["reason"] and "median_ms" not in row


def test_a_yardstick_that_cannot_be_built_fails_its_row_and_the_run_goes_on(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_features", lambda: AMX)

    def broken(kind, base, images):
        raise RuntimeError("Tensor dtype mismatch! Expected: Float, Got: c10::BFloat16")

    monkeypatch.setattr(cpu_rows, "yardstick", broken)
    rows = _rows({"timm:eager:bf16", "vit_fast:reference"}, quick=True)
    assert rows["timm:eager:bf16"]["status"] == "failed" and "median_ms" not in rows["timm:eager:bf16"]
    assert "its yardstick failed: RuntimeError: Tensor dtype mismatch" in rows["timm:eager:bf16"]["reason"]
    assert rows["vit_fast:reference"]["status"] == "ok"


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="PT2E needs the cpu extra (torchao)")
@pytest.mark.parametrize("kind", ["pt2e:int8", "pt2e:int8+bf16"])
def test_the_pt2e_yardsticks_run_eagerly(kind):
    """The +bf16 one under bf16 autocast: the exported graph's dtype assertions (fp32 at export) are gone."""
    base = vit_fast.create_model("vit_nano_patch2_8").eval()
    images = torch.randn(4, 1, 8, 8)
    got = cpu_rows.yardstick(kind, base, images)
    with torch.no_grad():
        fp32 = base(images)
    assert got.dtype == (torch.bfloat16 if kind.endswith("+bf16") else torch.float32)
    got = got.float()
    assert got.shape == fp32.shape and torch.isfinite(got).all()
    assert (got - fp32).abs().max() < 0.2 * fp32.abs().max()  # int8 of the same model, not noise


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "openvino")),
                    reason="ONNX Runtime / OpenVINO rows need the cpu extra (pip install 'vit_fast[cpu]')")
def test_onnx_runtime_and_openvino_rows(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_features", lambda: AVX2)
    rows = _rows({"onnxruntime:fp32", "onnxruntime:int8", "openvino:f32"}, quick=False)
    for name, r in rows.items():
        assert r["status"] == "ok" and r["images_per_s"] > 0 and r["agreement"] <= 1, (name, r.get("reason"))
    assert rows["onnxruntime:int8"]["agreement"] > rows["onnxruntime:fp32"]["agreement"]  # int8 is held to int8's


class _FakeTimer:
    quick = True

    def __init__(self) -> None:
        self.timed = 0

    def best_ms(self, fn) -> float:
        self.timed += 1
        return 1.0


@pytest.mark.parametrize("features", [AMX, AVX2], ids=["amx", "avx2"])
def test_the_bf16_peak_is_measured_where_the_cpu_has_native_bf16(monkeypatch, features):
    monkeypatch.setattr(cpu_features, "cpu_features", lambda: features)
    monkeypatch.setattr(peaks, "_conv_peak", lambda timer, dt: 0.0)
    monkeypatch.setattr(peaks, "_bandwidth_peaks", lambda *a: {"copy": 1.0})
    got = peaks.measure_peaks(CPU, _FakeTimer(), [torch.float32])
    assert ("bfloat16" in got["matmul_tflops"]) == features.native_bf16 and "int8" in got["matmul_tflops"]
    asked = peaks.measure_peaks(CPU, _FakeTimer(), [torch.bfloat16])
    if not features.native_bf16:  # asked for, but a minutes-long emulated matmul: skipped with the reason
        assert "bfloat16" not in asked["matmul_tflops"] and "no native bf16" in asked["peaks_skipped"]["bfloat16"]
    assert peaks.peak_key({"provider": "vit_fast:pt2e:int8+bf16", "dtype": "float32"}) == "int8"
    assert peaks.peak_key({"provider": "openvino:bf16", "dtype": "float32"}) == "bfloat16"  # fp32 in, bf16 inside
    assert peaks.peak_key({"provider": "vit_fast:optimized", "dtype": "float32", "peak_key": "bfloat16"}) == "bfloat16"


def test_machine_section_lists_the_cpu_features(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_features", lambda: AMX)
    cpu = envinfo.devices()[0]
    assert cpu["name"] == "Fake Xeon with AMX" and cpu["native_bf16"] and "AMX-BF16" in cpu["features"]


def _results(features: list[str], rows: list[tuple[str, float, str | None]]) -> dict:
    return {"environment": {"device": {"type": "cpu", "name": "x"},
                            "devices": [{"device": "cpu", "name": "x", "features": features}]},
            "rows": [{"kind": "model", "mode": "inference", "status": "ok", "name": "vit_small_patch16_224",
                      "shape_label": "B8", "provider": p, "provider_kind": "vit_fast" if p.startswith("vit_fast")
                      else "baseline", "images_per_s": v, "pick": pick} for p, v, pick in rows]}


def test_cpu_targets_are_read_from_the_rows():
    rows = [("vit_fast:optimized", 120.0, "compiled:bf16"), ("compiled:timm:freezing:bf16", 118.0, None),
            ("openvino:bf16", 127.6, None), ("vit_fast:pt2e:int8", 33.8, None), ("onnxruntime:int8", 63.6, None),
            ("timm:eager", 24.8, None)]
    status = {t["target"].split(" (")[0]: t for t in cpu_targets.cpu_target_status(_results(["AMX-BF16"], rows))}
    assert status["optimize_for_inference >= PyTorch bf16 compile + freezing"]["status"] == "met"
    assert status["vit_fast's best >= OpenVINO bf16"]["status"] == "missed"
    assert "= 0.94x" in status["vit_fast's best >= OpenVINO bf16"]["measured"]
    assert status["best int8 >= 2x ONNX Runtime int8"]["status"] == "missed"
    assert status["vit_fast's best >= the best PyTorch path"]["status"] == "met"
    other = cpu_targets.cpu_target_status(_results(["AVX2"], rows))
    assert all(t["status"].startswith("not applicable: set for AMX CPUs (this one: AVX2)") for t in other)
    assert cpu_targets.cpu_target_status({"environment": {"device": {"type": "cuda"}}, "rows": []}) == []
    res = _results(["AMX-BF16"], rows)
    res["environment"]["devices"][0].update(name="Fake Xeon", native_bf16=True)
    assert report.cpu_machine(res) == "Fake Xeon: AMX-BF16; native bf16"
