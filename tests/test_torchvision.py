"""torchvision's ViTs: every architecture converts with outputs equal to torchvision's, state dicts are told by
their keys, and the weights' preprocessing is the model's data config (checked against torchvision's own
transforms). Nothing is downloaded: the models are built with random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vit_fast
from vit_fast.pretrained import (
    TORCHVISION_ARCHS,
    default_torchvision_weights,
    torchvision_arch,
    torchvision_pretrained_cfg,
    torchvision_weights,
)
from vit_fast.weights import config_from_torchvision

tvm = pytest.importorskip("torchvision.models", reason="torchvision is not installed (pip install torchvision)")
timm_data = pytest.importorskip("timm.data", reason="timm is not installed")
Image = pytest.importorskip("PIL.Image")

RTOL = 1e-5  # the bound on fp32 relative error: max|ours - torchvision| / max|torchvision|


@torch.no_grad()
def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and non-trivial: torchvision zero-initializes the head and the class token, which
    would let a wrong mapping of them pass."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln.weight")):
            p.normal_(1.0, 0.2, generator=gen)
        else:
            p.normal_(0.0, 0.02 if p.dim() > 1 else 0.05, generator=gen)
    return module.eval()


def _torchvision_model(arch: str, **kwargs: object) -> torch.nn.Module:
    """torchvision's ``arch`` with random weights, built without its own initialization (overwritten anyway)."""
    with torch.device("meta"):
        tv = getattr(tvm, arch)(weights=None, **kwargs)
    return _randomize(tv.to_empty(device="cpu"), seed=len(arch) + sum(map(len, map(str, kwargs.values()))))


def _rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def _check_builder(arch: str, img: int, batch: int) -> None:
    kwargs = {} if img == 224 else {"image_size": img}
    tv = _torchvision_model(arch, **kwargs)
    x = torch.randn(batch, 3, img, img)
    with torch.no_grad():
        theirs = tv(x)
    assert theirs.std() > 0.1, "degenerate reference: the comparison would prove nothing"
    model = vit_fast.from_torchvision(tv)
    del tv
    assert torchvision_arch(model.config) == arch and model.config.img_size == img
    with torch.no_grad():
        ours = model(x)
    assert ours.shape == theirs.shape == (batch, 1000)
    assert _rel_error(ours, theirs) <= RTOL


@pytest.mark.parametrize("arch,img,batch", [("vit_b_16", 224, 2), ("vit_b_32", 224, 2), ("vit_b_16", 384, 1)],
                         ids=["B16-224", "B32-224", "B16-384-swag"])
def test_base_models_equal_torchvision(arch, img, batch):
    _check_builder(arch, img, batch)


@pytest.mark.slow
@pytest.mark.parametrize("arch,img", [("vit_l_16", 224), ("vit_l_16", 512), ("vit_l_32", 224), ("vit_h_14", 224),
                                      ("vit_h_14", 518)],
                         ids=["L16-224", "L16-512-swag", "L32-224", "H14-224", "H14-518-swag"])
def test_large_and_huge_models_equal_torchvision(arch, img):
    _check_builder(arch, img, 1)


def _tiny_torchvision(img: int = 32) -> torch.nn.Module:
    return _randomize(tvm.VisionTransformer(image_size=img, patch_size=8, num_layers=2, num_heads=3, hidden_dim=48,
                                            mlp_dim=96, num_classes=7), seed=1)


@pytest.mark.parametrize("source", ["state dict", ".pth", ".safetensors"])
def test_load_checkpoint_tells_a_torchvision_state_dict_by_its_keys(source, tmp_path):
    from safetensors.torch import save_file

    tv = _tiny_torchvision()
    sd = tv.state_dict()
    if source == ".pth":
        torch.save({"model": sd}, tmp_path / "tv.pth")
        sd = tmp_path / "tv.pth"
    elif source == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "tv.safetensors"))
        sd = tmp_path / "tv.safetensors"
    model = vit_fast.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2,
                                  num_heads=3, mlp_ratio=2.0, num_classes=7)
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # the preset's timm weights' normalization ...
    vit_fast.load_checkpoint(model, sd).eval()
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)  # ... replaced by torchvision's preprocessing
    assert model.pretrained_cfg["interpolation"] == "bilinear"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _rel_error(model(x), tv(x)) <= RTOL


def test_a_torchvision_checkpoint_into_another_image_size_resamples_its_position_embedding():
    tv = _tiny_torchvision(img=32)
    model = vit_fast.create_model("vit_tiny_patch16_224", img_size=48, patch_size=8, embed_dim=48, depth=2,
                                  num_heads=3, mlp_ratio=2.0, num_classes=7)
    vit_fast.load_checkpoint(model, tv.state_dict())
    expected = vit_fast.resample_pos_embed(tv.encoder.pos_embedding.detach(), (6, 6), (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)


def test_from_torchvision_state_dict_needs_the_heads_only_for_an_unknown_width():
    tv = _tiny_torchvision()
    with pytest.raises(ValueError, match="num_heads"):
        vit_fast.from_torchvision(tv.state_dict())
    model = vit_fast.from_torchvision(tv.state_dict(), num_heads=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel_error(model(x), tv(x)) <= RTOL
    with torch.device("meta"):
        b32 = tvm.vit_b_32(weights=None)
    config = config_from_torchvision(b32.state_dict())  # a known width: B's 12 heads from the table
    assert (config.num_heads, config.depth, config.patch_size, config.img_size) == (12, 12, 32, 224)


def test_from_torchvision_keeps_device_dtype_and_mode():
    tv = _tiny_torchvision().double().train()
    model = vit_fast.from_torchvision(tv)
    assert model.training and model.pos_embed.dtype == torch.float64
    assert model.pos_embed.data_ptr() != tv.encoder.pos_embedding.data_ptr()  # a copy, not shared storage


def test_unsupported_torchvision_variants_say_what_they_use():
    tv = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=3, hidden_dim=48, mlp_dim=96,
                               num_classes=7, representation_size=24)
    with pytest.raises(ValueError, match="representation_size"):
        vit_fast.from_torchvision(tv)
    with pytest.raises(TypeError, match="not a torchvision VisionTransformer"):
        vit_fast.from_torchvision(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("arch", sorted(TORCHVISION_ARCHS))
def test_the_table_is_torchvisions_architectures_and_weights(arch):
    with torch.device("meta"):
        tv = getattr(tvm, arch)(weights=None)
    a = TORCHVISION_ARCHS[arch]
    assert (tv.patch_size, tv.hidden_dim, len(tv.encoder.layers), tv.encoder.layers[0].num_heads, tv.mlp_dim) == (
        a["patch_size"], a["embed_dim"], a["depth"], a["num_heads"], a["mlp_dim"])
    assert torchvision_arch(config_from_torchvision(tv)) == arch
    enum = tvm.get_model_weights(arch)
    assert torchvision_weights(arch) == [w.name for w in enum]
    for w in enum:
        t = w.transforms()
        config = config_from_torchvision(tv).replace(img_size=t.crop_size[0])
        cfg = torchvision_pretrained_cfg(config, w.name)
        assert cfg["interpolation"] == t.interpolation.value
        assert cfg["mean"] == tuple(t.mean) and cfg["std"] == tuple(t.std) and len(w.meta["categories"]) == 1000
        assert round(t.crop_size[0] / cfg["crop_pct"]) == t.resize_size[0]


def test_every_torchvision_vit_is_in_the_table():
    assert sorted(n for n in tvm.list_models(module=tvm) if n.startswith("vit_")) == sorted(TORCHVISION_ARCHS)


class _Holder:  # what timm's resolve_data_config reads from a model: its pretrained_cfg
    def __init__(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg


@pytest.mark.parametrize("arch,weights", [(a, w) for a in sorted(TORCHVISION_ARCHS) for w in torchvision_weights(a)])
def test_data_config_preprocesses_as_torchvisions_transforms(arch, weights):
    """timm's pipeline built from the model's data config gives torchvision's own preprocessing, pixel for
    pixel (resize of the shorter side, interpolation, center crop, mean/std)."""
    w = tvm.get_model_weights(arch)[weights]
    crop = w.transforms().crop_size[0]
    with torch.device("meta"):
        config = config_from_torchvision(getattr(tvm, arch)(weights=None)).replace(img_size=crop)
    data = timm_data.resolve_data_config({}, model=_Holder(torchvision_pretrained_cfg(config, weights)))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (crop + 61, crop + 37, 3), dtype=np.uint8))
    ours = timm_data.create_transform(**data)(image)
    theirs = w.transforms()(image)
    assert ours.shape == theirs.shape == (3, crop, crop)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,img,expected", [
    ("vit_b_16", 224, "IMAGENET1K_V1"), ("vit_b_16", 384, "IMAGENET1K_SWAG_E2E_V1"),
    ("vit_l_16", 512, "IMAGENET1K_SWAG_E2E_V1"), ("vit_l_32", 224, "IMAGENET1K_V1"),
    ("vit_h_14", 518, "IMAGENET1K_SWAG_E2E_V1"), ("vit_h_14", 224, "IMAGENET1K_SWAG_LINEAR_V1"),
    ("vit_b_16", 320, "IMAGENET1K_V1"),
])
def test_default_weights_are_v1_where_they_fit_and_the_choice_is_the_tag(arch, img, expected):
    assert default_torchvision_weights(arch, img) == expected
    with torch.device("meta"):
        config = config_from_torchvision(getattr(tvm, arch)(weights=None)).replace(img_size=img)
    assert torchvision_pretrained_cfg(config)["tag"] == f"tv_{expected.lower()}"


def test_weights_are_named_either_way_and_unknown_ones_are_refused():
    with torch.device("meta"):
        config = config_from_torchvision(tvm.vit_b_16(weights=None))
    swag = torchvision_pretrained_cfg(config, "ViT_B_16_Weights.IMAGENET1K_SWAG_LINEAR_V1")
    assert (swag["tag"], swag["interpolation"], swag["crop_pct"]) == ("tv_imagenet1k_swag_linear_v1", "bicubic", 1.0)
    assert swag["hf_hub_id"] is None and swag["input_size"] == (3, 224, 224)
    with pytest.raises(ValueError, match="IMAGENET1K_SWAG_E2E_V1"):
        torchvision_pretrained_cfg(config, "IMAGENET1K_V2")
    model = vit_fast.from_torchvision(_tiny_torchvision())
    assert model.pretrained_cfg["tag"] is None  # not one of torchvision's architectures: no weights to name
    with pytest.raises(ValueError, match="none of torchvision's ViTs"):
        vit_fast.from_torchvision(_tiny_torchvision(), weights="IMAGENET1K_V1")
