"""Quantized inference (vit_fast.quantization): the fp8 and int8 models against the fp32 model on the same
weights, the module swaps that keep the model's forward, explain, save/load round trips, bad requests, and
``vit-fast eval``. The quantized ops' own numerics are tests/ops/test_{quantize_rows,scaled_linear,int8_linear}.py
and the fp8 forms in test_layer_norm.py and test_attention.py.

Documented bounds (relative Frobenius error of the logits against the fp32 model, random-init ViT-Ti/16 at 32x32,
2 blocks): fp8 <= 0.15, int8 <= 0.1. e4m3 keeps 3 mantissa bits (2^-4 relative rounding per element, on both
GEMM operands); int8 per-channel weights and 7-bit activations keep more. On the trained digits model both lose
under 1 point of top-1 (``vit-fast eval runs/digits-q --quantize int8 fp8``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import vit_fast
from vit_fast import backends
from vit_fast.quantization import (
    Fp8Linear,
    Int8Linear,
    UnsupportedFormatError,
    check_supported,
    load_quantized,
    quantize,
    save_quantized,
    supported_formats,
)

FP8_BOUND, INT8_BOUND = 0.15, 0.1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=2).eval()
    return m, torch.randn(3, 3, 32, 32)


# ---- models -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,bound", [("fp8", FP8_BOUND), ("int8", INT8_BOUND)])
def test_quantized_model_logits_within_bound(model_and_images, fmt, bound):
    m, x = model_and_images
    with torch.no_grad():
        ref = m(x)
        qm = quantize(m, fmt)
        out = qm(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    err = _rel(out, ref)
    assert 0 < err <= bound, err
    linears = [mod for mod in qm.modules() if isinstance(mod, (Fp8Linear, Int8Linear))]
    assert len(linears) == 4 * len(qm.blocks)  # qkv, proj, fc1, fc2; the head stays float by default
    assert isinstance(qm.head, torch.nn.Linear) and m.blocks[0].attn.qkv.weight.dtype == torch.float32  # a copy
    with torch.no_grad():
        headq = quantize(m, fmt, head=True)
    assert isinstance(headq.head, (Fp8Linear, Int8Linear)) and _rel(headq(x), ref) <= bound


def test_fp8_attention_emits_proj_input_when_kernels_run_it(model_and_images):
    """On kernels (here the Triton interpreter) the attention kernel writes proj's e4m3 input and proj takes one
    scale per (token, head): quantize_rows runs only for fc2's GELU. Under auto on CPU the same model goes
    through attention_fp8's reference (attention, one quantizing pass: a scale per token), within the same bound."""
    if "triton" not in backends.implemented("attention_fp8"):
        pytest.skip(backends.unavailable("triton") or "triton not implemented")
    m, x = model_and_images
    qm = quantize(m, "fp8")
    with torch.no_grad(), vit_fast.set_backend("triton"), backends.trace() as launches:
        out = qm(x)
    depth = len(qm.blocks)
    ran = [(r.op, r.backend) for r in launches]
    assert ran.count(("attention_fp8", "triton")) == depth and ("attention", "triton") not in ran
    assert ran.count(("quantize_rows", "triton")) == depth  # fc2's GELU only
    assert ran.count(("scaled_linear", "triton")) == 4 * depth
    with torch.no_grad():
        ref, auto = m(x), qm(x)
    assert _rel(out, ref) <= FP8_BOUND and _rel(auto, ref) <= FP8_BOUND


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantization_swaps_modules_and_keeps_the_models_forward(model_and_images, fmt):
    """The blocks stay the float model's Block (its forward runs); only leaf modules are swapped, under the
    same names, so a quantized state dict has the float model's keys plus the scales."""
    from vit_fast.model import Block
    from vit_fast.quantization import Fp8AttentionCore, Fp8LayerNorm, QuantizedMlp

    m, _ = model_and_images
    qm = quantize(m, fmt)
    for block in qm.blocks:
        assert type(block) is Block and isinstance(block.mlp, QuantizedMlp)
        assert isinstance(block.norm1, Fp8LayerNorm) == isinstance(block.attn.core, Fp8AttentionCore) == (fmt == "fp8")
    floats = set(m.state_dict())
    assert floats <= set(qm.state_dict())
    quantized = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
    assert set(qm.state_dict()) - floats == {k.replace(".weight", ".weight_scale") for k in floats
                                             if k.endswith(quantized)}


def test_fp8_layers_keep_their_weights_through_a_dtype_cast(model_and_images):
    m, x = model_and_images
    qm = quantize(m, "fp8").to(torch.float64).to(torch.float32)
    assert qm.blocks[0].attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert qm.blocks[0].attn.qkv.weight_scale.dtype == torch.float32
    with torch.no_grad():
        assert _rel(qm(x), m(x)) <= FP8_BOUND


def test_explain_shows_the_quantized_ops(model_and_images):
    m, x = model_and_images
    for fmt, ops_expected in (("fp8", {"layer_norm_fp8", "scaled_linear", "quantize_rows"}), ("int8", {"int8_linear"})):
        ex = vit_fast.explain(quantize(m, fmt), x)
        picked = ex.picked
        assert ops_expected <= {r["op"] for r in ex.rows}
        where = [w for w in picked if w.endswith(": scaled_linear") or w.endswith(": int8_linear")]
        assert any(".attn.qkv" in w for w in where) and any(".mlp.fc2" in w for w in where), where
        if fmt == "fp8":
            assert any(w.endswith("norm1: layer_norm_fp8") for w in picked), picked
            assert any(w.endswith("attn.core: attention_fp8") for w in picked), picked  # proj's e4m3 input


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_save_load_round_trip(model_and_images, tmp_path, fmt):
    m, x = model_and_images
    qm = quantize(m, fmt, head=True)
    path = tmp_path / f"q-{fmt}.safetensors"
    save_quantized(qm, path)
    back = load_quantized(path)
    assert back.quantization == qm.quantization == {"format": fmt, "head": True}
    for k, v in qm.state_dict().items():
        assert torch.equal(back.state_dict()[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn
                           else back.state_dict()[k], v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v), k
    assert "blocks.0.attn.qkv.weight_scale" in back.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(back(x), qm(x), rtol=0, atol=0)


def test_a_full_disk_keeps_the_previous_quantized_file_whole(model_and_images, tmp_path, monkeypatch):
    import errno

    from vit_fast import fileio

    m, x = model_and_images
    path = tmp_path / "q.safetensors"
    save_quantized(quantize(m, "int8"), path)
    before = path.read_bytes()
    real = fileio.os.fdopen

    def full(fd, *args, **kwargs):  # the temporary file takes a few bytes, then the disk is full
        f = real(fd, *args, **kwargs)
        f.write = lambda b: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return f

    monkeypatch.setattr(fileio.os, "fdopen", full)
    with pytest.raises(fileio.WriteError, match="No space left"):
        save_quantized(quantize(m, "fp8"), path)
    monkeypatch.undo()
    assert path.read_bytes() == before and load_quantized(path).quantization["format"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors"]  # no temporary left behind


def test_bad_requests_say_what_is_supported(model_and_images, tmp_path):
    m, _ = model_and_images
    with pytest.raises(ValueError, match="fp8, int8"):
        quantize(m, "int4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantize(m, "int8"), "fp8")
    with pytest.raises(ValueError, match="float32"):
        quantize(m, "int8", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(m, tmp_path / "x.safetensors")
    assert supported_formats("cpu") == {"fp8": None, "int8": None}


def test_fp8_on_an_old_gpu_and_int8_on_cuda_raise_naming_what_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(UnsupportedFormatError, match=r"compute capability >= 8\.9.*8\.0.*these run: none"):
        check_supported("fp8", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_supported("fp8", "cuda")
    with pytest.raises(UnsupportedFormatError, match=r"int8 runs on CPU only.*these run: fp8"):
        check_supported("int8", "cuda")


@pytest.mark.cuda
def test_fp8_on_the_gpu_against_bf16():
    if supported_formats("cuda")["fp8"] is not None:
        pytest.skip(supported_formats("cuda")["fp8"])
    torch.manual_seed(0)
    m = vit_fast.create_model("vit_small_patch16_224").cuda().eval().to(torch.bfloat16)
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        qm = quantize(m, "fp8")
        with backends.trace() as launches:
            out = qm(x)
        assert _rel(out, m(x)) <= FP8_BOUND
    assert out.dtype == torch.bfloat16 and ("scaled_linear", "reference") in {(r.op, r.backend) for r in launches}
    rows = torch.randn(8 * 197, 384, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(384, device="cuda"), torch.randn(384, device="cuda")
    with vit_fast.set_backend("triton"):  # the fused producers on real FP8 conversions
        tq, ts = vit_fast.ops.layer_norm_fp8(rows, w, b)
        gq, gs = vit_fast.ops.quantize_rows(rows, gelu=True)
    rq, rs = vit_fast.ops.layer_norm_fp8_ref(rows, w, b)
    torch.testing.assert_close(ts, rs, rtol=1e-2, atol=1e-6)
    assert (tq.float() != rq.float()).float().mean() < 0.02
    torch.testing.assert_close(gs, vit_fast.ops.quantize_rows_ref(rows, gelu=True)[1], rtol=1e-2, atol=1e-6)


# ---- vit-fast eval ------------------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_eval_cli_on_a_tiny_run(tmp_path):
    """A run directory by hand (model.safetensors + summary.json, as `vit-fast train` writes), then the CLI."""
    import json

    from safetensors.torch import save_file

    from vit_fast.train.models import build_model, config_of

    model = build_model("vit_nano_patch2_8", num_classes=10, in_chans=1, img_size=8, drop_path=0.0, overrides={})
    run = tmp_path / "run"
    run.mkdir()
    config = config_of(model)
    save_file(model.state_dict(), run / "model.safetensors", metadata={"config": json.dumps(config)})
    (run / "summary.json").write_text(json.dumps({"dataset": "digits", "img_size": 8, "config": config}))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "vit_fast.cli", "eval", str(run), "--quantize", "int8", "fp8",
                           "--batch-size", "128", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "digits test split, 360 images" in lines[0]
    for name in ("fp32", "int8", "fp8"):
        assert any(line.split()[0] == name and "top-1" in line and "images/s" in line for line in lines[1:]), name
