"""`picogpt sample`: continue a prompt with a checkpoint and print it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import PicoGPTError, SettingsError
from ..files import is_special, not_found
from ..settings import SamplingSettings, check_seed
from .common import run_function

MODES = {"char": ("char",), "token": ("bpe", "word"), "bpe": ("bpe",), "word": ("word",)}


def sample_command(
    ckpt: str,
    prompt: str = "\\n",
    max_new_tokens: int = 200,
    seed: int | None = 1337,
    num_samples: int = 1,
    stop: list[str] | str | None = None,
    device: str = "auto",
    stream: bool | None = None,
    mode: str | None = None,
    vocab_path: str | None = None,
    tokenizer_path: str | None = None,
    **sampling,
) -> None:
    """Generate text from a checkpoint: prints the prompt and its continuation.

    The tokenizer and the mode (char or token) come from the checkpoint itself.

    Args:
        ckpt: Checkpoint written by `picogpt fit` (e.g. checkpoints/small/best.ckpt), or a run folder (its
            best.ckpt) or a `picogpt export --format safetensors` folder.
        prompt: Text to continue; \\n and \\t are read as a newline and a tab. Characters a char model never
            saw are mapped to a close one or dropped, with a warning. A prompt longer than the context keeps
            its end.
        max_new_tokens: Number of tokens to generate per sample (the window slides past the context).
        seed: Random seed; the same seed gives the same text on the same device. null for a random one.
        num_samples: Number of samples to generate, one after the other.
        stop: A stop string, or a list of them (--stop "\\nQ:" or --stop '[".", "\\n\\n"]'); a sample ends
            before the first one it produces, which is not printed.
        device: cpu, cuda, cuda:N, mps, or auto (cuda, then mps, then cpu).
        stream: Print tokens as they are generated; default: on when writing to a terminal.
        mode: Accepted for compatibility: char or token, checked against the checkpoint.
        vocab_path: Accepted for compatibility: a char vocab.json, which must match the checkpoint's.
        tokenizer_path: Accepted for compatibility: a tokenizer.json, which must match the checkpoint's.
    """
    from ..checkpoint import load_checkpoint
    from ..generate import make_generator, resolve_device, stream_text
    from ..prompt import crop_note, encode_prompt, read_escapes, read_stop_strings

    if max_new_tokens < 0:
        raise SettingsError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise SettingsError(f"num_samples must be >= 1, got {num_samples}")
    check_seed(seed)
    settings = SamplingSettings(**sampling)
    target = resolve_device(device)
    loaded = load_checkpoint(ckpt, target)
    check_tokenizer_options(loaded.tokenizer, mode, vocab_path, tokenizer_path)
    tokenizer, model = loaded.tokenizer, loaded.model
    prompt_text, prompt_ids = encode_prompt(read_escapes(prompt), tokenizer)
    if len(prompt_ids) > model.config.block_size:
        print(crop_note(len(prompt_ids), model.config.block_size), file=sys.stderr)
    stop_strings = read_stop_strings(stop)
    streaming = sys.stdout.isatty() if stream is None else stream
    generator = make_generator(seed, target)
    for index in range(num_samples):
        if index:
            print("-" * 40)
        pieces = stream_text(model, tokenizer, prompt_ids, max_new_tokens, settings, generator, stop_strings)
        if streaming:
            sys.stdout.write(prompt_text)
            sys.stdout.flush()
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            print(prompt_text + "".join(pieces))
        sys.stdout.flush()


def check_tokenizer_options(
    tokenizer, mode: str | None = None, vocab_path: str | None = None, tokenizer_path: str | None = None
) -> None:
    """The original's --mode, --vocab_path and --tokenizer_path are optional; given, they must agree with the
    tokenizer stored in the checkpoint."""
    if mode is not None:
        if mode not in MODES:
            raise SettingsError(f"unknown --mode {mode!r}; use char or token (or leave it out)")
        if tokenizer.kind not in MODES[mode]:
            actual = "char" if tokenizer.kind == "char" else f"token ({tokenizer.kind})"
            raise PicoGPTError(
                f"--mode {mode} does not match the checkpoint, which was trained in {actual} mode; "
                "leave --mode out, the checkpoint says which"
            )
    for flag, path in (("--vocab_path", vocab_path), ("--tokenizer_path", tokenizer_path)):
        if path is not None:
            _check_same_tokenizer(tokenizer, flag, path)


def _check_same_tokenizer(tokenizer, flag: str, path: str) -> None:
    from ..tokenizer_files import load_tokenizer

    if not Path(path).exists() or is_special(path):
        raise PicoGPTError(f"{flag} {path} {not_found(path)}; leave it out, the checkpoint carries its tokenizer")
    given = load_tokenizer(path)
    if given.kind != tokenizer.kind:
        raise PicoGPTError(
            f"{flag} {path} is a {given.kind} tokenizer but the checkpoint was trained with a {tokenizer.kind} "
            "tokenizer; leave it out, the checkpoint carries its own"
        )
    if given.vocab_size != tokenizer.vocab_size or json.loads(given.to_json()) != json.loads(tokenizer.to_json()):
        raise PicoGPTError(
            f"{flag} {path} differs from the tokenizer stored in the checkpoint (vocab size {given.vocab_size} vs "
            f"{tokenizer.vocab_size} or different entries); leave it out, the checkpoint carries its own"
        )


def main(args: list[str]) -> None:
    run_function("sample", sample_command, args, settings=(SamplingSettings,))
