"""timm's model API around the forward: pretrained configs and tags, pretrained loading, factory arguments, layer-wise
LR decay groups, backbones (forward_intermediates, pruning, features_only), FX tracing, head and input-size changes,
and timm's ViT options; each compared with timm's own model on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_nested_close

import vit_fast
from vit_fast.config import PRESETS
from vit_fast.pretrained import get_pretrained_cfg, list_tags

timm = pytest.importorskip("timm")
from timm.models._registry import get_arch_pretrained_cfgs  # noqa: E402

TIMM_PRESETS = [n for n in PRESETS if n in timm.list_models()]
SMALL = dict(img_size=32, patch_size=8, depth=4)  # a vit_tiny at 4x4 patches: fast, same code paths
CFG_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation", "num_classes", "fixed_input_size",
            "classifier", "first_conv", "hf_hub_id", "license", "architecture", "tag", "pool_size")


def _pair(name="vit_tiny_patch16_224", **kw):
    """timm's model and vit_fast's with the same weights, both in eval mode."""
    t = timm.create_model(name, **kw).eval()
    return t, vit_fast.from_timm(t).eval()




# ---- pretrained configs and tags ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TIMM_PRESETS)
def test_pretrained_cfgs_equal_timm_registry_tag_by_tag(arch):
    theirs = get_arch_pretrained_cfgs(arch)
    assert [f"{arch}.{t}" for t in list_tags(arch)] == list(theirs)  # same tags, same default (first)
    for name, pc in theirs.items():
        ref = pc.to_dict()
        ours = get_pretrained_cfg(arch, name.split(".", 1)[1])
        assert {k: ours.get(k) for k in CFG_KEYS} == {k: ref.get(k) for k in CFG_KEYS}, name
        for test_size in (False, True):  # the preprocessing timm's data pipeline derives, eval size included
            assert timm.data.resolve_data_config(pretrained_cfg=ours, use_test_size=test_size) == \
                   timm.data.resolve_data_config(pretrained_cfg=ref, use_test_size=test_size), name


@pytest.mark.parametrize("name", ["vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit_small_patch16_224.dino",
                                  "vit_tiny_patch16_224.augreg_in21k", "vit_base_patch16_384", "vit_huge_patch14_224"])
def test_data_config_and_class_count_follow_the_tag_as_in_timm(name):
    with torch.device("meta"):
        t = timm.create_model(name)
        m = vit_fast.create_model(name)
    assert timm.data.resolve_data_config(model=m) == timm.data.resolve_data_config(model=t)
    assert m.pretrained_cfg == {k: v for k, v in t.pretrained_cfg.items() if k in m.pretrained_cfg}
    assert m.default_cfg is m.pretrained_cfg
    assert (m.num_classes, m.num_features, m.head_hidden_size, m.in_chans) == \
           (t.num_classes, t.num_features, t.head_hidden_size, t.in_chans)


def test_augreg_weights_get_their_own_normalization_not_imagenet_defaults():
    m = vit_fast.create_model("vit_base_patch16_224.augreg2_in21k_ft_in1k", device="meta")
    cfg = timm.data.resolve_data_config(model=m)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5) and cfg["crop_pct"] == 0.9


def test_unknown_tags_and_own_presets():
    with pytest.raises(ValueError, match="augreg2_in21k_ft_in1k"):
        vit_fast.create_model("vit_base_patch16_224.augreg2_in21k", device="meta")
    with pytest.raises(ValueError, match="no pretrained tags"):
        vit_fast.create_model("vit_tiny_patch4_32.cifar", device="meta")
    m = vit_fast.create_model("vit_nano_patch2_8")
    assert m.pretrained_cfg["input_size"] == (1, 8, 8) and m.pretrained_cfg["hf_hub_id"] is None
    m = vit_fast.create_model("vit_tiny_patch16_224", pretrained_cfg_overlay=dict(crop_pct=1.0), device="meta")
    assert m.pretrained_cfg["crop_pct"] == 1.0


def test_pretrained_offline_fails_with_a_way_out(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(RuntimeError, match=r"(?s)patch16_224\.augreg_in21k_ft_in1k.*Offline.*checkpoint_path="):
        vit_fast.create_model("vit_tiny_patch16_224", pretrained=True, depth=1, img_size=32)
    with pytest.raises(ValueError, match="no published weights"):
        vit_fast.create_model("vit_huge_patch14_224.untrained", pretrained=True, device="meta")


def test_pretrained_loads_like_timm_through_timm_hub_loader(monkeypatch, tmp_path):
    """Both factories read the same (mocked) hub file: resampled position embedding, adapted first conv."""
    from safetensors.torch import save_file

    source = timm.create_model("vit_tiny_patch16_224", depth=2)  # a 224 checkpoint, as published
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    requested = []

    def fake_download(repo_id=None, filename=None, **kwargs):
        requested.append(repo_id)
        return str(path)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", fake_download)
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    kw = dict(depth=2, img_size=64, in_chans=1)
    t = timm.create_model(name, pretrained=True, **kw).eval()
    m = vit_fast.create_model(name, pretrained=True, **kw).eval()
    assert requested == [f"timm/{name}"] * 2
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert_nested_close(m(x), t(x))


def test_device_dtype_and_unknown_arguments():
    m = vit_fast.create_model("vit_small_patch16_224", device="meta", dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in m.parameters()} == {("meta", torch.float64)}
    with pytest.raises(TypeError, match="not_a_model_arg"):
        vit_fast.create_model("vit_tiny_patch16_224", device="meta", not_a_model_arg=1)
    assert vit_fast.create_model("vit_tiny_patch16_224", device="meta", dynamic_img_size=True).config.dynamic_img_size


# ---- layer-wise LR decay ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, dict(reg_tokens=2, pre_norm=True), dict(global_pool="avg", class_token=False)])
def test_layer_decay_param_groups_equal_timm(kw):
    from timm.models._manipulate import group_parameters
    from timm.optim import create_optimizer_v2

    t, m = _pair(**SMALL, **kw)

    def groups(model):
        names = {id(p): n for n, p in model.named_parameters()}
        opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        return sorted((g["lr_scale"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
                      for g in opt.param_groups)

    assert groups(m) == groups(t) and len(groups(m)) > SMALL["depth"] * 2
    assert vit_fast.model.layer_ids(m) == group_parameters(m, m.group_matcher(), reverse=True)
    assert m.no_weight_decay() >= {"pos_embed", "cls_token"}


# ---- backbone -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {}, dict(indices=2), dict(indices=[0, -1], norm=True), dict(output_fmt="NLC"), dict(return_prefix_tokens=True),
    dict(indices=[1], stop_early=True), dict(intermediates_only=True, indices=(0, 2)),
    dict(output_dict=True, return_prefix_tokens=True),
])
@pytest.mark.parametrize("arch", [{}, dict(reg_tokens=3, no_embed_class=True),
                                  dict(class_token=False, global_pool="avg")])
def test_forward_intermediates_equal_timm(kw, arch):
    t, m = _pair(**SMALL, **arch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = m.forward_intermediates(x, **kw), t.forward_intermediates(x, **kw)
    if isinstance(ours, dict):
        assert ours.keys() == theirs.keys()
        ours, theirs = list(ours.values()), list(theirs.values())
    assert_nested_close(ours, theirs)


@pytest.mark.parametrize("norm", [False, True])
def test_features_only_equals_timm(norm):
    from timm.models._features import FeatureGetterNet

    m = vit_fast.create_model("vit_tiny_patch16_224", **SMALL, features_only=True, out_indices=(1, 3),
                              feature_cfg=dict(norm=norm)).eval()
    # timm's ViT takes no feature options through create_model: its wrapper, built by hand for norm=True
    t = timm.create_model("vit_tiny_patch16_224", **SMALL, features_only=True, out_indices=(1, 3)) if not norm \
        else FeatureGetterNet(timm.create_model("vit_tiny_patch16_224", **SMALL), out_indices=(1, 3), norm=True)
    t.eval()
    m.load_state_dict(t.state_dict(), strict=True)  # the same modules pruned on both sides
    assert m.feature_info.channels() == t.feature_info.channels()
    assert m.feature_info.reduction() == t.feature_info.reduction()
    assert m.in_chans == (3 if norm else t.in_chans)  # timm's factory sets it; its hand-built wrapper has none
    assert "num_classes" not in m.pretrained_cfg and m.pretrained_cfg["input_size"] == (3, 224, 224)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_nested_close(m(x), t(x))


def test_prune_intermediate_layers_equals_timm():
    t, m = _pair(**SMALL)
    assert m.prune_intermediate_layers([1], prune_norm=True) == t.prune_intermediate_layers([1], prune_norm=True)
    assert len(m.blocks) == 2 and m.config.depth == 2 and not m.config.final_norm and m.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_nested_close(m(x), t(x))
        assert_nested_close(m.forward_intermediates(x, indices=[1]), t.forward_intermediates(x, indices=[1]))


# ---- FX, export ------------------------------------------------------------------------------------------------


def test_fx_symbolic_trace_and_feature_extractor_equal_eager():
    from torchvision.models.feature_extraction import create_feature_extractor

    m = vit_fast.create_model("vit_tiny_patch16_224", **SMALL, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = torch.fx.symbolic_trace(m)
    leaves = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {vit_fast.model.attention_packed, vit_fast.model.layernorm_mlp, vit_fast.model.patch_embed} <= leaves
    fe = create_feature_extractor(m, return_nodes={"blocks.1": "mid", "head": "logits"})
    with torch.no_grad():
        out = fe(x)
        assert_nested_close(gm(x), m(x))
        assert_nested_close(out["logits"], m(x))
        assert_nested_close(out["mid"], m.blocks[:2](m._embed(x)))
    with pytest.raises(ValueError, match="32x32"):
        gm(torch.randn(1, 3, 48, 48))  # the image-size check survives tracing


def test_torch_export_equals_eager():
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(m, (x,))
    with torch.no_grad():
        assert_nested_close(ep.module()(x), m(x))


# ---- head, pooling, input size ---------------------------------------------------------------------------------


def test_reset_classifier_keeps_mode_device_dtype_and_changes_pooling_as_timm():
    t, m = _pair(**SMALL)
    m.to(torch.float64)
    m.reset_classifier(7)
    assert not m.head.training and m.head.weight.dtype == torch.float64 and m.config.num_classes == 7
    m.train().reset_classifier(3)
    assert m.head.training
    meta = vit_fast.create_model("vit_tiny_patch16_224", **SMALL, device="meta")
    meta.reset_classifier(4)
    assert meta.head.weight.device.type == "meta"
    m.eval().float()
    x = torch.randn(2, 3, 32, 32)
    for pool in ("avg", "", "token"):
        t.reset_classifier(0, pool)
        m.reset_classifier(0, pool)
        assert m.global_pool == m.config.global_pool == pool and not m.config.use_fc_norm
        with torch.no_grad():
            assert_nested_close(m(x), t(x))
    with pytest.raises(ValueError, match="token"):
        vit_fast.create_model("vit_tiny_patch16_224", **SMALL, class_token=False, global_pool="avg").reset_classifier(
            0, "token")


def test_set_input_size_resamples_in_place_as_timm():
    t, m = _pair(**SMALL, reg_tokens=1)
    m.pos_embed.requires_grad_(False)
    t.set_input_size(img_size=(48, 64))
    m.set_input_size(img_size=(48, 64))
    assert not m.pos_embed.requires_grad and m.config.grid_size == (6, 8) and m.patch_embed.img_size == (48, 64)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        assert_nested_close(m.pos_embed, t.pos_embed)
        assert_nested_close(m(x), t(x))
    with pytest.raises(ValueError, match="patch size"):
        m.set_input_size(patch_size=4)


# ---- timm's ViT options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    dict(reg_tokens=4), dict(no_embed_class=True), dict(reg_tokens=2, no_embed_class=True),
    dict(reg_tokens=2, class_token=False, global_pool="avg"), dict(fc_norm=True),
    dict(fc_norm=False, global_pool="avg"),
    dict(pre_norm=True), dict(class_token=False, global_pool="max"), dict(global_pool="avgmax"), dict(final_norm=False),
])
def test_vit_options_equal_timm_and_their_checkpoints_load_unchanged(kw):
    t, converted = _pair(**SMALL, **kw)
    m = vit_fast.create_model("vit_tiny_patch16_224", **SMALL, **kw).eval()
    assert converted.config == m.config
    vit_fast.load_checkpoint(m, t.state_dict())
    m.load_state_dict(t.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_nested_close(m(x), t(x))
        assert_nested_close(converted(x), t(x))
        assert_nested_close(m.forward_head(m.forward_features(x), pre_logits=True),
               t.forward_head(t.forward_features(x), pre_logits=True))


def test_checkpoint_of_other_grid_resamples_with_no_embed_class():
    t = timm.create_model("vit_tiny_patch16_224", **SMALL, no_embed_class=True, reg_tokens=2)
    m = vit_fast.create_model("vit_tiny_patch16_224", **{**SMALL, "img_size": 48}, no_embed_class=True, reg_tokens=2)
    ref = copy.deepcopy(t)
    ref.set_input_size(img_size=48)
    vit_fast.load_checkpoint(m, t.state_dict())
    assert_nested_close(m.pos_embed, ref.pos_embed)
