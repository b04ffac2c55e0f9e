""":func:`export_model`, the Python side of ``vit-fast export`` (the command is :mod:`vit_fast.export_cli`): a model
as an ONNX file, a ``torch.export`` program or an AOTInductor package, each checked against eager PyTorch on fresh
inputs before it is written.

- ``onnx``: torch.onnx's dynamo exporter (``torch.onnx.export(..., dynamo=True)`` on the ``torch.export``
  program), run under onnxruntime for the check. Needs the ``export`` extra (onnx, onnxscript, onnxruntime).
- ``pt2``: ``torch.export.export``, then ``torch.export.save``; loads with ``torch.export.load(path).module()``.
- ``aoti``: the same program compiled ahead of time by AOTInductor for the model's device (CPU or CUDA), as a
  package ``torch._inductor.aoti_load_package(path)`` loads.

The batch is dynamic unless a fixed size is asked for. What the graph holds depends on the backend in force
while it is traced: PyTorch's own (aten) ops where the reference runs (``auto`` on CPU), vit_fast's custom ops
(``torch.ops.vit_fast.*``) where a kernel backend runs; the result says which, because a program holding custom
ops needs ``import vit_fast`` before it is loaded, and ONNX has no operator for them.

An artifact is built in a staging folder beside its destination, checked, and only then moved into place through
:func:`vit_fast.fileio.atomic_write`: an export that fails or does not match eager leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vit_fast.fileio import atomic_write

FORMATS: dict[str, str] = {"onnx": ".onnx", "pt2": ".pt2", "aoti": ".aoti.pt2"}  # format -> default suffix
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The largest max relative error (max|artifact - eager| / max|eager|) an export may show: exporters reorder
# sums and fuse ops, so an fp32 artifact differs from eager in its last bits (1e-7 to 1e-6 measured), a 16-bit one
# by a few units of its rounding.
RTOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
EXAMPLE_BATCH = 2  # traced with; a dynamic export is then checked at other sizes
DYNAMIC_CHECK_BATCHES = (1, 3)
# aten ops ONNX has no operator for, and why: a clear error before the exporter's own.
_NO_ONNX = {"aten._scaled_mm": "the fp8 GEMM (ONNX has no fp8 matrix product with per-row and per-column scales)"}


class ExportError(ValueError):
    """The model cannot be exported in the format asked for, or its export does not match eager: nothing was
    written."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and how it was checked."""

    path: str
    format: str
    dtype: torch.dtype
    device: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    batch_size: int | None  # None: dynamic
    checked_batches: tuple[int, ...]
    max_rel_error: float
    tolerance: float
    backend: str
    custom_ops: tuple[str, ...]  # the vit_fast custom ops the artifact calls; empty: PyTorch's own ops only
    files: tuple[str, ...]
    seconds: float

    @property
    def needs_vit_fast(self) -> bool:
        """Whether loading the artifact needs ``import vit_fast`` first (it calls vit_fast's custom ops)."""
        return bool(self.custom_ops)

    def describe(self) -> str:
        size = sum(os.path.getsize(f) for f in self.files if os.path.exists(f)) / 2**20
        batch = "batch dynamic" if self.batch_size is None else f"batch fixed at {self.batch_size}"
        name = str(self.dtype).replace("torch.", "")
        lines = [
            f"wrote {', '.join(self.files)} ({size:.1f} MiB) in {self.seconds:.1f} s",
            f"  format: {self.format} ({_HOW[self.format]})",
            f"  input: {name} (B, {', '.join(map(str, self.input_shape))}) on {self.device}, {batch}",
            f"  checked against eager on fresh inputs of batch {', '.join(map(str, self.checked_batches))}: max "
            f"relative error {self.max_rel_error:.2e} (tolerance {self.tolerance:.0e})",
        ]
        if self.custom_ops:
            lines.append(f"  contents: vit_fast custom ops ({', '.join(self.custom_ops)}; backend {self.backend}): "
                         "run `import vit_fast` before loading it, so that these ops are registered")
        else:
            lines.append(f"  contents: reference ops only (PyTorch's own aten ops; backend {self.backend}): loads "
                         "without vit_fast")
        lines.append(f"  load: {_LOAD[self.format].format(path=self.path)}")
        return "\n".join(lines)


_HOW = {"onnx": "torch.onnx dynamo exporter, checked under onnxruntime", "pt2": "torch.export + torch.export.save",
        "aoti": "AOTInductor package"}
_LOAD = {"onnx": "onnxruntime.InferenceSession({path!r})", "pt2": "torch.export.load({path!r}).module()",
         "aoti": "torch._inductor.aoti_load_package({path!r})"}


def custom_ops_in(program: torch.export.ExportedProgram) -> list[str]:
    """The vit_fast custom ops (``vit_fast::name``) a ``torch.export`` program calls, in its nested graphs too."""
    found = set()
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "vit_fast":
                found.add(f"vit_fast::{node.target._opname}")
    return sorted(found)


def _aten_ops_in(program: torch.export.ExportedProgram) -> set[str]:
    return {f"aten.{node.target._opname}" for node in program.graph.nodes
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "aten"}


def _input_shape(model: torch.nn.Module, input_size: Sequence[int] | None) -> tuple[int, int, int]:
    if input_size is not None:
        shape = tuple(int(v) for v in input_size)
    elif getattr(model, "config", None) is not None and hasattr(model.config, "img_size"):
        img = model.config.img_size
        shape = (model.config.in_chans, *((img, img) if isinstance(img, int) else img))
    else:
        shape = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or ())
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_size must be (C, H, W) of positive sizes; got {shape or None} (a model without a "
                         "ViTConfig or pretrained_cfg['input_size'] needs input_size=...)")
    return shape  # type: ignore[return-value]


def _prepared(model: torch.nn.Module, dtype: torch.dtype | None, device: torch.device | str | None
              ) -> torch.nn.Module:
    """The model in eval mode, in ``dtype`` on ``device``: a copy when either changes, so the caller's stays."""
    p = next(model.parameters(), None)
    ref = p if p is not None else next(model.buffers())
    same = (dtype is None or dtype == ref.dtype) and (device is None or torch.device(device) == ref.device)
    m = model if same else copy.deepcopy(model).to(device=device, dtype=dtype)
    return m.eval()


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), torch.float32)


def _require(*names: str) -> list:
    mods = []
    for name in names:
        try:
            mods.append(importlib.import_module(name))
        except ImportError as e:
            raise ImportError(f"ONNX export needs {', '.join(names)}: pip install 'vit_fast[export]' "
                              f"({name}: {e})") from e
    return mods


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:400] if lines else '(no message)'}"


def _what(quantization: dict | None) -> str:
    return f"an {quantization['format']}-quantized model" if quantization else "the model"  # int8, fp8: "an"


def _trace(model: torch.nn.Module, example: torch.Tensor, dynamic: bool, fmt: str,
           quantization: dict | None) -> torch.export.ExportedProgram:
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    try:
        return torch.export.export(model, (example,), dynamic_shapes=shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - whatever torch.export raises, the answer is: this cannot be exported
        why = _first_line(e)
        if quantization and quantization.get("format") == "int8":
            why = ("its Linear layers are fbgemm's dynamic int8 kernels on packed weights, which torch.export "
                   f"cannot trace (no fake-tensor support for quantized tensors; {why})")
        raise ExportError(f"{fmt}: cannot export {_what(quantization)}: torch.export failed, and every format "
                          f"starts from it: {why}") from e


Runner = Callable[[torch.Tensor], torch.Tensor]


def _build_pt2(program: torch.export.ExportedProgram, staged: str, **_: object) -> Runner:
    torch.export.save(program, staged)
    return torch.export.load(staged).module()


def _build_aoti(program: torch.export.ExportedProgram, staged: str, quantization: dict | None, **_: object
                ) -> Runner:
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    try:
        aoti_compile_and_package(program, package_path=staged)
    except Exception as e:  # noqa: BLE001 - a compiler failure of any kind means: no package
        raise ExportError(f"aoti: AOTInductor could not compile {_what(quantization)}: {_first_line(e)}") from e
    return aoti_load_package(staged)


def _build_onnx(program: torch.export.ExportedProgram, staged: str, example: torch.Tensor, dynamic: bool,
                custom_ops: Sequence[str], backend: str, quantization: dict | None) -> Runner:
    if custom_ops:
        raise ExportError(f"onnx: the traced graph calls vit_fast custom ops ({', '.join(custom_ops)}; backend "
                          f"{backend}), which ONNX has no operator for: export with the reference ops "
                          "(--backend reference, or vit_fast.set_backend('reference'))")
    lacking = {op: why for op, why in _NO_ONNX.items() if op in _aten_ops_in(program)}
    if lacking:
        raise ExportError(f"onnx: cannot export {_what(quantization)}: it computes with "
                          + "; ".join(f"{op}, {why}" for op, why in lacking.items())
                          + ". A pt2 export keeps it; or export the float model to ONNX")
    _, ort = _require("onnxscript", "onnxruntime")
    _require("onnx")
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    try:
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, dynamic_shapes=shapes, verbose=False)
        onnx_program.save(staged)  # weights over 2 GB go to external data beside it, in the staging folder too
    except Exception as e:  # noqa: BLE001 - the exporter's many error types all mean: no ONNX file
        raise ExportError(f"onnx: torch.onnx could not translate {_what(quantization)}: {_first_line(e)}") from e
    try:
        session = ort.InferenceSession(staged, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnx: onnxruntime cannot load the exported graph: {_first_line(e)}") from e
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

    return run


_BUILDERS = {"pt2": _build_pt2, "aoti": _build_aoti, "onnx": _build_onnx}


def max_rel_error(model: torch.nn.Module, run: Runner, shape: tuple[int, int, int], batches: Sequence[int],
                  dtype: torch.dtype, device: torch.device) -> float:
    """``max |run(x) - model(x)| / max |model(x)|`` over fresh random images ``x`` of each batch size (inf for
    a wrong shape or a non-finite value where eager is finite)."""
    gen = torch.Generator().manual_seed(secrets.randbits(63))  # fresh inputs: never the traced example
    worst = 0.0
    for b in batches:
        x = torch.randn(b, *shape, generator=gen).to(device=device, dtype=dtype)
        want = model(x).float()
        got = run(x)
        got = (got[0] if isinstance(got, (tuple, list)) else got).float().to(want.device)
        if got.shape != want.shape or not torch.equal(torch.isfinite(got), torch.isfinite(want)):
            return math.inf
        ok = torch.isfinite(want)
        scale = want[ok].abs().max().item() if ok.any() else 0.0
        err = (got - want)[ok].abs().max().item() if ok.any() else 0.0
        worst = max(worst, err / max(scale, 1e-30))
    return worst


def _format_of(path: str, fmt: str | None) -> str:
    if fmt is None:
        fmt = "onnx" if path.endswith(".onnx") else "pt2" if path.endswith(".pt2") else None
        if fmt is None:
            raise ValueError(f"format not given and {path!r} does not end in .onnx or .pt2: pass format= "
                             f"({', '.join(FORMATS)})")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    return fmt


def export_model(
    model: torch.nn.Module,
    path: str | os.PathLike,
    format: str | None = None,
    *,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
    rtol: float | None = None,
    input_size: Sequence[int] | None = None,
) -> ExportResult:
    """Export ``model`` (in eval mode) to ``path`` as ``format`` (``onnx``, ``pt2`` or ``aoti``; None: told by
    the suffix, ``.pt2`` meaning ``pt2``), check it against eager on fresh inputs, and write it.

    ``batch_size`` None makes the batch dynamic (traced at 2, checked at 1 and 3); a number fixes it. ``dtype`` and
    ``device`` convert a copy of the model (the AOTInductor package is compiled for that device). ``backend``
    (``reference``, ``triton``, ...) is set while tracing; None keeps the one in force. ``rtol``: the largest
    max relative error accepted (default :data:`RTOL` of the dtype). ``input_size``: (C, H, W) for a model
    without a ViTConfig. Raises :class:`ExportError` when the model cannot be exported so or the artifact does
    not match eager; nothing is written then.
    """
    path = os.fspath(path)
    fmt = _format_of(path, format)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None (dynamic); got {batch_size!r}")
    if os.path.isdir(path):
        raise ValueError(f"path {path} is a directory; give the file to write")
    shape = _input_shape(model, input_size)
    m = _prepared(model, dtype, device)
    dtype = _float_dtype(m)
    dev = next((t.device for t in (*m.parameters(), *m.buffers())), torch.device("cpu"))
    tolerance = RTOL.get(dtype, 1e-4) if rtol is None else float(rtol)
    quantization = getattr(model, "quantization", None)
    if fmt == "onnx" and dtype == torch.bfloat16:
        raise ExportError("onnx: bfloat16 cannot be checked: onnxruntime's CPU provider has no bfloat16 kernels "
                          "for these ops and numpy no bfloat16 arrays to feed it; export float32 or float16")
    from vit_fast import backends

    start = time.perf_counter()
    dynamic = batch_size is None
    with backends.set_backend(backend) if backend else contextlib.nullcontext(), torch.no_grad():
        in_force = backends.get_backend()
        example = torch.randn(batch_size or EXAMPLE_BATCH, *shape).to(device=dev, dtype=dtype)
        program = _trace(m, example, dynamic, fmt, quantization)
        ops = tuple(custom_ops_in(program))
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as work:
            staged = os.path.join(work, os.path.basename(path))
            run = _BUILDERS[fmt](program=program, staged=staged, example=example, dynamic=dynamic, custom_ops=ops,
                                 backend=in_force, quantization=quantization)
            batches = DYNAMIC_CHECK_BATCHES if dynamic else (batch_size,)
            try:
                err = max_rel_error(m, run, shape, batches, dtype, dev)
            except Exception as e:  # noqa: BLE001 - an artifact that cannot run is not written either
                raise ExportError(f"{fmt}: the exported artifact fails to run on fresh inputs ({_first_line(e)}); "
                                  f"{path} was not written") from e
            if not err <= tolerance:
                raise ExportError(f"{fmt}: the export does not match eager (max relative error {err:.3g} on fresh "
                                  f"inputs, tolerance {tolerance:.0e}); {path} was not written")
            files = _move_into_place(work, folder)
    return ExportResult(path=path, format=fmt, dtype=dtype, device=str(dev), input_shape=shape,
                        batch_size=batch_size, checked_batches=tuple(batches), max_rel_error=err,
                        tolerance=tolerance, backend=in_force, custom_ops=ops, files=tuple(files),
                        seconds=time.perf_counter() - start)


def _move_into_place(work: str, folder: str) -> list[str]:
    """Each checked file of the staging folder (an ONNX file's external data too) moved to ``folder`` through
    the atomic writer, the main file last so that it never points at data not yet in place."""
    names = sorted(os.listdir(work), key=lambda n: n.endswith((".onnx", ".pt2")))
    out = []
    for name in names:
        src, dst = os.path.join(work, name), os.path.join(folder, name)
        atomic_write(dst, lambda tmp, src=src: os.replace(src, tmp))
        out.append(dst)
    return out[::-1]
