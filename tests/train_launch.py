"""Starting training runs from tests: in this process, as ``python -m vit_fast.train``, under torchrun on one
node or as two "nodes" on localhost; finding a torchrun worker's pid by its rank; reading a run's results."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vit_fast.train import build_parser, read_metrics, train, trainer

# One intra-op thread per process: the machine's cores are shared by the processes of a run (and the suite).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# torchrun's agents on several nodes, as the README starts them: their own store per rendezvous round
NODE_ENV = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
_TORCHRUN = (sys.executable, "-m", "torch.distributed.run")


def train_here(out: Path, *argv: str) -> dict:
    """A run in this process."""
    return train(build_parser().parse_args(["--out", str(out), "--no-progress", *argv]))


def train_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "vit_fast.train", "--no-progress", *argv]


def torchrun_cmd(nproc: int, *argv: str, max_restarts: int = 0, module: str = "vit_fast.train") -> list[str]:
    """torchrun on this machine (``--standalone``), ``nproc`` workers of ``python -m module argv``
    (``--no-progress`` first for training)."""
    extra = ["--no-progress"] if module == "vit_fast.train" else []
    return [*_TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
            "--monitor-interval", "0.2", "-m", module, *extra, *argv]


def node_cmd(port: int, nodes: int, *argv: str) -> list[str]:
    """One of ``nodes`` torchrun agents of one worker each, meeting through the c10d rendezvous on ``port`` (run
    it with :data:`NODE_ENV`)."""
    return [*_TORCHRUN, "--nnodes", str(nodes), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "vit-fast-test", "-m", "vit_fast.train",
            "--no-progress", *argv]


def signal_at_step(monkeypatch: pytest.MonkeyPatch, step_no: int, sig: int = signal.SIGUSR1) -> None:
    """This process gets ``sig`` (a preemption's signal) right after training step ``step_no``."""
    step = trainer.Trainer._train_step

    def signal_at(self, *a):
        step(self, *a)
        if self.progress.step == step_no:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(trainer.Trainer, "_train_step", signal_at)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str = "", err: str = "", status: int = 0) -> None:
    assert proc.returncode == status, (f"exit {proc.returncode}, expected {status}\nstdout:\n{out[-3000:]}\n"
                                       f"stderr:\n{err[-6000:]}")


def worker_pids(agent_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the workers a torchrun agent started (its children, by the RANK in their environment)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry)
    return found


def wait_for(ready: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    """Poll until ``ready()``; fail if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}")
        time.sleep(0.005)
    pytest.fail(f"no {what} within {timeout} s")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def memory_record(run: Path) -> dict:
    return next(r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "memory")
