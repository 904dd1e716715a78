"""`picogpt`: one command, several subcommands, each in its own module of this package.

`fit`, `finetune` and `validate` go to a LightningCLI (cli/fit.py, cli/finetune.py: configs, `--print_config`,
trainer flags); the others are plain functions whose parsers come from their signatures (cli/common.py). Only
the chosen command's module is imported, and each imports torch (let alone Lightning) only when it runs, so
`picogpt sample --help` answers in a fraction of a second.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

from ..errors import PicoGPTError, SettingsError

USAGE = """usage: picogpt {fit,finetune,validate,prepare,sample,chat,serve,evaluate,export,import,info,plot} [options]

  fit        train a GPT (picogpt fit --config configs/tiny.yaml)
  finetune   fine-tune a checkpoint on conversations, loss on the answers (picogpt finetune --config configs/chat.yaml)
  validate   val loss and perplexity of a checkpoint (picogpt validate --ckpt checkpoints/tiny/best.ckpt)
  prepare    tokenize text into train.bin/val.bin (picogpt prepare --text_path data/philosophy.txt)
  sample     generate text from a checkpoint (picogpt sample --ckpt checkpoints/tiny/best.ckpt)
  chat       talk to a checkpoint in a REPL (picogpt chat --ckpt checkpoints/tiny/best.ckpt)
  serve      an OpenAI-compatible chat server (picogpt serve --ckpt checkpoints/tiny/best.ckpt --port 8000)
  evaluate   loss, perplexity and bits per byte of a checkpoint on any text
  export     write a Hugging Face folder (GPT-2, Llama or Qwen3 layout) or safetensors from a checkpoint
  import     a Hugging Face GPT-2, Llama or Qwen3 folder as a checkpoint (picogpt import HF_DIR --out m.ckpt)
  info       what a checkpoint holds: model, tokenizer, data, steps, config, versions
  plot       draw a run's loss and learning-rate curves into a PNG

Run `picogpt COMMAND --help` for the options of each command. `--ckpt` names a checkpoint in every command;
the commands that compute take `--threads N` (default: the cores free of load; docs/first-hour.md)."""

LIGHTNING_COMMANDS = ("fit", "finetune", "validate")
# Plain commands: each is the module of this package with the same name, whose `main(args)` runs it.
FUNCTION_COMMANDS = ("prepare", "sample", "chat", "serve", "evaluate", "export", "import", "info", "plot")
MODULES = {"import": "import_"}  # a command whose module name differs (import is a Python keyword)


def run(command: str, args: list[str]) -> int:
    from .early import check_early, command_line, start_threads, take_threads
    from .paths import check_config_paths

    check_config_paths(args)  # a FIFO or /dev/zero as --config would hang the parser
    args = command_line(command, args)
    if command in LIGHTNING_COMMANDS:
        from .flags import check_lightning_options
        from .run_folder import is_rank_zero

        args, threads = take_threads(args)
        # Typos and first-hour mistakes are refused here, in milliseconds, before Lightning is imported.
        check_lightning_options(command, args)
        check_early(command, args)
        if not any(arg in ("-h", "--help") or arg.startswith("--print_config") for arg in args):
            start_threads(command, threads, say=is_rank_zero())
        try:
            if command == "finetune":
                from .finetune import run_finetune

                return run_finetune(args)
            from .fit import run_lightning_cli

            return run_lightning_cli(command, args)
        except RuntimeError as error:  # another rank of a distributed run died: one line, not gloo's traceback
            from .lost_rank import lost_rank_error

            raise (lost_rank_error(error, command, args) or error) from None
    importlib.import_module(f"{__package__}.{MODULES.get(command, command)}").main(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    return leave_distributed(run_command(argv))


def leave_distributed(code: int) -> int:
    """A rank of a run over several processes ends here, at once: at interpreter exit, torch 2.13's gloo process
    group sometimes aborted the finished rank ("terminate called without an active exception", SIGABRT, about
    one exit in five on two CPU ranks), which made torchrun report a failure and the other node's agent wait 300 s
    for it. Everything the run writes is written and closed before this point."""
    distributed = sys.modules.get("torch.distributed")
    if (distributed is not None and distributed.is_available() and distributed.is_initialized()
            and distributed.get_world_size() > 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_command(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in (*LIGHTNING_COMMANDS, *FUNCTION_COMMANDS):
        choices = ", ".join((*LIGHTNING_COMMANDS, *FUNCTION_COMMANDS))
        print(f"picogpt: unknown command {command!r}; choose one of {choices}", file=sys.stderr)
        return 2
    try:
        return run(command, rest)
    except SettingsError as error:
        print(f"picogpt {command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except PicoGPTError as error:
        print(f"picogpt {command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (e.g. `picogpt sample ... | head`): nothing is wrong, and nothing more to print.
        sys.stderr.close()
        return 0
    except OSError as error:
        print(f"picogpt {command}: error: {os_error_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\npicogpt {command}: interrupted", file=sys.stderr)
        return 130


def os_error_line(error: OSError) -> str:
    """An operating-system error the command did not expect, in one line: which file and why when it names one
    (disk full, permissions, a vanished folder), else what failed, never guessed to be a file problem."""
    reason = error.strerror or str(error) or type(error).__name__
    if not error.filename:
        return reason if reason == type(error).__name__ else f"{reason} ({type(error).__name__})"
    files = f"{error.filename} -> {error.filename2}" if error.filename2 else str(error.filename)
    hint = {errno.ENOSPC: "free some space or choose another output folder",
            errno.EDQUOT: "free some space or choose another output folder",
            errno.EACCES: "check its permissions or choose another folder",
            errno.EPERM: "check its permissions or choose another folder",
            errno.EROFS: "choose a folder on a writable disk"}.get(error.errno, "check that path")
    # Files are written to temporary names and renamed, so what was saved before is intact.
    return f"could not use {files}: {reason}; {hint} (files saved earlier are intact)"
