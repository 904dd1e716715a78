"""`picogpt`: one command, several subcommands.

`fit` and `validate` go to a LightningCLI (configs, `--print_config`, trainer flags); `prepare`, `sample` and
`chat` are plain functions turned into commands by jsonargparse. Nothing heavy is imported at module level, so
`picogpt sample --help` never pays for importing Lightning.
"""

from __future__ import annotations

import sys

USAGE = """usage: picogpt {fit,validate,prepare,sample,chat} [options]

  fit        train a GPT (picogpt fit --config configs/tiny.yaml)
  validate   val loss and perplexity of a checkpoint (picogpt validate --config ... --ckpt_path best.ckpt)
  prepare    tokenize text into train.bin/val.bin (picogpt prepare --text_path data/philosophy.txt)
  sample     generate text from a checkpoint (picogpt sample --ckpt checkpoints/tiny/best.ckpt)
  chat       talk to a checkpoint in a REPL (picogpt chat --ckpt checkpoints/tiny/best.ckpt)

Run `picogpt COMMAND --help` for the options of each command."""


def _function_command(name: str):
    if name == "prepare":
        from .prepare import prepare_cli

        return prepare_cli
    if name == "sample":
        from .generate import sample_command

        return sample_command
    from .chat import chat_command

    return chat_command


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
        elif command in ("prepare", "sample", "chat"):
            from jsonargparse import auto_cli

            auto_cli(_function_command(command), args=rest, prog=f"picogpt {command}", as_positional=False)
        else:
            print(f"picogpt: unknown command {command!r}; choose one of fit, validate, prepare, sample, chat",
                  file=sys.stderr)
            return 2
    except PicoGPTError as error:
        print(f"picogpt {command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
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
