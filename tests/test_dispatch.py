"""The one dispatch point: choosing, overriding, explaining, and refusing loudly."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import subprocess
import sys
import threading
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


def test_explain_reports_the_choice_in_force_in_its_own_thread():
    """explain() and explain(model, images) report this thread's use_backend where one is in force, while another
    thread explains under the process default at the same time."""
    m = vit_fast.create_model("vit_tiny_patch4_32", depth=1, num_classes=3, embed_dim=48).eval()
    x = torch.randn(1, 3, 32, 32)
    barrier, seen = threading.Barrier(2), {}

    def worker():
        with vit_fast.use_backend("cuda"):
            barrier.wait()  # the main thread explains while this choice is in force
            ex = vit_fast.explain("cpu")
            seen["thread"] = ex.title, set(ex.picked.values())
            barrier.wait()

    t = threading.Thread(target=worker)
    t.start()
    barrier.wait()
    ex = vit_fast.explain("cpu")
    barrier.wait()
    t.join()
    assert "backend setting 'auto'" in ex.title and set(ex.picked.values()) == {"reference"}
    assert "backend setting 'cuda'" in seen["thread"][0] and seen["thread"][1] == {"(raises)"}
    with vit_fast.set_backend("cuda"), vit_fast.use_backend("reference"):
        ex = vit_fast.explain(m, x)
    assert "backend setting 'reference'" in ex.title and set(ex.picked.values()) == {"reference"}


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
    assert {"patch_embed", "blocks.0-1.attn.core"} <= layers, layers  # layers that picked alike share a row group
    assert set(ex.picked.values()) == {"reference"}
    assert {r["op"] for r in ex.rows} == {r.op for r in rec}  # every op the model ran
    for r in ex.rows:
        assert r["available"] == (not r["reasons"])
        if r["backend"] == "cuda":
            assert any("device cpu not supported" in w or "vit_fast._C" in w for w in r["reasons"]), r
    assert "<- picked" in str(ex) and "blocks.0-1.attn.core: attention_packed" in str(ex)


def test_model_is_identical_under_auto_and_reference():
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = m(x)
        with vit_fast.set_backend("reference"):
            b = m(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---- the backend setting in threads, tasks and compiled code; the cached pick ------------------------------------


def test_use_backend_is_local_to_the_thread_and_wins_over_the_process_default():
    seen = {}

    def worker(name):
        with vit_fast.use_backend(name):
            barrier.wait()  # every thread holds its own choice at the same time
            seen[name] = vit_fast.get_backend()

    barrier = threading.Barrier(3)
    with vit_fast.set_backend("cuda"):
        threads = [threading.Thread(target=worker, args=(n,)) for n in ("reference", "triton")]
        for t in threads:
            t.start()
        barrier.wait()
        assert vit_fast.get_backend() == "cuda"  # the process default, untouched by the threads' choices
        for t in threads:
            t.join()
        with vit_fast.use_backend("reference"):
            assert vit_fast.get_backend() == "reference"
            with vit_fast.set_backend("triton"):  # a new default does not override a local choice
                assert vit_fast.get_backend() == "reference"
    assert seen == {"reference": "reference", "triton": "triton"}
    with pytest.raises(ValueError, match="auto, reference, triton, cuda"), vit_fast.use_backend("cudnn"):
        pass


def test_use_backend_is_local_to_the_asyncio_task():
    async def task(name):
        with vit_fast.use_backend(name):
            await asyncio.sleep(0)  # the other task runs here, under its own choice
            return vit_fast.get_backend()

    async def both():
        return await asyncio.gather(task("reference"), task("triton"))

    assert asyncio.run(both()) == ["reference", "triton"]
    assert vit_fast.get_backend() == "auto"


def test_threads_with_their_own_backend_and_model_get_their_single_threaded_results():
    """8 threads, each its own model and choice, 200 forwards each (the Triton interpreter is one-thread-only:
    one thread runs it, on a layer of its own, while the default is set to something the others must not run)."""
    models = [vit_fast.create_model("vit_tiny_patch4_32", depth=1, num_classes=3, embed_dim=48).eval()
              for _ in range(7)]
    images = [torch.randn(1, 3, 32, 32) for _ in range(7)]
    settings = ["reference", "auto"] * 3 + ["reference"]
    with torch.no_grad():
        want = [m(x) for m, x in zip(models, images, strict=True)]
        lx, lw, lb = torch.randn(4, 48), torch.randn(48), torch.randn(48)
        triton_ran = not backends.reasons("triton", "layer_norm", (lx, lw, lb), {})
        with vit_fast.use_backend("triton" if triton_ran else "reference"):
            ln_want = ops.layer_norm(lx, lw, lb)
    errors: list[str] = []

    def serve(i):
        with vit_fast.use_backend(settings[i]), torch.no_grad():
            for _ in range(200):
                if not torch.equal(models[i](images[i]), want[i]):
                    errors.append(f"thread {i} ({settings[i]})")
                    return

    def interpret():
        with vit_fast.use_backend("triton" if triton_ran else "reference"), torch.no_grad():
            for _ in range(20):
                if not torch.equal(ops.layer_norm(lx, lw, lb), ln_want):
                    errors.append("the Triton thread")
                    return

    with vit_fast.set_backend("cuda"):  # a thread that read the process default would raise: no GPU here
        threads = [threading.Thread(target=serve, args=(i,)) for i in range(7)]
        threads.append(threading.Thread(target=interpret))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors


@pytest.mark.parametrize("read", ["contextvar", "thread copy"])
def test_a_compiled_function_recompiles_under_another_choice(read, monkeypatch):
    """The choice is read while tracing and guarded: a call under a setting not seen before (use_backend's or
    set_backend's) recompiles, one seen before reuses its graph; no torch._dynamo.reset() is needed. Before torch
    2.14 the compiler reads the thread's copy of the choice instead of the ContextVar: the same holds."""
    from vit_fast import setting

    if read == "thread copy":
        monkeypatch.setattr(setting, "_COMPILER_READS_CONTEXTVARS", False)
    elif not setting._COMPILER_READS_CONTEXTVARS:
        pytest.skip(f"torch {torch.__version__} cannot trace a ContextVar")
    x, w, b = torch.randn(4, 24), torch.randn(24), torch.randn(24)
    if backends.reasons("triton", "layer_norm", (x, w, b), {}):
        pytest.skip("triton cannot run here")
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda *a: ops.layer_norm(*a), fullgraph=True, backend=counting)
    steps = [(vit_fast.use_backend, "reference", 1), (vit_fast.use_backend, "triton", 2),
             (vit_fast.use_backend, "reference", 2), (vit_fast.set_backend, "triton", 3),
             (vit_fast.set_backend, "auto", 4), (vit_fast.set_backend, "triton", 4)]
    for setter, name, compiles in steps:
        with setter(name), launches() as rec, torch.no_grad():
            compiled(x, w, b)
        assert {r.backend for r in rec} == {"reference" if name == "auto" else name}, (name, rec)
        assert len(graphs) == compiles, (setter.__name__, name, len(graphs))


def test_the_cached_pick_follows_the_setting_dtype_shape_and_grad_mode():
    """The per-call pick is cached; a change of any of what it depends on is never served a stale one."""
    x, w, b = torch.randn(4, 24), torch.randn(24), torch.randn(24)
    if backends.reasons("triton", "layer_norm", (x, w, b), {}):
        pytest.skip("triton cannot run here")

    def ran(*args, setting="auto"):
        with vit_fast.set_backend(setting), launches() as rec:
            ops.layer_norm(*args)
        return {r.backend for r in rec}

    assert ran(x, w, b) == {"reference"}
    assert ran(x, w, b, setting="triton") == {"triton"}
    assert ran(x, w, b) == {"reference"}
    with pytest.raises(BackendUnavailableError, match="float64"):
        ran(x.double(), w.double(), b.double(), setting="triton")
    assert ran(x.double(), w.double(), b.double()) == {"reference"}
    wide = torch.randn(4, 20000)
    with pytest.raises(BackendUnavailableError, match="width"):
        ran(wide, torch.ones(20000), torch.zeros(20000), setting="triton")
    assert ran(x[:0], w, b, setting="triton") == {"reference"}  # empty: nothing to launch
    assert ran(x, w, b, setting="triton") == {"triton"}


def test_a_kernel_that_cannot_launch_falls_back_to_the_reference_in_auto_and_raises_when_chosen(monkeypatch):
    """Every config ran out of a device resource (vit_fast.kernels.KernelLaunchError): auto warns and runs the
    reference; an explicit choice raises, naming the backend."""
    from vit_fast.kernels import KernelFallbackWarning, KernelLaunchError

    def no_room(*args):
        raise KernelLaunchError("no config of _layer_norm_fwd_kernel fits: out of shared memory")

    info = backends._OPS["layer_norm"]
    impl = info.impls["triton"]
    monkeypatch.setitem(info.impls, "triton", backends.Impl(no_room, impl.limits, impl.records))
    monkeypatch.setattr(backends, "_auto", lambda *a, **k: ("triton", "auto: a policy's pick", {}))
    backends._PICKS.clear()
    x, w, b = torch.randn(4, 24), torch.randn(24), torch.randn(24)
    with pytest.warns(KernelFallbackWarning, match="cannot launch"), launches() as rec:
        out = ops.layer_norm(x, w, b)
    assert [r.backend for r in rec] == ["reference"]
    torch.testing.assert_close(out, ops.layer_norm_ref(x, w, b))
    with vit_fast.set_backend("triton"), pytest.raises(BackendUnavailableError, match="cannot launch layer_norm"):
        ops.layer_norm(x, w, b)
    backends._PICKS.clear()


def test_the_setting_offers_auto_and_every_backend():
    assert backends.CHOICES == ("auto", *backends.BACKENDS)
