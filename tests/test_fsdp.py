"""FSDP2 training: equivalence with one process, two "nodes" through the c10d rendezvous, a rank killed and
restarted by torchrun, resumes at another process count and strategy, preemption under torchrun, ``vit-fast
eval`` under torchrun, ``vit-fast convert``, and per-process memory against the estimate.

The tests that start processes are marked ``subprocess`` (``pytest -m subprocess tests/test_fsdp.py``); the two
reference runs they compare with are made once per module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import warnings

import pytest
import torch
from train_launch import (
    ENV,
    NODE_ENV,
    check,
    free_port,
    memory_record,
    node_cmd,
    signal_at_step,
    torchrun_cmd,
    train_here,
    train_losses,
    wait_for,
    weights,
    worker_pids,
)

from vit_fast.train import list_checkpoints, run_from_args, trainer
from vit_fast.train.checkpoints import read_checkpoint
from vit_fast.train.recipes import build_parser

# A model that learns digits within one epoch (5 tokens, two blocks: two FSDP units and the root), drop-path,
# MixUp and CutMix off (the digits recipe's) so that processes compute the same thing; 22 steps of 64.
MODEL = ["--override", "depth=2", "--override", "embed_dim=32", "--override", "num_heads=2",
         "--override", "patch_size=4"]
RECIPE = ["--epochs", "1", "--batch-size", "64", "--crop", "none", "--lr", "5e-3", "--warmup-epochs", "0.2",
          "--label-smoothing", "0", "--workers", "0", "--ckpt-every", "5", *MODEL]
STEPS = 1437 // 64
TEST_IMAGES = 360


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _relative(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> float:
    assert [s for s, _ in a] == [s for s, _ in b]
    return max(abs(x - y) / abs(y) for (_, x), (_, y) in zip(a, b, strict=True))


def _assert_close_weights(a: dict, b: dict, rtol: float) -> None:
    # The key bias cannot change the attention (softmax ignores a per-query constant): its gradient is rounding
    # noise that Adam scales up to full-size steps, so it alone may drift apart (as in the DDP test).
    e = a["cls_token"].shape[-1]
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k].clone(), b[k].clone()
        if k.endswith("attn.qkv.bias"):
            x[e : 2 * e] = y[e : 2 * e] = 0
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``one``: the recipe in one process (DDP strategy: no wrapper); ``two``: FSDP over two torchrun "nodes" of
    one worker each, meeting through the c10d rendezvous on localhost."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    threads = torch.get_num_threads()
    train_here(root / "one", *RECIPE)
    torch.set_num_threads(threads)
    port = free_port()
    logs = [open(root / f"node{i}.log", "w+") for i in range(2)]  # noqa: SIM115 - closed below
    nodes = [subprocess.Popen(node_cmd(port, 2, "--out", str(root / "two"), "--strategy", "fsdp", *RECIPE),
                              stdout=log, stderr=subprocess.STDOUT, text=True, env=NODE_ENV) for log in logs]
    for node, log in zip(nodes, logs, strict=True):
        node.wait(timeout=600)
        log.seek(0)
        check(node, log.read())
        log.close()
    return root


@pytest.mark.subprocess
def test_fsdp_on_two_nodes_tracks_one_process_and_only_the_first_rank_writes_the_outputs(runs):
    one, two = runs / "one", runs / "two"
    assert len(train_losses(two)) == STEPS >= 20
    assert _relative(train_losses(two), train_losses(one)) < 1e-5  # reduce-scatter sums in another order
    s1, s2 = (read_checkpoint(list_checkpoints(r / "checkpoints")[0]) for r in (one, two))
    assert (s2["strategy"], s2["world_size"], s1["world_size"]) == ("fsdp", 2, 1)
    top1 = [json.loads((r / "summary.json").read_text())["test_top1"] for r in (one, two)]
    assert top1[0] > 0.3 and abs(top1[0] - top1[1]) <= 2 / TEST_IMAGES  # learned; at most 2 images differ
    _assert_close_weights(weights(two), weights(one), rtol=1e-4)
    # each rank wrote its own shard into one DCP directory per checkpoint, the first rank everything else
    newest = list_checkpoints(two / "checkpoints")[0]
    assert newest.is_dir() and newest.name == f"step_{STEPS:08d}"
    assert sorted(p.name for p in newest.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.pt"]
    assert len(list_checkpoints(two / "checkpoints")) == 2  # --keep-ckpts 2, the older DCP directories deleted
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "curves.png", "metrics.jsonl",
                                                     "model.safetensors", "summary.json"]
    # each rank holds half the states; together they hold the one process's (up to FSDP's padding)
    m1, m2 = memory_record(one), memory_record(two)
    whole = sum(m1["state_bytes"][0].values())
    halves = [sum(s.values()) for s in m2["state_bytes"]]
    assert all(0.45 * whole < h < 0.55 * whole for h in halves) and whole <= sum(halves) < 1.02 * whole
    assert sum(m2["estimate"][k] for k in ("weights", "grads", "optimizer")) == pytest.approx(max(halves), rel=0.01)


@pytest.mark.subprocess
def test_a_rank_killed_by_sigkill_is_restarted_by_torchrun_and_ends_with_the_same_weights(runs, tmp_path):
    out = tmp_path / "killed"
    log = open(tmp_path / "log", "w+")  # noqa: SIM115 - read while the run writes it
    proc = subprocess.Popen(torchrun_cmd(2, "--out", str(out), "--strategy", "fsdp", "--resume", *RECIPE,
                                         max_restarts=1), stdout=log, stderr=subprocess.STDOUT, text=True, env=ENV)
    wait_for(lambda: bool(list_checkpoints(out / "checkpoints")), proc, "a first checkpoint")
    rank1 = worker_pids(proc.pid)[1]
    os.kill(rank1, signal.SIGKILL)
    proc.wait(timeout=600)
    log.seek(0)
    text = log.read()
    check(proc, text)
    assert text.count("1437 training") == 2, text  # rank 0's banner: the workers were started twice
    resumed = re.findall(rf"resuming {re.escape(str(out))} from step (\d+)", text)
    assert len(resumed) == 1 and 0 < int(resumed[0]) < STEPS, text  # the restart continued from a checkpoint
    a, b = weights(out), weights(runs / "two")
    assert all(torch.equal(a[k], b[k]) for k in b)  # bitwise: the same shards, states and batches
    assert train_losses(out) == train_losses(runs / "two")


@pytest.mark.subprocess
def test_resume_one_process_into_two_then_preempted_under_torchrun_then_two_into_one(runs, tmp_path, monkeypatch):
    out = tmp_path / "moved"
    stop_at = 7
    step = trainer.Trainer._train_step

    def signal_at(self, *a):  # what a scheduler does: a signal arrives while a step runs
        step(self, *a)
        if self.progress.step == stop_at:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(trainer.Trainer, "_train_step", signal_at)
    args = build_parser().parse_args(["--out", str(out), "--no-progress", "--strategy", "fsdp", *RECIPE])
    assert run_from_args(args) == 75  # run alone, a preempted run exits EX_TEMPFAIL
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out / "checkpoints")][0] == f"step_{stop_at:08d}"

    # 1 -> 2 processes through DCP; SIGTERM to one rank only stops both after the same step
    log = open(tmp_path / "log", "w+")  # noqa: SIM115 - read while the run writes it
    proc = subprocess.Popen(torchrun_cmd(2, "--out", str(out), "--strategy", "fsdp", "--resume", "--workers", "0",
                                         max_restarts=1),
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=ENV)
    wait_for(lambda: "resuming" in open(tmp_path / "log").read(), proc, "the resume")
    os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)
    proc.wait(timeout=600)
    log.seek(0)
    text = log.read()
    check(proc, text)  # under torchrun a preempted worker exits 0, and torchrun does not restart it in place
    assert text.count("1437 training") == 1 and text.count("resuming") == 1, text  # started once, not restarted
    stops = dict(re.findall(r"rank (\d) stopped by SIGTERM after step (\d+)", text))
    assert stops.keys() == {"0", "1"} and stops["0"] == stops["1"], text
    stopped = int(stops["0"])
    assert stop_at < stopped < STEPS and not (out / "summary.json").exists()
    assert sorted(p.name for p in list_checkpoints(out / "checkpoints")[0].iterdir() if "distcp" in p.name) == \
        ["__0_0.distcp", "__1_0.distcp"]

    # 2 -> 1 process, and FSDP's checkpoint into the DDP strategy
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the checkpoint was written by")
        summary = train_here(out, "--resume", "--workers", "0")
    assert summary["steps"] == STEPS and summary["strategy"] == "ddp"
    assert _relative(train_losses(out), train_losses(runs / "one")) < 1e-5
    _assert_close_weights(weights(out), weights(runs / "one"), rtol=1e-4)


@pytest.mark.subprocess
def test_eval_under_torchrun_shards_the_test_split_and_equals_one_process(runs, capsys):
    from vit_fast.cli import main

    assert main(["eval", str(runs / "two")]) == 0
    alone = capsys.readouterr().out
    proc = subprocess.run(torchrun_cmd(2, "eval", str(runs / "two"), module="vit_fast.cli"), capture_output=True,
                          text=True, timeout=600, env=ENV)
    check(proc, proc.stdout, proc.stderr)
    scores = [re.findall(r"top-1 +([\d.]+)% +top-5 +([\d.]+)%", text) for text in (alone, proc.stdout)]
    assert scores[0] == scores[1] and len(scores[0]) == 1, (alone, proc.stdout)
    assert "2 processes on cpu" in proc.stdout and f"{TEST_IMAGES} images" in proc.stdout
    summary = json.loads((runs / "two" / "summary.json").read_text())
    assert float(scores[0][0][0]) == pytest.approx(100 * summary["test_top1"], abs=0.006)


@pytest.mark.subprocess
def test_convert_consolidates_a_sharded_checkpoint_for_vit_fast_and_timm(runs, tmp_path, capsys):
    import timm
    from safetensors.torch import load_file

    import vit_fast
    from vit_fast.cli import main
    from vit_fast.train.models import model_from_config

    newest = list_checkpoints(runs / "two" / "checkpoints")[0]  # the last step's: the final weights
    assert main(["convert", str(newest), "--out", str(tmp_path / "w.safetensors")]) == 0
    got, final = load_file(tmp_path / "w.safetensors"), weights(runs / "two")
    assert got.keys() == final.keys() and all(torch.equal(got[k], final[k]) for k in final)
    config = read_checkpoint(newest)["config"]
    ours = vit_fast.load_checkpoint(model_from_config(config), str(tmp_path / "w.safetensors")).eval()
    keys = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio")
    theirs = timm.models.VisionTransformer(**{k: config[k] for k in keys})
    theirs.eval()
    timm.models.load_checkpoint(theirs, str(tmp_path / "w.safetensors"))
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # a run directory means its newest checkpoint; a single-file one converts as well
    assert main(["convert", str(runs / "one"), "--out", str(tmp_path / "one.safetensors")]) == 0
    got, final = load_file(tmp_path / "one.safetensors"), weights(runs / "one")
    assert all(torch.equal(got[k], final[k]) for k in final)
    capsys.readouterr()
    (tmp_path / "junk").mkdir()
    assert main(["convert", str(tmp_path / "junk"), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "junk is not a readable vit_fast training checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.subprocess
def test_peak_memory_per_rank_shrinks_with_the_sharded_states(tmp_path):
    # Many parameters, little compute: one 8x8 patch per image (2 tokens), four 512-wide blocks (12.6M params,
    # 130 MB of fp32 AdamW states). With a fixed mmap threshold glibc hands every freed tensor back, so the peak
    # resident memory follows the tensors'. The batch is global and small: the estimate leaves activations out, and
    # at batch 64 the ones that halve per rank added 17 MB (27 %) to the measured saving.
    heavy = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--ckpt-every", "0", "--log-every", "1",
             "--strategy", "fsdp", "--override", "depth=4", "--override", "embed_dim=512", "--override",
             "num_heads=8", "--override", "patch_size=8"]
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}
    records = []
    for n in (1, 2):
        out = tmp_path / f"x{n}"
        proc = subprocess.Popen(torchrun_cmd(n, "--out", str(out), *heavy), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        wait_for(lambda out=out: (out / "metrics.jsonl").exists() and '"memory"' in (out / "metrics.jsonl").read_text(),
                 proc, "the memory record")
        os.killpg(proc.pid, signal.SIGKILL)  # the measurement is in; the rest of the run is not needed
        proc.wait(timeout=60)
        records.append(memory_record(out))
    one, two = records
    estimate = [sum(r["estimate"].values()) for r in records]
    states = [sum(r["state_bytes"][0].values()) for r in records]
    assert states[1] == pytest.approx(states[0] / 2, rel=0.01)
    # what sharding saves per rank, measured, is what the estimate says it saves
    saved = one["peak_bytes"][0] - max(two["peak_bytes"])
    assert saved == pytest.approx(estimate[0] - estimate[1], rel=0.3), (one, two)  # measured here: 1.14x
    assert max(two["peak_bytes"]) < 0.8 * one["peak_bytes"][0]


# ------------------------------------------------------------------------- one process, in this process

QUICK = [*RECIPE[:2], "--batch-size", "128", *RECIPE[4:]]  # 11 steps


def test_fsdp_in_one_process_is_plain_training_with_grad_checkpointing_cpu_offload_and_a_ddp_checkpoint(
        tmp_path, monkeypatch):
    import torch.distributed.fsdp as fsdp

    import vit_fast.model

    train_here(tmp_path / "plain", *QUICK)
    policies, recomputed = [], []
    real_shard, real_checkpoint = fsdp.fully_shard, vit_fast.model.checkpoint
    monkeypatch.setattr(fsdp, "fully_shard", lambda m, **kw: policies.append(kw) or real_shard(m, **kw))
    monkeypatch.setattr(vit_fast.model, "checkpoint",
                        lambda *a, **kw: recomputed.append(1) or real_checkpoint(*a, **kw))
    train_here(tmp_path / "gc", "--strategy", "fsdp", "--grad-checkpointing", *QUICK)
    assert len(policies) == 3 and recomputed  # two blocks and the root; the blocks ran under checkpoint()
    assert all(type(kw["offload_policy"]) is fsdp.OffloadPolicy for kw in policies)
    assert all(kw["mp_policy"].param_dtype is None and kw["mp_policy"].reduce_dtype is None for kw in policies)
    # a DDP (single-file) checkpoint resumed under FSDP, sharded onto CPU offload
    signal_at_step(monkeypatch, 4)
    assert run_from_args(build_parser().parse_args(["--out", str(tmp_path / "moved"), "--no-progress", *QUICK])) == 75
    monkeypatch.undo()
    policies.clear()
    monkeypatch.setattr(fsdp, "fully_shard", lambda m, **kw: policies.append(kw) or real_shard(m, **kw))
    summary = train_here(tmp_path / "moved", "--resume", "--strategy", "fsdp", "--cpu-offload")
    assert summary["strategy"] == "fsdp" and all(type(kw["offload_policy"]) is fsdp.CPUOffloadPolicy
                                                 for kw in policies)
    for run in ("gc", "moved"):  # one process: FSDP computes exactly what plain training does
        assert train_losses(tmp_path / run) == train_losses(tmp_path / "plain"), run
        a, b = weights(tmp_path / run), weights(tmp_path / "plain")
        assert all(torch.equal(a[k], b[k]) for k in b), run


@pytest.mark.slow
def test_torch_compile_composes_with_fsdp(tmp_path):
    train_here(tmp_path / "plain", *QUICK)
    train_here(tmp_path / "compiled", "--strategy", "fsdp", "--compile", *QUICK)  # each block's forward compiled
    assert _relative(train_losses(tmp_path / "compiled"), train_losses(tmp_path / "plain")) < 1e-5


def test_fsdp_computes_in_bf16_and_reduces_in_fp32_on_gpu_only_and_offloads_when_asked():
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    from vit_fast.train.distributed import fsdp_policies

    mp, offload = fsdp_policies("cuda", "bf16", cpu_offload=False)
    assert (mp.param_dtype, mp.reduce_dtype, type(offload)) == (torch.bfloat16, torch.float32, OffloadPolicy)
    for device, precision in (("cuda", "fp32"), ("cpu", "bf16"), ("cpu", "fp32")):
        mp, _ = fsdp_policies(device, precision, cpu_offload=False)
        assert (mp.param_dtype, mp.reduce_dtype) == (None, None), (device, precision)
    _, offload = fsdp_policies("cuda", "bf16", cpu_offload=True)
    assert type(offload) is CPUOffloadPolicy and offload.pin_memory
    _, offload = fsdp_policies("cpu", "fp32", cpu_offload=True)
    assert type(offload) is CPUOffloadPolicy and not offload.pin_memory


def test_fsdp_refuses_what_it_cannot_shard_naming_the_flag(tmp_path, capsys):
    for flags, said in ((["--model", "test_resnet"], "--strategy fsdp shards a vit_fast ViT"),
                        (["--precision", "fp16", *MODEL], "--strategy fsdp with --precision fp16"),
                        (["--cpu-offload", "--strategy", "ddp", *MODEL], "--cpu-offload offloads FSDP's shards")):
        args = build_parser().parse_args(["--out", str(tmp_path / said[2:8]), "--no-progress", "--epochs", "1",
                                          "--workers", "0", "--strategy", "fsdp", *flags])
        assert run_from_args(args) == 1
        assert said in capsys.readouterr().err


def test_dry_run_prints_the_plan_per_process_and_trains_nothing(tmp_path, monkeypatch, capsys):
    import torch.distributed as dist

    import vit_fast
    from vit_fast.train.memory import GIB, estimate_for_model

    monkeypatch.setenv("WORLD_SIZE", "8")
    out = tmp_path / "never"
    args = build_parser().parse_args(["--out", str(out), "--dry-run", "--strategy", "fsdp", "--model",
                                      "vit_huge_patch14_224", "--img-size", "224", "--device", "cpu"])
    assert run_from_args(args) == 0
    text = capsys.readouterr().out
    assert not out.exists() and not dist.is_initialized()
    with torch.device("meta"):
        model = vit_fast.create_model("vit_huge_patch14_224", num_classes=10, in_chans=1, img_size=224)
    est = estimate_for_model(model, strategy="fsdp", world_size=8)
    assert "strategy fsdp over 8 processes on cpu; precision fp32" in text, text
    assert re.search(rf"total +{est.total / GIB:.3f} GiB", text) and "nothing was trained" in text, text
    assert est.params > 600e6 and est.weights == pytest.approx(4 * est.params / 8, rel=0.01)


def test_the_estimate_shards_the_states_and_the_readme_table_is_the_computed_one():
    from pathlib import Path

    from vit_fast.train.memory import estimate_memory, memory_table

    assert estimate_memory(1000, strategy="ddp", world_size=1).total == 16 * 1000
    assert estimate_memory(1000, strategy="ddp", world_size=8, compute_bytes=2).total == (16 + 4 + 2) * 1000
    fsdp = estimate_memory(8000, strategy="fsdp", world_size=8, block_params=100, root_params=200, compute_bytes=2)
    assert (fsdp.weights, fsdp.grads, fsdp.optimizer) == (4000, 4000, 8000)
    assert fsdp.transient == 2 * (200 + 2 * 100) + (2 + 4) * 100
    assert estimate_memory(8000, strategy="fsdp", world_size=8, offload=True).optimizer == 0
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert memory_table() in readme
