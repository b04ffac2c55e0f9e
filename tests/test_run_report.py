"""`vit-fast report` on small fake run directories, and its FLOP count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import vit_fast
from vit_fast.cli import main
from vit_fast.config import get_config
from vit_fast.run_report import vit_flops

NANO = "vit_nano_patch2_8"


def _fake_run(out: Path, *, depth: int, epochs: int, finished: bool, top1: list[float]) -> dict:
    """metrics.jsonl (train and eval records as `vit-fast train` logs them) and, when finished, summary.json."""
    out.mkdir(parents=True)
    config = vit_fast.create_model(NANO, depth=depth).config.to_dict()
    records, step = [], 0
    for epoch in range(1, epochs + 1):
        for _ in range(3):
            step += 1
            records.append({"kind": "train", "step": step, "epoch": epoch, "loss": 2.3 / (step + 1), "acc": 0.5,
                            "lr": 1e-3, "img_s": 1000.0 + step})
        records.append({"kind": "eval", "epoch": epoch, "step": step, "test_loss": 1.0 / epoch,
                        "test_top1": top1[epoch - 1], "test_top5": min(1.0, top1[epoch - 1] + 0.2)})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tra')  # torn
    summary = {"dataset": "digits", "model": NANO, "precision": "fp32", "device": "cpu", "world_size": 1,
               "epochs": epochs, "steps": step, "batch_size": 64, "test_top1": top1[-1],
               "test_top5": min(1.0, top1[-1] + 0.2), "test_loss": 0.5, "train_images_per_s": 1234.5,
               "train_s": 50.0, "wall_s": 75.0, "skipped_steps": 0,
               "params": sum(p.numel() for p in vit_fast.create_model(NANO, depth=depth).parameters()),
               "img_size": 8, "config": config, "recipe": {"epochs": epochs}}
    if finished:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    else:  # what a run in progress has: its checkpoints
        from vit_fast.train.checkpoints import save_checkpoint

        save_checkpoint(out / "checkpoints", {"step": step, "config": config, "wall_s": 30.0,
                                              "recipe": {"model": NANO, "dataset": "digits", "epochs": 5}}, keep=1)
    return summary


def test_report_on_two_runs_prints_and_writes_the_table_and_curves(tmp_path, capsys):
    a = _fake_run(tmp_path / "vit-a", depth=4, epochs=3, finished=True, top1=[0.5, 0.7, 0.9312])
    _fake_run(tmp_path / "vit-b", depth=2, epochs=2, finished=False, top1=[0.4, 0.6])
    out = tmp_path / "report"
    rc = main(["report", str(tmp_path / "vit-a"), str(tmp_path / "vit-b"), "--out", str(out), "--batch-size", "4",
               "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0
    md = (out / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 4 and table[0].startswith("| run | model | dataset | epochs | top-1 | top-5 | params")
    assert table[0] in printed and table[2] in printed
    cells_a = [c.strip() for c in table[2].strip("|").split("|")]
    cells_b = [c.strip() for c in table[3].strip("|").split("|")]
    assert cells_a[:6] == ["vit-a", NANO, "digits", "3", "93.12%", "100.00%"]
    assert cells_a[6] == f"{a['params'] / 1e6:.2f}M"
    assert float(cells_a[7]) == pytest.approx(vit_flops(vit_fast.create_model(NANO).config) / 1e9, rel=1e-2)
    assert cells_a[8] == "1,234" and cells_a[9].endswith("*") and float(cells_a[9][:-1].replace(",", "")) > 0
    assert cells_a[10] == "1.2 min"
    # the unfinished run: accuracy from its last evaluation, speed from its training records, the rest from
    # its newest checkpoint
    b_params = sum(p.numel() for p in vit_fast.create_model(NANO, depth=2).parameters())
    assert cells_b[:6] == ["vit-b (unfinished)", NANO, "digits", "5", "60.00%", "80.00%"]
    assert cells_b[6] == f"{b_params / 1e6:.2f}M" and float(cells_b[7]) < float(cells_a[7])
    assert cells_b[8] == "1,004" and cells_b[10] == "30 s"
    assert "measured by `vit-fast report`" in md and "(unfinished)" in md
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 600


def test_no_measure_and_missing_run_directory(tmp_path, capsys):
    _fake_run(tmp_path / "r", depth=1, epochs=1, finished=True, top1=[0.3])
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--no-measure"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| r ")][0]
    assert [c.strip() for c in row.strip("|").split("|")][9] == "-"
    assert main(["report", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist: not a `vit-fast train` run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    assert "holds none of summary.json, model.safetensors, metrics.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [{}, {"class_token": False, "global_pool": "avg", "num_classes": 0}])
def test_vit_flops_are_the_flop_counters_matmuls_plus_attention(overrides):
    model = vit_fast.create_model(NANO, **overrides).eval()
    with vit_fast.set_backend("reference"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 1, 8, 8))
    c = model.config
    n = c.num_patches + c.num_prefix_tokens
    attention = c.depth * 2 * (2 * n * n * c.embed_dim)  # q k^T and p v, 2 FLOPs per multiply-add
    counted = counter.get_total_flops()
    counts = counter.get_flop_counts()["Global"]
    if not any("attention" in str(op) for op in counts):  # PyTorch's CPU attention is not in its counter
        counted += attention
    assert vit_flops(c) == counted


def test_vit_base_is_the_usual_17_6_gmacs():
    assert vit_flops(get_config("vit_base_patch16_224")) / 2e9 == pytest.approx(17.6, abs=0.05)  # timm's table


def test_a_cnn_run_beside_a_vit_run_gets_its_parameters_and_flops_from_its_config(tmp_path, capsys):
    from vit_fast.train.models import build_model, config_of

    _fake_run(tmp_path / "vit", depth=1, epochs=1, finished=True, top1=[0.3])
    cnn = build_model("test_resnet", num_classes=10, in_chans=1, img_size=8, drop_path=0.0, overrides={})
    _fake_run(tmp_path / "cnn", depth=1, epochs=1, finished=True, top1=[0.6])
    summary = json.loads((tmp_path / "cnn" / "summary.json").read_text())
    summary.update(model="test_resnet", config=config_of(cnn), in_chans=1, params=None)  # as a CNN run records it
    (tmp_path / "cnn" / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(tmp_path / "vit"), str(tmp_path / "cnn"), "--out", str(tmp_path / "o"),
                 "--no-measure"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cnn ")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cnn.eval()(torch.zeros(1, 1, 8, 8))  # the small-image stem keeps the 8x8 map: far more FLOPs than 2x2
    assert cells[1] == "test_resnet" and cells[4] == "60.00%"
    assert cells[6] == f"{sum(p.numel() for p in cnn.parameters()) / 1e6:.2f}M"
    assert float(cells[7]) == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-2)
