"""The CUDA C++ backend (vit_fast._C).

On any machine: the build decision, the pure-Python install, the extension's registrations seen through the
dispatcher (a CUDA kernel, a fake/meta kernel and the autograd rule for every op), the whole Python wiring traced
with fake CUDA tensors (forward and backward of every op, no GPU needed), the reasons the backend gives, and that a
missing extension is a reason in explain(), never an import error.

On a GPU (marked ``cuda``): every op's output and every gradient against the fp32 oracle (bf16, fp16; ViT and odd
sizes; strided views), determinism, opcheck, torch.compile(fullgraph=True) of the model, training steps under
autocast, and compute-sanitizer memcheck runs.
"""

from __future__ import annotations

import copy
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
from helpers import autocast_losses, check_oracle, leaves

import vit_fast
from vit_fast import backends
from vit_fast.ops import (
    attention,
    attention_packed,
    layer_norm,
    layernorm_mlp,
    layernorm_mlp_ref,
    patch_embed,
)
from vit_fast.tolerance import ATOL, assert_close

REPO = Path(__file__).resolve().parents[1]
OPS = tuple(op for op in backends.ops() if backends.limits(op, "cuda") is not None)  # the ops with C++ kernels
VARIANTS = {v: op for op in OPS for v in backends.variants(op)}  # entry points with C++ ops of their own -> the op
QUALNAMES = [f"vit_fast::{op}_{part}_cuda" for op in (*OPS, *VARIANTS) for part in ("fwd", "bwd")]
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
    assert "vit_fast/ops/attention.py" in names and "vit_fast/kernels/attention.py" in names
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
    op, part, _ = qualname.split("::")[1].rsplit("_", 2)
    if part == "fwd":
        assert has(qualname, "Autograd")
    assert torch._C._dispatch_pystub(qualname, "")[0] == f"vit_fast.ops.{VARIANTS.get(op, op)}"


@needs_ext
@pytest.mark.parametrize("op", [*OPS, *VARIANTS])
def test_schemas_match_the_triton_ops(op):
    if backends.unavailable("triton"):
        pytest.skip(backends.unavailable("triton"))
    for part in ("fwd", "bwd"):
        cpp = getattr(torch.ops.vit_fast, f"{op}_{part}_cuda").default._schema
        tri = getattr(torch.ops.vit_fast, f"{op}_{part}_triton").default._schema
        assert [(a.name, str(a.type)) for a in cpp.arguments] == [(a.name, str(a.type)) for a in tri.arguments]
        assert [str(r.type) for r in cpp.returns] == [str(r.type) for r in tri.returns]


def _fake_cuda_calls():
    """(op name, public op, args, kwargs) for each op on fake CUDA tensors: ViT-like shapes, bf16."""
    bf = torch.bfloat16

    def t(*shape, dtype=bf):
        return torch.randn(*shape, device="cuda", dtype=dtype)

    q, k, v = torch.randn(2, 9, 3, 2, 64, device="cuda", dtype=bf).permute(2, 0, 3, 1, 4).unbind(0)
    mlp = (t(2, 9, 32), t(32), t(32), t(64, 32), t(64), t(32, 64), t(32))
    return [
        ("attention", attention, (q, k, v), {}),
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
        assert [(r.op, r.backend, r.phase) for r in rec] == [("attention", "cuda", "fwd")]
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


# ---- GPU: numerics against the fp32 oracle -----------------------------------------------------------------------

gpu = pytest.mark.cuda


_leaves = leaves


def _check(op: str, args: tuple, kwargs: dict | None = None) -> torch.Tensor:
    return check_oracle(op, "cuda", args, kwargs or {})[0]


def _packed_qkv(B, N, H, D, dtype):
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype)
    return [t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0)]  # (B, H, N, D) views


ATTN_SHAPES = [(2, 197, 3, 64), (2, 257, 2, 64), (1, 577, 2, 64), (2, 197, 2, 80), (1, 577, 1, 80),
               (3, 50, 2, 64), (1, 1, 1, 64), (2, 65, 2, 128), (1, 1025, 1, 64)]


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_oracle(shape, dtype):
    B, N, H, D = shape
    q, k, v = _packed_qkv(B, N, H, D, dtype)
    _check("attention", (q, k, v))


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_attention_contiguous_transposed_and_scaled(dtype):
    q, k, v = (torch.randn(2, 3, 97, 80, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
    _check("attention", (q, k, v), {"scale": 0.3})
    base = torch.randn(2, 97, 3, 64, device="cuda", dtype=dtype)  # (B, N, H, D) memory viewed as (B, H, N, D)
    q, k, v = (base.transpose(1, 2).detach().requires_grad_() for _ in range(3))
    _check("attention", (q, k, v))


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("shape", [(2, 197, 3, 64), (1, 50, 2, 80), (1, 130, 2, 128), (2, 7, 1, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_attention_packed_matches_oracle_and_the_unpacked_op(shape, dtype):
    """The packed C++ ops: forward and the one dqkv against the fp32 oracle, and bit-identical to attention() of
    the q, k, v views (the same kernels; only the gradient's strides differ)."""
    from vit_fast.ops.attention import unpack_qkv

    B, N, H, D = shape
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype).requires_grad_()
    check_oracle("attention_packed", "cuda", (qkv,), {"scale": 0.3})
    dout = torch.randn(B, H, N, D, device="cuda", dtype=dtype)
    views = [t.detach().requires_grad_() for t in unpack_qkv(qkv.detach())]
    with vit_fast.set_backend("cuda"):
        out = attention_packed(qkv, scale=0.3)
        (dqkv,) = torch.autograd.grad(out, qkv, dout)
        want = attention(*views, scale=0.3)
        grads = torch.autograd.grad(want, views, dout)
    assert dqkv.is_contiguous() and torch.equal(out, want)
    for got, g in zip(unpack_qkv(dqkv), grads, strict=True):
        assert torch.equal(got, g)


LN_SHAPES = [(2, 197, 768), (4, 257, 384), (1, 577, 1024), (3, 50, 80), (7, 33), (2, 5, 1280), (1, 3, 6144)]


@gpu
@pytest.mark.parametrize("dtype", [*HALF, torch.float32], ids=[*HALF_IDS, "fp32"])
@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_matches_oracle(shape, dtype):
    c = shape[-1]
    x = (torch.randn(*shape, device="cuda") * 2 + 0.5).to(dtype).requires_grad_()
    w = (torch.randn(c, device="cuda") * 0.2 + 1).to(dtype).requires_grad_()
    b = (torch.randn(c, device="cuda") * 0.2).to(dtype).requires_grad_()
    _check("layer_norm", (x, w, b))


@gpu
def test_layer_norm_strided_rows_mixed_params_and_autocast():
    base = torch.randn(4, 197, 2 * 768, device="cuda", dtype=torch.bfloat16)
    x = base[..., :768].detach().requires_grad_()  # rows strided by 1536
    w = (torch.randn(768, device="cuda") * 0.2 + 1).requires_grad_()  # fp32 parameters, bf16 input
    b = (torch.randn(768, device="cuda") * 0.2).requires_grad_()
    _check("layer_norm", (x, w, b))
    with torch.autocast("cuda", dtype=torch.bfloat16), vit_fast.set_backend("cuda"):
        y = layer_norm(x, w, b)
    assert y.dtype == torch.float32  # CUDA autocast runs layer_norm in fp32


def _mlp_inputs(shape, hidden, dtype, *, residual=True, param_dtype=None, res_dtype=None):
    c = shape[-1]
    pdt = param_dtype or dtype

    def p(*s, scale=1.0, shift=0.0, dt=pdt):
        return (torch.randn(*s, device="cuda") * scale + shift).to(dt).requires_grad_()

    x = torch.randn(*shape, device="cuda").to(dtype).requires_grad_()
    params = [p(c, scale=0.2, shift=1.0), p(c, scale=0.2), p(hidden, c, scale=c**-0.5), p(hidden, scale=0.2),
              p(c, hidden, scale=hidden**-0.5), p(c, scale=0.2)]
    res = p(*shape, dt=res_dtype or dtype) if residual else None
    return [x, *params, res]


MLP_NAMES = ["x", "ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "residual"]


def _mlp_call(*a):
    return layernorm_mlp(*a[:7], residual=a[7])


def _mlp_ref(*a, upcast):
    return layernorm_mlp_ref(*a[:7], residual=a[7], upcast=upcast)


MLP_SHAPES = [((2, 197, 384), 1536), ((2, 257, 768), 3072), ((1, 577, 192), 768), ((3, 50, 80), 200), ((9, 40), 72)]


@gpu
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("case", MLP_SHAPES, ids=lambda c: "x".join(map(str, c[0])) + f"_h{c[1]}")
def test_layernorm_mlp_matches_oracle(case, dtype, residual):
    shape, hidden = case
    *args, res = _mlp_inputs(shape, hidden, dtype, residual=residual)
    _check("layernorm_mlp", tuple(args), {"residual": res})


@gpu
def test_layernorm_mlp_under_autocast_fp32_residual_stream():
    """The model's autocast path: fp32 x, residual and LayerNorm parameters, bf16 GEMMs, fp32 output."""
    ins = _mlp_inputs((2, 197, 384), 1536, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with vit_fast.set_backend("cuda"):
            out = _mlp_call(*ins)
        ref = layernorm_mlp_ref(*_leaves(ins)[:7], residual=ins[7])
    assert out.dtype == ref.dtype == torch.float32
    ref32 = layernorm_mlp_ref(*_leaves(ins)[:7], residual=ins[7], upcast=True)
    assert_close(out, ref, ref32, atol=ATOL[torch.bfloat16])
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in ins)


@gpu
def test_layernorm_mlp_only_requested_gradients_and_no_saved_pre():
    x, *params, res = _mlp_inputs((2, 197, 384), 1536, torch.bfloat16)
    for t in params:
        t.requires_grad_(False)
    with vit_fast.set_backend("cuda"):
        out = layernorm_mlp(x, *params, residual=res)
    (dx,) = torch.autograd.grad(out, [x], torch.ones_like(out))
    ref32_in = _leaves([x, *params, res], torch.float32)
    (want,) = torch.autograd.grad(layernorm_mlp_ref(*ref32_in[:7], residual=ref32_in[7], upcast=True), [ref32_in[0]],
                                  torch.ones_like(out, dtype=torch.float32))
    low = _leaves([x])[0]
    (lo,) = torch.autograd.grad(layernorm_mlp_ref(low, *params, residual=res), [low], torch.ones_like(out))
    assert_close(dx, lo, want, name="dx")
    # The backward recomputes the pre-activation when the forward did not save it.
    ins = _mlp_inputs((3, 50, 80), 200, torch.float16)
    mean_rstd = torch.ops.vit_fast.layernorm_mlp_fwd_cuda(*[t.detach() for t in ins[:7]], None, 1e-6, False)
    assert mean_rstd[3].numel() == 0
    saved = torch.ops.vit_fast.layernorm_mlp_fwd_cuda(*[t.detach() for t in ins[:7]], None, 1e-6, True)
    dout = torch.randn_like(saved[0])
    args = [t.detach() for t in ins[:6]]
    a = torch.ops.vit_fast.layernorm_mlp_bwd_cuda(dout, *args, saved[1], saved[2], saved[3], True, True, True)
    b = torch.ops.vit_fast.layernorm_mlp_bwd_cuda(dout, *args, saved[1], saved[2], mean_rstd[3], True, True, True)
    for g1, g2 in zip(a, b, strict=True):
        torch.testing.assert_close(g1, g2, atol=2e-3, rtol=2e-3)


PATCH_CASES = [(2, 3, 224, 224, 16, 192), (2, 3, 64, 48, 16, 96), (1, 3, 56, 56, 14, 80), (2, 1, 12, 20, 4, 24)]


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("pos", ["1+N", "N", None])
@pytest.mark.parametrize("case", PATCH_CASES, ids=lambda c: "x".join(map(str, c)))
def test_patch_embed_matches_oracle(case, pos, dtype):
    B, C, H, W, P, E = case
    n = (H // P) * (W // P)
    images = torch.randn(B, C, H, W, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(E, C, P, P, device="cuda") * (C * P * P) ** -0.5).to(dtype).requires_grad_()
    bias = (torch.randn(E, device="cuda") * 0.2).to(dtype).requires_grad_()
    cls = (torch.randn(1, 1, E, device="cuda") * 0.2).requires_grad_()  # fp32, as the model holds it
    pos_embed = None if pos is None else (torch.randn(1, n + (pos == "1+N"), E, device="cuda") * 0.2).requires_grad_()

    _check("patch_embed", (images, weight, bias), {"cls_token": cls, "pos_embed": pos_embed})


@gpu
def test_patch_embed_strided_images_no_cls_no_bias():
    base = torch.randn(2, 3, 64, 80, device="cuda", dtype=torch.bfloat16)
    images = base[..., :64].detach().requires_grad_()  # rows strided by 80
    weight = (torch.randn(32, 3, 16, 16, device="cuda") * 0.03).to(torch.bfloat16).requires_grad_()
    _check("patch_embed", (images, weight, None))


# ---- GPU: compile, training, sanitizer (opcheck, determinism, NaN rows: tests/test_contract.py) ---------------


@gpu
def test_compiled_model_fullgraph_under_cuda():
    torch._dynamo.reset()
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10).cuda().to(torch.bfloat16)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    with vit_fast.set_backend("cuda"):
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True)
        out = compiled(x)
        out.float().square().mean().backward()
    with vit_fast.set_backend("reference"), torch.no_grad():
        ref = m(x)
        oracle = copy.deepcopy(m).double()(x.double())
    assert_close(eager, ref, oracle, name="eager logits")
    assert_close(out, ref, oracle, name="compiled logits")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@gpu
def test_training_steps_under_autocast():
    torch.manual_seed(0)
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10).cuda()
    x = torch.randn(8, 3, 64, 64, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    losses = autocast_losses(m, x, y, 6, "cuda")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    # The first step's gradients point where the reference backend's do.
    m2 = vit_fast.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10).cuda()
    grads = {}
    for backend in ("cuda", "reference"):
        m2.zero_grad()
        with vit_fast.set_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            torch.nn.functional.cross_entropy(m2(x), y).backward()
        grads[backend] = {n: p.grad.float().flatten() for n, p in m2.named_parameters()}
    for n, g in grads["cuda"].items():
        r = grads["reference"][n]
        if r.norm() > 1e-6:
            assert torch.nn.functional.cosine_similarity(g, r, dim=0) > 0.98, n


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


@gpu
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
