"""Where a run writes, and ``OUT.partial``: the resumable stream of finished rows.

``OUT.partial`` is JSON Lines: a header line holding every setting that changes the numbers (model weights,
backend, samples, seed, top-k, alpha, image caps, inputs), then one row per line. A run killed at any point leaves
complete lines plus at most one torn last line; resuming truncates the torn line, reads the set of finished paths
back and scores only the rest, so no row is lost or written twice. The header must match the resumed command,
otherwise resuming is refused. The partial file is locked (``flock``) while a run writes it.

A write that fails (a full disk, a read-only folder) raises :class:`ScoreWriteError` naming the file and the
system's reason: a new partial file that could not even take its header is removed, an older one keeps its complete
rows (a torn last line is dropped on resume), so ``--resume`` continues once there is room.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from snodevit.scoring.errors import ScoreError, ScoreWriteError, write_error

logger = logging.getLogger(__name__)

OutputFormat = Literal["csv", "jsonl", "parquet"]
#: Output file name endings and the format each one selects.
OUTPUT_FORMATS: dict[str, OutputFormat] = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
PARTIAL_SUFFIX = ".partial"
_PARTIAL_VERSION = 2  # 2: rows carry the out-of-distribution gate (reason_code, ood_score, ...)


@dataclass(frozen=True)
class OutputPlan:
    """Where a run writes and whether it continues an earlier one."""

    out: Path  # the final file
    fmt: OutputFormat  # from the file name ending
    partial: Path  # ``OUT.partial``: the resumable JSON Lines stream
    resume: bool  # True: continue ``partial``; False: start a new one


def plan_output(out: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> OutputPlan:
    """Check the output path before any work is done.

    Rules: the name must end in .csv, .jsonl or .parquet and its folder must exist. With ``resume``, an existing
    ``OUT.partial`` is continued (a missing one starts afresh); an existing OUT with no partial file means that
    run already finished. With ``overwrite``, an existing OUT and partial file are replaced. With neither, an
    existing OUT or partial file is an error.

    Raises:
        ScoreError: as above.
    """
    if resume and overwrite:
        raise ScoreError("--resume and --overwrite contradict each other; pick one")
    path = Path(out)
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ScoreError(f"cannot tell the output format of {str(path)!r}: the name must end in "
                         f"{', '.join(OUTPUT_FORMATS)}")
    if path.is_dir():
        raise ScoreError(f"{path} is a folder; give a file name ending in {', '.join(OUTPUT_FORMATS)}")
    if not path.parent.is_dir():
        raise ScoreError(f"the output folder {path.parent} does not exist")
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    if overwrite:
        return OutputPlan(path, fmt, partial, resume=False)
    if resume:
        if partial.exists():
            return OutputPlan(path, fmt, partial, resume=True)
        if path.exists():
            raise ScoreError(f"{path} is complete (there is no {partial.name} to resume); "
                             "pass --overwrite to score again")
        return OutputPlan(path, fmt, partial, resume=False)
    if partial.exists():
        raise ScoreError(f"{partial} holds an unfinished run; pass --resume to continue it or --overwrite to "
                         "start again")
    if path.exists():
        raise ScoreError(f"{path} exists; pass --overwrite to replace it")
    return OutputPlan(path, fmt, partial, resume=False)


class PartialFile:
    """``OUT.partial``: a locked, append-only JSON Lines stream with a header line.

    Use as a context manager. ``done`` holds the absolute paths already scored (read back on resume).
    """

    def __init__(self, path: Path, header: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.header = header
        self.done: set[str] = set()
        self.rows_before = 0
        self._failed = False  # a write failed: closing must not raise the same error again
        created = not path.exists()
        try:
            self._f: IO[bytes] = open(path, "a+b")  # noqa: SIM115 - closed in close()
        except OSError as err:
            raise write_error(err, path, None) from None
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.close()
            raise ScoreError(f"another `snodevit score` is writing {path}; wait for it or stop it") from None
        try:
            if resume and self._load():
                return
            self._f.seek(0)
            self._f.truncate()
            try:
                self._write_line({"snodevit_score_partial": _PARTIAL_VERSION, "cwd": os.getcwd(),
                                  "settings": header})
                self._f.flush()
            except OSError as err:
                self._failed = True
                raise write_error(err, path, None) from None
        except ScoreWriteError:
            self.close()
            if created:
                path.unlink(missing_ok=True)
            raise
        except BaseException:
            self.close()
            raise

    def _write_line(self, obj: dict[str, Any]) -> None:
        self._f.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    def _load(self) -> bool:
        """Read an existing partial file; False when it holds not even a complete header (start afresh)."""
        self._f.seek(0)
        first = self._f.readline()
        if not first.endswith(b"\n"):
            return False
        try:
            meta = json.loads(first)
            version, cwd, settings = meta["snodevit_score_partial"], meta["cwd"], meta["settings"]
        except (ValueError, KeyError, TypeError):
            raise ScoreError(f"{self.path} is not a partial file of `snodevit score`; remove it or pass "
                             "--overwrite") from None
        if version != _PARTIAL_VERSION:
            raise ScoreError(f"{self.path} was written by another version of `snodevit score`; pass --overwrite")
        if cwd != os.getcwd():  # relative inputs and row paths would name other files
            raise ScoreError(f"cannot resume {self.path} from {os.getcwd()}: resume from {cwd}, where it started")
        diff = sorted(k for k in set(settings) | set(self.header) if settings.get(k) != self.header.get(k))
        if diff:
            was = ", ".join(f"{k}={settings.get(k)!r}" for k in diff if k != "class_names")
            now = ", ".join(f"{k}={self.header.get(k)!r}" for k in diff if k != "class_names")
            raise ScoreError(f"cannot resume {self.path}: it was started with other settings ({', '.join(diff)}: "
                             f"was {was or 'other classes'}; now {now or 'other classes'}). Resume with the same "
                             "command, or pass --overwrite to start again")
        offset = len(first)
        lineno = 1
        while True:
            line = self._f.readline()
            if not line:
                break
            lineno += 1
            if not line.endswith(b"\n"):  # torn by a kill mid-write: that image is scored again
                logger.info("dropping a torn last line of %s", self.path)
                self._f.truncate(offset)
                break
            try:
                row_path = json.loads(line)["path"]
            except (ValueError, KeyError, TypeError):
                raise ScoreError(f"{self.path}:{lineno} is corrupt; pass --overwrite to start again") from None
            self.done.add(os.path.abspath(row_path))
            self.rows_before += 1
            offset += len(line)
        self._f.seek(0, os.SEEK_END)
        return True

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append rows (one JSON line each) in one write.

        :meth:`flush` then hands them to the OS: they survive a killed process, though not a power cut.
        """
        try:
            self._f.write(b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in rows))
        except OSError as err:
            self._failed = True
            raise write_error(err, self.path, self.path) from None

    def flush(self) -> None:
        """Hand the buffered rows to the OS.

        Raises:
            ScoreWriteError: the disk is full or the file system refuses the write.
        """
        try:
            self._f.flush()
        except OSError as err:
            self._failed = True
            raise write_error(err, self.path, self.path) from None

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            self._f.flush()
        except OSError:
            if not self._failed:
                raise
        finally:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            try:
                self._f.close()
            except OSError:  # the buffered rows that failed, tried once more: the first error is the one reported
                if not self._failed:
                    raise

    def __enter__(self) -> PartialFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
