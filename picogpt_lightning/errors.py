"""The one exception type for mistakes a user can fix, and the one way to warn: both are a single line."""

from __future__ import annotations

import sys


class PicoGPTError(Exception):
    """A problem with the user's input (file, flag, config or checkpoint); the message says how to fix it."""


def warn(message: str) -> None:
    """One line on stderr about something that goes on, but that the user should know."""
    print(f"warning: {message}", file=sys.stderr)
