"""Dispatch policies: the file format, where a policy is found, lookups by GPU kind and shape bucket, a stale or
corrupt policy (a clear warning, then the reference), what pick() and explain() make of a policy, and the
choice under torch.compile. No GPU here: picks "on cuda:0" are asked for CPU tensors with ``device=`` (the
limits see the device only), and the GPU kind is faked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vit_fast
from vit_fast import backends, ops, policy
from vit_fast.backends import BackendUnavailableError

REPO = Path(__file__).resolve().parents[1]
H200 = {"type": "cuda", "name": "NVIDIA H200", "capability": "9.0"}
CUDA0 = torch.device("cuda", 0)
ATTN_BUCKET = [64, 256, 32]  # (D, N -> 256, B * H = 2 * 12 -> 32)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No policy from the machine: the user folder and the shipped folder are empty temporary ones, the GPU is
    an H200, and nothing looked up before a test leaks into it or out of it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(policy.ENV, raising=False)
    monkeypatch.setattr(policy, "SHIPPED_DIR", str(tmp_path / "shipped"))
    real_kind = policy.device_kind
    monkeypatch.setattr(policy, "device_kind", lambda d: dict(H200) if torch.device(d).type == "cuda" else real_kind(d))
    policy.reset()
    yield
    policy.reset()


def _entry(op="attention", dtype="bfloat16", mode="fwd", bucket=ATTN_BUCKET, order=("triton", "reference"),
           speedups=None) -> dict:
    speedups = speedups or {"reference": 1.0, "triton": 1.31, "cuda": 0.8}
    measured = {b: {"median_ms": 1.0 / s, "p20_ms": 0.99 / s, "p80_ms": 1.01 / s, "agreement": 0.3, "speedup": s}
                for b, s in speedups.items()}
    return {"op": op, "dtype": dtype, "mode": mode, "bucket": list(bucket), "shape": {}, "source": "test",
            "order": list(order), "measured": measured, "why": "test"}


def _doc(*entries: dict, kind: dict = H200, **versions: str) -> dict:
    doc = policy.new_document(kind, created="2026-01-01T00:00:00+00:00")
    doc["versions"].update(versions)
    doc["entries"] = list(entries) or [_entry()]
    return doc


def _write(path: Path, doc: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _user_file() -> Path:
    return Path(policy.user_dir()) / policy.file_name(H200)


def _qkv(dtype=torch.bfloat16, requires_grad=False, n=197):
    q = torch.randn(2, 12, n, 64, dtype=dtype, requires_grad=requires_grad)
    return (q, q, q), {"scale": None, "dropout_p": 0.0}


def _pick(args=None, kwargs=None, **kw) -> backends.Pick:
    if args is None:
        args, kwargs = _qkv()
    return backends.pick("attention", args, kwargs, device=CUDA0, **kw)


# ---- format, names and places ----------------------------------------------------------------------------------


def test_a_written_policy_reads_back_and_bad_documents_are_named():
    path = Path(policy.user_dir()) / "x.json"
    policy.write(str(path), _doc())
    assert policy.read(str(path)) == _doc() and policy.format_problems(_doc()) == []
    assert "schema" in policy.format_problems({**_doc(), "schema": "other/9"})[0]
    assert policy.format_problems([]) == ["not a JSON object (got list)"]
    for bad in ({"bucket": ["64"]}, {"order": ["triton"]}, {"mode": "backward"}, {"bucket": []}):
        assert "entry 0 is malformed" in policy.format_problems(_doc({**_entry(), **bad}))[0], bad
    with pytest.raises(ValueError, match="not a valid policy"):
        policy.write(str(path), {**_doc(), "entries": None})


def test_file_names_and_places(monkeypatch, tmp_path):
    assert policy.file_name(H200) == "nvidia-h200-sm90.json"
    xeon = {"type": "cpu", "name": "Intel(R) Xeon(R) Gold 6338"}
    assert policy.file_name(xeon) == "cpu-intel-r-xeon-r-gold-6338.json"
    assert policy.user_dir() == str(tmp_path / "cache" / "vit_fast" / "policies")
    assert [o for _, o in policy.candidates(H200)] == ["user cache", "shipped with vit_fast"]
    assert policy.default_path(H200) == str(_user_file())
    monkeypatch.setenv(policy.ENV, str(tmp_path / "mine.json"))  # a file: the only place looked at
    assert policy.candidates(H200) == [(str(tmp_path / "mine.json"), "$VIT_FAST_POLICY")]
    assert policy.default_path(H200) == str(tmp_path / "mine.json")
    monkeypatch.setenv(policy.ENV, str(tmp_path))  # a folder: the file named for the GPU in it
    assert policy.default_path(H200) == str(tmp_path / "nvidia-h200-sm90.json")


def test_size_buckets_and_each_ops_bucket():
    assert [backends.size_bucket(n) for n in (0, 1, 2, 3, 197, 256, 257)] == [1, 1, 2, 4, 256, 256, 512]
    (q, _, _), kw = _qkv()
    assert backends.bucket("attention", (q, q, q), kw) == tuple(ATTN_BUCKET)
    x = torch.empty(8, 197, 768)
    assert backends.bucket("layer_norm", (x, x[0, 0], x[0, 0]), {}) == (768, 2048)
    w1, w2 = torch.empty(3072, 768), torch.empty(768, 3072)
    assert backends.bucket("layernorm_mlp", (x, x[0, 0], x[0, 0], w1, w1[:, 0], w2, w2[:, 0]), {}) == (768, 3072, 2048)
    images, w = torch.empty(8, 3, 224, 224), torch.empty(768, 3, 14, 14)
    assert backends.bucket("patch_embed", (images, w, None), {}) == (3, 14, 14, 768, 2048)  # 8 * 256 patches


# ---- lookups ---------------------------------------------------------------------------------------------------


def test_auto_follows_the_policy_for_its_gpu_kind_and_bucket():
    _write(_user_file(), _doc(_entry(), _entry(mode="fwd+bwd", order=("reference",),
                                               speedups={"reference": 1.0, "triton": 0.9})))
    p = _pick()
    assert p.backend == "triton" and p.speedups == {"reference": 1.0, "triton": 1.31, "cuda": 0.8}
    assert p.why.startswith("auto on cuda: policy nvidia-h200-sm90.json: triton measured 1.31x the reference")
    grad = _pick(*_qkv(requires_grad=True))  # training looks up the fwd+bwd entry, where triton lost
    assert grad.backend == "reference" and "the reference measured fastest" in grad.why and "triton 0.90x" in grad.why
    with torch.no_grad():  # no gradient wanted: the forward entry again
        assert _pick(*_qkv(requires_grad=True)).backend == "triton"
    other = _pick(*_qkv(n=600))  # N 600 -> bucket 1024: not measured
    assert other.backend == "reference" and "has no measurement for attention bfloat16 fwd" in other.why
    assert _pick(*_qkv(torch.float16)).backend == "reference"  # another dtype: not measured either


def test_the_policy_chooses_only_among_backends_that_can_run_the_inputs():
    q = torch.randn(2, 12, 197, 96, dtype=torch.bfloat16)  # head dim 96: the CUDA kernels are built for 64/80/128
    args, kwargs = (q, q, q), {"scale": None, "dropout_p": 0.0}
    _write(_user_file(), _doc(_entry(bucket=backends.bucket("attention", args, kwargs),
                                     order=("cuda", "triton", "reference"))))
    p = _pick(args, kwargs)  # cuda cannot run these inputs (built or not): the next one measured faster
    assert p.backend == "triton" and "cuda passed over for these inputs (see why not): triton" in p.why
    p = _pick(args, {**kwargs, "dropout_p": 0.1})  # neither kernel takes dropout
    assert p.backend == "reference" and "cuda, triton passed over for these inputs (see why not): reference" in p.why


def test_a_bucket_between_two_measured_sizes_takes_their_common_choice():
    small, large = _entry(bucket=[64, 256, 8]), _entry(bucket=[64, 256, 128])
    _write(_user_file(), _doc(small, large))
    p = _pick()  # B * H 24 -> 32, between 8 and 128, which both ranked triton first
    assert p.backend == "triton" and "between measured sizes 8 and 128" in p.why
    policy.reset()
    _write(_user_file(), _doc(small, {**large, "order": ["reference"]}))
    assert _pick().backend == "reference"
    policy.reset()
    _write(_user_file(), _doc(small))  # beyond the largest size measured: not extrapolated
    assert _pick().backend == "reference"


def test_without_a_policy_auto_runs_the_reference_on_cuda_and_says_how_to_tune():
    p = _pick()
    assert p.backend == "reference" and p.speedups == {}
    assert "no policy for NVIDIA H200 (sm 9.0): auto runs the reference (PyTorch) on CUDA" in p.why
    assert "vit-fast tune" in p.why and "vit-fast tune" in policy.describe(CUDA0)


def test_the_user_policy_comes_before_the_shipped_one_and_vit_fast_policy_before_both(monkeypatch, tmp_path):
    shipped = _write(Path(policy.SHIPPED_DIR) / policy.file_name(H200), _doc(_entry(order=("reference",))))
    assert _pick().backend == "reference" and str(shipped) in policy.describe(CUDA0)
    policy.reset()
    _write(_user_file(), _doc())
    assert _pick().backend == "triton" and "user cache" in policy.describe(CUDA0)
    policy.reset()
    mine = _write(tmp_path / "elsewhere" / "mine.json", _doc(_entry(order=("reference",))))
    monkeypatch.setenv(policy.ENV, str(mine))
    assert _pick().backend == "reference" and "$VIT_FAST_POLICY" in policy.describe(CUDA0)


def test_the_policy_file_is_read_once_per_device(monkeypatch):
    _write(_user_file(), _doc())
    reads = []
    real = policy.read
    monkeypatch.setattr(policy, "read", lambda path: reads.append(path) or real(path))
    for n in (197, 600, 197):
        _pick(*_qkv(n=n))
    assert _pick().backend == "triton" and len(reads) == 1


@pytest.mark.parametrize("problem, expect", [
    ("{not json", "unreadable (JSONDecodeError"),
    ("other-schema", "schema is 'vit_fast.policy/0'"),
    ("other-gpu", "measured on NVIDIA A100-SXM4-80GB (sm 8.0), this is NVIDIA H200 (sm 9.0)"),
    ("old-torch", "measured with torch 2.4.0, this is torch"),
    ("old-vit_fast", "measured with vit_fast 0.0.1, this is vit_fast"),
])
def test_a_stale_or_corrupt_policy_warns_clearly_then_auto_runs_the_reference(problem, expect):
    doc = {"{not json": "{not json", "other-schema": {**_doc(), "schema": "vit_fast.policy/0"},
           "other-gpu": _doc(kind={"type": "cuda", "name": "NVIDIA A100-SXM4-80GB", "capability": "8.0"}),
           "old-torch": _doc(torch="2.4.0"), "old-vit_fast": _doc(vit_fast="0.0.1")}[problem]
    path = _write(_user_file(), doc)
    with pytest.warns(policy.PolicyWarning) as caught:
        p = _pick()
    (w,) = caught
    assert f"dispatch policy {path} (user cache) is not used" in str(w.message) and expect in str(w.message)
    assert "vit-fast tune" in str(w.message)
    assert p.backend == "reference" and "passed over" in p.why and expect in p.why


def test_a_patch_release_of_torch_keeps_the_policy():
    major_minor = ".".join(torch.__version__.split(".")[:2])
    _write(_user_file(), _doc(torch=f"{major_minor}.99"))
    assert _pick().backend == "triton"


def test_a_stale_user_policy_gives_way_to_a_fresh_shipped_one():
    _write(_user_file(), _doc(torch="1.0.0"))
    _write(Path(policy.SHIPPED_DIR) / policy.file_name(H200), _doc())
    with pytest.warns(policy.PolicyWarning, match="measured with torch 1.0.0"):
        assert _pick().backend == "triton"
    assert "shipped with vit_fast" in policy.describe(CUDA0)


# ---- explicit backends, CPU, explain, compile --------------------------------------------------------------------


def test_an_explicit_backend_runs_exactly_that_backend_whatever_the_policy_says():
    _write(_user_file(), _doc())
    with vit_fast.set_backend("reference"):
        p = _pick()
    assert p.backend == "reference" and p.why == "set_backend('reference')"
    if backends.unavailable("cuda"):
        with vit_fast.set_backend("cuda"), pytest.raises(BackendUnavailableError, match="vit_fast._C not built"):
            _pick()


def test_on_cpu_auto_runs_the_reference_even_where_a_policy_ranks_a_kernel(monkeypatch):
    cpu = policy.device_kind("cpu")
    _write(Path(policy.user_dir()) / policy.file_name(cpu), _doc(_entry(dtype="float32"), kind=cpu))
    args, kwargs = _qkv(torch.float32)
    assert backends.pick("attention", args, kwargs, full=False).why == "auto on cpu: the reference"
    reads = []
    real = policy.read
    monkeypatch.setattr(policy, "read", lambda path: reads.append(path) or real(path))
    ops.attention(*args, **kwargs)
    assert reads == []  # the per-call path on CPU never looks for a policy
    p = backends.pick("attention", args, kwargs)  # explain's path reads it, and still picks the reference
    assert p.backend == "reference" and "triton measured 1.31x" in p.why and p.speedups["triton"] == 1.31


@pytest.fixture
def fake_h200(monkeypatch):
    """vit_fast.explain("cuda") itself on the faked H200: CUDA visible, capability 9.0, and its example inputs fake
    tensors on cuda (nothing is allocated, no GPU is asked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backends, "capability", lambda index: (9, 0))
    with FakeTensorMode():
        yield


def test_explain_names_the_policy_in_force_and_the_measured_speedups(fake_h200):
    _write(_user_file(), _doc())  # attention's example inputs fall in the measured bucket
    ex = vit_fast.explain("cuda")
    text = str(ex)
    assert str(_user_file()) in text and "measured 2026-01-01 on NVIDIA H200 (sm 9.0)" in text
    triton_line = next(ln for ln in text.splitlines()[2:] if ln.startswith("attention ") and " triton " in ln)
    assert "1.31x" in triton_line and "<- picked" in triton_line
    assert "triton measured 1.31x the reference" in triton_line
    assert [r["speedup"] for r in ex.rows if r["op"] == "attention"] == [1.0, 1.31, 0.8]


def test_explain_on_a_gpu_without_a_policy_says_the_reference_runs_and_how_to_tune(fake_h200):
    ex = vit_fast.explain("cuda")
    assert "no policy for NVIDIA H200 (sm 9.0): auto runs the reference (PyTorch) on CUDA" in ex.title
    assert "run `vit-fast tune`" in ex.title
    assert set(ex.picked.values()) == {"reference"} and all(r["speedup"] is None for r in ex.rows)


def test_explain_on_a_gpu_names_its_policy_and_the_speedup_behind_each_pick(fake_h200):
    _write(_user_file(), _doc())  # attention's example inputs fall in the measured bucket
    ex = vit_fast.explain("cuda")
    assert f"policy {_user_file()} (user cache; measured 2026-01-01 on NVIDIA H200 (sm 9.0)" in ex.title
    attention = {r["backend"]: r for r in ex.rows if r["op"] == "attention"}
    assert attention["triton"]["picked"] and attention["triton"]["speedup"] == 1.31
    assert "policy nvidia-h200-sm90.json: triton measured 1.31x the reference" in attention["triton"]["note"]
    assert [attention[b]["speedup"] for b in ("reference", "cuda")] == [1.0, 0.8]
    assert ex.picked["layer_norm"] == "reference"  # not measured: the reference, and the row says why
    ln = next(r for r in ex.rows if r["op"] == "layer_norm" and r["picked"])
    assert "has no measurement for layer_norm" in ln["note"]


def test_explain_on_cpu_names_the_cpu_policy():
    cpu = policy.device_kind("cpu")
    doc = _doc(_entry(dtype="float32", bucket=[16, 8, 2], order=("reference",), speedups={"reference": 1.0}),
               kind=cpu)
    path = _write(Path(policy.user_dir()) / policy.file_name(cpu), doc)
    m = vit_fast.create_model("vit_nano_patch2_8", depth=1)
    ex = vit_fast.explain(m, torch.randn(1, *m.patch_embed.proj.weight.shape[1:2], 8, 8))
    assert f"policy {path}" in ex.title
    assert set(ex.picked.values()) == {"reference"}


def test_the_pick_under_torch_compile_reads_the_policy_without_a_graph_break():
    """policy.choose() is opaque to Dynamo: the first pick, inside the trace, reads the file and the graph holds
    the constant choice (fullgraph=True fails on any graph break); whether a gradient is wanted is a guard."""
    _write(_user_file(), _doc())

    def f(q: torch.Tensor) -> torch.Tensor:
        p = backends.pick("attention", (q, q, q), {"scale": None, "dropout_p": 0.0}, device=CUDA0, full=False)
        return q * 2 if p.backend == "triton" else q

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    (q, _, _), _ = _qkv()
    assert torch.equal(compiled(q), q * 2) and policy.looked_up() == ("cuda:0",)
    (q, _, _), _ = _qkv(requires_grad=True)  # the fwd+bwd entry is not measured: the reference
    assert torch.equal(compiled(q), q)


@pytest.mark.subprocess
def test_importing_vit_fast_reads_no_policy(tmp_path):
    """Nothing is looked up at import: a broken policy warns only at the first pick."""
    bad = _write(tmp_path / "bad.json", "{not json")
    code = ("import warnings; warnings.simplefilter('error', UserWarning)\n"
            "import vit_fast; from vit_fast import policy; assert not policy.looked_up(); print('imported')\n"
            "vit_fast.explain('cpu')\n")
    env = {**os.environ, policy.ENV: str(bad)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.stdout.strip() == "imported", r.stdout + r.stderr
    assert r.returncode != 0 and "PolicyWarning" in r.stderr and "is not used" in r.stderr, r.stderr


@pytest.mark.subprocess
def test_the_wheel_ships_the_policies(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for folder in ("vit_fast", "kernels"):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    _write(src / "vit_fast" / "policies" / "nvidia-h200-sm90.json", _doc())
    env = {**os.environ, "VIT_FAST_BUILD_CUDA": "0"}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "wheels"), str(src)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "wheels").glob("vit_fast-*.whl")
    assert "vit_fast/policies/nvidia-h200-sm90.json" in zipfile.ZipFile(wheel).namelist()


# ---- the torch.compile verdict -------------------------------------------------------------------------------------


def test_under_torch_compile_choose_follows_the_compiled_verdict():
    """An entry where triton beats eager PyTorch but not inductor's code: eager picks triton, compiled the
    reference; an entry written before the compiled verdict existed gives its eager order, and says so."""
    e = _entry()
    e["compiled_order"] = ["reference"]
    e["measured"]["triton"]["compiled_speedup"] = 0.9
    old = _entry(bucket=[64, 256, 128])  # no compiled_order: a policy from before
    _write(_user_file(), _doc(e, old))
    eager = policy.choose("cuda", 0, "attention", "bfloat16", "fwd", tuple(ATTN_BUCKET))
    compiled = policy.choose("cuda", 0, "attention", "bfloat16", "fwd", tuple(ATTN_BUCKET), compiled=True)
    assert eager[0] == ("triton", "reference") and compiled[0] == ("reference",)
    assert "under torch.compile" in compiled[2] and "triton 0.90x" in compiled[2]
    before = policy.choose("cuda", 0, "attention", "bfloat16", "fwd", (64, 256, 128), compiled=True)
    assert before[0] == ("triton", "reference") and "no torch.compile verdict" in before[2]


def test_the_dispatcher_follows_the_compiled_verdict_inside_a_trace(fake_h200, monkeypatch):
    """auto on the same inputs: triton in eager code (it beat eager PyTorch), the reference while torch.compile
    traces (inductor's code beat it): the dispatcher asks torch.compiler.is_compiling()."""
    e = _entry()
    e["compiled_order"] = ["reference"]
    _write(_user_file(), _doc(e))
    (q, _, _), _ = _qkv()
    args = ((q, q, q), {"scale": None, "dropout_p": 0.0})
    assert backends.pick("attention", *args, device=CUDA0, full=False).backend == "triton"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    chosen = backends.pick("attention", *args, device=CUDA0, full=False)
    assert chosen.backend == "reference" and "under torch.compile" in chosen.why


def test_a_compiled_order_without_the_reference_is_malformed():
    assert "entry 0 is malformed" in policy.format_problems(_doc({**_entry(), "compiled_order": ["triton"]}))[0]
    assert policy.format_problems(_doc({**_entry(), "compiled_order": ["triton", "reference"]})) == []
