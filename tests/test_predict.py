"""`vit-fast predict` on generated image files, for a tiny model saved as a training run's directory."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vit_fast
from vit_fast.cli import main
from vit_fast.predict import EXIT_SKIPPED

NANO = "vit_nano_patch2_8"
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3760


def _save_run(out: Path, model: torch.nn.Module, dataset: str = "digits") -> Path:
    """A run directory as `vit-fast train` leaves it: model.safetensors (config in its metadata), summary.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    save_file(weights, out / "model.safetensors",
              metadata={"config": json.dumps(config), "dataset": dataset, "model": NANO})
    summary = {"dataset": dataset, "model": NANO, "epochs": 1, "test_top1": 0.5, "test_top5": 0.9,
               "img_size": 8, "config": config, "params": sum(p.numel() for p in model.parameters())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return out


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = vit_fast.create_model(NANO).eval()
    with torch.no_grad():  # a head that makes the top classes differ clearly from image to image
        model.head.weight.normal_(0, 1.0)
    return _save_run(tmp_path / "run", model), model


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    files = {}
    for i in range(3):
        files[f"gray{i}"] = folder / f"gray{i}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(files[f"gray{i}"])
    files["rgb"] = folder / "sub" / "rgb.png"  # color for a grayscale model: converted
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), mode="RGB").save(files["rgb"])
    files["big"] = folder / "sub" / "big.jpg"  # resized to the model's 8x8
    Image.fromarray(rng.integers(0, 256, (24, 16), dtype=np.uint8), mode="L").save(files["big"])
    files["corrupt"] = folder / "corrupt.png"
    files["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
    (folder / "notes.txt").write_text("not an image: a folder search passes it by")
    return files


def _expected_top(model: torch.nn.Module, path: Path, k: int) -> list[int]:
    """The classes the model ranks first, from the image preprocessed here by hand as the digits run does."""
    with Image.open(path) as im:
        im = im.convert("L")
        if im.size != (8, 8):
            im = im.resize((8, 8), Image.BILINEAR)  # the shorter side of 16x24 is 16: resized, center-cropped
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None, None]
    with torch.no_grad():
        logits = model((x - DIGITS_MEAN) / DIGITS_STD)
    return logits.topk(k, dim=-1).indices[0].tolist()


def _read_jsonl(path: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in map(json.loads, path.read_text().splitlines())}


def test_predict_a_run_on_a_folder_with_corrupt_and_converted_images(run_dir, images, tmp_path, capsys):
    run, model = run_dir
    out, maps = tmp_path / "pred.jsonl", tmp_path / "maps"
    rc = main(["predict", str(run), str(images["gray0"].parent), str(images["corrupt"]), "--out", str(out),
               "--batch-size", "2", "--workers", "0", "--no-progress", "--top-k", "3", "--attention-maps", str(maps)])
    captured = capsys.readouterr()
    assert rc == EXIT_SKIPPED, captured.err  # a file was skipped: a script can tell
    recs = _read_jsonl(out)
    assert sorted(recs) == ["big.jpg", "corrupt.png", "gray0.png", "gray1.png",
                            "gray2.png", "rgb.png"]
    assert "error" in recs["corrupt.png"] and "top" not in recs["corrupt.png"]
    assert "converted color to grayscale" in recs["rgb.png"]["note"]
    assert "1 skipped" in captured.err and "1 converted" in captured.err
    for name in ("gray0.png", "gray1.png", "gray2.png", "rgb.png"):
        top = recs[name]["top"]
        assert [t["class"] for t in top] == _expected_top(model, images[name.split(".")[0]], 3)
        assert [t["label"] for t in top] == [str(t["class"]) for t in top]  # digits: the digit itself
        assert 1 >= top[0]["prob"] >= top[1]["prob"] >= top[2]["prob"] > 0
        assert name in captured.out and "corrupt.png" in captured.out and "skipped" in captured.out
    assert len(recs["big.jpg"]["top"]) == 3  # 16x24: resized to 8x12, center-cropped to 8x8
    for rec in recs.values():
        if "top" in rec:
            png = Path(rec["attention_map"])
            assert png.parent == maps and png.stat().st_size > 1000
            with Image.open(png) as im:
                assert im.format == "PNG" and im.size[0] > im.size[1] > 100
        else:
            assert "attention_map" not in rec
    assert len(list(maps.iterdir())) == 5


def test_predictions_are_the_same_with_and_without_maps_and_csv_and_label_files(run_dir, images, tmp_path):
    run, _model = run_dir
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"digit {i}" for i in range(10)) + "\n")
    common = [str(images["gray0"]), str(images["gray1"]), str(images["gray2"]), "--workers", "0",
              "--no-progress", "--top-k", "4"]
    assert main(["predict", str(run), *common, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert main(["predict", str(run), *common, "--out", str(tmp_path / "b.csv"), "--labels", str(labels),
                 "--attention-maps", str(tmp_path / "maps"), "--map-method", "cls", "--layer", "-1"]) == 0
    a = _read_jsonl(tmp_path / "a.jsonl")
    with open(tmp_path / "b.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for row in rows:
        top = a[Path(row["path"]).name]["top"]
        for i, t in enumerate(top, start=1):
            assert int(row[f"class_{i}"]) == t["class"] and row[f"label_{i}"] == f"digit {t['class']}"
            assert abs(float(row[f"prob_{i}"]) - t["prob"]) < 1e-5
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["gray0.png", "gray1.png", "gray2.png"]


def test_checkpoint_file_with_model_name_takes_head_and_channels_from_the_weights(tmp_path, images, capsys):
    model = vit_fast.create_model(NANO, num_classes=3, in_chans=3).eval()
    ckpt = tmp_path / "weights.pth"
    torch.save(model.state_dict(), ckpt)
    folder = tmp_path / "classes"
    for name in ("cat", "dog", "eel"):
        (folder / "train" / name).mkdir(parents=True)
    out = tmp_path / "p.jsonl"
    rc = main(["predict", str(ckpt), "--model", NANO, str(images["gray0"]), str(images["rgb"]), "--workers", "0",
               "--no-progress", "--labels", str(folder), "--out", str(out), "--mean", "0.5", "0.5", "0.5",
               "--std", "0.25", "0.25", "0.25"])
    assert rc == 0, capsys.readouterr().err
    recs = _read_jsonl(out)
    assert recs["gray0.png"]["note"] == "converted grayscale to RGB" and "note" not in recs["rgb.png"]
    with Image.open(images["rgb"]) as im:
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = torch.softmax(model((x - 0.5) / 0.25), dim=-1)[0]
    got = {t["label"]: t["prob"] for t in recs["rgb.png"]["top"]}
    assert got == pytest.approx({n: float(p) for n, p in zip(("cat", "dog", "eel"), expected, strict=True)},
                                abs=1e-5)

    # without a config in the file and without --model, the error says what to pass
    rc = main(["predict", str(ckpt), str(images["gray0"]), "--workers", "0", "--no-progress"])
    assert rc == 1 and "--model NAME" in capsys.readouterr().err


def test_user_errors_end_with_one_line_and_status_1(run_dir, images, tmp_path, capsys):
    run, _ = run_dir
    cases = [
        ([str(tmp_path / "nowhere"), str(images["gray0"])], "neither a run directory"),
        ([str(run), str(tmp_path / "no-such-*.png")], "no image files found"),
        ([str(run), str(images["gray0"]), "--out", str(tmp_path / "p.txt")], "--out must end in .jsonl or .csv"),
        ([str(run), str(images["corrupt"])], "not a readable image"),
        ([str(run), str(images["gray0"]), "--labels", str(tmp_path / "short.txt")], "names 2 classes"),
        ([str(run), str(images["gray0"]), "--mean", "0.1", "0.2", "0.3"], "mean needs 1 values"),
    ]
    (tmp_path / "short.txt").write_text("a\nb\n")
    for argv, message in cases:
        rc = main(["predict", *argv, "--workers", "0", "--no-progress"])
        captured = capsys.readouterr()
        assert rc == 1, argv
        assert message in captured.out + captured.err, (argv, captured.out, captured.err)


@pytest.mark.subprocess
def test_images_decode_in_loader_worker_processes(run_dir, images, tmp_path):
    run, model = run_dir
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(run), str(images["gray0"].parent), "--workers", "2", "--batch-size", "2",
                 "--no-progress", "--out", str(out), "--skip-bad"]) == 0
    recs = _read_jsonl(out)
    assert len(recs) == 6 and recs["gray1.png"]["top"][0]["class"] == _expected_top(model, images["gray1"], 1)[0]


def test_preprocessing_comes_from_flags_then_the_run_then_pretrained_cfg():
    from vit_fast.predict import Preprocess, preprocess_for

    model = vit_fast.create_model(NANO, in_chans=3)
    model.pretrained_cfg = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.25,) * 3, "crop_pct": 0.9,
                            "interpolation": "bicubic"}
    assert preprocess_for(model) == Preprocess((8, 8), (0.5,) * 3, (0.25,) * 3, 0.9, "bicubic", 3)
    from_run = preprocess_for(model, {"dataset": "cifar10", "img_size": 8})
    assert from_run.mean == pytest.approx((0.4914, 0.4822, 0.4465)) and from_run.crop_pct == 1.0
    assert from_run.interpolation == "bilinear"  # torchvision's Resize, as in training's evaluation
    # what the run does not say, the model's pretrained_cfg does
    assert preprocess_for(model, {"img_size": 8, "mean": [0.1] * 3}) == Preprocess((8, 8), (0.1,) * 3, (0.25,) * 3,
                                                                                 0.9, "bicubic", 3)
    flags = preprocess_for(model, {"dataset": "cifar10"}, mean=[0, 0, 0], crop_pct=0.5, interpolation="nearest")
    assert (flags.mean, flags.std, flags.crop_pct, flags.interpolation) == ((0, 0, 0), from_run.std, 0.5, "nearest")
    del model.pretrained_cfg
    plain = preprocess_for(model)
    assert (plain.mean, plain.crop_pct, plain.interpolation) == ((0.485, 0.456, 0.406), 1.0, "bilinear")
    with pytest.raises(ValueError, match="img_size"):
        preprocess_for(model, img_size=16)


def test_a_cnn_run_predicts_and_asking_it_for_attention_maps_names_the_flag(tmp_path, images, capsys):
    from safetensors.torch import save_file

    from vit_fast.train.models import build_model, config_of

    # a run directory as `vit-fast train --model test_resnet` leaves it: the config rebuilds the small-image stem
    model = build_model("test_resnet", num_classes=10, in_chans=1, img_size=8, drop_path=0.0, overrides={}).eval()
    run = tmp_path / "cnn"
    run.mkdir()
    config = config_of(model)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, run / "model.safetensors",
              metadata={"config": json.dumps(config), "model_family": "timm"})
    (run / "summary.json").write_text(json.dumps({"dataset": "digits", "model": "test_resnet", "img_size": 8,
                                                  "in_chans": 1, "num_classes": 10, "config": config}))
    out = tmp_path / "p.jsonl"
    common = [str(run), str(images["gray0"]), str(images["gray1"]), "--workers", "0", "--no-progress", "--top-k", "2"]
    assert main(["predict", *common, "--out", str(out)]) == 0, capsys.readouterr().err
    recs = _read_jsonl(out)
    assert [t["class"] for t in recs["gray1.png"]["top"]] == _expected_top(model, images["gray1"], 2)
    assert recs["gray1.png"]["top"][0]["label"] == str(recs["gray1.png"]["top"][0]["class"])

    assert main(["predict", *common, "--attention-maps", str(tmp_path / "maps")]) == 1
    assert "--attention-maps needs a ViT" in capsys.readouterr().err and not (tmp_path / "maps").exists()


def test_label_names_of_the_datasets_vit_fast_train_knows():
    from vit_fast.predict import read_labels

    assert read_labels(None, {"dataset": "cifar10"}, 10)[3] == "cat"
    cifar100 = read_labels(None, {"dataset": "cifar100"}, 100)
    assert (cifar100[0], cifar100[1], cifar100[99]) == ("apple", "aquarium_fish", "worm")
    assert cifar100 == sorted(set(cifar100))  # the meta file's fine labels are alphabetical
    assert read_labels(None, {"dataset": "imagefolder"}, 3) == ["0", "1", "2"]  # no names recorded: indices
