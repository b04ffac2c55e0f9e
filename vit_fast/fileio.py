"""Files that are never torn: every file vit_fast writes (checkpoints, metrics, results, plots, policies)
goes through :func:`atomic_write`; JSON files it reads go through :func:`read_json`, whose errors name the file.

A write that fails (a full disk, an I/O error) raises :class:`WriteError` naming the file that was being
written; the file that was there before is left whole and no temporary file is left behind. ``vit-fast``
turns a :class:`WriteError` (or any other out-of-space error) into one line and :data:`EXIT_WRITE_FAILED`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import threading
from collections.abc import Callable

# sysexits.h's EX_IOERR ("an error occurred while doing I/O on some file"): what `vit-fast` exits with when an
# output could not be written, so a script tells a full disk from a mistake in its own arguments (status 1).
EXIT_WRITE_FAILED = 74
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FAULTS = DISK_FULL_ERRNOS | {errno.EIO}  # what a write meets that no fix of the caller's arguments would cure
# A writer that reports a failed write in its own words (torch.save: "unexpected pos ...") failed for want of
# space when the disk has less than this left: a failed write stops at the last block that fit.
_FULL_BELOW_BYTES = 1 << 20

_UMASK_LOCK = threading.Lock()
_UMASK_FALLBACK: list[int] = []


class WriteError(OSError):
    """``filename`` could not be written (``errno`` says why: ENOSPC for a full disk, EIO, ...); the file that
    was there before, if any, is unchanged."""


def current_umask() -> int:
    """The process's umask, read without changing it: from ``/proc/self/status`` (Linux), else set and
    restored once under a lock (the only way to read it elsewhere; another thread creating a file in that
    instant could get the wrong mode, so it is done once and remembered)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:
        if not _UMASK_FALLBACK:
            mask = os.umask(0o022)
            os.umask(mask)
            _UMASK_FALLBACK.append(mask)
        return _UMASK_FALLBACK[0]


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[str], object]) -> None:
    """Write ``path`` so that a reader, or a run killed mid-write, sees the old file or the new one, never a
    torn one: the content goes to a temporary file in the same folder, is flushed to disk, then renamed over
    ``path``.

    ``data`` is the content (``str`` is written as UTF-8) or a function that writes the file whose path it is
    given (``lambda tmp: torch.save(obj, tmp)``). A write that fails for want of space or with an I/O error
    raises :class:`WriteError` naming ``path``, with the writer's own exception as its cause; the old file
    stays and the temporary one is removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    except OSError as e:
        failed = _write_error(e, path, folder)
        if failed is None:
            raise
        raise failed from e
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        # mkstemp makes owner-only files; these are outputs shared like any other (reports, plots), so they get
        # the mode open() would give them under the umask in force now
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        failed = _write_error(e, path, folder) if isinstance(e, Exception) else None  # before tmp frees its space
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if failed is not None:
            raise failed from e
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:  # the new file is in place; only its rename may not be on disk yet
        failed = _write_error(e, path, folder)
        if failed is None:
            raise
        raise failed from e


def _write_error(e: BaseException, path: str, folder: str) -> WriteError | None:
    """The :class:`WriteError` that ``e``, raised while writing ``path``, amounts to (a full disk or an I/O
    error), or None: any other error propagates as it is."""
    codes = [c.errno for c in _chain(e) if isinstance(c, OSError) and c.errno]
    code = next((c for c in codes if c in _FAULTS), None)
    if code is None and not codes and _free_bytes(folder) < _FULL_BELOW_BYTES:
        code = errno.ENOSPC
    return None if code is None else WriteError(code, os.strerror(code), path)


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while e is not None and all(e is not s for s in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _free_bytes(folder: str) -> float:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs (Windows) or no folder: nothing is known
        return float("inf")
    return st.f_bavail * st.f_frsize


def describe_write_failure(e: BaseException) -> str | None:
    """One line for a failed write (``vit-fast``'s message), or None when ``e`` is not one: a full disk or an
    I/O error, naming the file it hit where that is known."""
    if not isinstance(e, OSError) or e.errno not in _FAULTS:
        return None
    where = f" {e.filename}" if e.filename else ""
    kept = " (any earlier version of it is intact)" if isinstance(e, WriteError) and e.filename else ""
    if e.errno in DISK_FULL_ERRNOS:
        full = "the disk is full" if e.errno == errno.ENOSPC else "the disk is full for you (quota exceeded)"
        return f"{full}: no space left to write{where or ' a file'}{kept}; free some space and run again"
    return f"input/output error writing{where or ' a file'}{kept}: the disk or file system failed"


class FileFormatError(ValueError):
    """A file vit_fast reads is not what it should be (not JSON, torn, of the wrong shape); the message names
    the file."""


def read_json(path: str | os.PathLike, *, what: str = "JSON file",
              expect: type | tuple[type, ...] = dict) -> object:
    """The JSON document in ``path``, which must be an ``expect`` (a JSON object by default). A file that is no
    such JSON (torn, bit-flipped, another format) raises :class:`FileFormatError` naming ``path`` and ``what``
    it should have been; a missing file raises ``FileNotFoundError``."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not a valid {what}: not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: not a valid {what}: invalid JSON ({e.msg} at line {e.lineno} column "
                              f"{e.colno})") from e
    except RecursionError as e:
        raise FileFormatError(f"{path}: not a valid {what}: JSON nested too deeply") from e
    if not isinstance(doc, expect):
        names = {dict: "a JSON object", list: "a JSON list"}
        want = " or ".join(names.get(t, t.__name__) for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise FileFormatError(f"{path}: not a valid {what}: {want} was expected, the file holds a "
                              f"{type(doc).__name__}")
    return doc
