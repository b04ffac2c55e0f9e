"""vit_fast: a Vision Transformer for PyTorch whose hot paths run on Triton and CUDA C++ kernels."""

__version__ = "0.1.0"

from vit_fast import ops  # noqa: E402
from vit_fast.backends import explain, get_backend, set_backend  # noqa: E402

__all__ = ["__version__", "ops", "explain", "get_backend", "set_backend"]
