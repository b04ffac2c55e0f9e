"""A pytest plugin that runs timm's own model tests against vit_fast: loaded with ``-p timm_contract_plugin`` into a
pytest run of ``tests/test_models.py`` from timm's source distribution (see ``test_timm_contract.py``).

It routes ``timm.create_model`` to :func:`vit_fast.create_model` for the architectures named in
``VIT_FAST_TIMM_MODELS`` (comma-separated presets, tags allowed), narrows timm's model listings to those, and
deselects what does not concern them: tests of other models, TorchScript (not a goal: deprecated in this torch),
and pretrained downloads (no network in CI). The patching happens at import, before timm's test module binds
``from timm import create_model, list_models``.
"""

from __future__ import annotations

import os

import pytest
import timm
import timm.models

import vit_fast
from vit_fast.pretrained import split_name

MODELS = tuple(os.environ.get("VIT_FAST_TIMM_MODELS", "vit_tiny_patch16_224,vit_small_patch16_224").split(","))
_DOWNLOADS = {"test_model_inference", "test_model_load_pretrained", "test_model_features_pretrained"}

_timm_create_model = timm.create_model
_timm_list_models = timm.list_models
_timm_list_pretrained = timm.list_pretrained


def _routed(name: object) -> bool:
    return isinstance(name, str) and split_name(name)[0] in MODELS


def create_model(model_name, pretrained=False, **kwargs):
    if _routed(model_name):
        return vit_fast.create_model(model_name, pretrained=pretrained, **kwargs)
    return _timm_create_model(model_name, pretrained=pretrained, **kwargs)


def list_models(*args, **kwargs):
    return [n for n in _timm_list_models(*args, **kwargs) if _routed(n)]


def list_pretrained(*args, **kwargs):
    return [n for n in _timm_list_pretrained(*args, **kwargs) if _routed(n)]


for _module in (timm, timm.models):
    _module.create_model, _module.list_models, _module.list_pretrained = create_model, list_models, list_pretrained


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = params.get("model_name")
        test = getattr(item, "originalname", item.name)
        excluded = "torchscript" in item.name or test in _DOWNLOADS
        (keep if _routed(name) and not excluded else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
