"""Weights: timm models and checkpoints, Hugging Face ViT checkpoints, position-embedding resampling.

timm's layout is vit_fast's own (same parameter names), so a timm state dict loads unchanged. Hugging Face
``ViTModel`` / ``ViTForImageClassification`` checkpoints are converted: separate query/key/value projections
are fused into ``qkv`` and names are mapped, for both the classic layout of the files published on the Hub
(``vit.encoder.layer.N.attention.attention.query``) and the one current transformers releases save
(``vit.layers.N.attention.q_proj``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping

import torch

from vit_fast.config import ViTConfig
from vit_fast.model import VisionTransformer
from vit_fast.pos_embed import resample_pos_embed

__all__ = ["config_from_timm", "convert_hf_state_dict", "load_checkpoint", "read_state_dict", "resample_pos_embed"]

HF_LAYER_NORM_EPS = 1e-12  # transformers' ViTConfig default


# ----------------------------------------------------------------------------------------------- timm

_TIMM_UNSUPPORTED = [  # (attribute test, what it is): features vit_fast's ViT does not have
    (lambda m: getattr(m, "attn_pool", None) is not None, "attention pooling (global_pool 'map'/'prr')"),
    (lambda m: getattr(m, "pos_embed", None) is None, "no position embedding"),
    (lambda m: getattr(m, "pool_include_prefix", False), "pool_include_prefix=True"),
    (lambda m: not isinstance(getattr(m.patch_embed, "norm", torch.nn.Identity()), torch.nn.Identity),
     "a norm inside the patch embedding"),
    (lambda m: (m.patch_embed.proj.bias is None) != (not isinstance(m.norm_pre, torch.nn.Identity)),
     "a patch-projection bias that does not follow pre_norm"),
    (lambda m: not isinstance(getattr(m, "patch_drop", torch.nn.Identity()), torch.nn.Identity), "patch dropout"),
]
_TIMM_BLOCK_UNSUPPORTED = [
    ("ls1", "layer scale (init_values)"),
    ("ls2", "layer scale (init_values)"),
]


def _square_or_pair(v: tuple[int, int]) -> int | tuple[int, int]:
    return int(v[0]) if v[0] == v[1] else (int(v[0]), int(v[1]))


def config_from_timm(timm_model: torch.nn.Module) -> ViTConfig:
    """The :class:`ViTConfig` of a timm ``VisionTransformer`` instance; raises for features vit_fast lacks."""
    m = timm_model
    for test, what in _TIMM_UNSUPPORTED:
        if test(m):
            raise ValueError(f"timm model uses {what}, which vit_fast's VisionTransformer does not support")
    blk = m.blocks[0]
    for name, what in _TIMM_BLOCK_UNSUPPORTED:
        if not isinstance(getattr(blk, name, torch.nn.Identity()), torch.nn.Identity):
            raise ValueError(f"timm model uses {what}, which vit_fast's VisionTransformer does not support")
    attn = blk.attn
    for name in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, name, torch.nn.Identity()), torch.nn.Identity):
            raise ValueError(f"timm model uses attention {name}, which vit_fast does not support")
    if not isinstance(getattr(blk.mlp, "norm", torch.nn.Identity()), torch.nn.Identity):
        raise ValueError("timm model uses a norm inside the MLP (scale_mlp_norm), which vit_fast does not support")
    act = getattr(blk.mlp, "act", None)
    if not (isinstance(act, torch.nn.GELU) and act.approximate == "none"):
        raise ValueError(f"timm model's MLP activation is {act!r}; vit_fast computes exact GELU")
    pool = m.global_pool
    has_fc_norm = not isinstance(m.fc_norm, torch.nn.Identity)
    has_norm = not isinstance(m.norm, torch.nn.Identity)
    proj = m.patch_embed.proj
    return ViTConfig(
        img_size=_square_or_pair(m.patch_embed.img_size),
        patch_size=_square_or_pair(m.patch_embed.patch_size),
        in_chans=proj.in_channels,
        num_classes=m.num_classes,
        global_pool=pool,
        embed_dim=m.embed_dim,
        depth=len(m.blocks),
        num_heads=attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / m.embed_dim,
        qkv_bias=attn.qkv.bias is not None,
        class_token=m.cls_token is not None,
        reg_tokens=getattr(m, "num_reg_tokens", 0),
        no_embed_class=getattr(m, "no_embed_class", False),
        pre_norm=not isinstance(m.norm_pre, torch.nn.Identity),
        final_norm=has_norm or has_fc_norm,
        # timm's default placement stays None (as in the presets); an explicit one is kept
        fc_norm=None if has_fc_norm == (pool in ("avg", "max", "avgmax")) or not (has_norm or has_fc_norm)
        else has_fc_norm,
        drop_rate=m.head_drop.p,
        pos_drop_rate=m.pos_drop.p,
        proj_drop_rate=getattr(getattr(attn, "proj_drop", None), "p", 0.0),
        attn_drop_rate=getattr(getattr(attn, "attn_drop", None), "p", 0.0),
        drop_path_rate=float(getattr(m.blocks[-1].drop_path1, "drop_prob", 0.0) or 0.0),
        norm_eps=blk.norm1.eps,
        dynamic_img_size=bool(getattr(m, "dynamic_img_size", False)),
        dynamic_img_pad=bool(getattr(m.patch_embed, "dynamic_img_pad", False)),
    )


# ----------------------------------------------------------------------------------------- Hugging Face

_HF_RENAMES = [  # regex on the name with the "vit." / "layers" prefix normalized (see _from_hf)
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),  # classic
    (r"^layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),  # current
    (r"^layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),  # classic
    (r"^layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),  # classic
    (r"^layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),  # current
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
_HF_QKV = re.compile(r"^layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")
_HF_IGNORED = re.compile(r"^(pooler\.|embeddings\.mask_token$)")  # ViTModel extras timm's layout has no place for


def is_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("vit.", "embeddings.patch_embeddings")) for k in state_dict)


def _normalize_hf_name(key: str) -> str:
    key = key[4:] if key.startswith("vit.") else key
    key = re.sub(r"^encoder\.layer\.", "layer.", key)
    return re.sub(r"^layers\.", "layer.", key)


def convert_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ViT (either layout) -> timm/vit_fast names, with q/k/v fused into qkv."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        name = _normalize_hf_name(key)
        if _HF_IGNORED.match(name):
            continue
        m = _HF_QKV.match(name)
        if m:
            which = (m.group(2) or m.group(3))[0]  # q, k or v
            qkv.setdefault((int(m.group(1)), m.group(4)), {})[which] = value
            continue
        for pattern, repl in _HF_RENAMES:
            new, hits = re.subn(pattern, repl, name)
            if hits:
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"Hugging Face checkpoint has keys vit_fast cannot map: {unknown[:10]}"
                       f"{' ...' if len(unknown) > 10 else ''}")
    for (layer, kind), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise KeyError(f"Hugging Face checkpoint lacks the {'/'.join(missing)} {kind} of layer {layer}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# -------------------------------------------------------------------------------------------- loading

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` file (training wrappers unwrapped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        elif path.endswith((".pth", ".pt", ".bin", ".ckpt")):
            sd = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"unsupported checkpoint extension in {path}: use .safetensors, .pth, .pt or .bin")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is "unreadable file"
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    return _unwrap(sd, path)


def _unwrap(sd: object, source: str) -> dict[str, torch.Tensor]:
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, Mapping) or not sd:
        raise ValueError(f"{source} holds no state dict of tensors")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if all(k.startswith("_orig_mod.") for k in sd):  # saved from a torch.compile'd module
        sd = {k[len("_orig_mod."):]: v for k, v in sd.items()}
    return sd


def _hf_eps(path: str | None) -> float:
    """layer_norm_eps from a config.json beside an HF checkpoint file, else transformers' default."""
    if path is not None:
        cfg_path = os.path.join(os.path.dirname(os.fspath(path)), "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                return float(json.load(f).get("layer_norm_eps", HF_LAYER_NORM_EPS))
    return HF_LAYER_NORM_EPS


def _set_eps(model: VisionTransformer, eps: float) -> None:
    model.config.norm_eps = eps
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = eps


def load_checkpoint(
    model: VisionTransformer, source: str | os.PathLike | Mapping[str, torch.Tensor], *, eps: float | None = None
) -> VisionTransformer:
    """Load timm- or Hugging-Face-layout weights into ``model`` (in place) and return it.

    ``source``: a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` path or a state dict. The position
    embedding is resampled when the checkpoint's patch grid differs from the model's; a head with another
    class count is left freshly initialized (with a warning). Hugging Face checkpoints set the model's
    LayerNorm eps to theirs (``config.json`` beside the file, else 1e-12) unless ``eps`` is given.
    Missing/unexpected keys and wrong shapes raise ``KeyError``/``ValueError`` naming them.
    """
    path = None if isinstance(source, Mapping) else os.fspath(source)
    sd = read_state_dict(path) if path is not None else _unwrap(source, "state dict")
    label = path or "state dict"
    hf = is_hf_state_dict(sd)
    if hf:
        sd = convert_hf_state_dict(sd)
        eps = _hf_eps(path) if eps is None else eps
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    head_keys = {"head.weight", "head.bias"}
    # A checkpoint without a head (features only) into a model with one, or the other way round: head stays.
    if set(missing) <= head_keys and set(unexpected) <= head_keys and (missing or unexpected):
        for k in unexpected:
            sd.pop(k)
        warnings.warn(f"{label}: the head does not match the model's {model.num_classes} classes "
                      "and is left freshly initialized", stacklevel=2)
        missing = unexpected = []
    if missing or unexpected:
        raise KeyError(f"{label} does not fit {type(model).__name__}: missing keys {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                       f"{' ...' if len(unexpected) > 8 else ''}")
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        pe = sd["pos_embed"]
        if pe.dim() != 3 or pe.shape[-1] != own["pos_embed"].shape[-1]:
            raise ValueError(f"{label}: pos_embed has shape {tuple(pe.shape)}; the model needs "
                             f"{tuple(own['pos_embed'].shape)}")
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        sd["pos_embed"] = resample_pos_embed(pe, model.config.grid_size, None, prefix)
    if "head.weight" in sd and sd["head.weight"].shape != own["head.weight"].shape:
        warnings.warn(f"{label}: head has {sd['head.weight'].shape[0]} classes, the model "
                      f"{model.num_classes}; the head is left freshly initialized", stacklevel=2)
        sd.pop("head.weight")
        sd.pop("head.bias", None)
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in sd.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{label}: shapes do not match the model: {', '.join(wrong[:8])}")
    model.load_state_dict(sd, strict=False)
    if eps is not None:
        _set_eps(model, eps)
    return model
