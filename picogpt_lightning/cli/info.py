"""`picogpt info`: what a checkpoint holds."""

from __future__ import annotations

import json as json_module

from .common import run_function


def info_command(ckpt: str, json: bool = False) -> None:
    """Show what a checkpoint is: model shape and size, tokenizer, training data, steps, best val loss,
    the resolved config and library versions.

    Args:
        ckpt: Checkpoint written by `picogpt fit` (or by checkpoint.save_checkpoint), a run folder (its
            best.ckpt, else last.ckpt) or a folder of `picogpt export --format safetensors`.
        json: Print one JSON object instead of the table; facts the checkpoint lacks are null.
    """
    from ..info import describe_checkpoint, format_description

    facts = describe_checkpoint(ckpt)
    print(json_module.dumps(facts, indent=2) if json else format_description(facts))


def main(args: list[str]) -> None:
    run_function("info", info_command, args)
