"""Atomic file writes, the one way this project writes a file a reader may open: a reader sees the old file or the
complete new one, never half of one, and a failed write leaves nothing behind.

It lives in the lowest package so that every layer above (checkpoints, ONNX graphs, scoring output, reports,
benchmarks) uses this one implementation.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FILE_MODE = 0o644  # mkstemp creates 0600 files; reports, weights and outputs are meant to be readable by others


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, fsync it and rename it over
    ``path``; on any error (KeyboardInterrupt included) remove it.

    The temporary file lives next to the target so the final rename stays on one file system (and is atomic).

    Args:
        path: the destination file.
        make_parents: create the destination's folder first.

    Yields:
        The temporary file's path (it exists, empty); write it by name.
    """
    target = Path(path)
    if make_parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes,
                       check: Callable[[str], None] | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`); ``check(temp_path)``, if given, runs on the
    complete temporary file before it replaces ``path`` (and may raise to keep the old file).

    Returns:
        The destination as a ``Path``.
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        if check is not None:
            check(str(tmp))
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
