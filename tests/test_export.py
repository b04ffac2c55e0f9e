"""``vit-fast export`` / ``export_model``: ONNX (under onnxruntime), torch.export (.pt2) and AOTInductor, each
checked against eager on fresh inputs before it is written; what the artifact holds; what cannot be exported."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vit_fast
from vit_fast import export as ex
from vit_fast.export import ExportError, export_model

REPO = Path(__file__).resolve().parents[1]
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
missing_onnx = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(bool(missing_onnx), reason=f"ONNX export needs the export extra (pip install "
                                f"'vit_fast[export]'); missing: {', '.join(missing_onnx)}")


def _tiny(**kw) -> vit_fast.VisionTransformer:
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=7)
    return vit_fast.create_model("vit_tiny_patch16_224", **{**cfg, **kw}).eval()


def _eager(model, x):
    with torch.no_grad():
        return model(x)


def _staging_left(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith((".export-", ".tmp-"))]


def test_pt2_from_the_command_line_runs_any_batch_and_goes_through_the_atomic_writer(tmp_path, capsys,
                                                                                     monkeypatch):
    from vit_fast.cli import main

    written = []
    real = ex.atomic_write
    monkeypatch.setattr(ex, "atomic_write", lambda path, data: (written.append(os.fspath(path)), real(path, data)))
    model = _tiny()
    model.save_pretrained(str(tmp_path / "dir"))
    assert main(["export", str(tmp_path / "dir"), "--format", "pt2", "--out", str(tmp_path / "d.pt2")]) == 0
    out = capsys.readouterr().out
    for text in ("model directory", "batch dynamic", "checked against eager on fresh inputs of batch 1, 3",
                 "max relative error", "reference ops only"):
        assert text in out
    assert written == [str(tmp_path / "d.pt2")] and _staging_left(tmp_path) == []
    program = torch.export.load(str(tmp_path / "d.pt2")).module()
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(program(x), _eager(model, x))


def test_a_checkpoint_file_with_fixed_batch_and_dtype_from_the_command_line(tmp_path, capsys, monkeypatch):
    """MODEL as a checkpoint file that records no config (its preset named by --model), --batch-size and --dtype,
    and --out left to its default: the checkpoint's name with the format's suffix, in the working directory."""
    from safetensors.torch import save_file

    from vit_fast.cli import main

    model = vit_fast.create_model("vit_nano_patch2_8", num_classes=4).eval()
    save_file(model.state_dict(), str(tmp_path / "ckpt.safetensors"))
    monkeypatch.chdir(tmp_path)
    assert main(["export", "ckpt.safetensors", "--model", "vit_nano_patch2_8", "--format", "pt2", "--batch-size",
                 "3", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    for text in ("checkpoint ckpt.safetensors", "bfloat16 (B, 1, 8, 8)", "batch fixed at 3",
                 "fresh inputs of batch 3"):
        assert text in out
    program = torch.export.load(str(tmp_path / "ckpt.pt2")).module()
    x = torch.randn(3, 1, 8, 8, dtype=torch.bfloat16)
    want = _eager(model.to(torch.bfloat16), x)
    assert want.shape == (3, 4)
    torch.testing.assert_close(program(x), want)


@pytest.mark.slow
def test_pt2_fixed_batch_and_dtype(tmp_path):
    model = _tiny()
    result = export_model(model, tmp_path / "m.pt2", "pt2", batch_size=4, dtype=torch.bfloat16)
    assert result.batch_size == 4 and result.checked_batches == (4,) and result.dtype == torch.bfloat16
    assert "batch fixed at 4" in result.describe()
    assert model.pos_embed.dtype == torch.float32  # the caller's model is not converted
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert program(torch.randn(4, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(Exception, match="4"):  # the batch was fixed at 4
        program(torch.randn(3, 3, 32, 32, dtype=torch.bfloat16))


@needs_onnx
def test_onnx_dynamic_batch_runs_under_onnxruntime(tmp_path):
    import onnx
    import onnxruntime

    model = _tiny()
    result = export_model(model, tmp_path / "m.onnx")
    assert result.format == "onnx" and result.max_rel_error <= 1e-4
    graph_input = onnx.load(str(tmp_path / "m.onnx")).graph.input[0]
    batch_dim = graph_input.type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: dynamic batch
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(6, 3, 32, 32)
    out = torch.from_numpy(session.run(None, {graph_input.name: x.numpy()})[0])
    torch.testing.assert_close(out, _eager(model, x), atol=1e-5, rtol=1e-4)


def test_onnx_refuses_bfloat16_with_the_reason(tmp_path):
    with pytest.raises(ExportError, match="bfloat16"):
        export_model(_tiny(), tmp_path / "m.onnx", dtype=torch.bfloat16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_export_with_custom_ops_says_it_needs_vit_fast(tmp_path):
    """Under the triton backend (the interpreter, on CPU) the graph calls vit_fast's custom ops: a pt2 says it
    needs vit_fast, ONNX refuses them."""
    model = _tiny()
    result = export_model(model, tmp_path / "t.pt2", backend="triton")
    assert result.backend == "triton" and result.needs_vit_fast
    assert any(op.startswith("vit_fast::attention") for op in result.custom_ops)
    assert "import vit_fast" in result.describe()
    assert vit_fast.get_backend() == "auto"  # the backend was set for the export only
    if not missing_onnx:
        with pytest.raises(ExportError, match=r"vit_fast::.*reference"):
            export_model(model, tmp_path / "t.onnx", backend="triton")


@pytest.mark.subprocess
def test_a_pt2_with_custom_ops_loads_only_after_import_vit_fast(tmp_path):
    """What describe() tells the user, checked in fresh interpreters: without vit_fast the program's
    torch.ops.vit_fast.* cannot be deserialized; after `import vit_fast` it loads and gives eager's outputs."""
    model = vit_fast.create_model("vit_nano_patch2_8", depth=1).eval()
    result = export_model(model, tmp_path / "t.pt2", backend="triton")
    assert result.needs_vit_fast
    x = torch.randn(2, 1, 8, 8)
    torch.save({"x": x, "want": _eager(model, x)}, tmp_path / "io.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the Triton kernels the program calls, on CPU

    def load(imports: str) -> subprocess.CompletedProcess:
        code = (f"import sys, {imports}; io = torch.load(sys.argv[2]); out = torch.export.load(sys.argv[1])"
                ".module()(io['x']); torch.testing.assert_close(out, io['want'], atol=1e-5, rtol=1e-4)")
        return subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.pt2"), str(tmp_path / "io.pt")],
                              capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

    bare = load("torch")
    assert bare.returncode != 0 and "deserializ" in bare.stderr
    with_vit_fast = load("torch, vit_fast")
    assert with_vit_fast.returncode == 0, with_vit_fast.stderr[-3000:]


def test_an_export_that_does_not_match_eager_is_not_written(tmp_path, monkeypatch):
    real = ex._BUILDERS["pt2"]

    def off_by_a_little(**kw):
        run = real(**kw)
        return lambda x: run(x) * (1 + 1e-3)

    monkeypatch.setitem(ex._BUILDERS, "pt2", off_by_a_little)
    with pytest.raises(ExportError, match=r"not match eager \(max relative error 0\.001.*m\.pt2 was not written"):
        export_model(_tiny(), tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []  # nothing, not even the staging folder


@pytest.mark.slow
def test_fp8_models_export_where_the_format_holds_them(tmp_path):
    model = _tiny()
    fp8 = vit_fast.quantize(model, "fp8")
    result = export_model(fp8, tmp_path / "q8.pt2")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.export.load(str(tmp_path / "q8.pt2")).module()(x), _eager(fp8, x))
    assert result.max_rel_error <= result.tolerance
    if not missing_onnx:
        with pytest.raises(ExportError, match=r"onnx: cannot export an fp8-quantized model.*_scaled_mm"):
            export_model(fp8, tmp_path / "q8.onnx")


def test_bad_arguments_name_themselves(tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(_tiny(), tmp_path / "m.pt2", "tflite")
    with pytest.raises(ValueError, match="pass format="):
        export_model(_tiny(), tmp_path / "m.bin")
    with pytest.raises(ValueError, match="batch_size"):
        export_model(_tiny(), tmp_path / "m.pt2", batch_size=0)
    with pytest.raises(ValueError, match="input_size"):
        export_model(torch.nn.Linear(2, 2), tmp_path / "m.pt2")


def test_cli_refuses_an_int8_model_in_one_line_saying_why(tmp_path, capsys):
    from vit_fast.cli import main

    with pytest.warns(UserWarning, match="freshly initialized"):  # a preset, as `vit-fast predict` takes one
        status = main(["export", "vit_nano_patch2_8", "--format", "pt2", "--quantize", "int8", "--out",
                       str(tmp_path / "q.pt2")])
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("vit-fast export: error: pt2: cannot export an int8-quantized model")
    assert "fbgemm" in err and err.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_the_export_extra_holds_what_onnx_export_imports():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    def names(extra: str) -> set[str]:
        return {req.split(";")[0].split(">")[0].split("=")[0].split("[")[0].strip() for req in extras[extra]}

    assert set(ONNX_MODULES) <= names("export")
    assert names("export") <= names("test")  # the README's test install runs the ONNX tests instead of skipping them


@pytest.mark.subprocess
def test_aoti_package_from_the_command_line(tmp_path):
    """AOTInductor compiles C++ for a minute on 2 cores: the smallest model, at 8x8 pixels, in a subprocess
    (`vit-fast export` as a user runs it)."""
    model = vit_fast.create_model("vit_nano_patch2_8", depth=1)
    model.save_pretrained(str(tmp_path / "dir"))
    out = tmp_path / "m.aoti.pt2"
    proc = subprocess.run([sys.executable, "-m", "vit_fast.cli", "export", str(tmp_path / "dir"), "--format", "aoti",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AOTInductor package" in proc.stdout and "max relative error" in proc.stdout
    runner = torch._inductor.aoti_load_package(str(out))
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(runner(x), _eager(model.eval(), x), atol=1e-5, rtol=1e-4)


@pytest.mark.cuda
def test_aoti_package_for_cuda(tmp_path):
    model = _tiny()
    result = export_model(model, tmp_path / "m.aoti.pt2", "aoti", device="cuda")
    assert result.device.startswith("cuda") and result.max_rel_error <= result.tolerance
    runner = torch._inductor.aoti_load_package(str(tmp_path / "m.aoti.pt2"))
    x = torch.randn(3, 3, 32, 32, device="cuda")
    torch.testing.assert_close(runner(x), _eager(model.cuda(), x), atol=1e-4, rtol=1e-3)


def test_the_python_api_is_top_level():
    import vit_fast

    assert vit_fast.export_model is export_model and "export_model" in vit_fast.__all__
