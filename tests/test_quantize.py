"""Quantized inference: the FP8 ops (reference and the Triton producers through the interpreter), the fp8 and int8
models against the fp32 model on the same weights, explain, save/load round trips, bad requests, and
``vit-fast eval``.

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
import torch.nn.functional as F
from helpers import gemm_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from vit_fast.tolerance import assert_close

FP8_BOUND, INT8_BOUND = 0.15, 0.1


def _ops():
    from vit_fast.ops import scaled_linear

    return scaled_linear


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=2).eval()
    return m, torch.randn(3, 3, 32, 32)


# ---- ops ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", [(1, 16), (7, 80), (50, 192)])
def test_quantize_rows_reference_and_triton(shape, gelu):
    q = _ops()
    x = torch.randn(*shape) * 3
    target = F.gelu(x) if gelu else x
    ref_q, ref_s = q.quantize_rows_ref(x, gelu=gelu)
    assert ref_q.dtype == q.FP8 and ref_s.shape == (shape[0],)
    torch.testing.assert_close(ref_s, target.abs().amax(1) / q.E4M3_MAX)
    deq = ref_q.float() * ref_s[:, None]
    assert ((deq - target).abs() <= target.abs().amax(1, keepdim=True) * 2**-4 + 1e-6).all()  # half an e4m3 ulp
    if "triton" not in backends.implemented("quantize_rows"):
        pytest.skip(backends.unavailable("triton") or "triton not implemented")
    with vit_fast.set_backend("triton"), backends.trace() as launches:
        tq, ts = q.quantize_rows(x, gelu=gelu)
    assert {(r.op, r.backend) for r in launches} == {("quantize_rows", "triton")}
    torch.testing.assert_close(ts, ref_s, rtol=1e-5, atol=1e-12)
    # ties of the rounding may go the other way: at most one e4m3 step apart, and rarely
    diff = (tq.float() * ts[:, None] - deq).abs()
    assert (diff <= target.abs().amax(1, keepdim=True) * 2**-3 + 1e-6).all()
    assert (tq.float() != ref_q.float()).float().mean() < 0.01


@pytest.mark.parametrize("shape", [(1, 16), (7, 80), (197, 64)])
def test_layer_norm_fp8_triton_matches_reference(shape):
    q = _ops()
    m, c = shape
    x, w, b = torch.randn(m, c) * 2 + 1, torch.randn(c), torch.randn(c)
    ref_q, ref_s = q.layer_norm_fp8_ref(x, w, b, eps=1e-6)
    y = F.layer_norm(x, (c,), w, b, 1e-6)
    assert (ref_q.float() * ref_s[:, None] - y).abs().max() <= y.abs().max() * 2**-4 + 1e-6
    if "triton" not in backends.implemented("layer_norm_fp8"):
        pytest.skip(backends.unavailable("triton") or "triton not implemented")
    with vit_fast.set_backend("triton"):
        tq, ts = q.layer_norm_fp8(x, w, b, eps=1e-6)
    torch.testing.assert_close(ts, ref_s, rtol=1e-5, atol=1e-12)
    assert ((tq.float() - ref_q.float()).abs() > 0).float().mean() < 0.01


def test_layer_norm_kernel_keeps_its_plain_variant():
    """The fp8 variant is a constexpr of the same kernel: the plain forward still writes the LayerNorm."""
    if "triton" not in backends.implemented("layer_norm"):
        pytest.skip(backends.unavailable("triton") or "triton not implemented")
    x, w, b = torch.randn(9, 48), torch.randn(48), torch.randn(48)
    with vit_fast.set_backend("triton"):
        y = vit_fast.ops.layer_norm(x, w, b, eps=1e-6)
    assert_close(y, F.layer_norm(x, (48,), w, b, 1e-6), F.layer_norm(x.double(), (48,), w.double(), b.double(), 1e-6))


def test_scaled_linear_applies_row_and_channel_scales():
    q = _ops()
    x, w, bias = torch.randn(13, 64), torch.randn(48, 64) * 0.1, torch.randn(48)
    xq, xs = q.quantize_rows_ref(x)
    wq, ws = q.quantize_rows_ref(w)  # per output channel = per row of the (N, K) weight
    out = q.scaled_linear(xq, xs, wq, ws, bias, out_dtype=torch.float32)
    emulated = q.scaled_linear_ref(xq, xs, wq, ws, bias, out_dtype=torch.float32, upcast=True)
    torch.testing.assert_close(out, emulated, rtol=1e-4, atol=1e-4)  # _scaled_mm == the dequantized product
    assert _rel(out, F.linear(x, w, bias)) < 0.06
    with pytest.raises(ValueError, match="x_scale"):
        q.scaled_linear(xq, xs[:-1], wq, ws, bias, out_dtype=torch.float32)


@pytest.mark.parametrize("rowwise", [True, False], ids=["scaled_mm", "fp32_product"])
def test_scaled_linear_reference_paths_agree_on_edge_shapes(monkeypatch, rowwise):
    """Both CPU paths of the reference (torch._scaled_mm where it takes row-wise scales, the exact fp32 product
    where it does not, as on torch 2.11): one row, one output, strided size-1 scales, an empty batch."""
    from vit_fast.ops import scaled_linear as sl

    if rowwise and not sl._CPU_ROWWISE:
        pytest.skip("this torch's CPU _scaled_mm takes per-tensor scales only")
    monkeypatch.setattr(sl, "_CPU_ROWWISE", rowwise)
    q = _ops()
    for m, n in ((1, 1), (1, 24), (9, 1), (0, 24)):
        xq, xs = q.quantize_rows_ref(torch.randn(m, 32))
        wq, ws = q.quantize_rows_ref(torch.randn(n, 32) * 0.1)
        xs, ws = torch.stack([xs, xs], -1).view(-1)[::2], torch.stack([ws, ws], -1).view(-1)[::2]  # stride 2
        out = q.scaled_linear_ref(xq, xs, wq, ws, None, out_dtype=torch.bfloat16)
        exact = q.scaled_linear_ref(xq, xs, wq, ws, None, out_dtype=torch.float32, upcast=True)
        assert out.shape == (m, n) and out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), exact, rtol=2**-8, atol=1e-6)  # one bf16 rounding of the product


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_scaled_linear_with_a_scale_per_row_and_head(backend):
    """x_scale (M, G): each group of K / G columns has its own scale, as attention_fp8 emits per (token, head)."""
    if backend not in backends.implemented("scaled_linear"):
        pytest.skip(backends.unavailable("triton") or "triton not implemented")
    q = _ops()
    heads, d = 3, 32
    x = torch.randn(13, heads, d) * torch.tensor([0.01, 1.0, 100.0])[:, None]  # heads far apart in magnitude
    xq, xs = q.quantize_rows_ref(x.reshape(-1, d))
    xq, xs = xq.view(13, heads * d), xs.view(13, heads)
    w, bias = torch.randn(40, heads * d) * 0.1, torch.randn(40)
    wq, ws = q.quantize_rows_ref(w)
    with vit_fast.set_backend(backend), backends.trace() as launches:
        out = q.scaled_linear(xq, xs, wq, ws, bias, out_dtype=torch.float32)
    assert {(r.op, r.backend) for r in launches} == {("scaled_linear", backend)}
    dequantized = (xq.float().view(13, heads, d) * xs[..., None]).view(13, -1)
    gemm_close(out, F.linear(dequantized, wq.float() * ws[:, None], bias), "out")
    # one scale per row would have flushed the small head to zero: per head it survives
    assert _rel(out, F.linear(x.reshape(13, -1), w, bias)) < 0.06


def test_attention_fp8_emits_a_scale_per_token_and_head():
    q8 = _ops()
    if "triton" not in backends.implemented("attention_fp8"):
        pytest.skip(backends.unavailable("triton") or "triton not implemented")
    B, H, N, D = 2, 3, 37, 64
    q, k, v = torch.randn(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    want = vit_fast.ops.attention(q, k, v).transpose(1, 2).reshape(B * N, H, D)
    for backend in ("reference", "triton"):
        with vit_fast.set_backend(backend), backends.trace() as launches:
            out, scale = q8.attention_fp8(q, k, v)
        assert {(r.op, r.backend) for r in launches} == {("attention_fp8", backend)}
        assert out.shape == (B * N, H * D) and out.dtype == torch.float8_e4m3fn and scale.shape == (B * N, H)
        torch.testing.assert_close(scale, want.abs().amax(-1) / 448, rtol=1e-5, atol=0)
        got = out.float().view(B * N, H, D) * scale[..., None]
        assert ((got - want).abs() <= want.abs().amax(-1, keepdim=True) * 2**-4).all()  # half an e4m3 step


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
    through the reference route (a quantize pass, then the row-wise GEMM), within the same bound."""
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
            assert any(w.endswith("attn.proj: quantize_rows") for w in picked), picked  # the separate pass


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
        tq, ts = _ops().layer_norm_fp8(rows, w, b)
        gq, gs = _ops().quantize_rows(rows, gelu=True)
    rq, rs = _ops().layer_norm_fp8_ref(rows, w, b)
    torch.testing.assert_close(ts, rs, rtol=1e-2, atol=1e-6)
    assert (tq.float() != rq.float()).float().mean() < 0.02
    torch.testing.assert_close(gs, _ops().quantize_rows_ref(rows, gelu=True)[1], rtol=1e-2, atol=1e-6)


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


# ---- the FP8 GEMM on shapes nobody picked -----------------------------------------------------------------------


@st.composite
def _gemm_shapes(draw):
    groups = draw(st.sampled_from([1, 2, 3, 5]))
    k = groups * 16 * draw(st.integers(1, 3))  # a group is a multiple of 16 columns, as cuBLASLt's K is
    return (draw(st.integers(1, 70)), k, draw(st.integers(1, 70)), groups, draw(st.booleans()),
            draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])), draw(st.integers(0, 2**16)))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_gemm_shapes())
def test_scaled_linear_triton_matches_the_dequantized_product(case):
    """Any M and N (odd, below one tile), K in 16-column groups, with and without bias, each output dtype: the
    Triton FP8 GEMM equals the fp64 product of the dequantized operands up to the output dtype's rounding."""
    if "triton" not in backends.implemented("scaled_linear"):
        pytest.skip(backends.unavailable("triton") or "triton not implemented")
    m, k, n, groups, has_bias, out_dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    q = _ops()
    xq, xs = q.quantize_rows_ref(torch.randn(m * groups, k // groups, generator=g))
    xq, xs = xq.reshape(m, k), xs.view(m, groups).contiguous()
    wq, ws = q.quantize_rows_ref(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g).to(out_dtype) if has_bias else None
    with vit_fast.set_backend("triton"):
        out = q.scaled_linear(xq, xs if groups > 1 else xs[:, 0], wq, ws, bias, out_dtype=out_dtype)
    x64 = (xq.double().view(m, groups, -1) * xs.double()[..., None]).view(m, k)
    want = x64 @ (wq.double() * ws.double()[:, None]).t() + (0 if bias is None else bias.double())
    assert out.dtype == out_dtype and out.shape == (m, n)
    step = {torch.float32: 2**-20, torch.float16: 2**-10, torch.bfloat16: 2**-7}[out_dtype]
    assert ((out.double() - want).abs() <= step * (want.abs() + want.abs().max())).all()
