"""Model directories (config.json + model.safetensors, timm's hub format): vit_fast -> vit_fast, vit_fast -> timm
(``create_model("local-dir:DIR")``) and timm -> vit_fast. Nothing is downloaded."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import vit_fast
from vit_fast import hub

timm = pytest.importorskip("timm", reason="timm is not installed")
from timm.models import save_for_hf  # noqa: E402

TINY = dict(img_size=32, patch_size=8, depth=2, num_classes=7)


def _timm_has_local_dir() -> bool:
    from timm.models import _factory

    return "local-dir" in getattr(_factory, "_MODEL_SOURCES", ())


needs_local_dir = pytest.mark.skipif(not _timm_has_local_dir(),
                                     reason=f"timm {timm.__version__} has no 'local-dir:' model source (timm 1.0.16+)")


def _data_config(model: torch.nn.Module) -> dict:
    """timm's data config of ``model``, sequences as tuples (timm leaves config.json's lists as lists)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module, shape=(2, 3, 32, 32)) -> None:
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=1e-6, rtol=1e-6)


def test_save_and_load_round_trip_keeps_weights_config_and_preprocessing(tmp_path):
    model = vit_fast.create_model("vit_tiny_patch4_32", depth=2, reg_tokens=2, norm_eps=1e-12)
    with pytest.warns(UserWarning, match="eps"):
        out = model.save_pretrained(str(tmp_path / "m"))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert out == str(tmp_path / "m")
    loaded = vit_fast.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.config.norm_eps == 1e-12
    for key in ("mean", "std", "input_size", "crop_pct", "interpolation"):
        assert loaded.pretrained_cfg[key] == model.pretrained_cfg[key], key
    assert loaded.pretrained_cfg["architecture"] == "vit_tiny_patch4_32"
    assert not loaded.training
    _same_outputs(model, loaded)


def test_save_pretrained_writes_timms_format(tmp_path):
    model = vit_fast.create_model("vit_small_patch16_224", **TINY)
    model.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == "vit_small_patch16_224"
    assert cfg["num_classes"] == 7 and cfg["num_features"] == 384 and cfg["global_pool"] == "token"
    assert cfg["model_args"] == {"img_size": 32, "num_classes": 7, "in_chans": 3, "global_pool": "token",
                                 "patch_size": 8, "depth": 2}
    # every pretrained_cfg key is one timm's PretrainedCfg takes (an unknown one makes timm raise)
    import dataclasses

    from timm.models._pretrained import PretrainedCfg

    assert set(cfg["pretrained_cfg"]) <= {f.name for f in dataclasses.fields(PretrainedCfg)}
    assert set(hub.PRETRAINED_CFG_KEYS) <= {f.name for f in dataclasses.fields(PretrainedCfg)}
    assert cfg["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]  # the augreg tag's normalization, kept


@needs_local_dir
@pytest.mark.parametrize("name,overrides", [
    ("vit_small_patch16_224", TINY),  # a timm architecture with overrides
    ("vit_nano_patch2_8", {}),  # vit_fast's own preset: timm builds it from its arguments over a timm ViT
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1, global_pool="avg", reg_tokens=1,
                                  class_token=True, num_classes=3)),
])
def test_timm_loads_a_vit_fast_directory(name, overrides, tmp_path):
    model = vit_fast.create_model(name, **overrides)
    model.save_pretrained(str(tmp_path))
    theirs = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert type(theirs).__module__.startswith("timm.")
    c = model.config
    _same_outputs(model, theirs, (2, c.in_chans, *((c.img_size,) * 2)))
    # the preprocessing travels; the input size is the model's own (a factory override of img_size leaves the
    # preset's in pretrained_cfg, in timm and vit_fast alike; the directory records the real one, as timm's save)
    assert _data_config(theirs) == {**_data_config(model), "input_size": (c.in_chans, c.img_size, c.img_size)}


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_vit_fast_loads_a_timm_directory(safe, tmp_path):
    theirs = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)
    save_for_hf(theirs, str(tmp_path), safe_serialization=safe)
    ours = vit_fast.from_pretrained(tmp_path)
    assert isinstance(ours, vit_fast.VisionTransformer)
    assert ours.config.depth == 2 and ours.num_classes == 5 and ours.config.img_size == (32, 32)
    _same_outputs(theirs, ours)
    assert _data_config(ours) == {**_data_config(theirs), "input_size": (3, 32, 32)}


def test_a_timm_directory_of_features_vit_fast_lacks_is_refused_by_name(tmp_path):
    theirs = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, init_values=1e-5)
    save_for_hf(theirs, str(tmp_path), safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_args"]["init_values"] = 1e-5  # what the factory records for layer scale
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*init_values"):
        vit_fast.from_pretrained(tmp_path)
    cfg["architecture"] = "deit_tiny_patch16_224"
    del cfg["model_args"]["init_values"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="deit_tiny_patch16_224"):
        vit_fast.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_the_config_name_the_file(tmp_path):
    vit_fast.create_model("vit_tiny_patch16_224", **TINY).save_pretrained(str(tmp_path / "a"))
    vit_fast.create_model("vit_tiny_patch16_224", **{**TINY, "depth": 3}).save_pretrained(str(tmp_path / "b"))
    (tmp_path / "b" / "config.json").write_bytes((tmp_path / "a" / "config.json").read_bytes())
    with pytest.raises(ValueError, match=r"b/model\.safetensors.*unexpected keys \['blocks\.2\."):
        vit_fast.from_pretrained(tmp_path / "b")


def test_a_failed_save_leaves_the_previous_directory_loadable(tmp_path, monkeypatch):
    old = vit_fast.create_model("vit_tiny_patch16_224", **TINY)
    old.save_pretrained(str(tmp_path))
    import safetensors.torch

    def torn(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", torn)
    with pytest.raises(OSError):
        vit_fast.create_model("vit_tiny_patch16_224", **TINY).save_pretrained(str(tmp_path))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temporaries
    _same_outputs(old, vit_fast.from_pretrained(tmp_path))


def test_save_pretrained_refuses_what_it_cannot_describe(tmp_path):
    model = vit_fast.create_model("vit_tiny_patch16_224", **TINY)
    with pytest.raises(ValueError, match="save_quantized"):
        vit_fast.quantize(model, "int8").save_pretrained(str(tmp_path / "q"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        model.save_pretrained(str(tmp_path / "file"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm's own eps: nothing to warn about
        model.save_pretrained(str(tmp_path / "ok"))


def test_predict_reads_a_model_directory_as_it_reads_a_run(tmp_path):
    from vit_fast.predict import load_model

    model = vit_fast.create_model("vit_nano_patch2_8")
    model.save_pretrained(str(tmp_path))
    loaded, _, _ = load_model(str(tmp_path))
    _same_outputs(model, loaded, (2, 1, 8, 8))
