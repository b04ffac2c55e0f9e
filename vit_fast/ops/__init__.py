"""The four ops the model computes through. Each has a pure-PyTorch reference ``<op>_ref`` and a public
``<op>`` that validates its inputs and runs the backend chosen by :mod:`vit_fast.backends`."""

from vit_fast.ops.attention import attention, attention_ref
from vit_fast.ops.layer_norm import layer_norm, layer_norm_ref
from vit_fast.ops.layernorm_mlp import layernorm_mlp, layernorm_mlp_ref
from vit_fast.ops.patch_embed import patch_embed, patch_embed_ref

__all__ = [
    "attention",
    "attention_ref",
    "layer_norm",
    "layer_norm_ref",
    "layernorm_mlp",
    "layernorm_mlp_ref",
    "patch_embed",
    "patch_embed_ref",
]
