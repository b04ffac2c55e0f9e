"""How the Triton launchers launch, and what keeps a first GPU run alive: the inputs' device made current, the
fixed-config mode (VIT_FAST_AUTOTUNE=0), tuning keys that bucket the row count, shared-memory budgets from the
device and per operand dtype, no tuning inside CUDA-graph capture, PyTorch's fp32 precision read without the
legacy TF32 flags, auto keeping fp32 GEMM work off the Triton kernels, capability and ROCm reasons, and PTX in the
built CUDA extension. Kernel numerics are each op's own test file."""

from __future__ import annotations

import contextlib
import glob
import importlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch
import triton
import vit_fast.kernels as kernels
from helpers import KERNEL_BACKENDS
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map_only

from vit_fast import backends
from vit_fast.backends import Facts
from vit_fast.ops import attention_ref
from vit_fast.tolerance import assert_close

attention = importlib.import_module("vit_fast.kernels.attention")
layer_norm = importlib.import_module("vit_fast.kernels.layer_norm")
layernorm_mlp = importlib.import_module("vit_fast.kernels.layernorm_mlp")
gemm = importlib.import_module("vit_fast.kernels.gemm")
patch_embed = importlib.import_module("vit_fast.kernels.patch_embed")
scaled_gemm = importlib.import_module("vit_fast.kernels.scaled_gemm")
quantize_rows = importlib.import_module("vit_fast.kernels.quantize_rows")

LAUNCHERS = {
    attention: ("attention_fwd", "attention_fwd_packed", "attention_fwd_fp8", "attention_bwd", "attention_bwd_packed"),
    layer_norm: ("layer_norm_fwd", "layer_norm_apply", "layer_norm_fwd_fp8", "layer_norm_bwd"),
    layernorm_mlp: ("layernorm_mlp_fwd", "layernorm_mlp_bwd"),
    patch_embed: ("patch_embed_fwd", "patch_embed_bwd"),
    quantize_rows: ("quantize_rows_fwd",),
    scaled_gemm: ("scaled_gemm",),
}
AUTOTUNED = [attention._attention_fwd_tuned, attention._attention_bwd_dkdv_tuned, attention._attention_bwd_dq_tuned,
             layer_norm._layer_norm_fwd_kernel, layer_norm._layer_norm_bwd_kernel,
             gemm._gemm_tuned, scaled_gemm._scaled_gemm_tuned, patch_embed._patch_embed_fwd_kernel,
             patch_embed._patch_embed_bwd_weight_kernel, patch_embed._patch_embed_bwd_images_kernel]
ROOT = pathlib.Path(__file__).resolve().parents[2]


# ---- the device guard ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [f"{m.__name__.rsplit('.', 1)[-1]}.{f}" for m, fs in LAUNCHERS.items() for f in fs])
def test_every_public_launcher_runs_on_its_inputs_device(name):
    module, fn = name.split(".")
    assert getattr(getattr(globals()[module], fn), "on_inputs_device", False), f"{name} has no device guard"


def test_the_guard_makes_the_first_tensors_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    ran = []
    launcher = kernels.on_inputs_device(lambda *a, **k: ran.append(len(entered)) or "out")
    with FakeTensorMode():  # tensors on cuda:1 without a GPU: the guard reads only their device
        x = torch.empty(2, device="cuda:1")
    assert launcher(3, x, scale=1.0) == "out" and entered == [torch.device("cuda:1")] and ran == [1]
    assert launcher(torch.empty(2), x) == "out" and len(entered) == 1  # the first tensor decides: CPU, no guard


@pytest.mark.cuda
def test_attention_on_the_second_gpu_without_set_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.cuda.set_device(0)
    q, k, v = (torch.randn(2, 3, 197, 64, device="cuda:1", dtype=torch.bfloat16) for _ in range(3))
    out, _ = attention.attention_fwd(q, k, v, 0.125)
    torch.cuda.synchronize(1)
    assert out.device == q.device
    assert_close(out, attention_ref(q, k, v, scale=0.125), attention_ref(q, k, v, scale=0.125, upcast=True))


# ---- autotuning: the fixed mode, capture, keys -----------------------------------------------------------------


class FakeAutotuner:
    """Stands in for a triton.autotune kernel: records whether the tuned or the plain kernel was launched."""

    def __init__(self, configs, prune=None):
        self.arg_names, self.keys, self.configs = ["x_ptr", "M", "BLOCK"], ["M"], configs
        self.early_config_prune = prune
        self.launched = []
        outer = self

        class Plain:
            __name__ = "_fake_kernel"

            def __getitem__(self, grid):
                return lambda *a, **k: outer.launched.append(("fixed", k))

        self.fn = Plain()

    def __getitem__(self, grid):
        return lambda *a, **k: self.launched.append(("tuned", k))


CONFIGS = [triton.Config({"BLOCK_M": 128}, num_warps=8), triton.Config({"BLOCK_M": 64}, num_warps=4)]


def _tuning_on(monkeypatch, on: bool = True, capturing: bool = False):
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setenv("VIT_FAST_AUTOTUNE", "1" if on else "0")
    monkeypatch.setattr(kernels, "_capturing", lambda named: capturing)


def test_the_suite_runs_fixed_configs():
    assert os.environ.get("VIT_FAST_AUTOTUNE") == "0" and not kernels.autotuning()


def test_fixed_mode_launches_the_first_config_pruning_keeps(monkeypatch):
    _tuning_on(monkeypatch, on=False)
    tuned = FakeAutotuner(CONFIGS, prune=lambda configs, named, **kw: configs[1:])
    kernels.launch(tuned, (1,), (torch.empty(1), 5), {"BLOCK": 16})
    assert tuned.launched == [("fixed", {"BLOCK": 16, **CONFIGS[1].all_kwargs()})]


def test_autotuned_when_allowed(monkeypatch):
    _tuning_on(monkeypatch)
    tuned = FakeAutotuner(CONFIGS)
    kernels.launch(tuned, (1,), (torch.empty(1), 5), {})
    assert tuned.launched == [("tuned", {})]


def test_no_tuning_inside_graph_capture(monkeypatch):
    """A shape first seen during capture runs the fixed config (and says how to get the tuned one); a shape tuned
    before capture replays through the autotuner, which reuses its cached config and times nothing."""
    tuned = FakeAutotuner(CONFIGS)
    _tuning_on(monkeypatch, capturing=False)
    kernels.launch(tuned, (1,), (torch.empty(1), 5), {})
    _tuning_on(monkeypatch, capturing=True)
    kernels.launch(tuned, (1,), (torch.empty(1), 5), {})
    with pytest.warns(UserWarning, match="CUDA-graph capture"):
        kernels.launch(tuned, (1,), (torch.empty(1), 6), {})
    assert [kind for kind, _ in tuned.launched] == ["tuned", "tuned", "fixed"]


def test_tuning_keys_never_hold_a_row_count():
    for tuned in AUTOTUNED:
        assert not {"M", "B", "rows"} & set(tuned.keys), f"{tuned.fn}: a new batch size would retune ({tuned.keys})"


def test_gemm_tuning_key_buckets_the_rows(monkeypatch):
    """layernorm_mlp's GEMM keys on the next power of two of M = B * N: 50 and 60 rows share a tuned config."""
    seen = []
    monkeypatch.setattr(gemm, "launch", lambda tuned, grid, args, kw, **_: seen.append((tuned, args, kw)))
    for m in (50, 60, 70):
        a, b = torch.randn(m, 32), torch.randn(32, 48)
        gemm.gemm(a, b, torch.empty(m, 48))
    keys = [kernels._tuning_key(t, {**dict(zip(t.arg_names, a, strict=False)), **kw}) for t, a, kw in seen]
    assert keys[0] == keys[1] != keys[2]


# ---- shared memory: the device's limit, each operand's bytes ---------------------------------------------------


def _on_gpu(dtype: torch.dtype):
    """What the pruning reads of a tensor on cuda:0: its device and element size (no GPU needed)."""
    return SimpleNamespace(device=torch.device("cuda", 0), element_size=lambda: torch.empty(0, dtype=dtype).itemsize)


@pytest.mark.parametrize("optin", [99 * 1024, 163 * 1024, 227 * 1024])
def test_attention_budget_is_the_devices(monkeypatch, optin):
    monkeypatch.setattr(kernels, "_smem_optin", lambda index: optin)
    q = _on_gpu(torch.bfloat16)
    for tuned, streamed, resident, tiles in [(attention._attention_fwd_tuned, "BLOCK_N", "BLOCK_M", 1),
                                             (attention._attention_bwd_dkdv_tuned, "BLOCK_M", "BLOCK_N", 2),
                                             (attention._attention_bwd_dq_tuned, "BLOCK_N", "BLOCK_M", 2)]:
        kept = tuned.early_config_prune(tuned.configs, {"Q": q, "N": 577}, HEAD_DIM=128)
        need = [(2 * c.kwargs[streamed] * c.num_stages + tiles * c.kwargs[resident]) * 128 * 2 for c in tuned.configs]
        fitting = [c for c, n in zip(tuned.configs, need, strict=True) if n <= optin]
        assert kept == (fitting or kept) and all(n <= optin for c, n in zip(tuned.configs, need, strict=True)
                                                 if c in kept and fitting)


def test_gemm_budget_counts_each_operands_dtype(monkeypatch):
    """An fp32 A tile next to a bf16 B tile costs 4 bytes per A element and 2 per B element. A budget between the
    per-operand sum and the max-dtype estimate keeps the config."""
    cfg = gemm.CONFIGS[3]  # 128 x 128 x 64, 3 stages
    bm, bn, bk, st = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], cfg.num_stages
    exact, by_max = (bm * 4 + bn * 2) * bk * st, (bm + bn) * 4 * bk * st
    monkeypatch.setattr(kernels, "_smem_optin", lambda index: (exact + by_max) // 2)
    named = {"a_ptr": _on_gpu(torch.float32), "b_ptr": _on_gpu(torch.bfloat16), "M": 4096, "N": 3072}
    kept = gemm.prune_configs(gemm.CONFIGS, named)
    assert cfg in kept and gemm.CONFIGS[0] not in kept  # 128 x 256 x 64 needs more


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_keeps_hoppers_large_tiles_for_16_bit_operands(monkeypatch, dtype):
    """On an H100/H200 (227 KiB) the 16-bit GEMMs (autocast included: LayerNorm writes its output in the GEMM
    dtype) keep the 128 x 256 and 256 x 128 tiles, and the fixed config is the first of them; a 99 KiB budget
    drops them."""
    named = {"a_ptr": _on_gpu(dtype), "b_ptr": _on_gpu(dtype), "M": 64 * 197, "N": 3072}
    monkeypatch.setattr(kernels, "_smem_optin", lambda index: 227 * 1024)
    kept = gemm.prune_configs(gemm.CONFIGS, named)
    big = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept[:2]]
    assert big == [(128, 256), (256, 128)]
    monkeypatch.setattr(kernels, "_smem_optin", lambda index: 99 * 1024)
    kept = gemm.prune_configs(gemm.CONFIGS, named)
    assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128 for c in kept)


@pytest.mark.parametrize("tuned, a, b", [(patch_embed._patch_embed_fwd_kernel, "images_ptr", "weight_ptr"),
                                         (patch_embed._patch_embed_bwd_weight_kernel, "grad_ptr", "images_ptr"),
                                         (patch_embed._patch_embed_bwd_images_kernel, "grad_ptr", "weight_ptr")])
def test_patch_embed_budget_is_the_devices(monkeypatch, tuned, a, b):
    monkeypatch.setattr(kernels, "_smem_optin", lambda index: 64 * 1024)
    named = {a: _on_gpu(torch.float32), b: _on_gpu(torch.float32), "M": 8192, "E": 768, "K": 768}
    kept = tuned.early_config_prune(tuned.configs, named)
    m, n, k = (name for name in tuned.configs[0].kwargs)
    assert kept and all((c.kwargs[m] + c.kwargs[n]) * 4 * c.kwargs[k] * c.num_stages <= 64 * 1024 for c in kept)


def test_the_fixed_gpu_config_fits_the_device(monkeypatch):
    monkeypatch.setattr(kernels, "_smem_optin", lambda index: 99 * 1024)
    args = (_on_gpu(torch.float16), _on_gpu(torch.float16))
    tuned = gemm._gemm_tuned
    named = dict(zip(["a_ptr", "b_ptr"], args, strict=True))
    cfg = kernels.fixed_config(SimpleNamespace(arg_names=["a_ptr", "b_ptr", "M", "N"], configs=tuned.configs,
                                               early_config_prune=tuned.early_config_prune), (*args, 4096, 768), {})
    assert cfg in gemm.prune_configs(tuned.configs, {**named, "M": 4096, "N": 768})
    assert (cfg.kwargs["BLOCK_M"] + cfg.kwargs["BLOCK_N"]) * 2 * cfg.kwargs["BLOCK_K"] * cfg.num_stages <= 99 * 1024


# ---- fp32: PyTorch's precision settings, and auto ----------------------------------------------------------------


@contextlib.contextmanager
def _precision(matmul: str, conv: str):
    old = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = old


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
@pytest.mark.parametrize("matmul, conv", [("tf32", "ieee"), ("ieee", "tf32")])
def test_kernels_follow_the_new_fp32_precision_settings(matmul, conv):
    """Once a program used the new settings, reading the legacy allow_tf32 flags raises: the kernels never do."""
    with _precision(matmul, conv):
        assert kernels.fp32_tf32("matmul") == (matmul == "tf32")
        assert kernels.fp32_tf32("conv") == (conv == "tf32")
        assert patch_embed._dot_precision(torch.float32) == conv


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
@pytest.mark.parametrize("flag", [False, True])
def test_kernels_follow_the_legacy_flags_as_set(flag):
    """A program that sets only the legacy flags (as older code does) gets what it set."""
    with _precision("none", "tf32"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = flag
        assert kernels.fp32_tf32("matmul") == kernels.fp32_tf32("conv") == flag


def test_no_package_code_reads_the_legacy_tf32_flags():
    """Only the torch < 2.9 branch of kernels.fp32_tf32 (where the flags are all there is) may name them."""
    found = []
    for folder in ("vit_fast", "kernels", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "allow_tf32" in line and "torch < 2.9" not in line:
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


# The ops whose Triton kernels run fp32 GEMMs off the tensor cores: their limits keep auto to the GEMM dtypes listed.
GEMM_OPS = [op for op in backends.ops() if "triton" in backends.implemented(op)
            and backends.limits(op, "triton").auto_gemm_dtypes is not None]


@pytest.mark.parametrize("op", GEMM_OPS)
def test_auto_leaves_fp32_gemm_work_to_the_reference(op):
    """The triton backend runs fp32 when chosen (IEEE FMA dot products), but auto never picks it for them."""
    limits = backends.limits(op, "triton")
    assert limits.auto_reasons(Facts(gemm_dtype=torch.float32))
    assert not limits.auto_reasons(Facts(gemm_dtype=torch.bfloat16))
    assert not limits.auto_reasons(Facts(gemm_dtype=torch.float16))


@pytest.mark.parametrize("op", GEMM_OPS)
def test_auto_on_cuda_skips_triton_for_fp32_even_when_a_policy_ranks_it_first(monkeypatch, op):
    monkeypatch.setattr(backends.policy, "choose", lambda *a, **k: (("triton", "reference"), {"triton": 2.0}, "test"))
    for dtype, want in ((torch.float32, "reference"), (torch.bfloat16, "triton")):
        with FakeTensorMode():  # the op's example inputs on cuda, without a GPU
            args, kwargs = tree_map_only(torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="cuda"),
                                         backends.example(op, dtype))
            assert backends.pick(op, args, kwargs, setting="auto").backend == want, dtype


# ---- capability and ROCm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, ids=lambda b: f"backend={b}")
def test_capability_below_8_is_a_reason(monkeypatch, backend):
    """Every op the backend declares needs at least sm 8.0 (the FP8 ops 8.9), and a lower one is a reason."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "capability", lambda index: (7, 5))
    declared = [op for op in backends.ops() if backends.limits(op, backend) is not None]
    assert declared
    for op in declared:
        limits = backends.limits(op, backend)
        assert limits.min_capability >= (8, 0), op
        need = ".".join(map(str, limits.min_capability))
        why = limits.reasons(Facts(), torch.device("cuda", 0), {torch.float16})
        assert f"compute capability 7.5 < {need}" in why, op


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, ids=lambda b: f"backend={b}")
def test_rocm_is_refused_by_name(monkeypatch, backend):
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    args, kwargs = backends.example("layer_norm", torch.float16)
    why = backends.reasons(backend, "layer_norm", args, kwargs, device=torch.device("cuda"))
    assert any("ROCm" in w for w in why)
    monkeypatch.setattr(torch.version, "hip", None)
    assert not any("ROCm" in w for w in backends.reasons(backend, "layer_norm", args, kwargs,
                                                         device=torch.device("cuda")))


# ---- the CUDA extension embeds PTX -------------------------------------------------------------------------------


def _cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit, or the pip package nvidia-cuda-cuobjdump."""
    found = shutil.which("cuobjdump")
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    candidates = [found] + [os.path.join(h, "bin", "cuobjdump") for h in homes if h]
    candidates += [p for r in roots for p in sorted(glob.glob(os.path.join(r, "*", "bin", "cuobjdump")))]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_the_cuda_extension_embeds_ptx():
    """A GPU newer than the built SASS JIT-compiles the embedded PTX (setup.py's arch list ends in +PTX)."""
    spec = importlib.util.find_spec("vit_fast._C")
    if spec is None or not spec.origin:
        pytest.skip("vit_fast._C not built (no CUDA toolkit at install, or VIT_FAST_BUILD_CUDA=0)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    listed = subprocess.run([tool, "--list-ptx", spec.origin], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "ptx" in listed.stdout.lower(), f"no PTX in {spec.origin}:\n{listed.stdout}"


def test_setup_embeds_ptx_for_the_newest_arch():
    text = (ROOT / "setup.py").read_text()
    assert 'DEFAULT_ARCH_LIST = "8.0;9.0+PTX"' in text and '+PTX"' in text.split("def _default_arch_list")[1]


# ---- the changed GEMM signature still lowers to sm_90 ------------------------------------------------------------

_GEMM_COMPILE_SCRIPT = """
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vit_fast.kernels import gemm as k

kern = k._gemm_tuned
names = kern.fn.arg_names
variants = [  # (operand dtype, C dtype, flags): fc1 forward (training), fc2 with an fp32 residual, dH's GELU backward
    ("bf16", "bf16", {"HAS_BIAS": True, "EPILOGUE": 1, "STORE_AUX": True}),
    ("bf16", "fp32", {"HAS_BIAS": True, "HAS_RESIDUAL": True}),
    ("fp16", "fp16", {"EPILOGUE": 2, "STORE_AUX": True, "BIAS_GRAD": True}),
]
for op_dt, c_dt, flags in variants:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    operand = torch.empty(0, device="meta", dtype=dtypes[op_dt])
    cfg = kern.early_config_prune(kern.configs, {"M": 12608, "N": 3072, "a_ptr": operand, "b_ptr": operand})[0]
    consts = {"HAS_BIAS": False, "HAS_RESIDUAL": False, "EPILOGUE": 0, "STORE_AUX": False, "BIAS_GRAD": False,
              "BIAS_GRAD_ROWS": 32, "FP32_PRECISION": "ieee", **flags, **cfg.kwargs}
    types = {"a_ptr": op_dt, "b_ptr": op_dt, "c_ptr": c_dt, "res_ptr": c_dt, "dbias_ptr": "fp32"}
    sig = {n: "constexpr" if n in consts else "*" + types.get(n, op_dt) if n.endswith("_ptr") else "i32"
           for n in names}
    src = ASTSource(kern.fn, sig, {(names.index(n),): v for n, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps,
                                                                    "num_stages": cfg.num_stages})
print("compiled")
"""


@pytest.mark.subprocess
def test_the_gemm_kernel_compiles_for_sm90():
    from sm90 import compile_for_sm90

    compile_for_sm90(_GEMM_COMPILE_SCRIPT, "one")
