"""Pretrained configurations: timm's ``pretrained_cfg`` for every tag of every preset, under timm's keys.

A model's ``pretrained_cfg`` tells data pipelines how its weights expect images (size, mean/std, crop,
interpolation) and tells loaders where the weights live and which layers are the first conv and the
classifier. ``timm.data.resolve_data_config(model=m)`` reads it, so a vit_fast model created as
``vit_base_patch16_224.augreg2_in21k_ft_in1k`` resolves the same preprocessing as timm's model of that name.

The facts are timm's registry (timm 1.0), kept as data in ``pretrained_tags.json``; ``tests/test_timm_api.py`` checks
them against the installed timm, tag by tag. A tag-less name takes the architecture's first tag, as timm does.
"""

from __future__ import annotations

import difflib
import json
from importlib.resources import files

from vit_fast.config import PRESETS, ViTConfig, _pair


def _load_tags() -> tuple[dict[str, tuple], dict[str, list[tuple]], dict]:
    data = json.loads(files("vit_fast").joinpath("pretrained_tags.json").read_text())
    norms = {name: (tuple(n["mean"]), tuple(n["std"])) for name, n in data["normalization"].items()}
    tags = {arch: [(tag, norms[norm], classes, crop, license) for tag, norm, classes, crop, license in rows]
            for arch, rows in data["tags"].items()}
    return norms, tags, data["torchvision"]


# architecture -> its tags in timm's order (the first is the default): (tag, (mean, std), num_classes, crop_pct,
# license). All of them: bicubic interpolation, center crop, fixed input size, weights at hf://timm/<arch>.<tag>.
# The table is data (pretrained_tags.json, package data).
_NORMS, _TAGS, _TORCHVISION = _load_tags()
_IMAGENET = _NORMS["imagenet"]
_NO_WEIGHTS = {"untrained"}

# vit_fast's own presets have no published weights; their configs describe the data they are trained on
# (the normalization of vit_fast.train's datasets) so that data-config resolution stays meaningful.
_CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_DIGITS = ((0.3053,), (0.3760,))
_OWN = {"vit_tiny_patch4_32": _CIFAR100, "vit_small_patch4_32": _CIFAR100, "vit_nano_patch2_8": _DIGITS}


def _cfg(arch: str | None, tag: str | None, norm: tuple, num_classes: int, crop_pct: float, license: str | None,
         config: ViTConfig) -> dict:
    """One config dict with timm's keys, in the order of timm's ``PretrainedCfg.to_dict()``. The original
    (non-Hub) download locations (timm's ``url``, ``custom_load``) are left out: vit_fast loads from the Hub only."""
    cfg = {
        "hf_hub_id": f"timm/{arch}.{tag}" if tag and tag not in _NO_WEIGHTS else None,
        "architecture": arch,
        "tag": tag,
        "input_size": (config.in_chans, *_pair(config.img_size)),
        "fixed_input_size": True,  # a learned position embedding for one grid
        "interpolation": "bicubic",
        "crop_pct": crop_pct,
        "crop_mode": "center",
        "mean": norm[0],
        "std": norm[1],
        "num_classes": num_classes,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    if license:
        cfg["license"] = license
    return cfg


def split_name(name: str) -> tuple[str, str | None]:
    """``'vit_base_patch16_224.augreg_in1k'`` -> ``('vit_base_patch16_224', 'augreg_in1k')``; no tag -> None."""
    arch, _, tag = name.partition(".")
    return arch, tag or None


def list_tags(arch: str) -> list[str]:
    """The pretrained tags of a preset, the default first (empty for vit_fast's own presets)."""
    return [t[0] for t in _TAGS.get(arch, [])]


def get_pretrained_cfg(arch: str, tag: str | None = None, config: ViTConfig | None = None) -> dict:
    """The pretrained config of ``arch`` (a preset name) for ``tag`` (None: the default tag).

    ``config`` is the architecture the config's input size describes (default: the preset's own).
    """
    config = config or PRESETS[arch]
    tags = _TAGS.get(arch)
    if not tags:
        if tag:
            raise ValueError(f"{arch} has no pretrained tags (it is vit_fast's own preset); got tag {tag!r}")
        mean_std = _OWN.get(arch, _IMAGENET)
        return _cfg(arch, None, mean_std, config.num_classes, 1.0 if arch in _OWN else 0.9, None, config)
    if tag is None:
        tag = tags[0][0]
    for t, norm, num_classes, crop_pct, license in tags:
        if t == tag:
            return _cfg(arch, t, norm, num_classes, crop_pct, license, config)
    close = difflib.get_close_matches(tag, list_tags(arch), n=3, cutoff=0.3) or list_tags(arch)
    raise ValueError(f"unknown pretrained tag {tag!r} for {arch}; known: {', '.join(close)} "
                     f"(see vit_fast.pretrained.list_tags({arch!r}))")


def config_pretrained_cfg(config: ViTConfig) -> dict:
    """A config for a model built from a bare :class:`ViTConfig` (no preset, no weights): timm's defaults."""
    return _cfg(None, None, _IMAGENET, config.num_classes, 0.9, None, config)


def features_cfg(cfg: dict) -> dict:
    """The config of a feature backbone: without the classifier entries (as timm's feature wrappers)."""
    return {k: v for k, v in cfg.items() if k not in ("num_classes", "classifier", "global_pool")}


# ----------------------------------------------------------------------------------------------- torchvision

TORCHVISION_ARCHS: dict[str, dict[str, int]] = _TORCHVISION["architectures"]
# architecture -> [(weights name, crop size, resize size, interpolation)], torchvision's order
_TV_WEIGHTS: dict[str, list[tuple[str, int, int, str]]] = {
    arch: [tuple(row) for row in rows] for arch, rows in _TORCHVISION["weights"].items()}
_TV_DEFAULT = "IMAGENET1K_V1"


def torchvision_arch(config: ViTConfig) -> str | None:
    """The torchvision builder (``'vit_b_16'`` ...) whose architecture ``config`` has, any image size; else None."""
    patch = _pair(config.patch_size)
    for arch, a in TORCHVISION_ARCHS.items():
        if (patch == (a["patch_size"],) * 2 and config.embed_dim == a["embed_dim"] and config.depth == a["depth"]
                and config.num_heads == a["num_heads"] and config.mlp_hidden_dim == a["mlp_dim"]):
            return arch
    return None


def torchvision_weights(arch: str) -> list[str]:
    """The names of torchvision's weights for ``arch`` (``'vit_b_16'``), in torchvision's order."""
    if arch not in _TV_WEIGHTS:
        raise ValueError(f"unknown torchvision ViT {arch!r}; known: {', '.join(_TV_WEIGHTS)}")
    return [w[0] for w in _TV_WEIGHTS[arch]]


def default_torchvision_weights(arch: str, img_size: int) -> str:
    """Which weights a bare torchvision state dict of ``arch`` at ``img_size`` is taken to hold: IMAGENET1K_V1
    where the architecture has V1 weights made for that size (ViT-B/16 and L/16 at 224 could also be
    SWAG_LINEAR: say ``weights=`` then); else the weights made for that size (the SWAG_E2E ones at 384, 512 and
    518, SWAG_LINEAR for ViT-H/14 at 224, which has no V1); else V1, or the architecture's first weights."""
    rows = _TV_WEIGHTS[arch]
    fits = [w for w, crop, _, _ in rows if crop == img_size]
    names = [w for w, *_ in rows]
    for candidates in (fits, names):
        if candidates:
            return _TV_DEFAULT if _TV_DEFAULT in candidates else candidates[0]
    raise AssertionError(f"{arch} has no weights")  # the table lists some for every architecture


def torchvision_pretrained_cfg(config: ViTConfig, weights: str | None = None) -> dict:
    """The pretrained config (timm's keys) of a model holding torchvision's ``weights`` for ``config``: their
    preprocessing (resize of the shorter side to ``crop / crop_pct``, center crop, interpolation, ImageNet
    mean/std) as ``timm.data.resolve_data_config`` reads it, at the model's own input size.

    ``weights``: ``'IMAGENET1K_V1'`` or ``'ViT_B_16_Weights.IMAGENET1K_V1'``; None takes
    :func:`default_torchvision_weights`. The choice is the config's tag (``'tv_imagenet1k_v1'``; no other key,
    so timm still reads the config). An architecture torchvision publishes no weights for gets the preprocessing
    of its V1 recipe (bilinear, crop 0.875) and no tag.
    """
    arch = torchvision_arch(config)
    img = _pair(config.img_size)
    if arch is None:
        if weights is not None:
            raise ValueError(f"weights={weights!r}: the model's architecture is none of torchvision's ViTs "
                             f"({', '.join(TORCHVISION_ARCHS)}), so it holds none of their weights")
        cfg = _cfg(preset_for(config), None, _IMAGENET, config.num_classes, 0.875, None, config)
        cfg["interpolation"] = "bilinear"
        return cfg
    name = default_torchvision_weights(arch, img[0]) if weights is None else weights.rpartition(".")[2]
    rows = {w: (crop, resize, interp) for w, crop, resize, interp in _TV_WEIGHTS[arch]}
    if name not in rows:
        raise ValueError(f"weights={weights!r} are not torchvision weights of {arch}; known: {', '.join(rows)}")
    crop, resize, interpolation = rows[name]
    cfg = _cfg(preset_for(config), f"tv_{name.lower()}", _IMAGENET, config.num_classes, crop / resize, None, config)
    cfg.update(hf_hub_id=None, interpolation=interpolation)
    return cfg


def preset_for(config: ViTConfig) -> str | None:
    """The preset of ``config``'s architecture (patches, width, depth, heads, MLP), the one of its image size
    first; None when no preset has that architecture. ``save_pretrained`` names it in config.json."""
    same = [name for name, p in PRESETS.items()
            if (_pair(p.patch_size), p.embed_dim, p.depth, p.num_heads, p.mlp_hidden_dim)
            == (_pair(config.patch_size), config.embed_dim, config.depth, config.num_heads, config.mlp_hidden_dim)]
    same.sort(key=lambda name: _pair(PRESETS[name].img_size) != _pair(config.img_size))
    return same[0] if same else None

