"""Model directories in timm's Hugging Face Hub format: ``config.json`` + ``model.safetensors``.

``model.save_pretrained(dir)`` writes what ``timm.models.save_for_hf`` writes for the same network: a config.json
with the timm architecture it is built on, the ``model_args`` that differ from it, the ``pretrained_cfg``
(preprocessing) and the weights under timm's names, so ``timm.create_model("local-dir:DIR")`` rebuilds it. A
``vit_fast`` entry beside them holds the whole :class:`ViTConfig` (also what timm's arguments cannot say, such as
the LayerNorm eps), and the weights' metadata holds it too, so ``vit-fast predict DIR`` reads the directory as it
reads a run. :func:`vit_fast.from_pretrained` loads such a directory, or one timm wrote.

This is huggingface_hub's ``PyTorchModelHubMixin`` idea (``save_pretrained`` / ``from_pretrained`` over one
config and one safetensors file) without the mixin itself: the mixin writes its own config.json layout (the
constructor's arguments), which timm cannot read, and it would make huggingface_hub a dependency of the model.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from vit_fast.config import PRESETS, ViTConfig, _pair, get_config
from vit_fast.fileio import atomic_write
from vit_fast.pretrained import config_pretrained_cfg, get_pretrained_cfg, list_tags, preset_for, split_name

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# The weight files timm's local-dir loader looks for, in its order (a timm directory may hold any of them).
WEIGHT_FILES = (WEIGHTS_NAME, "pytorch_model.bin", "pytorch_model.pth", "model.pth")
# timm's PretrainedCfg fields: timm builds a PretrainedCfg from config.json's "pretrained_cfg", and an unknown key
# there is a TypeError, so nothing else goes in. The source fields are left out, as timm's own save leaves them.
PRETRAINED_CFG_KEYS = (
    "architecture", "tag", "custom_load", "input_size", "test_input_size", "min_input_size", "fixed_input_size",
    "interpolation", "crop_pct", "test_crop_pct", "crop_mode", "mean", "std", "num_classes", "label_offset",
    "label_names", "label_descriptions", "pool_size", "test_pool_size", "first_conv", "classifier", "license",
    "description", "origin_url", "paper_name", "paper_ids", "notes",
)
# ViTConfig fields that are not timm VisionTransformer arguments (timm takes a norm_layer object instead).
_NOT_TIMM_ARGS = ("norm_eps",)
_BASE_ARCH = "vit_base_patch16_224"  # the timm architecture a config with no timm preset is expressed over
_TIMM_DEFAULT_EPS = 1e-6


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model directory (a folder with a config.json)."""
    return (Path(path) / CONFIG_NAME).is_file()


def timm_architecture(model: torch.nn.Module) -> str:
    """The timm architecture config.json names for ``model``: its preset when that is one of timm's (a preset
    with timm pretrained tags), else the preset of its shape when that is timm's, else ``vit_base_patch16_224``;
    ``model_args`` then carry every difference."""
    config = model.config
    for name in ((getattr(model, "pretrained_cfg", None) or {}).get("architecture"), preset_for(config)):
        if name in PRESETS and list_tags(name):
            return name
    return _BASE_ARCH


def _timm_model_args(config: ViTConfig, arch: str) -> dict:
    """timm's reconstruction arguments: the ones timm's own save records, and every field that differs from
    the architecture's preset."""
    base, mine = PRESETS[arch].to_dict(), config.to_dict()
    args = {k: mine[k] for k in ("img_size", "num_classes", "in_chans", "global_pool")}
    args.update({k: v for k, v in mine.items() if v != base[k] and k not in _NOT_TIMM_ARGS})
    return {k: _jsonable(v) for k, v in args.items()}


def _jsonable(value: object) -> object:
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def hub_config(model: torch.nn.Module) -> dict:
    """The config.json of ``model`` in timm's format, with the whole ViTConfig (and the model's own preset name,
    which timm may not know) under ``"vit_fast"``."""
    config: ViTConfig = model.config
    arch = timm_architecture(model)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    own_arch = cfg.get("architecture")
    cfg.update(architecture=arch, num_classes=config.num_classes, input_size=(config.in_chans,
                                                                              *_pair(config.img_size)),
               fixed_input_size=not config.dynamic_img_size, custom_load=False)
    pretrained_cfg = {k: _jsonable(cfg[k]) for k in PRETRAINED_CFG_KEYS if cfg.get(k) is not None}
    pretrained_cfg.pop("architecture")
    out = {"architecture": arch, "num_classes": config.num_classes, "num_features": config.embed_dim}
    if config.global_pool:
        out["global_pool"] = config.global_pool
    out["model_args"] = _timm_model_args(config, arch)
    out["pretrained_cfg"] = pretrained_cfg
    out["vit_fast"] = {"architecture": own_arch, "config": _jsonable(config.to_dict())}
    return out


def save_pretrained(model: torch.nn.Module, save_directory: str | os.PathLike) -> Path:
    """Write ``model`` to ``save_directory`` as config.json + model.safetensors (timm's hub format); returns the
    directory. Each file goes through :func:`vit_fast.fileio.atomic_write`, the weights first."""
    from safetensors.torch import save_file

    if getattr(model, "quantization", None):
        raise ValueError("save_pretrained: the model is quantized; save it with vit_fast.save_quantized(model, path)")
    config = model.config
    if not isinstance(config, ViTConfig):
        raise TypeError(f"save_pretrained needs a vit_fast VisionTransformer; got {type(model).__name__}")
    if config.norm_eps != _TIMM_DEFAULT_EPS:
        warnings.warn(f"save_pretrained: LayerNorm eps {config.norm_eps} is not a timm argument; vit_fast reads it "
                      f"back, timm's create_model('local-dir:...') builds eps {_TIMM_DEFAULT_EPS}", stacklevel=3)
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_directory {folder} exists and is not a directory")
    text = json.dumps(hub_config(model), indent=2) + "\n"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "config": json.dumps(_jsonable(config.to_dict()))}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(folder / CONFIG_NAME, text)
    return folder


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable JSON file: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object (a model config)")
    return data


def _as_config_value(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _is_size(v: object) -> bool:
    ints = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    return ints(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(map(ints, v)))


_KINDS = {  # what each ViTConfig field may hold in a config file
    "size": ("an int or a pair of ints", _is_size),
    "int": ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool|None": ("true, false or null", lambda v: v is None or isinstance(v, bool)),
}


def _field_kind(name: str, default: object) -> str:
    if name in ("img_size", "patch_size"):
        return "size"
    if name == "fc_norm":
        return "bool|None"
    return type(default).__name__


def _checked_fields(values: dict, where: str) -> dict:
    """``values`` as ViTConfig arguments, after checking each one's type (a wrong one is named)."""
    defaults = ViTConfig().to_dict()
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"{where} {unknown} are not arguments of vit_fast's VisionTransformer")
    for name, value in values.items():
        what, ok = _KINDS[_field_kind(name, defaults[name])]
        if not ok(value):
            raise ValueError(f"{where}: {name} is {value!r}, expected {what}")
    return {k: _as_config_value(v) for k, v in values.items()}


def read_model_dir(path: str | os.PathLike) -> tuple[ViTConfig, dict, Path]:
    """``(config, pretrained_cfg, weights file)`` of a model directory, vit_fast's or timm's.

    A directory vit_fast wrote is rebuilt from its ``"vit_fast"`` entry; one timm wrote from its architecture (a
    preset name) and ``model_args`` (timm arguments vit_fast's ViT does not have are an error naming them).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model directory not found: {folder}")
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} holds no {CONFIG_NAME}: not a model directory")
    data = _read_json(cfg_path)
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} holds none of {', '.join(WEIGHT_FILES)}")
    try:
        config, arch = _config_of(data)
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
        raise ValueError(f"{cfg_path}: {type(e).__name__}: {e}") from e
    pretrained = data.get("pretrained_cfg") or {}
    if not isinstance(pretrained, dict):
        raise ValueError(f"{cfg_path}: pretrained_cfg is a {type(pretrained).__name__}, not an object")
    cfg = get_pretrained_cfg(arch, None, config) if arch in PRESETS else config_pretrained_cfg(config)
    cfg["tag"] = None  # the preset's default tag and its license are not this directory's
    cfg.pop("license", None)
    cfg.update({k: _as_config_value(v) for k, v in pretrained.items() if k in PRETRAINED_CFG_KEYS})
    cfg.update(architecture=arch, hf_hub_id=None, num_classes=config.num_classes)
    return config, cfg, weights


def _config_of(data: dict) -> tuple[ViTConfig, str | None]:
    own = data.get("vit_fast")
    arch = data.get("architecture")
    if isinstance(own, dict) and isinstance(own.get("config"), dict):
        config = ViTConfig(**_checked_fields(own["config"], "vit_fast.config"))
        arch = own.get("architecture")
        return config, arch if isinstance(arch, str) else None
    if not isinstance(arch, str):
        raise ValueError("no architecture: not a timm or vit_fast model config (a Hugging Face transformers "
                         "directory loads with vit_fast.load_checkpoint on its weights file)")
    arch, _ = split_name(arch)
    args = data.get("model_args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"model_args is a {type(args).__name__}, not an object")
    if "num_classes" in data:
        args = {"num_classes": data["num_classes"], **args}
    return get_config(arch, **_checked_fields(args, "model_args")), arch
