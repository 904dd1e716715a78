"""A pretrained model's own chat template: the Jinja source from its tokenizer_config.json or chat_template.jinja.

`JinjaChatTemplate` sits behind the same interface as chat_template.ChatTemplate (segments, render,
stop_strings, answer_pieces, jinja, to_dict), so `chat`, `serve`, `model.chat()`, `finetune` and `export` use it
unchanged. It renders the way transformers' `apply_chat_template` does: a sandboxed, immutable Jinja environment
with trim_blocks and lstrip_blocks, `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text,
the bos/eos/pad tokens as variables, and `add_generation_prompt`. The prompt `picogpt chat` builds is then
exactly the string transformers builds.

Which text a model learns to write is found in the rendered text: each answer's content, and the eos token
right after it. Message contents are encoded as text (a special token's literal typed by a user stays text);
the template's own markup is encoded with its special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

import numpy as np

from .segments import Segment
from .errors import PicoGPTError

JINJA_NAME = "jinja"


def _compile(source: str):
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise PicoGPTError("a model's own chat template needs Jinja2: run `pip install jinja2`") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateError as error:
        raise PicoGPTError(f"the chat template is not valid Jinja ({error}); fix chat_template in "
                           f"tokenizer_config.json or chat_template.jinja") from None


class JinjaChatTemplate:
    """A Jinja chat template with the special tokens it refers to."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, stop_tokens: Sequence[str] = (), name: str = JINJA_NAME):
        if not isinstance(source, str) or not source.strip():
            raise PicoGPTError("the chat template is empty: give a Jinja template")
        self.name, self.source = name, source
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.stop_tokens = list(stop_tokens)
        self.compiled = _compile(source)

    # -------------------------------------------------------------------------------------- as data

    def to_dict(self) -> dict:
        return {"name": self.name, "jinja": self.source, "bos_token": self.bos_token, "eos_token": self.eos_token,
                "pad_token": self.pad_token, "stop_tokens": list(self.stop_tokens)}

    @classmethod
    def from_dict(cls, description: dict) -> JinjaChatTemplate:
        return cls(description["jinja"], description.get("bos_token"), description.get("eos_token"),
                   description.get("pad_token"), description.get("stop_tokens") or (),
                   description.get("name", JINJA_NAME))

    def jinja(self, has_eot: bool = True) -> str:
        return self.source

    # -------------------------------------------------------------------------------------- text

    def render(self, messages: Sequence[dict[str, str]], has_eot: bool = True,
               add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self.compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                        pad_token=self.pad_token or "", tools=None, documents=None)
        except jinja2.exceptions.TemplateError as error:
            raise PicoGPTError(f"the chat template refused the conversation: {error}") from None

    def segments(self, messages: Sequence[dict[str, str]], has_eot: bool = True,
                 add_generation_prompt: bool = False) -> list[Segment]:
        """The rendered text in pieces: the template's markup (never trained), message contents, and each
        answer with the end token that follows it (trained). Contents are found in order in the rendered text;
        an answer the template rewrote beyond trimming cannot be found and is refused, never trained wrongly."""
        text = self.render(messages, has_eot, add_generation_prompt)
        pieces: list[Segment] = []
        cursor = 0
        ends = [token for token in (self.eos_token, *self.stop_tokens) if token]
        for number, message in enumerate(messages, start=1):
            content = message["content"]
            start, found = self._find(text, content, cursor)
            if start < 0:
                if message["role"] == "assistant":
                    raise PicoGPTError(f"message {number}: the chat template changes the answer's text, so the tokens "
                                       f"to learn cannot be told from the template's own; fine-tune with another "
                                       f"template (--data.chat_template qa or im)")
                continue
            end = start + len(found)
            if message["role"] == "assistant":
                end += next((len(token) for token in ends if text.startswith(token, end)), 0)
            pieces += [Segment(text[cursor:start], False), Segment(text[start:end], message["role"] == "assistant")]
            cursor = end
        pieces.append(Segment(text[cursor:], False))
        return [piece for piece in pieces if piece.text]

    @staticmethod
    def _find(text: str, content: str, cursor: int) -> tuple[int, str]:
        for candidate in (content, content.strip()):
            if candidate and (start := text.find(candidate, cursor)) >= 0:
                return start, candidate
        return -1, ""

    answer_lead = ""  # the rendered prompt ends where the answer's own text begins

    def stop_strings(self, has_eot: bool = True) -> list[str]:
        return [token for token in (self.eos_token, *self.stop_tokens) if token]

    def answer_pieces(self, pieces: Iterable[str]) -> Iterator[str]:
        yield from pieces


def encode_jinja_conversation(messages, template: JinjaChatTemplate, tokenizer,
                              add_generation_prompt: bool = False) -> tuple[list[int], np.ndarray]:
    """Token ids of the rendered conversation and the loss mask (True on answers and their end token).

    When no message holds the text of a special token, the whole text is encoded at once, as transformers
    does, so the ids are exactly its ids. Otherwise the pieces are encoded one by one, contents as plain text.
    """
    segments = template.segments(messages, True, add_generation_prompt)
    markup = getattr(tokenizer, "encode_markup", None)
    specials = _special_texts(tokenizer)
    if markup is None or not any(token in message["content"] for message in messages for token in specials):
        text = "".join(piece.text for piece in segments)
        trained = np.zeros(len(text) + 1, dtype=bool)
        position = 0
        for piece in segments:
            trained[position : position + len(piece.text)] = piece.trained
            position += len(piece.text)
        if markup is None:
            ids, lasts = tokenizer.encode_with_offsets(text)
        else:
            # A token carries loss when its last character does: " Paris" after a template's "A:" is the
            # answer's first token, though it starts with the template's space.
            encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
            ids, lasts = encoding.ids, [max(start, end - 1) for start, end in encoding.offsets]
        return list(ids), trained[np.asarray(lasts, dtype=np.int64)]
    ids: list[int] = []
    mask: list[bool] = []
    contents = {message["content"] for message in messages} | {message["content"].strip() for message in messages}
    for piece in segments:
        piece_ids = _encode_piece(piece.text, contents, template, tokenizer)
        ids += piece_ids
        mask += [piece.trained] * len(piece_ids)
    return ids, np.asarray(mask, dtype=bool)


def _encode_piece(text: str, contents: set[str], template: JinjaChatTemplate, tokenizer) -> list[int]:
    for end in (template.eos_token, *template.stop_tokens):
        if end and text.endswith(end) and text[: -len(end)] in contents:  # an answer and its end token
            return tokenizer.encode_text(text[: -len(end)]) + tokenizer.encode_markup(end)
    return tokenizer.encode_text(text) if text in contents else tokenizer.encode_markup(text)


def _special_texts(tokenizer) -> list[str]:
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is None or not hasattr(inner, "get_added_tokens_decoder"):
        return []
    return [token.content for token in inner.get_added_tokens_decoder().values() if token.content]
