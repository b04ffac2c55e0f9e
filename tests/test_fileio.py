"""Files survive faults: atomic_write on a disk that fills up or fails midway leaves the previous file whole and
no temporary file, every `vit-fast` subcommand then ends with one line and status 74, and the umask is read
without being changed."""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_fast import cli, fileio
from vit_fast.fileio import EXIT_WRITE_FAILED, WriteError, atomic_write, current_umask

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _proc_umask() -> bool:
    try:
        with open("/proc/self/status") as f:
            return any(line.startswith("Umask:") for line in f)
    except OSError:
        return False


@pytest.fixture
def umask_027():
    umask = os.umask  # the real one: the test may replace os.umask before this is torn down
    old = umask(0o027)
    yield
    umask(old)


@pytest.mark.skipif(not _proc_umask(), reason="no Umask line in /proc/self/status (not Linux >= 4.7)")
def test_the_umask_is_read_from_proc_without_setting_it(tmp_path, monkeypatch, umask_027):
    def never(*_args):
        raise AssertionError("os.umask called: the process-wide umask changed for a moment")

    monkeypatch.setattr(os, "umask", never)
    assert current_umask() == 0o027
    atomic_write(tmp_path / "a.txt", "x")  # the umask in force at the write, not one read at import
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640


def test_without_proc_the_umask_is_set_and_restored_once_under_the_lock(tmp_path, monkeypatch, umask_027):
    real_umask, calls = os.umask, []

    def umask(mask: int) -> int:
        assert fileio._UMASK_LOCK.locked(), "the umask was changed outside the lock"
        calls.append(mask)
        return real_umask(mask)

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc"):
            raise FileNotFoundError(path)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(fileio, "open", no_proc, raising=False)
    monkeypatch.setattr(fileio, "_UMASK_FALLBACK", [])
    monkeypatch.setattr(os, "umask", umask)
    assert current_umask() == 0o027 and current_umask() == 0o027
    assert len(calls) == 2 and calls[1] == 0o027  # set, restored; the second call read the remembered value
    assert real_umask(0o027) == 0o027  # restored
    atomic_write(tmp_path / "b.txt", b"y")
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640 and len(calls) == 2


# ---- atomic_write when the disk fills up or fails midway ------------------------------------------------------

class _DiskFillsAt(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full disk does: the part that fit is written."""

    def __init__(self, path: str, room: int) -> None:
        self.f, self.room = open(path, "wb"), room  # noqa: SIM115 - closed by close()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            self.f.write(bytes(b[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)

    def close(self) -> None:
        self.f.close()
        super().close()


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def _fail_fdopen(monkeypatch, code: int) -> None:
    """os.fdopen in atomic_write gives a file that writes a few bytes, then fails with ``code``."""
    real = os.fdopen

    class Failing(io.RawIOBase):
        def __init__(self, fd, *_args, **_kwargs):
            self.f = real(fd, "wb")

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            self.f.write(bytes(b[:3]))
            raise OSError(code, os.strerror(code))

        def close(self) -> None:
            self.f.close()
            super().close()

    monkeypatch.setattr(fileio.os, "fdopen", Failing)


def _fail(monkeypatch, name: str, code: int) -> None:
    def failing(*_args, **_kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fileio.os, name, failing)


@pytest.mark.parametrize("stage, code", [
    ("write", errno.ENOSPC), ("write", errno.EIO), ("fsync", errno.EIO), ("replace", errno.EIO),
    ("mkstemp", errno.ENOSPC), ("quota", errno.EDQUOT),
])
def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, stage, code):
    path = tmp_path / "results.json"
    atomic_write(path, json.dumps({"version": 1}))
    if stage in ("write", "quota"):
        _fail_fdopen(monkeypatch, code)
    elif stage == "mkstemp":
        def no_inode(*_args, **_kwargs):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(fileio.tempfile, "mkstemp", no_inode)
    else:
        _fail(monkeypatch, stage, code)
    with pytest.raises(WriteError) as info:
        atomic_write(path, json.dumps({"version": 2, "rows": list(range(1000))}))
    assert info.value.errno == code and info.value.filename == os.fspath(path)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == code
    assert json.loads(path.read_text()) == {"version": 1}
    assert _leftovers(tmp_path, {"results.json"}) == []


def test_torch_save_and_safetensors_on_a_disk_that_fills_keep_the_previous_file_loadable(tmp_path):
    from safetensors.torch import load_file, save

    ckpt, weights = tmp_path / "step_00000001.pt", tmp_path / "model.safetensors"
    old = {"w": torch.randn(50, 20)}
    atomic_write(ckpt, lambda tmp: torch.save(old, tmp))
    atomic_write(weights, save(old))
    new = {"w": torch.randn(500, 200)}
    with pytest.raises(WriteError) as info:  # torch.save says "unexpected pos": the OSError is its context
        atomic_write(ckpt, lambda tmp: torch.save(new, _DiskFillsAt(tmp, 20_000)))
    assert info.value.errno == errno.ENOSPC and info.value.filename == os.fspath(ckpt)

    def save_weights(tmp: str) -> None:
        with _DiskFillsAt(tmp, 20_000) as f:
            f.write(save(new))

    with pytest.raises(WriteError, match="No space left"):
        atomic_write(weights, save_weights)
    assert torch.equal(torch.load(ckpt, weights_only=True)["w"], old["w"])
    assert torch.equal(load_file(weights)["w"], old["w"])
    assert _leftovers(tmp_path, {ckpt.name, weights.name}) == []


def test_a_writer_failing_in_its_own_words_is_a_full_disk_only_when_the_disk_is_full(tmp_path, monkeypatch):
    def torch_like(tmp: str) -> None:  # what torch.save raises on a full disk: no OSError anywhere
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1388096 vs 1387984")

    path = tmp_path / "ckpt.pt"
    monkeypatch.setattr(fileio, "_free_bytes", lambda folder: 1 << 30)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of room: the writer's own bug, as it is
        atomic_write(path, torch_like)
    monkeypatch.setattr(fileio, "_free_bytes", lambda folder: 4096)
    with pytest.raises(WriteError) as info:
        atomic_write(path, torch_like)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value.__cause__, RuntimeError)
    assert _leftovers(tmp_path, set()) == []


def test_other_errors_propagate_unchanged_and_interrupts_still_clean_up(tmp_path):
    path = tmp_path / "x.txt"

    def denied(tmp: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", tmp)

    with pytest.raises(PermissionError):
        atomic_write(path, denied)

    def interrupted(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert _leftovers(tmp_path, set()) == []


# ---- one line from every subcommand ---------------------------------------------------------------------------

def _full_disk_run(path: Path):
    def run(_args: argparse.Namespace) -> int:
        atomic_write(path, lambda tmp: torch.save({"w": torch.randn(100, 100)}, _DiskFillsAt(tmp, 1000)))
        return 0

    return run


@pytest.mark.parametrize("command", cli.COMMANDS, ids=[c.name for c in cli.COMMANDS])
def test_every_subcommand_ends_a_full_disk_with_one_line_and_status_74(command, tmp_path, monkeypatch, capsys):
    import importlib

    path = tmp_path / "out" / "file.bin"
    monkeypatch.setattr(importlib.import_module(command.module), command.run, _full_disk_run(path))
    assert cli._runner(command)(argparse.Namespace()) == EXIT_WRITE_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"vit-fast {command.name}: error: the disk is full") and os.fspath(path) in err
    assert _leftovers(path.parent, set()) == []


def test_io_errors_get_one_line_and_other_os_errors_a_traceback(tmp_path, monkeypatch, capsys):
    command = next(c for c in cli.COMMANDS if c.name == "report")
    module = __import__(command.module, fromlist=["_"])

    def eio(_args):
        raise OSError(errno.EIO, "Input/output error")  # from anywhere, not only atomic_write: no file known

    monkeypatch.setattr(module, command.run, eio)
    assert cli._runner(command)(argparse.Namespace()) == EXIT_WRITE_FAILED
    assert capsys.readouterr().err == ("vit-fast report: error: input/output error writing a file: the disk or file "
                                       "system failed\n")

    def denied(_args):
        raise PermissionError(errno.EACCES, "Permission denied", "/root/x")

    monkeypatch.setattr(module, command.run, denied)
    with pytest.raises(PermissionError):
        cli._runner(command)(argparse.Namespace())


def test_predict_on_a_full_disk_keeps_the_earlier_predictions(tmp_path, monkeypatch, capsys):
    from test_predict import _save_run

    import vit_fast
    from vit_fast.cli import main

    run = _save_run(tmp_path / "run", vit_fast.create_model("vit_nano_patch2_8").eval())
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("L", (8, 8), 128).save(image)
    out = tmp_path / "pred.jsonl"
    out.write_text('{"earlier": true}\n')
    _fail_fdopen(monkeypatch, errno.ENOSPC)
    assert main(["predict", str(run), str(image), "--out", str(out), "--workers", "0", "--no-progress"]) == 74
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"vit-fast predict: error: the disk is full: no space left to write {out} "
                                        "(any earlier version of it is intact); free some space and run again"]
    assert out.read_text() == '{"earlier": true}\n' and _leftovers(tmp_path, {"run", "a.png", "pred.jsonl"}) == []


# ---- read_json --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b'{"a": 1', "invalid JSON"), (b"\xff\xfe{}", "not UTF-8"), (b"[1, 2]", "a JSON object was expected"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"), (b"", "invalid JSON"),
])
def test_read_json_names_the_file_and_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "summary.json"
    path.write_bytes(content)
    with pytest.raises(fileio.FileFormatError, match=message) as info:
        fileio.read_json(path, what="run summary")
    assert str(info.value).startswith(f"{path}: not a valid run summary")


# ---- a real full disk: a 3 MB tmpfs -----------------------------------------------------------------------------

def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.subprocess
def test_train_on_a_3mb_tmpfs_says_the_disk_is_full_and_keeps_the_previous_checkpoint(tmp_path):
    """The issue's case: room for one 1.7 MB digits checkpoint, not two."""
    if not _can_mount_tmpfs():
        pytest.skip("cannot mount a tmpfs here (no unprivileged user and mount namespaces)")
    script = tmp_path / "in_namespace.sh"
    report = tmp_path / "report.json"
    script.write_text(f"""set -e
disk=$(mktemp -d)
mount -t tmpfs -o size=3m tmpfs "$disk"
set +e
"{sys.executable}" -m vit_fast.cli train --out "$disk/run" --epochs 1 --ckpt-every 2 --keep-ckpts 1 \\
    --no-progress >/dev/null 2>"{tmp_path}/err.txt"
rc=$?
"{sys.executable}" - "$disk" "$rc" "{report}" <<'PY'
import json, os, sys, torch
disk, rc, report = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ckpts = os.path.join(disk, "run", "checkpoints")
names = sorted(os.listdir(ckpts))
kept = torch.load(os.path.join(ckpts, names[0]), map_location="cpu", weights_only=True) if names else {{}}
json.dump({{"rc": rc, "err": open("{tmp_path}/err.txt").read(), "names": names,
           "kept_step": kept.get("step"), "disk": disk}}, open(report, "w"))
PY
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["unshare", "-rm", "sh", str(script)], capture_output=True, text=True, timeout=240,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(report.read_text())
    lines = got["err"].strip().splitlines()
    assert got["rc"] == EXIT_WRITE_FAILED and "Traceback" not in got["err"], got["err"]
    assert lines[-1].startswith("vit-fast train: error: the disk is full: no space left to write "
                                f"{got['disk']}/run/checkpoints/step_00000004.pt"), got["err"]
    assert got["names"] == ["step_00000002.pt"] and got["kept_step"] == 2  # the previous one, whole; no temporary
