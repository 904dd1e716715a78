"""The exception types for mistakes a user can fix, and the one way to warn: each is a single line."""

from __future__ import annotations

import sys


class PicoGPTError(Exception):
    """A problem with the user's input (file, flag, config or checkpoint); the message says how to fix it.
    The command line prints it in one line and exits with status 1."""


class SettingsError(PicoGPTError):
    """A setting that cannot work (an unknown flag, a value out of range), found before any work is done.
    The command line prints it in one line and exits with status 2, as argparse does for usage errors."""


def warn(message: str) -> None:
    """One line on stderr about something that goes on, but that the user should know."""
    print(f"warning: {message}", file=sys.stderr)
