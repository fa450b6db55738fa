"""The ``snodevit`` command line: thin commands over the library (``main`` is the console script)."""

from snodevit.cli.main import main

__all__ = ["main"]
