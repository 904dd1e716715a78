"""The `--config` files of every command, looked at before any parser reads them: a named pipe would block the
parser forever and /dev/zero would be read without end, so such a path is refused in one line saying what it is."""

from __future__ import annotations

from ..errors import SettingsError
from ..files import is_special, what_path_is


def config_paths(args: list[str]) -> list[str]:
    """The values given to `--config` (as `--config X` or `--config=X`)."""
    values = []
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            values.append(args[index + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    return values


def check_config_paths(args: list[str]) -> None:
    """Refuse a `--config` that names something other than a file or missing path (a YAML text given inline, as
    a resume does, is no path and passes)."""
    for value in config_paths(args):
        if "\n" not in value and is_special(value):
            raise SettingsError(f"--config {value} is {what_path_is(value)}, not a YAML file: pass a config file "
                                f"such as configs/tiny.yaml")
