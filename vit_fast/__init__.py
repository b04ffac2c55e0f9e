"""vit_fast: a Vision Transformer for PyTorch whose hot paths run on Triton and CUDA C++ kernels.

Public names: :class:`ViTConfig`, :class:`VisionTransformer`, :func:`create_model`, :func:`list_models`,
:func:`from_timm`, :func:`load_checkpoint`, :func:`set_backend` / :func:`use_backend`, :func:`explain`,
:func:`attention_maps`, :func:`quantize` (with :func:`save_quantized` / :func:`load_quantized`),
:func:`optimize_for_inference`, :func:`export_model` and the ops in :mod:`vit_fast.ops`.
"""

__version__ = "0.1.0"

from vit_fast import ops  # noqa: E402
from vit_fast.attn_maps import attention_maps  # noqa: E402
from vit_fast.backends import BackendUnavailableError, get_backend, set_backend, use_backend  # noqa: E402
from vit_fast.config import ViTConfig, list_models  # noqa: E402
from vit_fast.explanation import explain  # noqa: E402
from vit_fast.export import export_model  # noqa: E402
from vit_fast.factory import create_model, from_pretrained, from_timm, from_torchvision  # noqa: E402
from vit_fast.model import VisionTransformer  # noqa: E402
from vit_fast.predictor import optimize_for_inference  # noqa: E402
from vit_fast.quantization import load_quantized, quantize, save_quantized  # noqa: E402
from vit_fast.weights import load_checkpoint, resample_pos_embed  # noqa: E402

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "ViTConfig",
    "VisionTransformer",
    "attention_maps",
    "create_model",
    "explain",
    "export_model",
    "from_pretrained",
    "from_timm",
    "from_torchvision",
    "get_backend",
    "list_models",
    "load_checkpoint",
    "load_quantized",
    "optimize_for_inference",
    "quantize",
    "ops",
    "resample_pos_embed",
    "save_quantized",
    "set_backend",
    "use_backend",
]
