"""int8 through PyTorch's own x86 path: PT2E quantization with torchao's X86 Inductor quantizer, compiled by
inductor to oneDNN int8 kernels (AMX-INT8 or VNNI where the CPU has them).

:func:`quantize_pt2e` returns an inference artifact, not a module of vit_fast's: the model exported with
``torch.export`` (batch dimension dynamic), its Linear and convolution layers quantized (weights int8 per
channel; activations static from calibration batches when given, else dynamic per call), then
``torch.compile``-d. It sits beside :func:`vit_fast.quantize`'s fbgemm module swap, which stays as it is; the CPU
path search (:mod:`vit_fast.cpu_paths`) times both and keeps the faster. Needs torchao (the ``cpu`` extra).
Compile under inductor freezing (``torch._inductor.config.freezing = True``): that is what folds the
quantized weights into prepacked oneDNN int8 GEMMs.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

MIN_TORCHAO = (0, 14)  # the first release that carries the PT2E quantization flow (torchao.quantization.pt2e)


def unavailable() -> str | None:
    """Why the PT2E int8 path cannot run here (torchao missing or too old), or None."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'vit_fast[cpu]'): the PT2E int8 path needs it"
    version = importlib.metadata.version("torchao")
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    if parts < MIN_TORCHAO:
        return f"torchao {version} is older than {'.'.join(map(str, MIN_TORCHAO))}, the first with PT2E quantization"
    return None


def quantize_pt2e(model: nn.Module, calibration: Sequence[torch.Tensor] | None = None, *,
                  example: torch.Tensor | None = None, compile: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` (left unchanged: a copy is exported) as a PT2E int8 artifact.

    Args:
        model: a vit_fast ViT in float32, on CPU.
        calibration: a few batches of real images (B, C, H, W) for static activation scales; None: activations
            are quantized dynamically, per call.
        example: an input to export with (default: the first calibration batch, else two random images).
        compile: ``torch.compile`` the quantized graph (False: the eager quantize/dequantize graph, for checks).

    Raises ``RuntimeError`` with the reason when torchao is missing (see :func:`unavailable`).
    """
    why = unavailable()
    if why is not None:
        raise RuntimeError(why)
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    calibration = [c.float() for c in calibration] if calibration else None
    if example is None:
        shape = (model.config.in_chans, *model.patch_embed.img_size)
        example = calibration[0] if calibration else torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    net = copy.deepcopy(model).float().eval()
    with torch.no_grad(), warnings.catch_warnings():
        # torchao's convert builds its zero points with torch.tensor(tensor) and warns each time
        warnings.filterwarnings("ignore", message=r".*torch\.tensor\(", category=UserWarning)
        exported = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=calibration is None))
        prepared = prepare_pt2e(exported, quantizer)
        for batch in calibration or [example]:
            prepared(batch)
        converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    _drop_dtype_asserts(converted)
    return torch.compile(converted, dynamic=False, fullgraph=True) if compile else converted


def _drop_dtype_asserts(graph: torch.fx.GraphModule) -> None:
    """torch.export pins the dtype each ``.to()`` saw at export (fp32) with an assertion node; under bf16 autocast
    (the int8+bf16 path) those dtypes are bf16, so the pinned graph would refuse to run. The assertions compute
    nothing: they go."""
    asserts = [n for n in graph.graph.nodes if n.target is torch.ops.aten._assert_tensor_metadata.default]
    for node in asserts:
        graph.graph.erase_node(node)
    if asserts:
        graph.recompile()


__all__ = ["quantize_pt2e", "unavailable"]
