"""Weights: timm models and checkpoints, Hugging Face ViT checkpoints, position-embedding resampling.

timm's layout is vit_fast's own (same parameter names), so a timm state dict loads unchanged. Hugging Face
``ViTModel`` / ``ViTForImageClassification`` checkpoints are converted: separate query/key/value projections
are fused into ``qkv`` and names are mapped, for both the classic layout of the files published on the Hub
(``vit.encoder.layer.N.attention.attention.query``) and the one current transformers releases save
(``vit.layers.N.attention.q_proj``). torchvision ViT checkpoints (``conv_proj``, ``class_token``,
``encoder.layers.encoder_layer_N``) are renamed: their attention already packs q, k and v as timm's ``qkv``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import pickle
import re
import warnings
from collections.abc import Mapping

import torch

from vit_fast.config import ViTConfig
from vit_fast.model import VisionTransformer
from vit_fast.pos_embed import resample_pos_embed
from vit_fast.pretrained import TORCHVISION_ARCHS, torchvision_pretrained_cfg

__all__ = ["config_from_timm", "config_from_torchvision", "convert_hf_state_dict", "convert_torchvision_state_dict",
           "load_checkpoint", "read_state_dict", "resample_pos_embed"]

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


def _rename(renames: list[tuple[str, str]], key: str, name: str, value: torch.Tensor,
            out: dict[str, torch.Tensor], missed: list[str]) -> None:
    """Puts ``value`` under the first rename of ``name`` that matches, or ``key`` into ``missed``."""
    for pattern, repl in renames:
        new, hits = re.subn(pattern, repl, name)
        if hits:
            out[new] = value
            return
    missed.append(key)


def _unmapped(family: str, missed: list[str], unknown: list[str] | None) -> None:
    """Keys no rename matched: into the caller's ``unknown`` list when it gave one, else a KeyError naming them."""
    if unknown is not None:
        unknown.extend(missed)
    elif missed:
        raise KeyError(f"{family} checkpoint has keys vit_fast cannot map: {missed[:10]}"
                       f"{' ...' if len(missed) > 10 else ''}")


def convert_hf_state_dict(state_dict: Mapping[str, torch.Tensor], *,
                          unknown: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face ViT (either layout) -> timm/vit_fast names, with q/k/v fused into qkv. Keys it cannot map
    raise ``KeyError``, or are appended to ``unknown`` when a list is given."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    missed: list[str] = []
    for key, value in state_dict.items():
        name = _normalize_hf_name(key)
        if _HF_IGNORED.match(name):
            continue
        m = _HF_QKV.match(name)
        if m:
            which = (m.group(2) or m.group(3))[0]  # q, k or v
            qkv.setdefault((int(m.group(1)), m.group(4)), {})[which] = value
            continue
        _rename(_HF_RENAMES, key, name, value, out, missed)
    _unmapped("Hugging Face", missed, unknown)
    for (layer, kind), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise KeyError(f"Hugging Face checkpoint lacks the {'/'.join(missing)} {kind} of layer {layer}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ------------------------------------------------------------------------------------------ torchvision

_TV_LAYER = r"^encoder\.layers\.encoder_layer_(\d+)\."
_TV_RENAMES = [
    (r"^conv_proj\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (_TV_LAYER + r"ln_1\.", r"blocks.\1.norm1."),
    (_TV_LAYER + r"ln_2\.", r"blocks.\1.norm2."),
    (_TV_LAYER + r"self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),  # q, k, v packed as qkv
    (_TV_LAYER + r"self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (_TV_LAYER + r"mlp\.(?:0|linear_1)\.", r"blocks.\1.mlp.fc1."),  # linear_1/2: torchvision < 0.13's names
    (_TV_LAYER + r"mlp\.(?:3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
]
_TV_UNSUPPORTED = [
    (re.compile(r"^heads\.pre_logits\."), "a pre-logits layer (representation_size)"),
    (re.compile(r"^conv_proj\.conv_"), "a convolutional stem (conv_stem_configs)"),
]


def is_torchvision_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k in ("class_token", "encoder.pos_embedding") or k.startswith("encoder.layers.encoder_layer_")
               for k in state_dict)


def convert_torchvision_state_dict(state_dict: Mapping[str, torch.Tensor], *,
                                   unknown: list[str] | None = None) -> dict[str, torch.Tensor]:
    """torchvision ``VisionTransformer`` names -> timm/vit_fast names (the tensors are the same). Keys it cannot
    map raise ``KeyError``, or are appended to ``unknown`` when a list is given."""
    out: dict[str, torch.Tensor] = {}
    missed: list[str] = []
    for key, value in state_dict.items():
        for pattern, what in _TV_UNSUPPORTED:
            if pattern.match(key):
                raise ValueError(f"torchvision checkpoint has {what} ({key}), which vit_fast's ViT does not have")
        _rename(_TV_RENAMES, key, key, value, out, missed)
    _unmapped("torchvision", missed, unknown)
    return out


def config_from_torchvision(
    source: torch.nn.Module | Mapping[str, torch.Tensor], *, num_heads: int | None = None
) -> ViTConfig:
    """The :class:`ViTConfig` of a torchvision ``VisionTransformer`` (a module or its state dict).

    A state dict does not record the number of heads: it is taken from torchvision's architecture of that width
    (B: 12, L and H: 16) unless ``num_heads`` is given, which another width needs.
    """
    if isinstance(source, torch.nn.Module):
        for attr in ("conv_proj", "encoder", "heads", "image_size", "patch_size"):
            if not hasattr(source, attr):
                raise TypeError(f"source is a {type(source).__name__}, not a torchvision VisionTransformer "
                                f"(no {attr!r} attribute)")
        if not isinstance(source.conv_proj, torch.nn.Conv2d):
            raise ValueError("torchvision model has a convolutional stem (conv_stem_configs), which vit_fast's ViT "
                             "does not have")
        first = source.encoder.layers[0]
        num_heads = first.num_heads if num_heads is None else num_heads
        extra = dict(pos_drop_rate=source.dropout, proj_drop_rate=source.dropout,
                     attn_drop_rate=source.attention_dropout, norm_eps=source.encoder.ln.eps)
        state = source.state_dict()
    else:
        extra, state = {}, source
    sd = convert_torchvision_state_dict(state)
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise KeyError(f"torchvision checkpoint lacks {key} (its name there: {_tv_name(key)})")
    embed_dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    if grid * grid != sd["pos_embed"].shape[1] - 1:
        raise ValueError(f"torchvision checkpoint: encoder.pos_embedding has {sd['pos_embed'].shape[1]} rows, not "
                         "a class token and a square grid of patches")
    if num_heads is None:
        widths = {a["embed_dim"]: a["num_heads"] for a in TORCHVISION_ARCHS.values()}
        if embed_dim not in widths:
            raise ValueError(f"torchvision checkpoint of width {embed_dim} is none of torchvision's architectures: "
                             "pass num_heads=...")
        num_heads = widths[embed_dim]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return ViTConfig(img_size=grid * patch, patch_size=patch, in_chans=in_chans,
                     num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                     embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                     mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim, **extra)


def _tv_name(key: str) -> str:
    return {"patch_embed.proj.weight": "conv_proj.weight", "pos_embed": "encoder.pos_embedding",
            "blocks.0.mlp.fc1.weight": "encoder.layers.encoder_layer_0.mlp.0.weight"}[key]


# ------------------------------------------------------------------------------------------------ layouts

# One block's names in each layout a checkpoint may come in: what an unknown state dict is compared with.
_LAYOUT_NAMES = {
    "timm/vit_fast": ["cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                      "norm_pre.weight"] + [f"blocks.0.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2",
                                                                           "mlp.fc1", "mlp.fc2")
                                            for p in ("weight", "bias")]
                     + ["norm.weight", "fc_norm.weight", "head.weight", "head.bias"],
    "Hugging Face ViT": ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
                         "vit.embeddings.patch_embeddings.projection.weight"]
                        + [f"vit.encoder.layer.0.{m}.weight" for m in (
                            "layernorm_before", "attention.attention.query", "attention.attention.key",
                            "attention.attention.value", "attention.output.dense", "layernorm_after",
                            "intermediate.dense", "output.dense")]
                        + [f"vit.layers.0.{m}.weight" for m in ("attention.q_proj", "attention.k_proj",
                                                                "attention.v_proj", "attention.o_proj", "mlp.fc1")]
                        + ["vit.layernorm.weight", "classifier.weight"],
    "torchvision ViT": ["class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"]
                       + [f"encoder.layers.encoder_layer_0.{m}" for m in (
                           "ln_1.weight", "self_attention.in_proj_weight", "self_attention.in_proj_bias",
                           "self_attention.out_proj.weight", "ln_2.weight", "mlp.0.weight", "mlp.3.weight")]
                       + ["encoder.ln.weight", "heads.head.weight", "heads.head.bias"],
}


def closest_layout(keys: list[str]) -> tuple[str, float]:
    """The known checkpoint layout whose names ``keys`` resemble most, and how much (0..1: the mean over the keys,
    layer numbers set aside, of the best ``difflib`` ratio against one of the layout's names)."""
    sample = sorted({re.sub(r"\d+", "0", k) for k in keys})[:200]
    if not sample:
        return "timm/vit_fast", 0.0
    scores = {}
    for layout, names in _LAYOUT_NAMES.items():
        scores[layout] = sum(max(difflib.SequenceMatcher(None, k, n).ratio() for n in names)
                             for k in sample) / len(sample)
    best = max(scores, key=scores.get)
    return best, scores[best]


def _layout_hint(keys: list[str]) -> str:
    layout, score = closest_layout(keys)
    hint = f"its keys are closest to the {layout} layout ({score:.0%} alike)"
    prefix = os.path.commonprefix(keys).rpartition(".")[0]
    if prefix and len(keys) > 1:
        hint += f"; every key starts with {prefix + '.'!r}: strip it"
    return hint


# -------------------------------------------------------------------------------------------- loading

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` file (training wrappers unwrapped).

    Pickled files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a file
    cannot run code. A file that cannot be read, or holds no tensors, raises ``ValueError`` naming it.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a directory, not a file (a model directory loads with "
                         "vit_fast.from_pretrained)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not path.endswith((".safetensors", *_TORCH_SUFFIXES)):
        raise ValueError(f"unsupported checkpoint extension in {path}: use .safetensors, .pth, .pt or .bin")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"cannot read checkpoint {path}: refused, it pickles objects other than tensors and plain "
                         "containers (vit_fast reads .pth/.pt/.bin with torch.load(weights_only=True), so no code "
                         f"from the file runs): {_first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - any reader failure is "unreadable file"
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {_first_line(e)}") from e
    return _unwrap(sd, path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _unwrap(sd: object, source: str) -> dict[str, torch.Tensor]:
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, Mapping):
        raise ValueError(f"{source} holds a {type(sd).__name__}, not a state dict of tensors")
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{source} holds no state dict of tensors (no tensor under a string key)")
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if all(k.startswith("_orig_mod.") for k in sd):  # saved from a torch.compile'd module
        sd = {k[len("_orig_mod."):]: v for k, v in sd.items()}
    return sd


def _hf_eps(path: str | None) -> float:
    """layer_norm_eps from a config.json beside an HF checkpoint file, else transformers' default."""
    if path is None:
        return HF_LAYER_NORM_EPS
    cfg_path = os.path.join(os.path.dirname(os.fspath(path)), "config.json")
    if not os.path.isfile(cfg_path):
        return HF_LAYER_NORM_EPS
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        return float(cfg.get("layer_norm_eps", HF_LAYER_NORM_EPS))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{cfg_path} (the config beside {path}) has no readable layer_norm_eps: "
                         f"{type(e).__name__}: {_first_line(e)}") from e


def _set_eps(model: VisionTransformer, eps: float) -> None:
    model.config.norm_eps = eps
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = eps


def load_checkpoint(
    model: VisionTransformer, source: str | os.PathLike | Mapping[str, torch.Tensor], *, eps: float | None = None,
    torchvision_weights: str | None = None,
) -> VisionTransformer:
    """Load timm-, Hugging-Face- or torchvision-layout weights into ``model`` (in place) and return it.

    ``source``: a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` path or a state dict; the layout is told by
    its keys. The position embedding is resampled when the checkpoint's patch grid differs from the model's; a
    head with another class count is left freshly initialized (with a warning). Hugging Face checkpoints set the
    model's LayerNorm eps to theirs (``config.json`` beside the file, else 1e-12) unless ``eps`` is given.
    torchvision checkpoints set the model's ``pretrained_cfg`` to the preprocessing of ``torchvision_weights``
    (a bare state dict does not say which weights it holds; None: IMAGENET1K_V1, see
    :func:`vit_fast.pretrained.default_torchvision_weights`).
    Missing/unexpected keys raise ``KeyError`` naming them and the closest known layout; wrong shapes and
    unreadable files raise ``ValueError`` naming the file.
    """
    path = None if isinstance(source, Mapping) else os.fspath(source)
    sd = read_state_dict(path) if path is not None else _unwrap(source, "state dict")
    label = path or "state dict"
    original_keys = list(sd)
    hf, tv = is_hf_state_dict(sd), is_torchvision_state_dict(sd)
    unmapped: list[str] = []  # keys of the checkpoint's layout that have no place in vit_fast's model
    try:
        if hf:
            sd = convert_hf_state_dict(sd, unknown=unmapped)
            eps = _hf_eps(path) if eps is None else eps
        elif tv:
            sd = convert_torchvision_state_dict(sd, unknown=unmapped)
    except (KeyError, ValueError) as e:
        raise type(e)(f"{label}: {e.args[0] if e.args else e}") from e
    if torchvision_weights is not None and not tv:
        raise ValueError(f"torchvision_weights={torchvision_weights!r}, but {label} is not a torchvision checkpoint")
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own)) + sorted(unmapped)
    head_keys = {"head.weight", "head.bias"}
    # A checkpoint without a head (features only) into a model with one, or the other way round: head stays.
    if set(missing) <= head_keys and set(unexpected) <= head_keys and (missing or unexpected):
        for k in unexpected:
            sd.pop(k)
        warnings.warn(f"{label}: the head does not match the model's {model.num_classes} classes "
                      "and is left freshly initialized", stacklevel=2)
        missing = unexpected = []
    if missing or unexpected:
        raise KeyError(f"{label} does not fit {type(model).__name__}: {_layout_hint(original_keys)}; missing keys "
                       f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                       f"{' ...' if len(unexpected) > 8 else ''}")
    try:
        _load_matching(model, sd, own, label)
    except (RuntimeError, TypeError) as e:  # tensors of a dtype or layout the parameters cannot take
        raise ValueError(f"{label}: cannot load its tensors into the model: {type(e).__name__}: "
                         f"{_first_line(e)}") from e
    if eps is not None:
        _set_eps(model, eps)
    if tv:
        model.pretrained_cfg = torchvision_pretrained_cfg(model.config, torchvision_weights)
    return model


def _load_matching(model: VisionTransformer, sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                   label: str) -> None:
    """Load ``sd`` (names already the model's) after resampling the position embedding and dropping a head
    of another class count."""
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        pe = sd["pos_embed"]
        if pe.dim() != 3 or pe.shape[-1] != own["pos_embed"].shape[-1] or not pe.is_floating_point():
            raise ValueError(f"{label}: pos_embed has shape {tuple(pe.shape)} ({pe.dtype}); the model needs "
                             f"{tuple(own['pos_embed'].shape)}")
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        sd["pos_embed"] = resample_pos_embed(pe, model.config.grid_size, None, prefix)
    if "head.weight" in sd and sd["head.weight"].shape != own["head.weight"].shape:
        warnings.warn(f"{label}: head has {sd['head.weight'].shape[0] if sd['head.weight'].dim() else 0} classes, "
                      f"the model {model.num_classes}; the head is left freshly initialized", stacklevel=3)
        sd.pop("head.weight")
        sd.pop("head.bias", None)
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in sd.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{label}: shapes do not match the model: {', '.join(wrong[:8])}")
    check_dtypes(sd, own, label)
    model.load_state_dict(sd, strict=False)


def check_dtypes(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], label: str) -> None:
    """Raise ``ValueError`` naming ``label`` where ``state`` holds integer, bool or complex tensors for floating
    point ones of the model: copying them in would cast silently (or drop an imaginary part)."""
    wrong = [f"{k} ({v.dtype})" for k, v in state.items()
             if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if wrong:
        raise ValueError(f"{label}: tensors that are not floating point where the model's are: "
                         f"{', '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}")
