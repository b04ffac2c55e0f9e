"""vit_fast.rundir, the one reader of a `vit-fast train` run directory: what it reads from each file, where a run
still in progress gets its facts, and the error, naming the file, for a file that is torn, bit-flipped or of the
wrong shape."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_predict import NANO, _save_run

import vit_fast
from vit_fast.rundir import RunDirError, build_network, read_run, weights_config


@pytest.fixture
def model() -> torch.nn.Module:
    m = vit_fast.create_model(NANO).eval()
    with torch.no_grad():
        m.head.weight.normal_()
    return m


@pytest.fixture
def run_dir(tmp_path, model) -> Path:
    run = _save_run(tmp_path / "run", model)
    records = [{"kind": "train", "step": 1, "epoch": 1, "loss": 2.0, "img_s": 10.0},
               {"kind": "eval", "epoch": 1, "step": 1, "test_top1": 0.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')
    return run


def test_a_finished_run_gives_its_model_summary_classes_metrics_and_test_split(run_dir, model):
    run = read_run(run_dir)
    assert run.finished and run.summary["dataset"] == "digits" and run.description == f"run {run_dir}"
    assert run.config() == (model.config.to_dict(), str(run_dir / "summary.json"))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(run.load_model()(x), model(x))  # the trained weights, not fresh ones
        assert not torch.equal(run.network()(x), model(x))  # the architecture, fresh weights
    assert run.class_names(10) == [str(i) for i in range(10)] and run.class_names(7) is None
    assert [r["kind"] for r in run.metrics()] == ["train", "eval"]  # the torn last line is skipped
    test = run.test_split()
    assert len(test) == 360 and test[0][0].shape == (1, 8, 8)  # digits' fixed split


def test_the_config_comes_from_the_summary_then_the_weights_then_nothing(run_dir, model):
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["config"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert read_run(run_dir).config() == (model.config.to_dict(), str(run_dir / "model.safetensors"))
    weights = load_file(run_dir / "model.safetensors")
    save_file(weights, run_dir / "model.safetensors")  # no metadata
    assert read_run(run_dir).config() == (None, "") and read_run(run_dir).network() is None
    with pytest.raises(RunDirError, match="records no model config"):
        read_run(run_dir).load_model()
    from vit_fast.predict import load_model

    loaded, _, _ = load_model(str(run_dir), model_name=NANO)  # --model names the preset of such a run
    assert torch.equal(loaded.head.weight, model.head.weight)


def test_a_run_in_progress_tells_its_facts_from_its_newest_checkpoint(tmp_path, model):
    from vit_fast.train.checkpoints import save_checkpoint

    run_dir = tmp_path / "running"
    for step in (3, 6):
        save_checkpoint(run_dir / "checkpoints", {"step": step, "config": model.config.to_dict(), "wall_s": 1.5 * step,
                                                  "recipe": {"model": NANO, "dataset": "digits", "epochs": 9}}, keep=2)
    run = read_run(run_dir)
    assert not run.finished and run.summary is None
    assert run.facts() == {"config": model.config.to_dict(), "wall_s": 9.0, "model": NANO, "dataset": "digits",
                           "epochs": 9}
    assert run.config()[1].endswith("step_00000006.pt") and run.network() is not None
    with pytest.raises(FileNotFoundError, match="not a finished"):
        run.load_model()


class _RunsCode:
    """Unpickled without weights_only, this makes the folder ``marker``: the code a hostile checkpoint carries."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_passed_over_with_a_warning_naming_it(tmp_path, model):
    from vit_fast.train.checkpoints import save_checkpoint

    run_dir, marker = tmp_path / "running", tmp_path / "code-ran"
    save_checkpoint(run_dir / "checkpoints", {"step": 3, "config": model.config.to_dict(), "wall_s": 4.5}, keep=2)
    hostile = run_dir / "checkpoints" / "step_00000009.pt"  # the newest: the one a reader takes first
    torch.save({"step": 9, "config": model.config.to_dict(), "payload": _RunsCode(str(marker))}, hostile)
    with pytest.warns(UserWarning, match=f"{hostile} is unreadable"):
        run = read_run(run_dir)
        facts, (config, source) = run.facts(), run.config()
    assert facts["wall_s"] == 4.5 and source.endswith("step_00000003.pt") and config == model.config.to_dict()
    assert weights_config(hostile) is None
    assert not marker.exists()


def test_a_directory_that_is_no_run_and_files_that_are_not_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for path, words in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "holds none of"),
                        (tmp_path / "file", "is not a directory")):
        with pytest.raises(FileNotFoundError, match=words):
            read_run(path)


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[: len(b) // 2], "invalid JSON"),  # truncated
    (lambda b: b.replace(b'"dataset":', b'"dataset"\x3b', 1), "invalid JSON"),  # one bit flipped (: -> ;)
    (lambda b: bytes([b[0] ^ 0x80]) + b[1:], "not UTF-8"),
    (lambda b: b"[1, 2, 3]", "a JSON object was expected, the file holds a list"),
    (lambda b: b'{"img_size": "8"}', "'img_size' is a str (\"8\"), not a size"),
    (lambda b: b'{"classes": [1, 2]}', "'classes' is a list, not a list of strings"),
    (lambda b: b'{"test_top1": true}', "'test_top1' is a bool (true), not a number"),
    (lambda b: b'{"config": [64, 4]}', "'config' is a list, not an object"),
    (lambda b: b.replace(b'"img_size": 8', b'"img_size": 16', 1), "'img_size' 16 is not its model config's 8"),
])
def test_a_damaged_summary_is_an_error_naming_it(run_dir, damage, words):
    path = run_dir / "summary.json"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(RunDirError) as info:
        read_run(run_dir)
    assert str(info.value).startswith(f"{path}: not a valid run summary: ") and words in str(info.value)


@pytest.mark.parametrize("change, words", [
    ({"depth": "4"}, "ViTConfig field 'depth' is a str (\"4\")"),
    ({"qkv_bias": 1}, "ViTConfig field 'qkv_bias' is an int (1)"),
    ({"embed_dim": 63}, "does not make a network: embed_dim 63 must be divisible by num_heads 4"),
    ({"depth": 5}, "model.safetensors: cannot be loaded into the model its config describes"),
    ({"colour": "red"}, "unknown ViTConfig field 'colour'"),
    ({"embed_dim": None}, "ViTConfig field 'embed_dim' is a NoneType"),
])
def test_a_config_of_the_wrong_shape_is_an_error_naming_its_file(run_dir, model, change, words):
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    summary["config"] = {**summary["config"], **change}
    path.write_text(json.dumps(summary))
    with pytest.raises(RunDirError, match="^" + str(run_dir)) as info:
        read_run(run_dir).load_model()
    assert words in str(info.value)
    with pytest.raises(RunDirError, match="missing"):
        build_network({k: v for k, v in model.config.to_dict().items() if k != "depth"}, "a.json")


def test_a_config_in_weights_metadata_that_is_not_json_names_the_weights(tmp_path, model):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"config": "{depth: 4"})
    with pytest.raises(RunDirError, match=f"^{path}: the model config in its metadata is not JSON"):
        weights_config(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(RunDirError, match=f"^{path}: not a readable safetensors file"):
        weights_config(path)


@pytest.mark.parametrize("line, words", [
    ('{"kind": "train", "step": 2, "epoch": 1, "loss": "low"}', "record 2: 'loss' is a str"),
    ('{"kind": "eval", "epoch": 2}', "record 2: 'test_top1' is missing"),
    ("[1, 2]", "record 2: holds a list, not an object"),
    ('{"kind": ["train"], "step": 2}', "record 2: 'kind' is a list, not a string"),
])
def test_metrics_records_of_the_wrong_shape_are_an_error_naming_the_file(run_dir, line, words):
    path = run_dir / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "epoch": 1, "loss": 2.0}\n' + line + "\n")
    with pytest.raises(RunDirError, match=f"^{path}: ") as info:
        read_run(run_dir).metrics()
    assert words in str(info.value)
    path.write_bytes(b'{"kind": "train", "step": 1, "epoch": 1, "loss": 2.0}\n\xff\n')
    with pytest.raises(RunDirError, match="not UTF-8"):
        read_run(run_dir).metrics()


def test_the_cli_reports_a_damaged_run_in_one_line(run_dir, tmp_path, capsys):
    from PIL import Image

    from vit_fast.cli import main

    (run_dir / "summary.json").write_bytes(b'{"dataset": "dig')
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    for argv in (["predict", str(run_dir), str(tmp_path / "a.png"), "--workers", "0", "--no-progress"],
                 ["report", str(run_dir), "--out", str(tmp_path / "r"), "--no-measure"],
                 ["eval", str(run_dir)]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{run_dir / 'summary.json'}: not a valid run summary: invalid JSON" in err
