"""Exit codes and the error a command raises for the user to act on (printed without a traceback)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_PARTIAL = 1  # the run finished but some items failed (``score``)
EXIT_USAGE = 2  # unusable arguments or input
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """An error the user can act on; printed without a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code
