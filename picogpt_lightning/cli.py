"""`picogpt`: one command, several subcommands.

`fit` and `validate` go to a LightningCLI (configs, `--print_config`, trainer flags); the other commands
are plain functions turned into commands by jsonargparse. Nothing heavy is imported at module level, so
`picogpt sample --help` never pays for importing Lightning.
"""

from __future__ import annotations

import importlib
import sys

USAGE = """usage: picogpt {fit,validate,prepare,sample,chat,evaluate,export,info,plot} [options]

  fit        train a GPT (picogpt fit --config configs/tiny.yaml)
  validate   val loss and perplexity of a checkpoint (picogpt validate --config ... --ckpt_path best.ckpt)
  prepare    tokenize text into train.bin/val.bin (picogpt prepare --text_path data/philosophy.txt)
  sample     generate text from a checkpoint (picogpt sample --ckpt checkpoints/tiny/best.ckpt)
  chat       talk to a checkpoint in a REPL (picogpt chat --ckpt checkpoints/tiny/best.ckpt)
  evaluate   loss, perplexity and bits per byte of a checkpoint on any text
  export     write a Hugging Face (GPT-2) folder or a safetensors file from a checkpoint
  info       what a checkpoint holds: model, tokenizer, data, steps, config, versions
  plot       draw a run's loss and learning-rate curves into a PNG

Run `picogpt COMMAND --help` for the options of each command."""


# Commands that are plain functions: (module, function). Imported only when chosen, so each starts fast.
FUNCTION_COMMANDS = {
    "prepare": ("prepare", "prepare_cli"),
    "sample": ("generate", "sample_command"),
    "chat": ("chat", "chat_command"),
    "evaluate": ("evaluate", "evaluate_command"),
    "export": ("export", "export_command"),
    "info": ("info", "info_command"),
    "plot": ("plot", "plot_command"),
}


def _function_command(name: str):
    module, function = FUNCTION_COMMANDS[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)


def expand_bare_flags(function, args: list[str]) -> list[str]:
    """`--json` alone means `--json true`: jsonargparse wants a value after every bool option."""
    import types
    import typing

    flags = {
        f"--{name}"
        for name, hint in typing.get_type_hints(function).items()
        if bool in (set(typing.get_args(hint)) or {hint}) <= {bool, types.NoneType}
    }
    expanded = []
    for index, arg in enumerate(args):
        expanded.append(arg)
        following = args[index + 1] if index + 1 < len(args) else "--"
        if arg in flags and following.startswith("--"):
            expanded.append("true")
    return expanded


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    from .errors import PicoGPTError

    try:
        if command in ("fit", "validate"):
            from .train import run_lightning_cli

            return run_lightning_cli(command, rest)
        elif command in FUNCTION_COMMANDS:
            from jsonargparse import auto_cli

            function = _function_command(command)
            auto_cli(function, args=expand_bare_flags(function, rest), prog=f"picogpt {command}",
                     as_positional=False)
        else:
            choices = ", ".join(["fit", "validate", *FUNCTION_COMMANDS])
            print(f"picogpt: unknown command {command!r}; choose one of {choices}", file=sys.stderr)
            return 2
    except PicoGPTError as error:
        print(f"picogpt {command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (e.g. `picogpt sample ... | head`): nothing is wrong, and nothing more to print.
        sys.stderr.close()
        return 0
    except OSError as error:
        # Disk full, permissions, a vanished folder: files are written to temporary names and renamed, so what
        # was saved before is intact.
        where = f" ({error.filename})" if error.filename else ""
        print(f"picogpt {command}: error: could not write or read a file{where}: {error.strerror or error}; "
              f"free some space or choose another output folder; earlier checkpoints are intact", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\npicogpt {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
