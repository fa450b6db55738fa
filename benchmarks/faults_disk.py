"""A small tmpfs for the disk faults of ``snodevit score``: full (``ENOSPC``) or read-only (``EROFS``).

Mounting needs root (``CAP_SYS_ADMIN``); :func:`small_tmpfs` raises :class:`MountUnavailable` where it is not
allowed, so the benchmark can say so and the tests can skip. The mount is always removed afterwards.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


class MountUnavailable(RuntimeError):
    """This process may not mount a tmpfs (not root, or no CAP_SYS_ADMIN in this container)."""


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MountUnavailable(f"mount {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


@contextlib.contextmanager
def small_tmpfs(where: Path, size_bytes: int, *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` (rounded up to whole pages) mounted on ``where`` (created); unmounted after.

    Raises:
        MountUnavailable: mounting is not permitted here.
    """
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes},mode=0777" + (",ro" if read_only else "")
    _mount("-t", "tmpfs", "-o", options, "snodevit-faults", str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def grow(where: Path, size_bytes: int) -> None:
    """Give the mounted tmpfs at ``where`` more room (as freeing space on a full disk would)."""
    _mount("-o", f"remount,size={size_bytes}", str(where))


def files_in(where: Path) -> list[str]:
    """Names of the files in ``where`` (temporary files included: nothing may be left half-written)."""
    return sorted(p.name for p in where.iterdir())
