"""Unknown options, caught before any heavy import, in one line with a suggestion: the same for every command.

The plain commands check their arguments against the parser built from their signatures (no torch needed).
`fit` and `validate` would need Lightning (seconds) to build theirs, so their option names are read from the
source of the classes they configure with `ast` instead, in milliseconds: the Trainer's, the LightningModule's
and the data module's `__init__` parameters. That early check can only refuse names that no parser would
accept; the real parser still checks everything (and refuses abbreviations, `allow_abbrev=False`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from ..errors import SettingsError

PACKAGE = Path(__file__).resolve().parent.parent
# Sections of `fit`/`validate` whose keys are checked here: the section name, and where its class is defined.
SECTION_SOURCES = {
    "trainer": ("lightning", "pytorch/trainer/trainer.py", "Trainer"),
    "model": (None, "module.py", "GPTLightningModule"),
    "data": (None, "data.py", "GPTDataModule"),
}
FINETUNE_DATA = (None, "chat_data.py", "ConversationDataModule")  # finetune's data section
# Options of LightningCLI's own (`--optimizer`, `--lr_scheduler` take any class's arguments: not checked here).
LIGHTNING_OPTIONS = {"--config", "-c", "--print_config", "--help", "-h", "--seed_everything", "--ckpt_path",
                     "--weights_only", "--optimizer", "--lr_scheduler", "--trainer", "--model", "--data"}
FREE_SECTIONS = ("--optimizer.", "--lr_scheduler.")
# The options cli/fit.py adds to LightningCLI's (kept here too, so typos are caught before Lightning loads;
# tests/test_cli.py checks that the two lists agree).
FIT_OPTIONS = ("--ckpt_dir", "--additional_steps", "--sample_prompt", "--sample_tokens", "--overwrite",
               "--allow_data_change", "--budget")
VALIDATE_OPTIONS = (*FIT_OPTIONS, "--verbose")


def option_name(arg: str) -> str | None:
    """`--trainer.max_steps` for `--trainer.max_steps=5` or `--trainer.callbacks+=...`; None for values."""
    if not arg.startswith("-") or arg in ("-", "--") or _is_number(arg) or arg[1:2].isdigit():
        return None
    return arg.split("=", 1)[0].rstrip("+")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def unknown_option_error(command: str, name: str, known: Iterable[str]) -> SettingsError:
    close = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return SettingsError(f"unknown option {name}{hint} (see `picogpt {command} --help`)")


def check_options(command: str, args: list[str], known: Iterable[str]) -> None:
    """Refuse the first option in `args` that is not one of `known`, suggesting the closest known one."""
    known = set(known)
    if "-h" in args or "--help" in args:
        return
    for arg in args:
        name = option_name(arg)
        if name is not None and name not in known:
            raise unknown_option_error(command, name, known)


def section_source(command: str, section: str) -> tuple:
    return FINETUNE_DATA if (command, section) == ("finetune", "data") else SECTION_SOURCES[section]


@cache
def init_parameters(source: tuple) -> frozenset[str] | None:
    """The `__init__` parameters of a section's class (`source`: its package, file and class name), read from
    its source; None if that cannot be done (then the real parser alone checks the section)."""
    package, relative, class_name = source
    if package is None:
        path = PACKAGE / relative
    else:
        spec = importlib.util.find_spec(package)  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / relative
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    if item.args.kwarg is not None:  # takes **kwargs: anything may be valid
                        return None
                    names = [a.arg for a in (*item.args.posonlyargs, *item.args.args, *item.args.kwonlyargs)]
                    return frozenset(names[1:] if names and names[0] == "self" else names)
    return None


def lightning_options(command: str) -> tuple[set[str], set[str]]:
    """(every option name `fit`/`finetune`/`validate` knows, as far as can be read without importing
    Lightning, the sections whose keys could not be read and so are not checked)."""
    known = set(LIGHTNING_OPTIONS) | set(VALIDATE_OPTIONS if command == "validate" else FIT_OPTIONS)
    unchecked = set()
    for section in SECTION_SOURCES:
        names = init_parameters(section_source(command, section))
        if names is None:
            unchecked.add(section)
        else:
            known |= {f"--{section}.{name}" for name in names}
    return known, unchecked


def check_lightning_options(command: str, args: list[str]) -> None:
    """The early check of `fit`/`validate` options: `--trainer.max_step` and `--trainr.max_steps` are refused
    here; nested keys (`--trainer.logger.init_args.save_dir`) are checked up to their first part."""
    if "-h" in args or "--help" in args:
        return
    known, unchecked = lightning_options(command)
    for arg in args:
        name = option_name(arg)
        if name is None or name in known or name.startswith(FREE_SECTIONS):
            continue
        section, _, rest = name[2:].partition(".")
        if section in unchecked:
            continue
        if rest and section in SECTION_SOURCES and f"--{section}.{rest.split('.')[0]}" in known:
            continue  # a nested key of a known option, e.g. --trainer.logger.init_args.save_dir
        raise unknown_option_error(command, name, known)
