"""Loading weights: timm and Hugging Face layouts, files, resampling, head changes, errors."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import vit_fast
from vit_fast.weights import convert_hf_state_dict

transformers = pytest.importorskip("transformers")

TINY = dict(embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0)


def _hf_model(cls=None, **kw):
    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                                 image_size=32, patch_size=8, num_labels=7, **kw)
    return (cls or transformers.ViTForImageClassification)(cfg).eval()


def _to_classic_hf_layout(sd: dict) -> dict:
    """The names of the checkpoint files published on the Hub, written out independently of vit_fast."""
    table = [
        (r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
        (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
        (r"attention\.q_proj\.", "attention.attention.query."),
        (r"attention\.k_proj\.", "attention.attention.key."),
        (r"attention\.v_proj\.", "attention.attention.value."),
        (r"attention\.o_proj\.", "attention.output.dense."),
        (r"mlp\.fc1\.", "intermediate.dense."),
        (r"mlp\.fc2\.", "output.dense."),
    ]
    out = {}
    for k, v in sd.items():
        for pat, rep in table:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


@pytest.mark.parametrize("old,new", [((14, 14), (24, 24)), ((24, 24), (14, 14)), ((7, 7), (4, 6))])
def test_resample_pos_embed_equals_timm(old, new):
    pe = torch.randn(1, 1 + old[0] * old[1], 32)
    ours = vit_fast.resample_pos_embed(pe, new, old, num_prefix_tokens=1)
    theirs = resample_abs_pos_embed(pe, list(new), list(old), num_prefix_tokens=1)
    assert ours.shape == (1, 1 + new[0] * new[1], 32)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours[:, :1], pe[:, :1])


@pytest.mark.parametrize("layout", ["current", "classic"])
def test_hf_classification_checkpoint_gives_hf_logits(layout, tmp_path):
    hf = _hf_model()
    sd = hf.state_dict()
    if layout == "classic":
        sd = _to_classic_hf_layout(sd)
        assert "vit.encoder.layer.0.attention.attention.query.weight" in sd
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=7, **TINY)
    vit_fast.load_checkpoint(m, path).eval()
    assert m.config.norm_eps == 1e-12 and m.blocks[1].norm2.eps == 1e-12
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(pixel_values=x).logits, atol=1e-5, rtol=1e-5)


def test_hf_vitmodel_with_pooler_and_config_eps(tmp_path):
    hf = _hf_model(transformers.ViTModel, layer_norm_eps=1e-5)
    torch.save(_to_classic_hf_layout(hf.state_dict()), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"layer_norm_eps": 1e-5}))
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0, **TINY)
    vit_fast.load_checkpoint(m, tmp_path / "pytorch_model.bin").eval()
    assert m.blocks[0].norm1.eps == 1e-5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.forward_features(x), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_224_checkpoint_into_384_model(suffix, tmp_path):
    t224 = timm.create_model("vit_tiny_patch16_224", depth=2)
    sd = t224.state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "epoch": 3}, path)
    m = vit_fast.create_model("vit_tiny_patch16_384", depth=2, checkpoint_path=str(path)).eval()
    # timm's own way of loading the same checkpoint into its 384 model
    t384 = timm.create_model("vit_tiny_patch16_384", depth=2).eval()
    from timm.models.vision_transformer import checkpoint_filter_fn

    t384.load_state_dict(checkpoint_filter_fn(sd, t384))
    torch.testing.assert_close(m.pos_embed, t384.pos_embed, atol=1e-6, rtol=1e-6)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        torch.testing.assert_close(m(x), t384(x), atol=1e-4, rtol=1e-4)


def test_state_dict_source_and_ddp_prefix():
    t = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval()
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval()
    vit_fast.load_checkpoint(m, {f"module.{k}": v for k, v in t.state_dict().items()})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), t(x))
    assert m.config.norm_eps == 1e-6  # timm's eps is kept


def test_new_class_count_keeps_a_fresh_head_with_a_warning():
    t = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=1000)
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=10)
    head = m.head.weight.clone()
    with pytest.warns(UserWarning, match="head"):
        vit_fast.load_checkpoint(m, t.state_dict())
    assert torch.equal(m.head.weight, head)
    torch.testing.assert_close(m.blocks[0].attn.qkv.weight, t.blocks[0].attn.qkv.weight)


def test_headless_checkpoint_into_model_with_head_warns():
    t = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=0)
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=10)
    with pytest.warns(UserWarning, match="head"):
        vit_fast.load_checkpoint(m, t.state_dict())


def test_load_errors_name_the_problem(tmp_path):
    t = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2)
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=2)
    sd = t.state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(KeyError, match=r"blocks\.1\.mlp\.fc2\.weight"):
        vit_fast.load_checkpoint(m, missing)
    with pytest.raises(KeyError, match="blocks.5.extra"):
        vit_fast.load_checkpoint(m, {**sd, "blocks.5.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight"):
        vit_fast.load_checkpoint(m, {**sd, "blocks.0.attn.qkv.weight": torch.zeros(3, 3)})
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors"):
        vit_fast.load_checkpoint(m, bad)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        vit_fast.load_checkpoint(m, tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint extension"):
        vit_fast.load_checkpoint(m, tmp_path / "w.npz")
    with pytest.raises(KeyError, match="lacks the v weight of layer 0"):
        sd_hf = _hf_model().state_dict()
        convert_hf_state_dict({k: v for k, v in sd_hf.items() if "v_proj.weight" not in k})


def test_load_does_not_warn_when_everything_fits():
    t = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vit_fast.load_checkpoint(m, t.state_dict())


def _torchvision_state_dict() -> dict:
    tvm = pytest.importorskip("torchvision.models")
    return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=3, hidden_dim=48, mlp_dim=96,
                                 num_classes=7).state_dict()


@pytest.mark.parametrize("layout", ["timm/vit_fast", "Hugging Face ViT", "torchvision ViT"])
def test_an_unknown_layout_names_the_closest_known_one_and_the_keys(layout):
    """A checkpoint of a known layout under a wrapper's prefix (or with a key renamed) is no known layout: the
    error says which one it resembles, and lists what is missing and what is unexpected."""
    source = {"timm/vit_fast": lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).state_dict(),
              "Hugging Face ViT": lambda: _hf_model().state_dict(),
              "torchvision ViT": _torchvision_state_dict}[layout]()
    sd = {f"backbone.{k}": v for k, v in source.items()}
    m = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    with pytest.raises(KeyError) as info:
        vit_fast.load_checkpoint(m, sd)
    text = str(info.value)
    assert f"closest to the {layout} layout" in text and "every key starts with 'backbone.'" in text
    assert "missing keys ['blocks.0." in text and "unexpected keys ['backbone." in text
    renamed = dict(source)
    renamed["something.else"] = renamed.pop(next(iter(renamed)))
    with pytest.raises(KeyError, match=f"closest to the {layout} layout"):
        vit_fast.load_checkpoint(m, renamed)
