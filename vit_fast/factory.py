"""Building models: ``create_model`` (timm's factory signature over vit_fast's presets and tags), ``from_timm``,
``from_torchvision`` and ``from_pretrained`` (a model directory, see :mod:`vit_fast.hub`).

The factory is where names, pretrained configs, weights and feature wrappers meet, so that ``model.py`` knows
none of them (the dependency runs factory -> model, weights, pretrained -> config).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

import torch

from vit_fast.config import get_config
from vit_fast.hub import read_model_dir
from vit_fast.model import VisionTransformer
from vit_fast.pretrained import features_cfg, get_pretrained_cfg, split_name, torchvision_pretrained_cfg
from vit_fast.weights import (
    check_dtypes,
    config_from_timm,
    config_from_torchvision,
    convert_torchvision_state_dict,
    load_checkpoint,
    read_state_dict,
)


def create_model(
    model_name: str,
    pretrained: bool = False,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    pretrained_cfg: str | dict | None = None,
    pretrained_cfg_overlay: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    features_only: bool = False,
    out_indices: int | list[int] | tuple[int, ...] = 3,
    feature_cls: str | type | None = None,
    feature_cfg: dict | None = None,
    **overrides: object,
) -> torch.nn.Module:
    """Build ``model_name``: a preset (see :func:`vit_fast.list_models`), optionally tagged as timm names its
    weights (``'vit_base_patch16_224.augreg2_in21k_ft_in1k'``; no tag = the architecture's default tag).

    - ``overrides`` are :class:`ViTConfig` fields (``num_classes=10``, ``img_size=384``, ``reg_tokens=4``,
      ``dynamic_img_size=True`` for any image size, ``dynamic_img_pad=True`` to pad images to the patch size);
      an unknown one raises ``TypeError``. ``num_classes`` defaults to the tag's.
    - The model's ``pretrained_cfg`` is the tag's (``pretrained_cfg`` picks another tag or passes a dict,
      ``pretrained_cfg_overlay`` updates entries), so ``timm.data.resolve_data_config(model=m)`` answers as for
      timm's model.
    - ``pretrained=True`` downloads the tag's weights through timm's Hugging Face Hub loader (cached by
      huggingface_hub); ``checkpoint_path`` loads a local file through :func:`vit_fast.load_checkpoint`.
    - ``device``/``dtype``: where and in which dtype the parameters are created.
    - ``features_only=True``: a backbone returning the outputs of the blocks ``out_indices`` (timm's
      ``FeatureGetterNet`` over :meth:`VisionTransformer.forward_intermediates`; ``feature_cfg`` passes its
      options, e.g. ``norm`` or ``output_fmt``).
    """
    arch, tag = split_name(model_name)
    config = get_config(arch)  # an unknown architecture raises here, naming the closest ones
    if isinstance(pretrained_cfg, dict):
        cfg = dict(pretrained_cfg)
    else:
        if isinstance(pretrained_cfg, str):
            tag = pretrained_cfg
        cfg = get_pretrained_cfg(arch, tag)
    cfg.update(pretrained_cfg_overlay or {})
    if cfg.get("num_classes") is not None and cfg["num_classes"] >= 0:
        overrides.setdefault("num_classes", cfg["num_classes"])
    config = config.replace(**overrides)

    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = VisionTransformer(config)
    if dtype is not None:
        model.to(dtype)
    model.pretrained_cfg = cfg
    if pretrained:
        load_pretrained(model, cache_dir=cache_dir)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    if not features_only:
        return model
    return _feature_backbone(model, out_indices, feature_cls, dict(feature_cfg or {}))


def load_pretrained(model: VisionTransformer, cache_dir: str | os.PathLike | None = None) -> VisionTransformer:
    """Load the weights ``model.pretrained_cfg`` names from the Hugging Face Hub, through timm's hub loader.

    The first conv is adapted when the model takes another number of channels (as timm does), the position
    embedding resampled to the model's grid, and a head of another class count left fresh (with a warning).
    """
    cfg = model.pretrained_cfg
    name = ".".join(filter(None, (cfg.get("architecture"), cfg.get("tag"))))
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        raise ValueError(f"{name or 'this model'} has no published weights (pretrained_cfg has no hf_hub_id); "
                         "pass checkpoint_path=... to load a local file")
    try:
        from timm.models import adapt_input_conv, load_state_dict_from_hf
    except ImportError as e:
        raise ImportError("pretrained=True downloads through timm's hub loader: pip install timm, or pass "
                          "checkpoint_path=... with a local file") from e
    try:
        state_dict = load_state_dict_from_hf(hub_id, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - whatever the hub client raises, the remedy is the same
        raise RuntimeError(
            f"pretrained=True could not get the weights of {name} from the Hugging Face Hub (hf-hub:{hub_id}): "
            f"{type(e).__name__}: {e}. Offline, or the Hub unreachable? On a machine with network access download "
            f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors, then create the model with "
            f"checkpoint_path='path/to/model.safetensors' (and pretrained=False)."
        ) from e
    conv = state_dict.get("patch_embed.proj.weight")
    if conv is not None and conv.shape[1] != model.in_chans:
        state_dict["patch_embed.proj.weight"] = adapt_input_conv(model.in_chans, conv)
    return load_checkpoint(model, state_dict)


def _feature_backbone(model: VisionTransformer, out_indices, feature_cls, feature_cfg: dict) -> torch.nn.Module:
    try:
        from timm.models._features import FeatureGetterNet
    except ImportError as e:
        raise ImportError("features_only=True wraps the model in timm's FeatureGetterNet: pip install timm, or call "
                          "model.forward_intermediates(...) directly") from e
    if feature_cls not in (None, "getter", FeatureGetterNet):
        raise ValueError(f"feature_cls {feature_cls!r} is not supported: vit_fast backbones use 'getter' "
                         "(timm's FeatureGetterNet over forward_intermediates), as timm's ViT does")
    feature_cfg.pop("feature_cls", None)
    cfg = model.pretrained_cfg
    backbone = FeatureGetterNet(model, out_indices=feature_cfg.pop("out_indices", out_indices), **feature_cfg)
    backbone.pretrained_cfg = features_cfg(cfg)
    backbone.default_cfg = backbone.pretrained_cfg
    backbone.in_chans = model.in_chans  # as on timm's features_only wrapper (timm.models.get_model_traits reads it)
    return backbone


def from_timm(timm_model: torch.nn.Module) -> VisionTransformer:
    """A vit_fast model with the architecture, weights and ``pretrained_cfg`` of a timm ``VisionTransformer``.

    Its outputs equal timm's (same math, same parameters); the returned model is on timm's device and
    dtype, in timm's train/eval mode.
    """
    cfg = config_from_timm(timm_model)
    p = next(timm_model.parameters())
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    state = {k: v.detach().clone() for k, v in timm_model.state_dict().items()}  # copies, not shared storage
    model.load_state_dict(state, strict=True, assign=True)
    if getattr(timm_model, "pretrained_cfg", None):
        model.pretrained_cfg = dict(timm_model.pretrained_cfg)
    return model.to(device=p.device, dtype=p.dtype).train(timm_model.training)


def _assigned(config, state: Mapping[str, torch.Tensor], label: str) -> VisionTransformer:
    """A model of ``config`` holding ``state`` (which must fit it exactly), built on the meta device so that
    nothing is allocated before the weights are known to fit."""
    with torch.device("meta"):
        model = VisionTransformer(config)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{label} does not fit the config: missing keys {missing[:8]}, unexpected keys "
                         f"{unexpected[:8]}, shapes {wrong[:8]}")
    check_dtypes(state, own, label)
    try:
        model.load_state_dict(dict(state), strict=True, assign=True)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{label}: cannot load its tensors into the model: {type(e).__name__}: {e}") from e
    return model


def from_torchvision(
    source: torch.nn.Module | Mapping[str, torch.Tensor], *, weights: str | None = None, num_heads: int | None = None
) -> VisionTransformer:
    """A vit_fast model with the architecture and weights of a torchvision ``VisionTransformer`` (``vit_b_16`` to
    ``vit_h_14``, any image size, the SWAG ones included), given as the module or its state dict.

    Outputs equal torchvision's (same math; fp32 relative error within 1e-5, tested). ``model.pretrained_cfg`` is
    the preprocessing of torchvision's ``weights`` (``'IMAGENET1K_V1'``, ``'IMAGENET1K_SWAG_E2E_V1'``,
    ``'IMAGENET1K_SWAG_LINEAR_V1'``, or ``'ViT_B_16_Weights.IMAGENET1K_V1'``): the tensors do not say which ones
    they are, and V1 and SWAG preprocess differently. ``weights=None`` takes IMAGENET1K_V1 where the architecture
    has V1 weights for the model's image size, else the weights made for that size (SWAG_E2E at 384/512/518);
    the config's tag records the choice (``'tv_imagenet1k_v1'``). ``num_heads``: for a state dict of a width
    none of torchvision's architectures has. A module keeps its device, dtype and train/eval mode.
    """
    config = config_from_torchvision(source, num_heads=num_heads)
    module = isinstance(source, torch.nn.Module)
    state = source.state_dict() if module else source
    sd = {k: v.detach().clone() for k, v in convert_torchvision_state_dict(state).items()}
    model = _assigned(config, sd, "torchvision model" if module else "torchvision state dict")
    model.pretrained_cfg = torchvision_pretrained_cfg(config, weights)
    if module:
        p = next(source.parameters())
        model = model.to(device=p.device, dtype=p.dtype).train(source.training)
    return model


def from_pretrained(
    path: str | os.PathLike, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> VisionTransformer:
    """The model in the directory ``path``: config.json + model.safetensors in timm's hub format, written by
    :meth:`VisionTransformer.save_pretrained` or by timm (``save_for_hf``; a timm ViT vit_fast can build).

    The weights are read safely (safetensors, or ``torch.load(weights_only=True)`` for a ``pytorch_model.bin``)
    and must fit the config exactly. ``dtype`` None keeps the dtype they were saved in. The model is returned in
    eval mode, as Hugging Face's ``from_pretrained`` returns it. Bad files raise ``ValueError``
    (``FileNotFoundError`` for missing ones) naming the file.
    """
    config, cfg, weights = read_model_dir(path)
    label = f"{weights} (with {os.path.join(os.fspath(path), 'config.json')})"
    model = _assigned(config, read_state_dict(weights), label)
    model.pretrained_cfg = cfg
    return model.to(device=device, dtype=dtype).eval()

