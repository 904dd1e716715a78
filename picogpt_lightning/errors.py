"""The one exception type for mistakes a user can fix: the CLI prints its message as a single line."""


class PicoGPTError(Exception):
    """A problem with the user's input (file, flag, config or checkpoint); the message says how to fix it."""
