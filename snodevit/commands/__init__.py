"""Subcommands of the ``snodevit`` CLI, one module each (see ``snodevit.cli``)."""
