"""Conversations with a model: turns rendered by its chat template, history trimmed to the context, streamed
answers.

The template (chat_template.py) is the one the model was fine-tuned with, stored in its checkpoint, or `qa`, the
corpus' own form, for a model that has none:

    SYSTEM PROMPT

    Q: first message
    A: first answer<|endoftext|>

    Q: new message
    A:

The model continues the prompt until it writes end-of-text, the start of a next turn ("\\nQ:" or "\\nA:", which
a model never fine-tuned, or a tiny one, writes instead) or a stop string. The prompt is rebuilt from the
history at each turn; when it no longer fits the model's context the oldest turns are dropped, never the system
prompt. The REPL around a session is `picogpt chat` (cli/chat.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

import torch

from .chat_template import ChatTemplate, get_template, turn_stop_strings
from .conversation import encode_conversation
from .errors import PicoGPTError
from .generate import stream_text
from .prompt import encode_prompt, read_escapes
from .settings import SamplingSettings

COMMANDS_HELP = "commands: /reset (forget the conversation), /system TEXT, /temp X, /exit (or Ctrl-D)"


class ChatSession:
    """A conversation with one model: history, prompt building within the context, streamed answers."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        template: ChatTemplate | None = None,
        system_prompt: str = "",
        settings: SamplingSettings | None = None,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        generator: torch.Generator | None = None,
        output: TextIO | None = None,
        notes: TextIO | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template or get_template()
        self.settings = settings or SamplingSettings()
        self.max_new_tokens = max_new_tokens
        self.stop = [*turn_stop_strings(self.template, tokenizer.eot_id is not None), *stop]
        self.generator = generator
        self.output = output or sys.stdout
        self.notes = notes or sys.stderr
        self.history: list[tuple[str, str]] = []
        self.answer_prompt = ""  # written before each answer, once the notes about its prompt are out
        self.system_prompt = ""
        self.set_system_prompt(system_prompt)

    # -------------------------------------------------------------------------------------- state

    def note(self, text: str) -> None:
        print(text, file=self.notes, flush=True)

    def set_system_prompt(self, text: str) -> None:
        self.system_prompt = encode_prompt(text, self.tokenizer)[0] if text else ""

    def reset(self) -> None:
        self.history.clear()

    # -------------------------------------------------------------------------------------- prompt

    @property
    def prompt_budget(self) -> int:
        """Tokens the prompt may use: the context less room for the answer (a quarter of it at most; a longer
        answer slides the window)."""
        block_size = self.model.config.block_size
        return max(1, block_size - min(self.max_new_tokens, block_size // 4))

    def messages(self, message: str) -> list[dict[str, str]]:
        """The conversation so far and `message`, in the messages form."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for question, answer in self.history:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return [*messages, {"role": "user", "content": message}]

    def _encode(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return encode_conversation(messages, self.template, self.tokenizer, add_generation_prompt).ids

    def build_prompt(self, message: str) -> list[int]:
        """Token ids of the conversation plus `message`, dropping the oldest turns until it fits the budget.

        If the system prompt and the message alone do not fit, the message loses its beginning instead.
        """
        budget = self.prompt_budget
        dropped = 0
        ids = self._encode(self.messages(message))
        while len(ids) > budget and self.history:
            self.history.pop(0)
            dropped += 1
            ids = self._encode(self.messages(message))
        if dropped:
            self.note(f"(the {dropped} oldest turn(s) no longer fit the context and were dropped)")
        if len(ids) > budget and self.system_prompt:
            system_ids = self._encode(self.messages(message)[:1], add_generation_prompt=False)
            if len(system_ids) < budget:
                self.note("(the message is too long for the context; its beginning is left out)")
                rest = self._encode(self.messages(message)[-1:])
                ids = system_ids + rest[len(rest) - (budget - len(system_ids)) :]
        return ids

    # -------------------------------------------------------------------------------------- answers

    def reply(self, message: str) -> str:
        """Stream the model's answer to `message` to the output, remember the turn, return the answer.

        Ctrl-C while the answer is being written ends that answer (what was written is kept), not the session.
        """
        message = encode_prompt(message, self.tokenizer)[0]
        prompt_ids = self.build_prompt(message)
        self.output.write(self.answer_prompt)
        self.output.flush()
        raw = ""
        shown = 0
        interrupted = False
        pieces = stream_text(
            self.model, self.tokenizer, prompt_ids, self.max_new_tokens, self.settings, self.generator, self.stop
        )
        try:
            for piece in pieces:
                raw += piece
                # Leading and trailing whitespace is not part of the answer: hold it back until text follows.
                visible = raw.strip()
                self.output.write(visible[shown:])
                self.output.flush()
                shown = len(visible)
        except KeyboardInterrupt:
            pieces.close()
            interrupted = True
        self.output.write("\n")
        self.output.flush()
        if interrupted:
            self.note("(answer stopped)")
        answer = raw.strip()
        self.history.append((message, answer))
        return answer

    def handle(self, line: str) -> bool:
        """Act on one line of input: a command or a message. Returns False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.reply(line)
            return True
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if command in ("/exit", "/quit"):
            return False
        if command == "/reset":
            self.reset()
            self.note("(conversation cleared)")
        elif command == "/system":
            self.set_system_prompt(read_escapes(argument))
            self.note(f"(system prompt {'set' if argument else 'removed'})")
        elif command == "/temp":
            self._set_temperature(argument)
        else:
            self.note(f"(unknown command {command}; {COMMANDS_HELP})")
        return True

    def _set_temperature(self, argument: str) -> None:
        try:
            temperature = float(argument)
            SamplingSettings(temperature=temperature)
        except (ValueError, PicoGPTError):
            self.note(f"(/temp needs a number >= 0, e.g. /temp 0.7; got {argument!r})")
            return
        self.settings.temperature = temperature
        self.note(f"(temperature {temperature})")
