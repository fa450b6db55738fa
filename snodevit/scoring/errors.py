"""The one error of batch scoring: arguments or state that make a run impossible (the CLI's exit code 2)."""

from __future__ import annotations


class ScoreError(ValueError):
    """Unusable arguments or state (no inputs, bad output path, mismatched resume); the message says what to do."""
