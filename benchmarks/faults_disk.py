"""A small tmpfs for the disk faults of ``snodevit score``: full (``ENOSPC``) or read-only (``EROFS``), and
:func:`score_faults`, which runs the real command line onto each.

Mounting needs root (``CAP_SYS_ADMIN``); :func:`small_tmpfs` raises :class:`MountUnavailable` where it is not
allowed, so the benchmark can say so and the tests can skip. The mount is always removed afterwards.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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


def _score(inputs: Path, model: Path, out: Path, *extra: str) -> tuple[int, str]:
    """``snodevit score`` in a subprocess: (exit code, its last stderr line)."""
    cmd = [sys.executable, "-m", "snodevit.cli", "score", str(inputs), "--model", str(model), "--out", str(out),
           "--no-progress", "--batch-size", "16", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def _whole_rows(partial: Path) -> int:
    """Complete rows of a partial file (its header and a torn last line not counted)."""
    return max(0, partial.read_bytes().count(b"\n") - 1) if partial.exists() else 0


def score_faults(workdir: Path, model: Path, inputs: Path) -> dict[str, Any]:
    """``snodevit score`` onto a full tmpfs (then room again, and ``--resume``) and onto a read-only one."""
    ref = workdir / "reference.jsonl"
    rc, _ = _score(inputs, model, ref)
    reference = ref.read_text().splitlines()
    out: dict[str, Any] = {"images": len(reference), "reference_exit_code": rc,
                           "reference_bytes": ref.stat().st_size}
    size = max(16 * 1024, out["reference_bytes"] // 3)
    try:
        with small_tmpfs(workdir / "full", size) as mount:
            target = mount / "scores.jsonl"
            rc, message = _score(inputs, model, target)
            out["full"] = {"tmpfs_bytes": size, "exit_code": rc, "message": message, "files_left": files_in(mount),
                           "whole_rows_kept": _whole_rows(mount / "scores.jsonl.partial")}
            grow(mount, 64 * 2**20)
            rc, _ = _score(inputs, model, target, "--resume")
            out["resume"] = {"exit_code": rc, "files_left": files_in(mount),
                             "rows_equal_reference": target.exists() and target.read_text().splitlines() == reference}
        with small_tmpfs(workdir / "ro", 64 * 1024, read_only=True) as mount:
            rc, message = _score(inputs, model, mount / "scores.csv")
            out["read_only"] = {"exit_code": rc, "message": message, "files_left": files_in(mount)}
    except MountUnavailable as err:
        out["mount_unavailable"] = str(err)
    return out
