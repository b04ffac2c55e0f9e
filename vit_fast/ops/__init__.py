"""The four ops the model computes through. Each has a pure-PyTorch reference ``<op>_ref`` and a public
``<op>`` that validates its inputs and runs the backend chosen by :mod:`vit_fast.backends`.

The quantized-inference ops (``quantize_rows``, ``layer_norm_fp8``, ``scaled_linear``, ``int8_linear``) live in
:mod:`vit_fast.ops.scaled_linear`, imported here so they are declared with the others at import: the
dispatcher's registry is data fixed when vit_fast is imported, not changed by the first :func:`vit_fast.quantize`.
"""

from vit_fast.ops.attention import (  # noqa: I001 - the model's ops first: the registry's order
    attention,
    attention_packed,
    attention_packed_ref,
    attention_ref,
)
from vit_fast.ops.layer_norm import layer_norm, layer_norm_ref
from vit_fast.ops.layernorm_mlp import layernorm_mlp, layernorm_mlp_ref
from vit_fast.ops.patch_embed import patch_embed, patch_embed_ref

# Imported as the module, not its functions: a function named scaled_linear here would hide the module.
from vit_fast.ops import scaled_linear

__all__ = [
    "attention",
    "attention_packed",
    "attention_packed_ref",
    "attention_ref",
    "layer_norm",
    "layer_norm_ref",
    "layernorm_mlp",
    "layernorm_mlp_ref",
    "patch_embed",
    "patch_embed_ref",
    "scaled_linear",
]
