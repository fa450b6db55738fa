"""The ``snodevit`` command line.

Each subcommand lives in its own module under ``snodevit/commands`` and defines ``add_parser(subparsers)``
(which sets ``func``). Commands print for people; with ``--json`` they print one JSON object on stdout.

Exit codes: 0 success; 1 the run finished but some items failed (``score``); 2 unusable arguments or input
(a message on stderr names the problem); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("info", "train", "evaluate", "calibrate", "export", "score", "benchmark")

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2


class CLIError(Exception):
    """An error the user can act on; printed without a traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snodevit", description="Uncertainty-aware image classification with a "
                                     "stochastic (SDE) Vision Transformer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"snodevit.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"snodevit.commands.{name}":
                continue  # command not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .checkpoint import CheckpointError

    known: tuple[type[BaseException], ...] = (CLIError, CheckpointError, FileNotFoundError, ValueError)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except known as e:
        if args.verbose:
            raise
        print(f"snodevit {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "code", EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
