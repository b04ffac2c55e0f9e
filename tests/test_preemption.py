"""Preemption: SIGTERM or SIGUSR1 during ``vit-fast train`` finishes the step, checkpoints, exits 75 (0 under
torchrun), and ``--resume`` continues bitwise. The torchrun side (one rank signalled, every rank stops after the
same step, no restart in place; a SIGKILLed rank restarted) is in tests/test_fsdp.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
import torch
from train_launch import ENV, check, signal_at_step, train_cmd, train_here, train_losses, wait_for, weights

from vit_fast.train import list_checkpoints, read_metrics, run_from_args
from vit_fast.train.preemption import EXIT_PREEMPTED, StopSignals, exit_status
from vit_fast.train.recipes import build_parser

TINY = ["--override", "depth=1", "--override", "embed_dim=16", "--override", "num_heads=2"]
# The digits recipe (affine augmentation in a loader worker, label smoothing), two epochs of 22 steps.
COMMON = ["--epochs", "2", "--batch-size", "64", "--ckpt-every", "100", "--log-every", "1", *TINY]
STEPS_PER_EPOCH = 1437 // 64


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("preempt") / "full"
    train_here(out, *COMMON)
    torch.set_num_threads(threads)
    return out


def _assert_same_run(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    keep = lambda run: [(r["kind"], r["step"], r.get("loss"), r.get("test_top1"))  # noqa: E731
                        for r in read_metrics(run / "metrics.jsonl") if r["kind"] != "memory"]
    assert keep(a) == keep(b)


@pytest.mark.subprocess
def test_sigterm_to_the_process_group_checkpoints_the_step_exits_75_and_resumes_bitwise(full, tmp_path):
    cut = tmp_path / "cut"
    log = open(tmp_path / "err", "w+")  # noqa: SIM115 - read after the run
    proc = subprocess.Popen(train_cmd("--out", str(cut), *COMMON), stdout=subprocess.DEVNULL, stderr=log, text=True,
                            env=ENV, start_new_session=True)
    wait_for(lambda: len(train_losses(cut)) > STEPS_PER_EPOCH + 2, proc, "the second epoch")
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: the training process and its loader worker
    proc.wait(timeout=300)
    log.seek(0)
    err = log.read()
    check(proc, "", err, status=EXIT_PREEMPTED)
    stopped = re.findall(r"rank 0 stopped by SIGTERM after step (\d+); checkpoint (\S+); continue with --resume", err)
    assert len(stopped) == 1 and "Traceback" not in err, err
    step, path = int(stopped[0][0]), stopped[0][1]
    assert STEPS_PER_EPOCH + 2 < step < 2 * STEPS_PER_EPOCH and path == str(cut / "checkpoints" / f"step_{step:08d}.pt")
    assert list_checkpoints(cut / "checkpoints")[0].name == f"step_{step:08d}.pt"
    assert not (cut / "summary.json").exists() and train_losses(cut)[-1][0] == step
    train_here(cut, "--resume")
    _assert_same_run(full, cut)


def test_a_signal_in_an_epochs_last_step_stops_after_its_evaluation_and_checkpoint(full, tmp_path, monkeypatch,
                                                                                    capsys):
    signal_at_step(monkeypatch, STEPS_PER_EPOCH)
    previous = signal.getsignal(signal.SIGUSR1)
    cut = tmp_path / "cut"
    assert run_from_args(build_parser().parse_args(["--out", str(cut), "--no-progress", *COMMON])) == EXIT_PREEMPTED
    assert signal.getsignal(signal.SIGUSR1) is previous  # the run's handlers are gone with it
    assert f"stopped by SIGUSR1 after step {STEPS_PER_EPOCH}" in capsys.readouterr().err
    records = read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "eval"] == [STEPS_PER_EPOCH]  # the epoch was finished
    assert [p.name for p in list_checkpoints(cut / "checkpoints")] == [f"step_{STEPS_PER_EPOCH:08d}.pt"]
    monkeypatch.undo()
    train_here(cut, "--resume")
    _assert_same_run(full, cut)


def test_the_exit_status_under_torchrun_and_alone_and_the_handlers_are_put_back():
    assert (exit_status(under_torchrun=False), exit_status(under_torchrun=True)) == (75, 0)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGTERM  # the first signal is the one reported
    assert {s: signal.getsignal(s) for s in before} == before
