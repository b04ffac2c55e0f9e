"""The ops the model and the quantized model compute through, each declared once in its module as a
:class:`~vit_fast.ops.spec.OpSpec`: a pure-PyTorch reference ``<op>_ref`` and a public ``<op>`` that checks its
inputs and runs the backend :mod:`vit_fast.backends` picks.

Importing this package declares every op, the quantized-inference ones too: the dispatcher's registry is data
fixed when vit_fast is imported, not changed by the first :func:`vit_fast.quantize`.
"""

from vit_fast.ops.attention import (  # noqa: I001 - the model's ops first: the registry's order
    attention,
    attention_fp8,
    attention_fp8_ref,
    attention_packed,
    attention_packed_ref,
    attention_ref,
)
from vit_fast.ops.layer_norm import layer_norm, layer_norm_fp8, layer_norm_fp8_ref, layer_norm_ref
from vit_fast.ops.layernorm_mlp import layernorm_mlp, layernorm_mlp_ref
from vit_fast.ops.patch_embed import patch_embed, patch_embed_ref
from vit_fast.ops._fp8 import E4M3_MAX, FP8
from vit_fast.ops.quantize_rows import quantize_rows, quantize_rows_ref
from vit_fast.ops.scaled_linear import scaled_linear, scaled_linear_ref
from vit_fast.ops.int8_linear import int8_linear, int8_linear_ref

__all__ = [
    "E4M3_MAX",
    "FP8",
    "attention",
    "attention_fp8",
    "attention_fp8_ref",
    "attention_packed",
    "attention_packed_ref",
    "attention_ref",
    "int8_linear",
    "int8_linear_ref",
    "layer_norm",
    "layer_norm_fp8",
    "layer_norm_fp8_ref",
    "layer_norm_ref",
    "layernorm_mlp",
    "layernorm_mlp_ref",
    "patch_embed",
    "patch_embed_ref",
    "quantize_rows",
    "quantize_rows_ref",
    "scaled_linear",
    "scaled_linear_ref",
]
