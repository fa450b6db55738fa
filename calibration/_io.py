"""Atomic file writes: a reader never sees a half-written report, figure or metrics file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

FILE_MODE = 0o644  # mkstemp creates 0600 files; reports are meant to be readable by others


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    The temporary file lives next to the target so the final rename stays on one file system (and is atomic);
    on any error it is removed, so nothing is left behind.

    Args:
        path: the destination file; its folder must exist.
        data: the bytes to write.

    Returns:
        The destination as a ``Path``.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target
