"""The mistakes of a first hour with `fit`, `finetune` and `validate`, refused before Lightning is imported.

Building LightningCLI's parser takes seconds (importing Lightning), so the commonest mistakes are found here
first, from the command line and the YAML files it names, in a fraction of a second: a config file given
without `--config`, a `--data.text_path` that is not there, `validate` without a checkpoint, a new run into a
folder that holds one. This check only refuses what the real one would refuse later (with the same message);
anything it cannot read it leaves to the real parser. It also reads `--ckpt`, the name every other command uses
for a checkpoint, as LightningCLI's `--ckpt_path`.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

from ..errors import PicoGPTError, SettingsError
from .flags import option_name
from .run_folder import default_ckpt_dir, holds_run, is_rank_zero

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
TRUE_WORDS = ("true", "yes", "on", "1")
LIGHTNING_COMMANDS = ("fit", "finetune", "validate")
THREAD_COMMANDS = ("fit", "finetune", "validate", "sample", "chat", "evaluate")  # take --threads N (serve: its own)
CKPT_COMMANDS = ("sample", "chat", "serve", "evaluate", "export", "info")  # the plain commands taking --ckpt


def use_ckpt_alias(command: str, args: list[str], lightning: bool) -> list[str]:
    """`--ckpt` is the documented name of a checkpoint everywhere: LightningCLI's commands get it as their
    `--ckpt_path`, and the other commands take `--ckpt_path` as their `--ckpt`."""
    old, new = ("--ckpt", "--ckpt_path") if lightning else ("--ckpt_path", "--ckpt")
    if not lightning and command not in CKPT_COMMANDS:
        return list(args)
    renamed = []
    for arg in args:
        name, equals, value = arg.partition("=")
        renamed.append(new + equals + value if name == old else arg)
    return renamed


def command_line(command: str, args: list[str]) -> list[str]:
    """`args` as the command's parser takes them: `--ckpt` under its other name where needed (above), and
    `validate` without Lightning's results table (its one-line result says the same) unless --verbose is given."""
    args = use_ckpt_alias(command, args, lightning=command in LIGHTNING_COMMANDS)
    if command == "validate" and not any(option_name(arg) == "--verbose" for arg in args):
        args.append("--verbose=false")
    return args


def take_threads(args: list[str]) -> tuple[list[str], int | None]:
    """`--threads N` taken out of a Lightning command's arguments (its parser does not know it): (the other
    arguments, N or None)."""
    rest, threads, index = [], None, 0
    while index < len(args):
        name, equals, value = args[index].partition("=")
        if name != "--threads":
            rest.append(args[index])
        elif equals or index + 1 < len(args):
            if not equals:
                index += 1
                value = args[index]
            threads = read_threads(value)
        else:
            raise SettingsError("--threads needs a number of threads, e.g. --threads 2 (or auto)")
        index += 1
    return rest, threads


def read_threads(value: str | int | None) -> int | None:
    if value is None or str(value).strip().lower() in ("auto", "null", "none"):
        return None
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise SettingsError(f"--threads must be a whole number >= 1 (or auto), got {value!r}")
    return int(text)


def start_threads(command: str, requested: int | None, say: bool) -> None:
    """Set torch's thread count for this command (threads.py) and, if `say`, tell which in the start-up line,
    before the seconds of importing Lightning or loading a model: on stdout for fit, finetune and validate (their
    report), on stderr for the others (their stdout is the model's text)."""
    from ..threads import apply_threads

    choice = apply_threads(requested)
    if say:
        lightning = command in LIGHTNING_COMMANDS
        print(f"picogpt {command}: {choice.describe()}{'; loading Lightning' if lightning else ''}",
              file=sys.stdout if lightning else sys.stderr, flush=True)


def check_early(command: str, args: list[str]) -> None:
    """Refuse the first-hour mistakes of `picogpt fit|finetune|validate ARGS` (see the module's docstring)."""
    if "-h" in args or "--help" in args or any(arg.startswith("--print_config") for arg in args):
        return
    given = command_line_values(command, args)
    settings = merged_settings(given)
    ckpt_path = settings.get("ckpt_path")
    if command == "validate" and not ckpt_path:
        raise SettingsError("validate needs --ckpt_path (or --ckpt): a checkpoint file, a run folder, or last/best "
                            "of --ckpt_dir (without one it would report the loss of random weights)")
    data = settings.get("data") if isinstance(settings.get("data"), dict) else {}
    text_path = data.get("text_path")
    explicit = "data.text_path" in given
    if (command == "fit" and isinstance(text_path, str) and not data.get("prepared_dir") and (explicit or not ckpt_path)
            and not any(char in text_path for char in "*?[") and not Path(text_path).exists()):
        from ..corpus import find_text_files

        find_text_files(text_path)  # raises the data module's own message, seconds sooner
    if command != "validate" and not ckpt_path and is_rank_zero():
        check_run_folder(settings, given)


def command_line_values(command: str, args: list[str]) -> dict[str, object]:
    """{"config": [files], "data.text_path": value, ...} from `args`; a config file with no option before it
    is refused (it was meant for --config)."""
    values: dict[str, object] = {"config": []}
    index = 0
    while index < len(args):
        arg = args[index]
        if option_name(arg) is None:
            check_stray(command, arg)
            index += 1
            continue  # anything else the real parser judges
        name, equals, value = arg.partition("=")
        if not equals:
            following = args[index + 1] if index + 1 < len(args) else None
            if following is None or option_name(following) is not None:
                index += 1
                continue  # no value here: the real parser says what is missing
            value, index = following, index + 1
        index += 1
        key = name.lstrip("-").rstrip("+")
        if key in ("config", "c"):
            values["config"].append(value)
        elif not name.endswith("+"):
            values[key] = value
    return values


def check_stray(command: str, arg: str) -> None:
    """A value with no option before it: a config file given without --config is named as such."""
    if arg.endswith(CONFIG_SUFFIXES):
        raise SettingsError(f"unknown option {arg}; did you mean --config {arg}? (see `picogpt {command} --help`)")


def merged_settings(given: dict[str, object]) -> dict:
    """The config files in order, then the command line's dotted options on top, as nested dicts."""
    import yaml

    settings: dict = {}
    for file in given["config"]:
        path = Path(str(file))
        if not path.is_file():
            raise PicoGPTError(f"config file {path} does not exist" if not path.exists()
                               else f"config file {path} is not a file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # the real parser reports it
        if isinstance(loaded, dict):
            _merge(settings, loaded)
    for key, value in given.items():
        if key != "config":
            _merge(settings, _nested(key.split("."), _scalar(value)))
    return settings


def _scalar(text: object) -> object:
    import yaml

    try:
        return yaml.safe_load(str(text))
    except yaml.YAMLError:
        return text


def _nested(keys: list[str], value: object) -> dict:
    return {keys[0]: value if len(keys) == 1 else _nested(keys[1:], value)}


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def check_run_folder(settings: dict, given: dict[str, object]) -> None:
    """A new run into a folder that holds one, refused as cli/fit.py would (it checks again, and locks)."""
    trainer = settings.get("trainer") if isinstance(settings.get("trainer"), dict) else {}
    if trainer.get("fast_dev_run") or str(settings.get("overwrite")).lower() in TRUE_WORDS:
        return
    folder = Path(str(settings["ckpt_dir"])) if settings.get("ckpt_dir") else default_ckpt_dir(given["config"])
    existing = holds_run(folder)
    if existing:
        step = checkpoint_step(folder / existing)
        raise PicoGPTError(
            f"{folder} already holds a run ({existing} at step {step}): continue it with --ckpt "
            f"{folder / 'last.ckpt'}, start over with --overwrite true (deletes its checkpoints and logs), "
            f"or choose another --ckpt_dir"
        )


class _Facts(pickle.Unpickler):
    """Reads the plain values of a checkpoint's pickle without torch: an ordered dict is a dict, every other
    class or function it names becomes an inert stand-in (so nothing in the file runs), tensors become None."""

    def find_class(self, module: str, name: str):
        return _Dict if (module, name) == ("collections", "OrderedDict") else _StandIn

    def persistent_load(self, pid):
        return None


class _Dict(dict):
    """An ordered dict (a dict with attributes, which a state dict's pickle sets)."""


class _StandIn:
    """Whatever the pickle builds from a class or function: it takes any arguments and keeps nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


def checkpoint_step(path: Path) -> object:
    """The global_step of a checkpoint written by torch.save, read without importing torch; "?" if unknown."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            with archive.open(name) as pickled:
                facts = _Facts(pickled).load()
        return facts.get("global_step", "?") if isinstance(facts, dict) else "?"
    except (OSError, StopIteration, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, TypeError, ValueError,
            AttributeError, IndexError, KeyError):
        return "?"

