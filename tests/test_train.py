"""Training: digits in fp32/bf16/fp16, kill-and-resume, DDP over gloo, CIFAR files, ImageFolder, fine-tuning.

The tests that start other processes (a killed run, two gloo processes, the installed command) are marked
``subprocess``: ``pytest -m subprocess tests/test_train.py`` runs them."""

from __future__ import annotations

import functools
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vit_fast.train import (
    build_parser,
    data,
    list_checkpoints,
    load_newest_checkpoint,
    param_groups,
    read_metrics,
    run_from_args,
    train,
    trainer,
)
from vit_fast.train.checkpoints import rng_state, save_checkpoint, set_rng_state, tidy_for_resume
from vit_fast.train.recipes import RECIPES, adopt_saved_recipe, parse_overrides, resolve

# A model small enough for a CPU test to take seconds, from the presets' own code path.
TINY = ["--override", "depth=1", "--override", "embed_dim=16", "--override", "num_heads=2"]
TINY_CIFAR = ["--model", "vit_tiny_patch4_32", "--override", "depth=1", "--override", "embed_dim=24",
              "--override", "num_heads=2", "--override", "patch_size=8"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """The digits recipe sets one intra-op thread; give the rest of the suite back what it had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _train(out: Path, *argv: str) -> dict:
    return train(build_parser().parse_args(["--out", str(out), "--no-progress", *argv]))


def _python_train(*argv: str, launcher: tuple[str, ...] = ("-m", "vit_fast.train")) -> list[str]:
    return [sys.executable, *launcher, "--no-progress", *argv]


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-5000:]}")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def _epoch_losses(run: Path) -> list[float]:
    by_epoch: dict[int, list[float]] = {}
    for r in read_metrics(run / "metrics.jsonl"):
        if r["kind"] == "train":
            by_epoch.setdefault(r["epoch"], []).append(r["loss"])
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


# --------------------------------------------------------------------------------------------- digits


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_digits_run_learns_and_writes_its_run_directory(tmp_path, precision):
    # a quick learner: one wide block, a small batch, a high learning rate, no regularization
    fast = ["--crop", "none", "--label-smoothing", "0", "--warmup-epochs", "0.5", "--lr", "5e-3", "--batch-size",
            "16", "--workers", "0", "--override", "depth=1", "--override", "embed_dim=64", "--override", "num_heads=4"]
    epochs = 4
    summary = _train(tmp_path, "--precision", precision, "--epochs", str(epochs), *fast)
    losses = _epoch_losses(tmp_path)
    assert losses[-1] < 0.6 * losses[0], losses
    assert summary["test_top1"] > 0.5, summary  # chance is 0.1
    assert summary["test_top5"] >= summary["test_top1"]
    assert summary["precision"] == precision and summary["steps"] == epochs * (1437 // 16)
    for name in ("model.safetensors", "summary.json", "curves.png", "metrics.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "summary.json").read_text())["test_top1"] == summary["test_top1"]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, summary["steps"] + 1))
    assert len([r for r in records if r["kind"] == "eval"]) == epochs
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list_checkpoints(tmp_path / "checkpoints")) == 2  # --keep-ckpts 2


def test_fp16_with_grad_scaler_counts_overflow_steps_and_goes_on(tmp_path, monkeypatch):
    if not torch.amp.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast in this torch")
    # A first loss scale far too high: the first steps overflow in fp16 and are skipped while the scale falls.
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**24))
    summary = _train(tmp_path, "--precision", "fp16", "--epochs", "2", "--batch-size", "64", "--workers", "0",
                     *TINY)
    skipped = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("skipped")]
    assert summary["precision"] == "fp16" and summary["skipped_steps"] == len(skipped) >= 1
    assert skipped[0] == 1 and len(skipped) < summary["steps"]
    scaler = torch.load(list_checkpoints(tmp_path / "checkpoints")[0], weights_only=True)["scaler"]
    assert scaler["scale"] < 2.0**24  # the scaler's state is checkpointed
    assert np.isfinite(summary["test_loss"])


def test_nan_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch, capsys):
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def cross_entropy(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    args = build_parser().parse_args(["--out", str(tmp_path), "--no-progress", "--epochs", "1", "--workers", "0",
                                      "--log-every", "3", *TINY])
    assert run_from_args(args) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 5 (epoch 1)" in err, err
    # the steps before it are logged, none after
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------- kill and resume


@pytest.mark.subprocess
def test_sigkill_mid_epoch_then_resume_gives_bitwise_the_same_weights(tmp_path):
    # The default digits recipe (affine augmentation in a loader worker, drop-path, label smoothing), tiny model.
    common = ["--epochs", "3", "--batch-size", "32", "--ckpt-every", "7", "--log-every", "1", *TINY]
    full, cut = tmp_path / "full", tmp_path / "cut"
    _check(subprocess.run([os.path.join(os.path.dirname(sys.executable), "vit-fast"), "train", "--no-progress",
                           "--out", str(full), *common], capture_output=True, text=True, timeout=600))

    steps_per_epoch = 1437 // 32
    proc = subprocess.Popen(_python_train("--out", str(cut), *common), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        done = [int(p.stem.split("_")[1]) for p in list_checkpoints(cut / "checkpoints")]
        if done and max(done) > steps_per_epoch + 2:  # inside the second epoch
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr.read()}"
    assert not (cut / "model.safetensors").exists()
    killed_at = max(int(p.stem.split("_")[1]) for p in list_checkpoints(cut / "checkpoints"))
    assert killed_at % steps_per_epoch, "not killed mid-epoch"

    # What a kill during a save or a damaged disk leaves behind must not stop or change the resumed run.
    (cut / "checkpoints" / f"step_{killed_at + 1:08d}.pt.tmp4242").write_bytes(b"half a checkpoint")
    (cut / "checkpoints" / "step_99999999.pt").write_bytes(b"not a checkpoint")
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 9999, "los')
    resumed = subprocess.run(_python_train("--out", str(cut), "--resume"), capture_output=True, text=True,
                             timeout=600)
    _check(resumed)
    assert f"resuming {cut} from step {killed_at}" in resumed.stderr
    assert "unreadable" in resumed.stderr and (cut / "checkpoints" / "step_99999999.unreadable").exists()
    assert not list((cut / "checkpoints").glob("*.tmp*"))

    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert losses(full) == losses(cut)
    s_full, s_cut = (json.loads((r / "summary.json").read_text()) for r in (full, cut))
    assert s_full["test_top1"] == s_cut["test_top1"] and s_full["steps"] == s_cut["steps"]


def test_resume_keeps_the_recipe_and_a_used_directory_needs_resume(tmp_path):
    _train(tmp_path, "--epochs", "1", "--workers", "0", *TINY)
    with pytest.raises(ValueError, match="already holds a run"):
        _train(tmp_path, "--epochs", "1", *TINY)
    with pytest.raises(ValueError, match=r"--lr 0.5 \(the run has 0.002\)"):
        _train(tmp_path, "--resume", "--lr", "0.5")
    summary = _train(tmp_path, "--resume", "--workers", "0")  # finished: writes the outputs again, trains nothing
    assert summary["steps"] == 1437 // 64 and summary["recipe"]["override"] == TINY[1::2]


class _Stop(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def _train_stopping_at(monkeypatch, out, step: int, *flags: str) -> dict:
    """Run with ``flags`` into ``out``, stop it right after the checkpoint of ``step`` is written (as a kill
    would), and return that checkpoint."""
    save = trainer.save_checkpoint

    def save_then_stop(ckpt_dir, ckpt, keep):
        save(ckpt_dir, ckpt, keep)
        if ckpt["step"] == step:
            raise _Stop

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(_Stop):
        _train(out, *flags)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    return load_newest_checkpoint(out / "checkpoints")


def test_a_run_stopped_after_a_mid_epoch_checkpoint_resumes_to_bitwise_the_same_weights(tmp_path, monkeypatch):
    common = ["--epochs", "2", "--batch-size", "64", "--ckpt-every", "5", "--workers", "0", *TINY]
    _train(tmp_path / "full", *common)
    ckpt = _train_stopping_at(monkeypatch, tmp_path / "cut", 30, *common)  # inside the second epoch of 22 steps
    assert set(ckpt) == {"format", "model", "optimizer", "scheduler", "scaler", "rng", "step", "epoch", "config",
                         "recipe", "skipped_steps", "train_images", "train_s", "wall_s", "last_eval", "strategy",
                         "world_size", "path", "dcp"}
    assert (ckpt["step"], ckpt["epoch"], ckpt["last_eval"]["epoch"]) == (30, 1, 1)

    _train(tmp_path / "cut", "--resume", "--workers", "0")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [[r for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["kind"] != "memory"]
               for run in ("full", "cut")]
    assert [(r["step"], r.get("loss")) for r in records[0]] == [(r["step"], r.get("loss")) for r in records[1]]


def test_checkpoints_round_trip_the_random_state_and_pass_over_what_a_kill_left(tmp_path):
    cpu = torch.device("cpu")
    state = rng_state(cpu)
    drawn = (torch.rand(3), np.random.rand(3).tolist(), random.random())
    for step in (3, 7):
        save_checkpoint(tmp_path, {"step": step, "rng": [state]}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000007.pt"]
    (tmp_path / "step_00000009.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "step_00000010.pt.tmp4242").write_bytes(b"half a checkpoint")
    with pytest.warns(UserWarning, match="unreadable"):
        ckpt = load_newest_checkpoint(tmp_path)
    assert ckpt["step"] == 7 and ckpt["format"] == 1
    tidy_for_resume(tmp_path, ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000007.pt", "step_00000009.unreadable"]
    set_rng_state(ckpt["rng"][0], cpu)
    assert torch.equal(torch.rand(3), drawn[0]) and np.random.rand(3).tolist() == drawn[1]
    assert random.random() == drawn[2]


def test_recipes_fill_the_unset_flags_and_a_resumed_run_keeps_its_recipe():
    r = resolve(build_parser().parse_args(["--dataset", "cifar100", "--lr", "0.1"]))
    assert (r.lr, r.model, r.epochs, r.mixup) == (0.1, "vit_small_patch4_32", 300, RECIPES["cifar10"]["mixup"])
    assert resolve(build_parser().parse_args([])).dataset == "digits"
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        resolve(build_parser().parse_args(["--batch-size", "0"]))
    with pytest.raises(ValueError, match=r"--lr 0.5 \(the run has 0.002\)"):
        adopt_saved_recipe(build_parser().parse_args(["--lr", "0.5"]), {"lr": 0.002})
    args = build_parser().parse_args(["--workers", "3"])
    adopt_saved_recipe(args, {"lr": 0.002, "epochs": 7})
    assert (args.lr, args.epochs, args.workers) == (0.002, 7, 3)
    assert parse_overrides(["depth=6", "qkv_bias=False", "act=gelu"]) == {"depth": 6, "qkv_bias": False,
                                                                          "act": "gelu"}
    with pytest.raises(ValueError, match="--drop-path sets it"):
        parse_overrides(["drop_path_rate=0.1"])


# ---------------------------------------------------------------------------------------------- DDP


@pytest.mark.subprocess
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # Drop-path draws per process, so the comparison runs without it; everything else is the digits recipe.
    common = ["--epochs", "1", "--batch-size", "32", "--drop-path", "0", "--workers", "0", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(_python_train("--out", str(tmp_path / "one"), *common), capture_output=True, text=True,
                         timeout=600, env=env)
    _check(one)
    two = subprocess.run(
        _python_train("--out", str(tmp_path / "two"), *common,
                      launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                "-m", "vit_fast.train")),
        capture_output=True, text=True, timeout=600, env=env)
    _check(two)
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert (s1["world_size"], s2["world_size"]) == (1, 2) and s1["steps"] == s2["steps"] == 1437 // 32
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    # The key bias cannot change the attention (softmax ignores a per-query constant): its gradient is rounding
    # noise, which Adam scales up to full-size steps, so it alone may drift apart. Everything else agrees.
    e = a["cls_token"].shape[-1]
    for t in (a, b):
        t["blocks.0.attn.qkv.bias"][e : 2 * e] = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    losses = [[r["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["kind"] == "train"]
              for run in ("one", "two")]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-6, atol=0)
    assert abs(s1["test_top1"] - s2["test_top1"]) <= 1 / 360  # at most one test image decided differently
    # only the first process writes: one set of outputs, one metrics line per step
    assert [r["step"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["kind"] == "train"] == \
        list(range(1, s2["steps"] + 1))


def test_train_sampler_shards_are_the_global_batches():
    ds = torch.utils.data.TensorDataset(torch.arange(103))
    one = data.TrainSampler(ds, batch_size=8, seed=3)
    shards = [data.TrainSampler(ds, batch_size=8, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in (one, *shards):
        s.set_epoch(5)
    glob = list(one)
    parts = [list(s) for s in shards]
    assert one.batches_per_epoch == shards[0].batches_per_epoch == 103 // 8
    for step in range(one.batches_per_epoch):
        merged = sorted(parts[0][step * 4 : step * 4 + 4] + parts[1][step * 4 : step * 4 + 4])
        assert merged == sorted(glob[step * 8 : step * 8 + 8])  # same images, same augmentation seeds
    one.set_epoch(5, start_batch=3)
    assert list(one) == glob[24:]
    one.set_epoch(6)
    assert list(one) != glob
    with pytest.raises(ValueError, match="divisible"):
        data.TrainSampler(ds, batch_size=9, seed=0, world_size=2)


# -------------------------------------------------------------------------------------- other datasets


def _write_cifar(root: Path, name: str, per_file: int = 24) -> None:
    """The python-format files of CIFAR-10/100 in their standard layout, with random images."""
    rng = np.random.default_rng(0)
    classes = 10 if name == "cifar10" else 100
    folder, files = data.cifar_files(name)
    (root / folder).mkdir(parents=True)
    for f in files:
        if f in ("batches.meta", "meta"):
            blob = ({"label_names": [f"c{i}" for i in range(10)]} if name == "cifar10" else
                    {"fine_label_names": [f"c{i}" for i in range(100)],
                     "coarse_label_names": [f"s{i}" for i in range(20)]})
        else:
            labels = rng.integers(0, classes, per_file).tolist()
            blob = {"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                    ("labels" if name == "cifar10" else "fine_labels"): labels}
            if name == "cifar100":
                blob["coarse_labels"] = [x // 5 for x in labels]
        with open(root / folder / f, "wb") as fh:
            pickle.dump(blob, fh)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_files_load_and_train_with_the_full_augmentation(tmp_path, name):
    _write_cifar(tmp_path / "data", name)
    train_set, test_set, info = data.load_datasets(name, tmp_path / "data", 32, data.Augmentation())
    assert (len(train_set), len(test_set)) == ((120, 24) if name == "cifar10" else (24, 24))
    image, label = train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < info.num_classes
    # the dataset's default recipe: pad-crop, flip, RandAugment, random erasing, MixUp/CutMix, label smoothing
    summary = _train(tmp_path / "run", "--dataset", name, "--data-dir", str(tmp_path / "data"), "--epochs", "2",
                     "--batch-size", "8", "--workers", "0", *TINY_CIFAR)
    assert summary["steps"] == 2 * (len(train_set) // 8) and np.isfinite(summary["test_loss"])
    assert summary["recipe"]["mixup"] > 0 and summary["recipe"]["randaugment_ops"] > 0
    assert _weights(tmp_path / "run")["head.weight"].shape[0] == info.num_classes


def test_missing_or_incomplete_data_dir_says_what_is_expected_where(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist; it must hold cifar-100-python/ \(train"):
        _train(tmp_path / "run", "--dataset", "cifar100", "--data-dir", str(tmp_path / "nowhere"))
    _write_cifar(tmp_path / "data", "cifar10")
    os.remove(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py lacks data_batch_3.*data_batch_1, data_batch_2"):
        _train(tmp_path / "run2", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"))
    with pytest.raises(ValueError, match="--data-dir is required"):
        _train(tmp_path / "run3", "--dataset", "imagefolder")
    (tmp_path / "folder" / "train" / "a").mkdir(parents=True)
    args = build_parser().parse_args(["--out", str(tmp_path / "run4"), "--dataset", "imagefolder", "--data-dir",
                                      str(tmp_path / "folder")])
    assert run_from_args(args) == 1
    assert "lacks val/" in capsys.readouterr().err


def test_imagefolder_trains_at_the_model_resolution(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog", "emu"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / cls / f"{i}.png")
    summary = _train(tmp_path / "run", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
                     "--img-size", "32", "--epochs", "1", "--batch-size", "6", "--workers", "0", *TINY_CIFAR)
    assert summary["steps"] == 3 and summary["img_size"] == 32 and summary["config"]["num_classes"] == 3
    assert summary["classes"] == ["cat", "dog", "emu"]  # vit-fast predict names its classes from the run


def test_fine_tune_into_another_resolution_and_class_count(tmp_path):
    _write_cifar(tmp_path / "data10", "cifar10", per_file=8)
    _write_cifar(tmp_path / "data100", "cifar100", per_file=16)
    _train(tmp_path / "pre", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data10"), "--epochs", "1",
           "--batch-size", "8", "--workers", "0", *TINY_CIFAR)
    pre = _weights(tmp_path / "pre")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = _train(tmp_path / "fine", "--dataset", "cifar100", "--data-dir", str(tmp_path / "data100"),
                         "--init", str(tmp_path / "pre" / "model.safetensors"), "--img-size", "48",
                         "--layer-decay", "0.7", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                         "--lr", "1e-9", "--min-lr", "0", "--weight-decay", "0", *TINY_CIFAR)
    assert any("head" in str(w.message) for w in caught)
    fine = _weights(tmp_path / "fine")
    assert summary["img_size"] == 48 and fine["head.weight"].shape == (100, 24)
    assert fine["pos_embed"].shape == (1, 1 + 6 * 6, 24) and pre["pos_embed"].shape == (1, 1 + 4 * 4, 24)
    # with a vanishing learning rate the carried-over weights are still the pre-trained ones
    torch.testing.assert_close(fine["blocks.0.attn.qkv.weight"], pre["blocks.0.attn.qkv.weight"], rtol=0, atol=1e-6)


def test_param_groups_exempt_norms_biases_and_embeddings_and_decay_by_layer():
    import vit_fast

    model = vit_fast.create_model("vit_nano_patch2_8", depth=3)
    groups = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {names[id(p)]: g for g in groups for p in g["params"]}
    assert len(seen) == len(names)
    for n in ("pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.2.attn.qkv.bias", "head.bias"):
        assert seen[n]["weight_decay"] == 0.0, n
    for n in ("blocks.1.mlp.fc1.weight", "head.weight", "patch_embed.proj.weight"):
        assert seen[n]["weight_decay"] == 0.05, n
    assert seen["head.weight"]["lr"] == 1.0 and seen["blocks.2.mlp.fc2.weight"]["lr"] == 0.5
    assert seen["blocks.0.attn.proj.weight"]["lr"] == 0.125 and seen["pos_embed"]["lr"] == 0.0625


def test_help_explains_every_flag_with_its_default():
    parser = build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert "default" in (action.help or ""), action.option_strings
    assert "0.002 (digits)" in parser.format_help()


@pytest.mark.subprocess
def test_the_installed_command_shows_the_train_help():
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "vit-fast"), "train", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "--resume" in out.stdout and "0.002 (digits)" in out.stdout


@pytest.mark.slow
def test_default_digits_recipe_reaches_95_percent(tmp_path):
    """The acceptance run: ``vit-fast train`` with no recipe flags (the issue's budget: 5 minutes on 2 cores)."""
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "vit-fast"), "train", "--no-progress",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=1800)
    _check(proc)
    summary = json.loads((tmp_path / "summary.json").read_text())
    print(f"digits default recipe: top-1 {summary['test_top1']:.4f} in {summary['wall_s']:.0f} s")
    assert summary["test_top1"] >= 0.95


# ------------------------------------------------------------------------------ CNN baselines (timm)

# timm's own test ResNet (0.37M parameters, deep stem with a max-pool): a CNN run in seconds on CPU.
TINY_CNN = ["--model", "test_resnet"]


def test_a_timm_cnn_trains_on_digits_and_writes_what_predict_and_report_rebuild_it_from(tmp_path):
    from safetensors import safe_open

    from vit_fast.train.models import model_from_config

    summary = _train(tmp_path, "--epochs", "1", "--workers", "0", "--lr", "5e-3", *TINY_CNN)
    for name in ("model.safetensors", "summary.json", "curves.png", "metrics.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len(list_checkpoints(tmp_path / "checkpoints")) == 1
    assert summary["steps"] == 1437 // 64 and summary["test_top1"] > 0.2, summary  # chance is 0.1
    assert summary["model"] == "test_resnet" and summary["model_family"] == "timm"
    config = summary["config"]
    assert config == {"family": "timm", "name": "test_resnet", "kwargs": {"num_classes": 10, "in_chans": 1},
                      "small_input_stem": {"conv": "conv1.0", "pool": "maxpool"}}
    assert (summary["in_chans"], summary["num_classes"], summary["img_size"]) == (1, 10, 8)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"]) == config and meta["model_family"] == "timm"
    # the recorded config alone rebuilds the network the weights fit, with the small-image stem
    model = model_from_config(json.loads((tmp_path / "summary.json").read_text())["config"])
    model.load_state_dict(_weights(tmp_path))
    assert sum(p.numel() for p in model.parameters()) == summary["params"]
    assert model.conv1[0].stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    assert model.eval()(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_a_timm_cnn_run_stopped_mid_epoch_resumes_to_bitwise_the_same_weights(tmp_path, monkeypatch):
    common = ["--epochs", "2", "--batch-size", "128", "--ckpt-every", "5", "--workers", "0", "--drop-path", "0.1",
              *TINY_CNN]
    _train(tmp_path / "full", *common)
    ckpt = _train_stopping_at(monkeypatch, tmp_path / "cut", 15, *common)  # inside the second epoch of 11 steps
    assert ckpt["config"]["kwargs"]["drop_path_rate"] == 0.1
    summary = _train(tmp_path / "cut", "--resume", "--workers", "0")
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm's running stats too
    assert summary["steps"] == 2 * (1437 // 128) and summary["model_family"] == "timm"


@pytest.mark.parametrize("img_size", [8, 64, 224])
def test_cnns_get_the_small_image_stem_up_to_64_px(img_size):
    from vit_fast.train.models import build_model, config_of

    model = build_model("resnet18", num_classes=10, in_chans=1, img_size=img_size, drop_path=0.0, overrides={})
    small = img_size <= 64
    assert model.conv1.kernel_size == ((3, 3) if small else (7, 7))
    assert model.conv1.stride == ((1, 1) if small else (2, 2)) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, torch.nn.Identity) == small
    assert config_of(model)["small_input_stem"] == ({"conv": "conv1", "pool": "maxpool"} if small else None)
    # an 8x8 digit keeps an 8x8 map through the stem (a 2x2 one with ImageNet's stem)
    x = torch.randn(2, 1, img_size, img_size)
    stem = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    assert stem.shape[-1] == (img_size if small else img_size // 4)


def _named_groups(model: torch.nn.Module, groups: list[dict]) -> list[tuple[list[str], float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [([names[id(p)] for p in g["params"]], g["weight_decay"], g.get("lr_scale", 1.0)) for g in groups]


@pytest.mark.parametrize("arch", ["vit", "cnn"])
@pytest.mark.parametrize("layer_decay", [0.5, 1.0])
def test_param_groups_are_the_groups_of_timms_optimizer_factory(arch, layer_decay):
    import timm
    import timm.optim

    import vit_fast

    torch.manual_seed(0)
    model = (vit_fast.create_model("vit_nano_patch2_8", depth=3) if arch == "vit"
             else timm.create_model("test_resnet", num_classes=10))
    ours = param_groups(model, lr=2.0, weight_decay=0.05, layer_decay=layer_decay)
    theirs = timm.optim.create_optimizer_v2(model, "adamw", lr=2.0, weight_decay=0.05,
                                            layer_decay=layer_decay if layer_decay < 1 else None).param_groups
    assert _named_groups(model, ours) == _named_groups(model, theirs)
    assert all(g["lr"] == 2.0 * g.get("lr_scale", 1.0) for g in ours)
    scales = {g.get("lr_scale", 1.0) for g in ours}
    if layer_decay == 1.0:
        assert len(ours) == 2 and scales == {1.0}
    else:  # the ViT: stem, 3 blocks, final norm + head; the ResNet: stem, one layer per block, then the head
        assert len(scales) == 5 if arch == "vit" else len(scales) > 2
        assert min(scales) == layer_decay ** (len(scales) - 1)


def test_vit_only_options_on_a_cnn_work_through_timm_or_name_the_flag(tmp_path):
    import timm

    from vit_fast.train.models import build_model, enable_grad_checkpointing

    model = timm.create_model("test_resnet")
    enable_grad_checkpointing(model)
    assert model.grad_checkpointing
    with pytest.raises(ValueError, match="--grad-checkpointing"):
        enable_grad_checkpointing(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="--layer-decay"):
        param_groups(torch.nn.Linear(2, 2), lr=1.0, weight_decay=0.05, layer_decay=0.7)
    kw = dict(num_classes=10, in_chans=1, img_size=8, drop_path=0.0, overrides={})
    with pytest.raises(ValueError, match="--init"):
        build_model("test_resnet", **{**kw, "init": str(tmp_path / "w.safetensors")})
    with pytest.raises(ValueError, match="--override"):
        build_model("test_resnet", **{**kw, "overrides": {"no_such_keyword": 1}})
    with pytest.raises(ValueError, match="--model 'no_such_net'"):
        build_model("no_such_net", **kw)
    with pytest.raises(ValueError, match="fixed input size"):
        build_model("test_vit", **kw)
    assert "3x3 stride-1 first convolution and no max-pool" in " ".join(build_parser().format_help().split())


def test_atomic_writes_leave_no_temporary_and_get_the_mode_a_plain_write_gets(tmp_path):
    from vit_fast.fileio import atomic_write

    atomic_write(tmp_path / "a.json", "{}")
    atomic_write(tmp_path / "b.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
    (tmp_path / "c.txt").write_text("")
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert sorted(modes) == ["a.json", "b.bin", "c.txt"]
    assert modes["a.json"] == modes["b.bin"] == modes["c.txt"], modes  # not mkstemp's owner-only 0600
