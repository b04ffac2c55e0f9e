"""The CUDA C++ backend (vit_fast._C).

On any machine: the build decision, the pure-Python install, the extension's registrations seen through the
dispatcher (a CUDA kernel, a fake/meta kernel and the autograd rule for every op), the whole Python wiring traced
with fake CUDA tensors (forward and backward of every op, no GPU needed), the reasons the backend gives, and that a
missing extension is a reason in explain(), never an import error.

On a GPU (marked ``cuda``): that auto waits for a measured policy, and compute-sanitizer memcheck runs of the
kernels. Each op's CUDA numerics are in tests/ops/test_<op>.py, the contract (opcheck, determinism, NaN rows) in
tests/suites/test_contract.py, the whole model on this backend in tests/suites/test_cuda_model.py.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import vit_fast
from vit_fast import backends
from vit_fast.ops import (
    attention,
    attention_packed,
    layer_norm,
    layernorm_mlp,
    patch_embed,
)
from vit_fast.ops.spec import custom_op_names

REPO = Path(__file__).resolve().parents[1]
OPS = tuple(op for op in backends.ops() if backends.limits(op, "cuda") is not None)  # the ops with C++ kernels
QUALNAMES = [f"vit_fast::{name}" for op in OPS for name in custom_op_names(backends.spec(op), "cuda")]
BUILT = backends.unavailable("cuda") is None
needs_ext = pytest.mark.skipif(not BUILT, reason=f"cuda backend unavailable: {backends.unavailable('cuda')}")
HALF = [torch.bfloat16, torch.float16]
HALF_IDS = ["bf16", "fp16"]


def _toolkit_present() -> bool:
    nvcc = [shutil.which("nvcc"), *glob.glob("/usr/local/cuda*/bin/nvcc"), *glob.glob("/opt/cuda/bin/nvcc")]
    return any(p and os.path.isfile(p) for p in nvcc) or bool(os.environ.get("CUDA_HOME"))


def _setup_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VIT_FAST_BUILD_CUDA"}
    env.pop("TRITON_INTERPRET", None)
    env.update(extra)
    return env


# ---- build ---------------------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_setup_decides_on_the_toolkit_and_the_flag():
    """`setup.py --name` runs the build decision without compiling: it names what it will do."""
    probe = [sys.executable, "setup.py", "--name"]
    default = subprocess.run(probe, cwd=REPO, env=_setup_env(), capture_output=True, text=True, timeout=300)
    assert default.returncode == 0, default.stderr
    if _toolkit_present():
        assert "building vit_fast._C with CUDA_HOME=" in default.stdout
        assert "TORCH_CUDA_ARCH_LIST=" in default.stdout
    else:
        assert "building without the CUDA extension" in default.stdout
    skipped = subprocess.run(probe, cwd=REPO, env=_setup_env(VIT_FAST_BUILD_CUDA="0"), capture_output=True,
                             text=True, timeout=300)
    assert skipped.returncode == 0, skipped.stderr
    assert "vit_fast._C" not in skipped.stdout


@pytest.mark.subprocess
def test_arch_list_is_respected(tmp_path):
    if not _toolkit_present():
        pytest.skip("no CUDA toolkit here")
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=_setup_env(TORCH_CUDA_ARCH_LIST="9.0"))
    assert r.returncode == 0, r.stderr
    assert "TORCH_CUDA_ARCH_LIST=9.0 " in r.stdout


def _copy_sources(dst: Path) -> Path:
    """What a clean checkout holds for the build: no build outputs, no in-place extension."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for folder in ("vit_fast", "kernels", "csrc"):
        shutil.copytree(REPO / folder, dst / folder, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    return dst


@pytest.mark.subprocess
def test_pure_python_wheel_without_the_extension(tmp_path):
    """VIT_FAST_BUILD_CUDA=0: the wheel holds the Python package and the Triton kernels, no vit_fast._C."""
    src = _copy_sources(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "wheels"), str(src)], env=_setup_env(VIT_FAST_BUILD_CUDA="0"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "wheels").glob("vit_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vit_fast/ops/attention/__init__.py" in names and "vit_fast/ops/attention/cases.py" in names
    assert "vit_fast/kernels/attention/__init__.py" in names and "vit_fast/kernels/attention/tma.py" in names
    assert not [n for n in names if "/_C" in n or n.endswith(".so")]


@pytest.mark.slow
@pytest.mark.subprocess
def test_extension_builds_from_a_clean_checkout(tmp_path):
    """The full build (minutes on a small machine): the extension compiles, links and registers every op."""
    if not _toolkit_present():
        pytest.skip("no CUDA toolkit here")
    src = _copy_sources(tmp_path / "src")
    env = _setup_env(MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=env, capture_output=True,
                       text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    check = ("import torch, vit_fast._C as C; "
             f"assert all(torch._C._dispatch_has_kernel_for_dispatch_key(q, 'CUDA') for q in {QUALNAMES!r})")
    r = subprocess.run([sys.executable, "-c", check], cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_extension_is_built_where_a_toolkit_is():
    """CI installs with a toolkit present: the extension must then have been built and loaded."""
    if not _toolkit_present() or os.environ.get("VIT_FAST_BUILD_CUDA") == "0":
        pytest.skip("no CUDA toolkit here (or VIT_FAST_BUILD_CUDA=0): the pure-Python install is expected")
    assert BUILT, backends.unavailable("cuda")
    import vit_fast._C  # noqa: F401


# ---- registrations and the Python wiring (no GPU needed) ------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("qualname", QUALNAMES)
def test_every_op_has_a_cuda_kernel_and_a_fake(qualname):
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has(qualname, "CUDA")
    assert has(qualname, "Meta")  # register_fake also registers the meta kernel
    assert torch._library.simple_registry.singleton.find(qualname).fake_impl.kernel is not None
    if qualname.split("::")[1].rsplit("_", 2)[1] == "fwd":
        assert has(qualname, "Autograd")


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_schemas_are_written_once_in_python(op):
    """Each C++ op's schema is its op's Contract, defined from Python: the extension registers kernels only (the
    dispatcher checked each kernel's C++ signature against the schema when Python defined it, at import)."""
    contract = backends.spec(op).contract
    fwd, bwd = custom_op_names(backends.spec(op), "cuda")
    for name, schema in ((fwd, contract.fwd_schema), (bwd, contract.bwd_schema)):
        registered = getattr(torch.ops.vit_fast, name).default._schema
        assert str(registered) == f"vit_fast::{name}{schema}"


def test_the_extension_defines_no_schema():
    sources = [p for p in (REPO / "csrc").iterdir() if p.suffix in (".cu", ".cpp", ".h")]
    assert sources
    for path in sources:
        text = path.read_text()
        assert "TORCH_LIBRARY(" not in text and "m.def(" not in text, f"{path.name} defines a schema"


def _fake_cuda_calls():
    """(op name, public op, args, kwargs) for each op on fake CUDA tensors: ViT-like shapes, bf16."""
    bf = torch.bfloat16

    def t(*shape, dtype=bf):
        return torch.randn(*shape, device="cuda", dtype=dtype)

    q, k, v = torch.randn(2, 9, 3, 2, 64, device="cuda", dtype=bf).permute(2, 0, 3, 1, 4).unbind(0)
    mlp = (t(2, 9, 32), t(32), t(32), t(64, 32), t(64), t(32, 64), t(32))
    return [
        ("attention", attention, (q, k, v), {}),
        ("attention_packed", attention_packed, (t(2, 9, 3, 2, 64),), {}),
        ("layer_norm", layer_norm, (t(2, 9, 32), t(32), t(32)), {}),
        ("layernorm_mlp", layernorm_mlp, mlp, {"residual": t(2, 9, 32, dtype=torch.float32)}),
        ("patch_embed", patch_embed, (t(2, 3, 8, 8), t(16, 3, 4, 4), t(16)),
         {"cls_token": t(1, 1, 16), "pos_embed": t(1, 5, 16, dtype=torch.float32)}),
    ]


@needs_ext
def test_public_ops_dispatch_to_cuda_with_fake_cuda_tensors():
    """Dispatch, the thin wrappers and the custom ops' fakes on fake CUDA tensors (no GPU): under set_backend("cuda")
    each public op selects the cuda implementation, whose output has the reference's shape and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), vit_fast.set_backend("cuda"):
        calls = _fake_cuda_calls()
        assert [name for name, *_ in calls] == list(OPS)
        for name, public, args, kwargs in calls:
            assert backends.pick(name, args, kwargs).backend == "cuda", name
            out = public(*args, **kwargs)
            with vit_fast.set_backend("reference"):
                ref = public(*args, **kwargs)
            assert (out.device.type, out.shape, out.dtype) == ("cuda", ref.shape, ref.dtype), name
        qkv = torch.randn(2, 9, 3, 2, 64, device="cuda", dtype=torch.bfloat16)  # (B, N, 3, H, D)
        with backends.trace() as rec:
            out = attention_packed(qkv)  # the C++ packed op, no Python wrapper
        assert [(r.op, r.backend, r.phase) for r in rec] == [("attention_packed", "cuda", "fwd")]
        assert out.shape == (2, 2, 9, 64) and out.stride() == (9 * 2 * 64, 64, 2 * 64, 1)


def _meta_leaf(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_()


@needs_ext
def test_autograd_rules_and_backward_fakes_on_meta_tensors():
    """The shared autograd rule registered on every C++ forward op, its backward op's fake: gradients of every
    input, with its shape and dtype (meta tensors: the autograd engine runs without a device)."""
    qkv = [_meta_leaf(2, 3, 9, 64) for _ in range(3)]
    packed = _meta_leaf(2, 9, 3, 3, 64)  # (B, N, 3, H, D)
    x, w, b = _meta_leaf(2, 9, 32), _meta_leaf(32, dtype=torch.float32), _meta_leaf(32, dtype=torch.float32)
    mlp = [_meta_leaf(2, 9, 32, dtype=torch.float32), _meta_leaf(32, dtype=torch.float32),
           _meta_leaf(32, dtype=torch.float32), _meta_leaf(64, 32), _meta_leaf(64), _meta_leaf(32, 64),
           _meta_leaf(32)]
    res = _meta_leaf(2, 9, 32, dtype=torch.float32)
    images, pw, pb = _meta_leaf(2, 3, 8, 8), _meta_leaf(16, 3, 4, 4), _meta_leaf(16)
    cls, pos = _meta_leaf(1, 1, 16, dtype=torch.float32), _meta_leaf(1, 5, 16, dtype=torch.float32)
    ops = torch.ops.vit_fast
    cases = [
        (lambda: ops.attention_fwd_cuda(*qkv, 0.125)[0], qkv),
        (lambda: ops.attention_packed_fwd_cuda(packed, 0.125)[0], [packed]),
        (lambda: ops.layer_norm_fwd_cuda(x, w, b, 1e-6)[0], [x, w, b]),
        (lambda: ops.layernorm_mlp_fwd_cuda(*mlp, res, 1e-6, True)[0], [*mlp, res]),
        (lambda: ops.patch_embed_fwd_cuda(images, pw, pb, cls, pos), [images, pw, pb, cls, pos]),
    ]
    for call, inputs in cases:
        out = call()
        assert out.requires_grad
        grads = torch.autograd.grad(out, inputs, torch.empty_like(out))
        for leaf, g in zip(inputs, grads, strict=True):
            assert g is not None and g.shape == leaf.shape and g.dtype == leaf.dtype


@needs_ext
def test_output_layouts_match_the_triton_fakes():
    m = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(2, 3, 7, 80, **m)
    out, lse = torch.ops.vit_fast.attention_fwd_cuda(q, q, q, 0.1)
    assert out.stride() == (7 * 3 * 80, 80, 3 * 80, 1) and lse.dtype == torch.float32 and lse.shape == (2, 3, 7)
    qkv = torch.empty(2, 7, 3, 3, 96, **m)[..., :80]  # (B, N, 3, H, D), strided
    out, lse = torch.ops.vit_fast.attention_packed_fwd_cuda(qkv, 0.1)
    assert out.stride() == (7 * 3 * 80, 80, 3 * 80, 1) and lse.shape == (2, 3, 7)
    dqkv = torch.ops.vit_fast.attention_packed_bwd_cuda(out, qkv, out, lse, 0.1)
    assert dqkv.shape == (2, 7, 3, 3, 80) and dqkv.is_contiguous()  # one gradient buffer, the kernels' slices
    x = torch.empty(4, 5, 48, **m)
    y, mean, rstd = torch.ops.vit_fast.layer_norm_fwd_cuda(x, torch.empty(48, **m), torch.empty(48, **m), 1e-6)
    assert y.shape == x.shape and mean.shape == (20,) and rstd.dtype == torch.float32
    p = [torch.empty(48, **m), torch.empty(48, **m), torch.empty(96, 48, **m), torch.empty(96, **m),
         torch.empty(48, 96, **m), torch.empty(48, **m)]
    res = torch.empty(4, 5, 48, device="meta", dtype=torch.float32)
    out, mean, rstd, pre = torch.ops.vit_fast.layernorm_mlp_fwd_cuda(x, *p, res, 1e-6, True)
    assert out.dtype == torch.float32 and pre.shape == (20, 96) and pre.dtype == torch.bfloat16
    grads = torch.ops.vit_fast.layernorm_mlp_bwd_cuda(out, x, *p[:5], mean, rstd, pre, True, False, True)
    assert [tuple(g.shape) for g in grads] == [(4, 5, 48), (48,), (48,), (0,), (0,), (48, 96), (48,)]
    images, w = torch.empty(2, 3, 32, 32, **m), torch.empty(64, 3, 16, 16, **m)
    tokens = torch.ops.vit_fast.patch_embed_fwd_cuda(images, w, None, torch.empty(1, 1, 64, **m),
                                                torch.empty(1, 5, 64, device="meta", dtype=torch.float32))
    assert tokens.shape == (2, 5, 64) and tokens.dtype == torch.float32


@needs_ext
def test_explain_lists_cuda_as_built():
    rows = {r["op"]: r for r in vit_fast.explain("cuda").rows
            if r["backend"] == "cuda" and "cuda" in backends.implemented(r["op"])}
    assert set(rows) == set(OPS)  # the quantized-inference ops have no CUDA C++ kernels
    for op, row in rows.items():
        assert not any("not built" in w or "not implemented" in w for w in row["reasons"]), (op, row["reasons"])
        if not torch.cuda.is_available():
            assert row["reasons"] == ["no CUDA device visible"], (op, row["reasons"])
        else:
            assert row["reasons"] == [], (op, row["reasons"])


@pytest.mark.cuda
def test_auto_does_not_pick_cuda_before_gpu_validation():
    """auto takes a kernel backend on a GPU only where the policy measured it (verified and timed there)."""
    q, k, v = (torch.randn(2, 3, 197, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for args in ((q, k, v), (q.float(), k.float(), v.float())):
        chosen = backends.pick("attention", args, {})
        assert chosen.backend == "reference" or chosen.backend in chosen.speedups, chosen


@pytest.mark.subprocess
def test_missing_extension_is_a_reason_not_an_import_error():
    code = textwrap.dedent("""
        import sys
        sys.modules["vit_fast._C"] = None  # as if it was never built
        import vit_fast
        rows = [r for r in vit_fast.explain("cuda").rows if r["backend"] == "cuda"]
        assert rows and all(any("vit_fast._C not built" in w for w in r["reasons"]) for r in rows), rows
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@needs_ext
def test_cuda_reasons_name_what_is_not_supported():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def why(op, *args, **kwargs):
        return backends.reasons("cuda", op, args, kwargs)

    with FakeTensorMode():
        m = dict(device="cuda")
        q = torch.empty(1, 2, 5, 96, dtype=torch.float32, **m)
        got = why("attention", q, q, q, dropout_p=0.1)
        assert any("dropout_p" in w for w in got) and any("head dim 96" in w for w in got)
        assert any("float32" in w for w in got)
        assert why("attention", *(torch.empty(1, 2, 5, 80, dtype=torch.bfloat16, **m),) * 3) == []
        x = torch.empty(3, 8000, dtype=torch.float32, **m)
        got = why("layer_norm", x, x[0], x[0])
        assert len(got) == 1 and "width C = 8000 > 6144" in got[0], got
        ims = torch.empty(1, 3, 8, 8, dtype=torch.float32, **m)
        w = torch.empty(4, 3, 4, 4, dtype=torch.bfloat16, **m)
        got = why("patch_embed", ims, w, None)
        assert any("weight dtype bfloat16 differs" in w for w in got) and any("float32 not supported" in w for w in got)
        x = torch.empty(2, 16, dtype=torch.float32, **m)
        p = [torch.empty(16, **m), torch.empty(16, **m), torch.empty(32, 16, **m), torch.empty(32, **m),
             torch.empty(16, 32, **m), torch.empty(16, **m)]
        got = why("layernorm_mlp", x, *p, dropout_p=0.1)
        assert any("dropout_p" in w for w in got) and any("GEMM dtype float32" in w for w in got)


@needs_ext
def test_explicit_cuda_on_cpu_tensors_raises_with_reasons():
    x = torch.randn(2, 8)
    with vit_fast.set_backend("cuda"), pytest.raises(backends.BackendUnavailableError, match="device cpu"):
        layer_norm(x, torch.ones(8), torch.zeros(8))


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for cand in sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer")) + sorted(
        glob.glob("/usr/local/cuda*/compute-sanitizer/compute-sanitizer")
    ):
        if os.access(cand, os.X_OK):
            return cand
    return None


SANITIZER_SCRIPT = """
import torch, vit_fast
from vit_fast.ops import attention, layer_norm, layernorm_mlp, patch_embed

torch.manual_seed(0)

def leaf(*s, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*s, device="cuda") * scale).to(dtype).requires_grad_()

with vit_fast.set_backend("cuda"):
    for n, d in ((37, 64), (70, 80)):  # a partial last block; two key blocks
        qkv = leaf(2, n, 3, 2, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention(q, k, v).sum().backward()
    print("done attention", flush=True)
    for c in (72, 33):  # vectorized and element paths
        x, w, b = leaf(5, 3, c), leaf(c), leaf(c)
        layer_norm(x, w, b).sum().backward()
    print("done layer_norm", flush=True)
    for c, h in ((64, 136), (40, 72)):  # GEMM tails in M, N and K
        x = leaf(3, 45, c, dtype=torch.float32)
        p = [leaf(c), leaf(c), leaf(h, c, scale=0.1), leaf(h), leaf(c, h, scale=0.1), leaf(c)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            layernorm_mlp(x, *p, residual=x).sum().backward()
    print("done layernorm_mlp", flush=True)
    for hw, p in ((32, 16), (28, 14)):  # cp.async gather and element gather
        images, w, b = leaf(2, 3, hw, hw), leaf(24, 3, p, p, scale=0.05), leaf(24)
        cls, pos = leaf(1, 1, 24, dtype=torch.float32), leaf(1, (hw // p) ** 2 + 1, 24, dtype=torch.float32)
        patch_embed(images, w, b, cls_token=cls, pos_embed=pos).sum().backward()
    print("done patch_embed", flush=True)
torch.cuda.synchronize()
"""


@pytest.mark.cuda
@pytest.mark.subprocess
def test_compute_sanitizer_memcheck(tmp_path):
    """One memcheck run over every op's forward and backward at small shapes with tails."""
    tool = _sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "run_ops.py"
    script.write_text(SANITIZER_SCRIPT)
    # Without the caching allocator every tensor is its own allocation: an out-of-bounds access cannot land in a
    # neighbour's memory unnoticed.
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    r = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, str(script)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    for op in OPS:
        assert f"done {op}" in r.stdout, (op, r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    assert "ERROR SUMMARY: 0 errors" in r.stdout + r.stderr
