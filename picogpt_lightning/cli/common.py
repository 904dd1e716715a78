"""What every plain command shares: a parser built from the command function's signature (and from the
settings dataclasses it takes as keyword arguments), and the one-line form of its errors.

The command functions themselves import torch and the model inside their bodies, so `--help` only pays for
jsonargparse and these signatures.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from dataclasses import fields

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from ..errors import SettingsError
from .early import THREAD_COMMANDS, read_threads, start_threads
from .flags import check_options, unknown_option_error


def bool_flags(parameters: dict[str, object]) -> set[str]:
    """The `--name` flags whose type is bool (or bool | None)."""
    return {
        f"--{name}"
        for name, hint in parameters.items()
        if bool in (set(typing.get_args(hint)) or {hint}) <= {bool, types.NoneType}
    }


def expand_bare_flags(flags: set[str], args: list[str]) -> list[str]:
    """`--json` alone means `--json true`: jsonargparse wants a value after every bool option."""
    expanded = []
    for index, arg in enumerate(args):
        expanded.append(arg)
        following = args[index + 1] if index + 1 < len(args) else "--"
        if arg in flags and following.startswith("--"):
            expanded.append("true")
    return expanded


def _description(function) -> str:
    """The docstring above its Args section."""
    return (inspect.getdoc(function) or "").split("\nArgs:", 1)[0].strip()


def run_function(name: str, function, args: list[str], settings: tuple[type, ...] = ()) -> None:
    """Parse `args` for `picogpt NAME` and call `function` with them.

    The options are the function's parameters, plus the fields of each dataclass in `settings`, which the
    function receives as keyword arguments (its `**` parameter): one definition of, say, the sampling options
    serves every command that samples.
    """
    parser = ArgumentParser(prog=f"picogpt {name}", description=_description(function), exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with the options below.")
    settings_fields = {field.name for dataclass in settings for field in fields(dataclass)}
    # skip: jsonargparse would also find the settings by following `**settings` into the function's body.
    parser.add_function_arguments(function, as_group=False, skip=settings_fields)
    hints = typing.get_type_hints(function)
    for dataclass in settings:
        parser.add_class_arguments(dataclass, nested_key=None, as_group=False)
        hints.update(typing.get_type_hints(dataclass))
    if name in THREAD_COMMANDS:
        parser.add_argument("--threads", type=int | str | None, default=None,
                            help="torch CPU threads (default: the cores this process may use less the load; "
                                 "see docs/first-hour.md)")
    known = set(parser._option_string_actions)
    check_options(name, args, known)
    try:
        values = parser.parse_args(expand_bare_flags(bool_flags(hints), args)).as_dict()
    except ArgumentError as error:
        raise settings_error(name, error, known) from None
    values.pop("config", None)
    if name in THREAD_COMMANDS:
        start_threads(name, read_threads(values.pop("threads")), say=sys.stderr.isatty())
    function(**values)


def class_refusal(message: str) -> str | None:
    """The reason in jsonargparse's report that it could not build a class of the settings, with the class."""
    if "class_path" not in message:
        return None
    lines = [line.strip() for line in message.splitlines()]
    reasons = lines[lines.index("Errors:") + 1:] if "Errors:" in lines else lines
    reason = next((line[2:] for line in reasons if line.startswith("- ")), lines[0])
    classes = sorted(set(re.findall(r"class_path='([^']+)'", message)))
    return f"{reason} ({', '.join(classes)})" if classes else reason


def settings_error(command: str, error: Exception, known: set[str]) -> SettingsError:
    """jsonargparse's complaint as one line; an unrecognized option gets the same suggestion as the early check."""
    message = " ".join(str(error).split())
    if message.startswith("unrecognized arguments:"):
        name = message.split(":", 1)[1].split()[0].split("=", 1)[0]
        return unknown_option_error(command, name, known)
    return SettingsError(f"{message} (see `picogpt {command} --help`)")
