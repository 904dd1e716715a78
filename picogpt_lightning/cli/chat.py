"""`picogpt chat`: a REPL over a ChatSession (chat.py), or one message per line from a pipe."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from ..errors import SettingsError
from ..settings import SamplingSettings
from .common import run_function


def chat_command(
    ckpt: str,
    system_prompt: str = "",
    chat_template: str | dict | None = None,
    max_new_tokens: int = 256,
    seed: int | None = 1337,
    stop: list[str] | str | None = None,
    device: str = "auto",
    **sampling,
) -> None:
    """Chat with a checkpoint: type a message, the model answers token by token.

    Commands: /reset, /system TEXT, /temp X, /exit (or Ctrl-D); Ctrl-C stops the current answer. With input
    piped from a file, each line is one message and only the answers are printed.

    Args:
        ckpt: Checkpoint written by `picogpt fit` (e.g. checkpoints/small/best.ckpt).
        system_prompt: Text placed before the conversation (e.g. "You are picoGPT, a helpful assistant.");
            it is kept when old turns are dropped to fit the context.
        chat_template: How turns become text: qa ("Q: ..." / "A: ..."), im (ChatML-like), or a dict of system,
            user and assistant formats, each holding {content} once. Default: the checkpoint's own (the one it
            was fine-tuned with), qa for a checkpoint that has none.
        max_new_tokens: Longest answer, in tokens.
        seed: Random seed, for reproducible conversations; null for a random one.
        stop: One more stop string, or a list of them, that end an answer (e.g. --stop "\\n\\n").
        device: cpu, cuda, cuda:N, mps, or auto (cuda, then mps, then cpu).
    """
    from ..chat import ChatSession
    from ..checkpoint import load_checkpoint
    from ..chat_template import get_template, template_from_meta
    from ..generate import make_generator, resolve_device
    from ..prompt import read_escapes, read_stop_strings

    if max_new_tokens < 1:
        raise SettingsError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    settings = SamplingSettings(**sampling)
    target = resolve_device(device)
    template = get_template(chat_template) if chat_template is not None else None  # checked before loading
    loaded = load_checkpoint(ckpt, target)
    session = ChatSession(
        loaded.model,
        loaded.tokenizer,
        template=template or template_from_meta(loaded.meta),
        system_prompt=read_escapes(system_prompt),
        settings=settings,
        max_new_tokens=max_new_tokens,
        stop=read_stop_strings(stop),
        generator=make_generator(seed, target),
    )
    if hasattr(sys.stdin, "reconfigure"):
        # A byte that is not UTF-8 must not end the session: it reaches the session as a lone surrogate, which
        # encode_prompt replaces (saying so), whatever the locale's choice of error handler.
        sys.stdin.reconfigure(errors="surrogateescape")
    run_repl(session, None if sys.stdin.isatty() else sys.stdin)


def run_repl(session, lines: Iterable[str] | None = None) -> None:
    """Feed `lines` (e.g. a piped file, one message per line) to the session, or read a terminal when None."""
    from ..chat import COMMANDS_HELP

    if lines is not None:
        for line in lines:
            if not session.handle(line.rstrip("\r\n")):
                return
        return
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    session.note(COMMANDS_HELP)
    # A pretrained model's Jinja template has no affixes: its turns get the plain "> " prompt.
    affixes = getattr(session.template, "affixes", {"user": ("",), "assistant": ("",)})
    user_prefix, assistant_prefix = (affixes[role][0] for role in ("user", "assistant"))
    # A one-line prefix ("Q: ") reads well as the input prompt; a marker spread over lines would not.
    user_prompt = user_prefix if user_prefix.strip() and "\n" not in user_prefix else "> "
    # Written by the session before each answer, after any note about its prompt (on stderr, on its own line).
    session.answer_prompt = assistant_prefix if "\n" not in assistant_prefix else ""
    while True:
        try:
            line = input(user_prompt)
        except EOFError:
            session.output.write("\n")
            return
        except KeyboardInterrupt:
            session.note("\n(Ctrl-C stops an answer; to quit use /exit or Ctrl-D)")
            continue
        if not session.handle(line):
            return


def main(args: list[str]) -> None:
    run_function("chat", chat_command, args, settings=(SamplingSettings,))
