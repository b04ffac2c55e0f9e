"""The one dispatch point: choosing, overriding, explaining, and refusing loudly."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import launches, public, reference

import vit_fast
from vit_fast import backends, ops
from vit_fast.backends import BackendUnavailableError

REPO = Path(__file__).resolve().parents[1]


def _qkv(dtype=torch.float32):
    return [torch.randn(1, 2, 5, 16, dtype=dtype) for _ in range(3)]


def test_default_is_auto_and_set_backend_works_globally_and_as_context_manager():
    assert vit_fast.get_backend() == "auto"
    vit_fast.set_backend("reference")
    assert vit_fast.get_backend() == "reference"
    with vit_fast.set_backend("triton"):
        assert vit_fast.get_backend() == "triton"
        with vit_fast.set_backend("cuda"):
            assert vit_fast.get_backend() == "cuda"
        assert vit_fast.get_backend() == "triton"
    assert vit_fast.get_backend() == "reference"


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="auto, reference, triton, cuda"):
        vit_fast.set_backend("cudnn")


@pytest.mark.subprocess
def test_environment_variable_sets_the_backend():
    code = "import vit_fast; print(vit_fast.get_backend())"
    env = {**os.environ, "VIT_FAST_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["VIT_FAST_BACKEND"] = "bogus"
    code = "import vit_fast, torch; vit_fast.ops.layer_norm(torch.ones(2, 3), torch.ones(3), torch.zeros(3))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "VIT_FAST_BACKEND must be one of" in out.stderr


def test_cuda_chosen_explicitly_on_cpu_raises_with_every_reason():
    q, k, v = _qkv()
    with vit_fast.set_backend("cuda"), pytest.raises(BackendUnavailableError) as err:
        ops.attention(q, k, v)
    msg = str(err.value)
    assert "backend 'cuda' cannot run attention" in msg
    assert "device cpu not supported" in msg
    if backends.unavailable("cuda"):
        assert "vit_fast._C" in msg


def test_float64_with_triton_chosen_explicitly_raises_and_auto_falls_back():
    q, k, v = _qkv(torch.float64)
    with vit_fast.set_backend("triton"), pytest.raises(BackendUnavailableError, match="dtype float64 not supported"):
        ops.attention(q, k, v)
    out = ops.attention(q, k, v)  # auto: the reference
    torch.testing.assert_close(out, ops.attention_ref(q, k, v))


def test_auto_picks_the_reference_on_cpu_and_says_why_not_the_others():
    q, k, v = _qkv()
    chosen = backends.pick("attention", (q, k, v), {"scale": None, "dropout_p": 0.0})
    assert (chosen.op, chosen.backend) == ("attention", "reference")
    assert chosen.why.startswith("auto on cpu")
    assert set(chosen.reasons) == set(backends.BACKENDS) and chosen.reasons["reference"] == []
    if backends.unavailable("cuda"):
        assert backends.unavailable("cuda") in chosen.reasons["cuda"]
    with launches() as rec:
        ops.attention(q, k, v)
    assert [(r.op, r.backend, r.phase) for r in rec] == [("attention", "reference", "fwd")]


def test_pick_for_an_explicit_backend_follows_the_setting_argument():
    q, k, v = _qkv()
    assert backends.pick("attention", (q, k, v), {}, setting="reference").backend == "reference"
    with pytest.raises(BackendUnavailableError, match="device cpu not supported"):
        backends.pick("attention", (q, k, v), {}, setting="cuda")


def test_reasons_lists_every_reason_not_only_the_first():
    """float64 and a head dim outside the kernels' range: the Triton backend names both."""
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    why = backends.reasons("triton", "attention", (q, q, q), {"dropout_p": 0.1})
    if backends.unavailable("triton"):
        assert why == [backends.unavailable("triton")]
        return
    for needle in ("float64", "head dim 8", "dropout_p"):
        assert any(needle in w for w in why), (needle, why)


def test_a_triton_below_the_packaging_floor_is_a_reason(monkeypatch):
    """torch >= 2.5 may bring a triton older than the extra's floor: the backend says so instead of crashing."""
    extra = next(line for line in (REPO / "pyproject.toml").read_text().splitlines() if '"triton>=' in line)
    assert f'"triton>={".".join(map(str, backends.TRITON_FLOOR))}"' in extra  # one floor, stated twice

    def installed(version):
        def answer(name):
            assert name == "triton"
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version
        return answer

    monkeypatch.setattr(importlib.metadata, "version", installed("3.2.0"))
    why = backends.triton_too_old()
    assert why == "triton 3.2.0 is older than 3.4, vit_fast's floor for its kernels (pip install 'triton>=3.4')"
    for fine in ("3.4.0", "3.6.0+git1234", "4.0.0", None):  # None: another distribution name, not second-guessed
        monkeypatch.setattr(importlib.metadata, "version", installed(fine))
        assert backends.triton_too_old() is None, fine


def test_registry_is_public_data():
    assert backends.ops() and len(set(backends.ops())) == len(backends.ops())
    for op in backends.ops():
        assert callable(public(op)) and callable(reference(op)), op
        assert backends.implemented(op)[0] == "reference"
        assert backends.limits(op, "reference") is None
        if "triton" in backends.implemented(op):
            lim = backends.limits(op, "triton")
            assert torch.float64 not in lim.dtypes and not lim.dropout


@pytest.mark.subprocess
def test_every_op_is_declared_at_import():
    """Known at import, whatever the process does later: a fresh interpreter sees every op after import alone."""
    code = "import vit_fast; from vit_fast import backends; print(' '.join(backends.ops()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == list(backends.ops())


def test_explain_covers_every_op_and_backend():
    ex = vit_fast.explain("cpu", torch.float32)
    assert {(r["op"], r["backend"]) for r in ex.rows} == {(o, b) for o in backends.ops() for b in backends.BACKENDS}
    assert ex.picked == {op: "reference" for op in backends.ops()}
    assert all(r["available"] for r in ex.rows if r["backend"] == "reference")
    cuda_rows = [r for r in ex.rows if r["backend"] == "cuda"]
    assert all(not r["available"] and r["reasons"] for r in cuda_rows)
    text = str(ex)
    for op in backends.ops():
        assert op in text
    assert "<- picked" in text
    with vit_fast.set_backend("cuda"):
        assert set(vit_fast.explain("cpu").picked.values()) == {"(raises)"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no GPU is visible")
def test_explain_for_cuda_without_a_gpu_says_so():
    ex = vit_fast.explain("cuda")
    assert "bfloat16" in ex.title
    for r in ex.rows:
        if r["backend"] != "reference":
            assert r["reasons"][0] == "no CUDA device visible"


def test_explain_a_model_on_its_images_per_layer_and_op():
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    ex = vit_fast.explain(m, x)
    with launches() as rec, torch.no_grad():
        m(x)
    layers = {r["where"].split(": ")[0] for r in ex.rows}
    assert {"patch_embed", "blocks.0-1.attn"} <= layers, layers  # layers that picked alike share a row group
    assert set(ex.picked.values()) == {"reference"}
    assert {r["op"] for r in ex.rows} == {r.op for r in rec}  # every op the model ran
    for r in ex.rows:
        assert r["available"] == (not r["reasons"])
        if r["backend"] == "cuda":
            assert any("device cpu not supported" in w or "vit_fast._C" in w for w in r["reasons"]), r
    assert "<- picked" in str(ex) and "blocks.0-1.attn: attention" in str(ex)


def test_model_is_identical_under_auto_and_reference():
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = m(x)
        with vit_fast.set_backend("reference"):
            b = m(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
