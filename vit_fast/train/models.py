"""The one place a training run turns ``--model`` into a network (and learns its native resolution): another
family of models plugs in here."""

from __future__ import annotations

import torch

import vit_fast
from vit_fast.config import get_config


def default_img_size(name: str) -> int:
    """The resolution preset ``name`` was made for (training at another one is allowed)."""
    size = get_config(name).img_size
    return size if isinstance(size, int) else size[0]


def build_model(name: str, *, num_classes: int, in_chans: int, img_size: int, drop_path: float,
                overrides: dict[str, object], init: str | None = None) -> torch.nn.Module:
    """Preset ``name`` for the dataset's classes, channels and resolution, with config ``overrides``; ``init``
    loads pre-trained weights (position embedding resampled, a head of another class count replaced)."""
    try:
        model = vit_fast.create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                                      drop_path_rate=drop_path, **overrides)
    except TypeError as e:  # an unknown config field in --override
        raise ValueError(f"--override: {e}") from e
    if init is not None:
        vit_fast.load_checkpoint(model, init)
    return model


def config_of(model: torch.nn.Module) -> dict:
    """What a checkpoint, the weights' metadata and the summary record to rebuild ``model``."""
    return model.config.to_dict()
