"""Training checkpoints under faults, in both layouts (one file; a DCP directory): a full disk or an I/O error
mid-save, a checkpoint that does not read back after writing, what a killed save leaves, a hostile index."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from train_launch import train_here

from vit_fast.fileio import WriteError
from vit_fast.train import checkpoints, list_checkpoints, load_newest_checkpoint, run_from_args
from vit_fast.train.checkpoints import (
    read_dcp_index,
    save_checkpoint,
    save_sharded_checkpoint,
    tidy_for_resume,
    verify_checkpoint,
)
from vit_fast.train.distributed import Dist
from vit_fast.train.recipes import build_parser

TINY = ["--override", "depth=1", "--override", "embed_dim=16", "--override", "num_heads=2"]
ONE = Dist(0, 1, 0, torch.device("cpu"))


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class _FailingFile:
    """A file that takes ``budget`` bytes, then raises OSError(``code``) part way through a write, as a disk
    filling up (ENOSPC) or failing (EIO) does."""

    def __init__(self, f: object, budget: int, code: int) -> None:
        self._f, self._left, self._code = f, budget, code

    def write(self, data: bytes) -> int:
        if len(data) > self._left:
            self._f.write(bytes(memoryview(data)[: self._left]))
            self._left = 0
            raise OSError(self._code, os.strerror(self._code))
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)

    def __enter__(self) -> _FailingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _fail_writes_of(monkeypatch, name: str, code: int, budget: int = 3000) -> None:
    """Writes of a checkpoint file or DCP shard whose path contains ``name`` fail part way."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    real_stream = FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real_stream(self, path, mode) as stream:
            yield _FailingFile(stream, budget, code) if name in str(path) and "w" in mode else stream

    def failing_open(path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)  # noqa: SIM115 - closed by the caller's with
        return _FailingFile(f, budget, code) if name in str(path) and "w" in mode else f

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    monkeypatch.setattr(checkpoints, "open", failing_open, raising=False)


@pytest.mark.parametrize(("strategy", "code"), [("ddp", errno.ENOSPC), ("fsdp", errno.ENOSPC), ("ddp", errno.EIO)])
def test_a_write_failing_mid_checkpoint_keeps_the_previous_one_and_ends_with_one_line(tmp_path, monkeypatch, capsys,
                                                                                      strategy, code):
    flags = ["--epochs", "1", "--workers", "0", "--ckpt-every", "5", "--strategy", strategy, *TINY]
    _fail_writes_of(monkeypatch, "step_00000010", code)
    args = build_parser().parse_args(["--out", str(tmp_path), "--no-progress", *flags])
    assert run_from_args(args) == 74  # EX_IOERR
    monkeypatch.undo()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vit-fast train:")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert ("disk is full" if code == errno.ENOSPC else "input/output error") in lines[0]
    assert str(tmp_path / "checkpoints") in lines[0] and "step_00000010" in lines[0], lines[0]
    # the checkpoint before stays, whole and loadable; nothing half-written is left
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step_00000005" + ("" if strategy == "fsdp" else ".pt")]
    verify_checkpoint(kept[0])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [kept[0].name]
    if code == errno.ENOSPC:  # room again: the run continues from it
        summary = train_here(tmp_path, "--resume", "--workers", "0")
        assert summary["steps"] == 1437 // 64


def _truncating_save(real):
    def save(obj, path):  # a write the system took but the disk did not keep whole (no error said so)
        real(obj, path)
        os.truncate(path, os.path.getsize(path) // 2)

    return save


def test_a_checkpoint_that_does_not_read_back_is_set_aside_before_any_older_one_is_deleted(tmp_path, monkeypatch):
    for step in (3, 5):
        save_checkpoint(tmp_path, {"step": step, "w": torch.randn(64)}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005.pt"]
    monkeypatch.setattr(checkpoints, "_torch_save", _truncating_save(checkpoints._torch_save))
    with pytest.raises(WriteError, match="does not read back") as e:
        save_checkpoint(tmp_path, {"step": 9, "w": torch.randn(64)}, keep=1)
    assert e.value.errno == errno.EIO and e.value.filename == str(tmp_path / "step_00000009.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005.pt", "step_00000009.unreadable"]
    assert load_newest_checkpoint(tmp_path)["step"] == 5


def _sharded(step: int) -> dict:
    return {"model": {"w": torch.full((8, 4), float(step))}, "optimizer": {"w": {"exp_avg": torch.zeros(8, 4)}}}


def test_a_dcp_checkpoint_is_staged_checked_against_its_index_and_renamed(tmp_path, monkeypatch):
    warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # one process, no group
    for step in (2, 4, 6):
        path = save_sharded_checkpoint(tmp_path, step, _sharded(step), {"note": step}, keep=2, d=ONE)
    assert path == tmp_path / "step_00000006"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006", "step_00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006"]  # no staging left
    ckpt = load_newest_checkpoint(tmp_path)
    assert (ckpt["step"], ckpt["note"], ckpt["dcp"]) == (6, 6, str(path))
    # a shard the disk cut short (an index that promises more than the file holds) fails the check
    from torch.distributed.checkpoint.filesystem import FileSystem

    real_stream = FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, p, mode):
        with real_stream(self, p, mode) as stream:
            yield stream
        if str(p).endswith(".distcp"):
            os.truncate(p, os.path.getsize(p) - 16)

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    with pytest.raises(WriteError, match=r"__0_0.distcp: \d+ bytes; the checkpoint's index needs \d+") as e:
        save_sharded_checkpoint(tmp_path, 8, _sharded(8), {"note": 8}, keep=2, d=ONE)
    assert e.value.errno == errno.EIO
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006"]


def test_resume_passes_over_unfinished_dcp_directories_and_clears_what_killed_saves_left(tmp_path):
    warnings.filterwarnings("ignore", message=".*assuming the intent is to")
    save_sharded_checkpoint(tmp_path, 10, _sharded(10), {}, keep=3, d=ONE)
    save_checkpoint(tmp_path, {"step": 7}, keep=3)
    (tmp_path / "step_00000011").mkdir()  # a directory under a checkpoint's name without an index
    for leftover in (".staging-step_00000012", ".deleting-step_00000003"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "__0_0.distcp").write_bytes(b"half")
    (tmp_path / ".tmp-abc-step_00000013.pt").write_bytes(b"half")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000011", "step_00000010", "step_00000007.pt"]
    with pytest.warns(UserWarning, match=r"step_00000011 is unreadable .*\.metadata: missing"):
        ckpt = load_newest_checkpoint(tmp_path)
    assert ckpt["step"] == 10 and ckpt["dcp"] == str(tmp_path / "step_00000010")
    tidy_for_resume(tmp_path, ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000007.pt", "step_00000010",
                                                          "step_00000011.unreadable"]


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["VF_PAYLOAD"]),))


def test_a_dcp_index_is_read_without_running_what_it_carries(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("VF_PAYLOAD", str(marker))
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000001" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(ValueError, match=r"\.metadata: unreadable .*pathlib.*touch.*no place in a checkpoint index"):
        read_dcp_index(tmp_path / "step_00000001")
    assert not marker.exists()
    with pytest.warns(UserWarning, match="unreadable"):
        assert load_newest_checkpoint(tmp_path) is None
    assert not marker.exists()
