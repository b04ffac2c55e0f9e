"""The one place a training run turns ``--model`` into a network (and learns its native resolution).

Two families: a vit_fast preset (see ``vit_fast.list_models()``), and any other timm model name, built by
``timm.create_model`` as a CNN baseline. A preset name wins where timm has the same name, so
``vit_tiny_patch16_224`` is always the fast ViT.

What rebuilds a run's network is :func:`config_of` (stored in checkpoints, the weights' metadata and
``summary.json``) and :func:`model_from_config` (fresh weights from it). A ViT's config is its
``ViTConfig.to_dict()``; a timm CNN's is ``{"family": "timm", "name", "kwargs", "small_input_stem"}``, where
``kwargs`` go to ``timm.create_model`` as they are and ``small_input_stem`` is None or the names of the replaced
first convolution and removed max-pool, so the same network comes back even if the rule that picked them changes.
"""

from __future__ import annotations

from torch import nn

import vit_fast
from vit_fast.config import get_config

TIMM = "timm"
# Inputs up to this size get the small-image stem on a CNN: a 7x7 stride-2 convolution and a stride-2 max-pool
# would leave a 2x2 map of an 8x8 digit after the stem (CIFAR ResNets use the same 3x3 stride-1 stem at 32 px).
SMALL_INPUT_MAX = 64
# The attribute a timm model built here carries its config in: timm's modules have no config object of ours.
_CONFIG_ATTR = "vit_fast_train_config"


def is_vit_preset(name: str) -> bool:
    """Whether ``--model name`` is a vit_fast preset (else it is taken as a timm CNN)."""
    return name in vit_fast.list_models()


def family_of(model: nn.Module) -> str:
    """``"vit_fast"`` or ``"timm"``: what ``summary.json`` records as ``model_family``."""
    return TIMM if hasattr(model, _CONFIG_ATTR) else "vit_fast"


def default_img_size(name: str) -> int:
    """The resolution ``name`` was made for (training at another one is allowed)."""
    if is_vit_preset(name):
        size = get_config(name).img_size
        return size if isinstance(size, int) else size[0]
    return int(_timm_pretrained_cfg(name)["input_size"][-1])


def build_model(name: str, *, num_classes: int, in_chans: int, img_size: int, drop_path: float,
                overrides: dict[str, object], init: str | None = None) -> nn.Module:
    """Preset ``name`` (or timm CNN ``name``) for the dataset's classes, channels and resolution, with
    ``overrides`` (ViTConfig fields for a preset, ``timm.create_model`` keywords for a CNN); ``init`` loads
    pre-trained weights into a preset (position embedding resampled, a head of another class count replaced).
    A CNN fed ``SMALL_INPUT_MAX`` px or less gets the small-image stem (:func:`small_input_stem`)."""
    if not is_vit_preset(name):
        if init is not None:
            raise ValueError(f"--init loads weights into vit_fast ViT presets only; {name} is a timm CNN and starts "
                             "from random weights")
        kwargs: dict[str, object] = {"num_classes": num_classes, "in_chans": in_chans, **overrides}
        if drop_path > 0:  # not every timm CNN takes the keyword, so it is passed only when asked for
            kwargs["drop_path_rate"] = drop_path
        model = _create_timm(name, kwargs)
        stem = small_input_stem(model, name) if img_size <= SMALL_INPUT_MAX else None
        config = {"family": TIMM, "name": name, "kwargs": kwargs, "small_input_stem": stem}
        _apply_stem(model, stem)
        setattr(model, _CONFIG_ATTR, config)
        return model
    try:
        model = vit_fast.create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                                      drop_path_rate=drop_path, **overrides)
    except TypeError as e:  # an unknown config field in --override
        raise ValueError(f"--override: {e}") from e
    if init is not None:
        vit_fast.load_checkpoint(model, init)
    return model


def config_of(model: nn.Module) -> dict:
    """What a checkpoint, the weights' metadata and the summary record to rebuild ``model``."""
    config = getattr(model, _CONFIG_ATTR, None)
    return dict(config) if config is not None else model.config.to_dict()


def model_from_config(config: dict) -> nn.Module:
    """A network with fresh weights from a :func:`config_of` dict (a vit_fast ViT's or a timm CNN's), ready
    for the run's ``model.safetensors``."""
    if config.get("family") != TIMM:
        return vit_fast.VisionTransformer(vit_fast.ViTConfig(**config))
    model = _create_timm(config["name"], dict(config["kwargs"]))
    _apply_stem(model, config.get("small_input_stem"))
    setattr(model, _CONFIG_ATTR, dict(config))
    return model


def enable_grad_checkpointing(model: nn.Module) -> None:
    """``--grad-checkpointing`` through the model's own ``set_grad_checkpointing`` (timm's API, which the
    vit_fast ViT shares); a timm model without it is an error naming the flag."""
    try:
        model.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError) as e:
        raise ValueError(f"--grad-checkpointing: {type(model).__name__} does not support gradient checkpointing "
                         f"({e or type(e).__name__})") from e


# ------------------------------------------------------------------------------------------- timm CNNs

def small_input_stem(model: nn.Module, name: str) -> dict[str, str | None]:
    """Where the small-image stem goes in timm CNN ``model``: ``{"conv": first convolution, "pool": the stem's
    max-pool or None}``. The first convolution is timm's ``pretrained_cfg["first_conv"]``; the max-pool is the
    first ``nn.MaxPool2d`` that is a direct child of that convolution's parent modules (``maxpool`` in the
    ResNet family, ``features.pool0`` in DenseNet), so pools inside the stages stay."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    conv = model.get_submodule(first) if first else None
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"--model {name}: no first convolution to give a 3x3 stride-1 stem for inputs of "
                         f"{SMALL_INPUT_MAX} px or less (timm's first_conv is {first!r}); train at --img-size "
                         f"{SMALL_INPUT_MAX + 1} or more")
    parts = first.split(".")
    parents = {".".join(parts[:i]) for i in range(len(parts))}
    pools = (n for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d) and n.rpartition(".")[0] in parents)
    pool = next(pools, None)
    return {"conv": first, "pool": pool}


def _apply_stem(model: nn.Module, stem: dict[str, str | None] | None) -> None:
    """Swap in a 3x3 stride-1 first convolution (same channels and bias) and drop the stem's max-pool."""
    if stem is None:
        return
    old = model.get_submodule(stem["conv"])
    conv = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None)
    # timm's (and torchvision's) ResNet initialization of convolutions; PyTorch's default is scaled for linears
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    model.set_submodule(stem["conv"], conv.to(old.weight.dtype))
    if stem.get("pool"):
        model.set_submodule(stem["pool"], nn.Identity())


def _timm_pretrained_cfg(name: str) -> dict:
    """timm's default pretrained config of ``name``; an unknown name or a fixed-size (transformer) model is a
    ValueError naming ``--model``."""
    import timm  # only runs that train a CNN pay for importing timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name) if timm.is_model(name) else None
    if cfg is None:
        raise ValueError(f"--model {name!r} is neither a vit_fast preset (vit_fast.list_models()) nor a timm model "
                         "(timm.list_models())")
    if cfg.fixed_input_size:
        raise ValueError(f"--model {name}: a timm model with a fixed input size (a transformer); vit-fast train "
                         "takes vit_fast presets and timm CNNs")
    return cfg.to_dict()


def _create_timm(name: str, kwargs: dict[str, object]) -> nn.Module:
    import timm

    _timm_pretrained_cfg(name)
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        flag = "--drop-path" if "drop_path_rate" in str(e) else "--override"
        raise ValueError(f"{flag}: timm.create_model({name!r}) does not take these keywords {sorted(kwargs)}: "
                         f"{e}") from e

