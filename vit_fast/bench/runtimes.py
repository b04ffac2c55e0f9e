"""Other CPU runtimes beside vit_fast in the model benchmark: ONNX Runtime (fp32, and int8 by its dynamic
quantization) and OpenVINO (f32, and its bf16 inference-precision hint), all from one ONNX export of timm's same
model. Optional: each row is skipped, with the reason, where its package is missing (``pip install
'vit_fast[cpu]'``); the ONNX file lives in a temporary folder for the row's life."""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

from vit_fast.bench.providers import Provider
from vit_fast.fileio import atomic_write

QUICK_SKIP = "ONNX export and runtime builds skipped in --quick (seconds each); the full run measures them"


def _missing(*modules: str) -> str | None:
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{', '.join(gone)} not installed (pip install 'vit_fast[cpu]')" if gone else None


class _Session(nn.Module):
    """An ONNX model run by another runtime, as a module: fp32 images in, fp32 outputs out."""

    def __init__(self, run: Callable, folder: tempfile.TemporaryDirectory) -> None:
        super().__init__()
        self.run, self.folder = run, folder  # the folder (and its ONNX files) lives as long as the session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x.detach().float().contiguous().numpy()))


def export_onnx(model: nn.Module, images_shape: tuple[int, ...], folder: str) -> str:
    """``model`` as ``folder/model.onnx``, the batch dimension dynamic (TorchScript-based exporter: seconds, where
    the dynamo one takes 4x as long)."""
    path = os.path.join(folder, "model.onnx")
    example = torch.randn(2, *images_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        atomic_write(path, lambda tmp: torch.onnx.export(
            model.eval(), (example,), tmp, dynamo=False, input_names=["images"], output_names=["out"],
            dynamic_axes={"images": {0: "batch"}, "out": {0: "batch"}}))
    return path


def _onnx_runtime(int8: bool, timm_copy: Callable) -> Callable:
    def build(cfg: object, base: nn.Module) -> nn.Module:
        import onnxruntime as ort

        folder = tempfile.TemporaryDirectory(prefix="vit-fast-onnx-")
        path = export_onnx(timm_copy(cfg, base), _shape(cfg), folder.name)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            q = os.path.join(folder.name, "model.int8.onnx")
            atomic_write(q, lambda tmp: quantize_dynamic(path, tmp, weight_type=QuantType.QInt8))
            path = q
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return _Session(lambda x: session.run(None, {"images": x})[0], folder)

    return build


def _openvino(bf16: bool, timm_copy: Callable) -> Callable:
    def build(cfg: object, base: nn.Module) -> nn.Module:
        import openvino as ov

        folder = tempfile.TemporaryDirectory(prefix="vit-fast-onnx-")
        path = export_onnx(timm_copy(cfg, base), _shape(cfg), folder.name)
        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
                                                         "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        return _Session(lambda x: compiled(x)[0], folder)

    return build


def _shape(cfg: object) -> tuple[int, int, int]:
    p = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
    return cfg.in_chans, cfg.grid_size[0] * p, cfg.grid_size[1] * p


def providers(*, quick: bool, no_bf16: str | None, timm_copy: Callable, timm_skip: str | None) -> list[Provider]:
    """ONNX Runtime fp32 and int8, OpenVINO f32 and bf16 (peers: shown beside, not what speedups are over)."""
    ort_skip = QUICK_SKIP if quick else timm_skip or _missing("onnx", "onnxruntime")
    ov_skip = QUICK_SKIP if quick else timm_skip or _missing("onnx", "openvino")
    skip = "inference only: another runtime"
    return [Provider("onnxruntime:fp32", "peer", _onnx_runtime(False, timm_copy), skip=ort_skip, train_skip=skip),
            Provider("onnxruntime:int8", "peer", _onnx_runtime(True, timm_copy), skip=ort_skip, train_skip=skip),
            Provider("openvino:f32", "peer", _openvino(False, timm_copy), skip=ov_skip, train_skip=skip),
            Provider("openvino:bf16", "peer", _openvino(True, timm_copy), skip=ov_skip or no_bf16, train_skip=skip)]
