"""The ``snodevit`` command line.

Each subcommand is a module with ``add_parser(subparsers)`` (which sets ``func``): the built-in ones live in this
package, and other packages plug theirs in through the ``snodevit.commands`` entry-point group (``export``
registers ``snodevit export`` that way, so this package never imports ONNX). Commands print for people; with
``--json`` they print one JSON object on stdout.

Exit codes: 0 success; 1 the run finished but some items failed (``score``); 2 unusable arguments or input
(a message on stderr names the problem); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points
from types import ModuleType

from snodevit.checkpoint import CheckpointError
from snodevit.cli import calibrate, evaluate, info, score, tail, train
from snodevit.cli.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, CLIError

BUILT_IN: tuple[ModuleType, ...] = (info, train, tail, evaluate, calibrate, score)
ENTRY_POINT_GROUP = "snodevit.commands"

__all__ = ["CLIError", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "build_parser", "main"]


def plugin_commands() -> list[ModuleType]:
    """The command modules other installed packages register (``[project.entry-points."snodevit.commands"]``)."""
    return [ep.load() for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snodevit", description="Uncertainty-aware image classification with a "
                                     "stochastic (SDE) Vision Transformer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (*BUILT_IN, *plugin_commands()):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    known: tuple[type[BaseException], ...] = (CLIError, CheckpointError, FileNotFoundError, ValueError)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except known as e:
        if args.verbose:
            raise
        print(f"snodevit {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "code", EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
