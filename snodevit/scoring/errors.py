"""The errors of batch scoring: unusable arguments or state (the CLI's exit code 2), and output that cannot be
written (a full disk, a read-only folder: exit code 74, ``EX_IOERR`` of sysexits.h)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class ScoreError(ValueError):
    """Unusable arguments or state (no inputs, bad output path, mismatched resume); the message says what to do."""

    code = 2  # the CLI's exit code


class ScoreWriteError(ScoreError):
    """The output could not be written; the output file is absent (or the old one), never half-written."""

    code = 74


def write_error(err: OSError, path: Path, partial: Path | None) -> ScoreWriteError:
    """A :class:`ScoreWriteError` naming the file, the system's reason and what to do.

    Args:
        err: what the write raised (``ENOSPC``, ``EROFS``, ``EACCES``, ``EDQUOT``, ...).
        path: the file that could not be written.
        partial: ``OUT.partial`` when it keeps the rows finished so far (rerun with ``--resume``); None when
            nothing was written.
    """
    code = errno.errorcode.get(err.errno or 0, "")
    reason = f"{os.strerror(err.errno)} ({code})" if err.errno else str(err)
    if partial is None:
        todo = "nothing was written; make room or pick a writable folder, then run the same command again"
    else:
        todo = (f"the rows finished so far are kept in {partial}; make room (or make the folder writable), then "
                "rerun the same command with --resume")
    return ScoreWriteError(f"cannot write {path}: {reason}; {todo}")
