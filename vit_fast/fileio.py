"""Files that are never torn: every file vit_fast writes (checkpoints, metrics, results, plots, policies)
goes through :func:`atomic_write`."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable

# mkstemp makes owner-only files; what is written here is shared like any other output (reports, plots), so it
# gets the mode open() would give it. Read once, at import: the umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[str], object]) -> None:
    """Write ``path`` so that a reader, or a run killed mid-write, sees the old file or the new one, never a
    torn one: the content goes to a temporary file in the same folder, is flushed to disk, then renamed over
    ``path``.

    ``data`` is the content (``str`` is written as UTF-8) or a function that writes the file whose path it is
    given (``lambda tmp: torch.save(obj, tmp)``).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
