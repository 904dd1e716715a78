"""Chat templates: how the turns of a conversation become text, and which of that text a model learns to write.

A conversation is a list of messages, `{"role": "system" | "user" | "assistant", "content": "..."}`. The
default template, `qa`, is the corpus' own form, so a model pretrained on data/philosophy.txt already knows it:

    SYSTEM PROMPT

    Q: first question
    A: first answer<|endoftext|>

    Q: next question
    A: next answer<|endoftext|>

A template is stored in fine-tuned checkpoints (meta["chat_template"]), where `picogpt chat`, `serve`, the
Python API and the export find it; the export writes it as Jinja for transformers' `apply_chat_template`.
Plain Python: no torch, no Lightning.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .errors import PicoGPTError
from .segments import Segment
from .tokenizer import ENDOFTEXT

ROLES = ("system", "user", "assistant")


def validate_messages(messages: object, for_generation: bool = False) -> list[dict[str, str]]:
    """The messages as plain {"role", "content"} dicts, or a PicoGPTError saying what is wrong with them.

    An optional system message comes first, then user and assistant turns alternate, starting with the user.
    For training there must be an answer to learn from; for generation the last turn is the user's, which is
    what the model answers.
    """
    if not isinstance(messages, list):
        raise PicoGPTError('no "messages" list')
    if not messages:
        raise PicoGPTError('"messages" is empty')
    checked = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise PicoGPTError(f"message {number} is not an object with a role and a content")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise PicoGPTError(f"message {number} has the unknown role {role!r}; use system, user or assistant")
        if not isinstance(content, str):
            raise PicoGPTError(f"message {number} has a content that is not a string ({type(content).__name__})")
        if role == "system" and number > 1:
            raise PicoGPTError(f"message {number} is a system message; only the first message may be one")
        expected = "user" if not checked or checked[-1]["role"] != "user" else "assistant"
        if role != "system" and role != expected:
            raise PicoGPTError(f"message {number} is from the {role} where the {expected} was expected; after an "
                               f"optional system message, turns alternate user, assistant, user, ...")
        checked.append({"role": role, "content": content})
    roles = [message["role"] for message in checked]
    if for_generation and roles[-1] != "user":
        raise PicoGPTError("the last message must be from the user: it is the one the model answers")
    if not for_generation and "assistant" not in roles:
        raise PicoGPTError("no assistant message: the conversation has no answer to learn from")
    return checked


# ----------------------------------------------------------------------------------------------- templates


@dataclass
class ChatTemplate:
    """How turns become text: one format per role, each holding `{content}` once.

    An answer ends with the end-of-text token when the tokenizer has one (then the rest of the assistant
    format follows, untrained). Char and word tokenizers saved before end-of-text existed have none; their
    answers end with the assistant format's text after `{content}` instead, which is then trained, and is
    where generation stops. Spaces that end the assistant prefix ("A: ") belong to the answer: BPE merges a
    space with the word after it, so the prompt ends at "A:" and the model writes " Knowledge" as it learned.
    """

    name: str
    system: str
    user: str
    assistant: str
    affixes: dict[str, tuple[str, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.affixes = {role: self._prefix_and_suffix(role) for role in ROLES}

    def _prefix_and_suffix(self, role: str) -> tuple[str, str]:
        """The literal text before and after `{content}` in the role's format ({{ and }} stand for braces)."""
        fmt = getattr(self, role)
        where = f"chat template {self.name!r}: the {role} format {fmt!r}"
        if not isinstance(fmt, str):
            raise PicoGPTError(f"{where} is not a string")
        try:
            parts = list(string.Formatter().parse(fmt))
        except ValueError as error:
            raise PicoGPTError(f"{where} does not render ({error}); write {{{{ and }}}} for literal braces") from None
        fields = [(name, spec, conversion) for _, name, spec, conversion in parts if name is not None]
        if fields != [("content", "", None)]:
            found = ", ".join("{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                              for name, spec, conversion in fields) or "no placeholder"
            raise PicoGPTError(f"{where} does not render: it needs {{content}} exactly once and nothing else "
                               f"in braces, found {found}")
        split = next(index for index, part in enumerate(parts) if part[1] is not None)
        prefix = "".join(part[0] for part in parts[: split + 1])
        suffix = "".join(part[0] for part in parts[split + 1 :])
        return prefix, suffix

    # -------------------------------------------------------------------------------------- as data

    def to_dict(self) -> dict[str, str]:
        """Plain strings only, so a checkpoint holding it loads with torch.load(weights_only=True)."""
        return {"name": self.name, "system": self.system, "user": self.user, "assistant": self.assistant}

    @classmethod
    def from_dict(cls, description: object) -> ChatTemplate:
        keys = {"system", "user", "assistant"}
        if not isinstance(description, dict) or not keys <= description.keys() <= keys | {"name"}:
            raise PicoGPTError(f"a chat template is a name ({', '.join(BUILTIN_TEMPLATES)}) or a dict with the keys "
                               f"system, user and assistant (and optionally name), got {description!r}")
        return cls(description.get("name", "custom"), description["system"], description["user"],
                   description["assistant"])

    # -------------------------------------------------------------------------------------- text

    @property
    def generation_prefix(self) -> str:
        """What the prompt ends with: the assistant prefix without the spaces the answer starts with."""
        return self.affixes["assistant"][0].rstrip(" ")

    @property
    def answer_lead(self) -> str:
        """The spaces the model writes before an answer's content (the end of the assistant prefix)."""
        return self.affixes["assistant"][0][len(self.generation_prefix) :]

    def segments(
        self, messages: Sequence[dict[str, str]], has_eot: bool, add_generation_prompt: bool = False
    ) -> list[Segment]:
        """The text of `messages` in pieces that say whether the model learns them (answers and their ends).

        `messages` should have passed `validate_messages`; with `add_generation_prompt` the text ends where
        the model's next answer begins.
        """
        pieces = []
        for message in messages:
            role, content = message["role"], message["content"]
            prefix, suffix = self.affixes[role]
            if role != "assistant":
                pieces.append(Segment(prefix + content + suffix, False))
                continue
            pieces.append(Segment(self.generation_prefix, False))
            if has_eot:
                pieces += [Segment(self.answer_lead + content, True), Segment(ENDOFTEXT, True, special=True),
                           Segment(suffix, False)]
            elif suffix:
                pieces.append(Segment(self.answer_lead + content + suffix, True))
            else:
                raise PicoGPTError(f"chat template {self.name!r} has nothing after {{content}} in its assistant "
                                   f"format and this tokenizer has no end-of-text token, so answers could never end; "
                                   f"add an end marker to the format (as qa's blank line) or use a newer tokenizer")
        if add_generation_prompt:
            pieces.append(Segment(self.generation_prefix, False))
        return [piece for piece in pieces if piece.text]

    def render(self, messages: Sequence[dict[str, str]], has_eot: bool, add_generation_prompt: bool = False) -> str:
        return "".join(piece.text for piece in self.segments(messages, has_eot, add_generation_prompt))

    def stop_strings(self, has_eot: bool) -> list[str]:
        """Where an answer ends: end-of-text (or, without it, the assistant format's closing text), and the
        start of a next user turn, which a model that was never fine-tuned writes instead.

        The next turn's marker is the user prefix without its spaces ("Q:"), after a single newline when the
        template separates turns by newlines: such a model writes one newline or two.
        """
        assistant_suffix, user_prefix = self.affixes["assistant"][1], self.affixes["user"][0]
        stops = [ENDOFTEXT] if has_eot else [assistant_suffix] if assistant_suffix else []
        marker = user_prefix.strip()
        if marker:
            after_answer = assistant_suffix + user_prefix
            between = after_answer[: after_answer.index(marker)]
            stops.append(("\n" if "\n" in between else between) + marker)
        return stops

    def answer_pieces(self, pieces: Iterable[str]) -> Iterator[str]:
        """Generated pieces of an answer without its `answer_lead`, which belongs to the template's form."""
        lead = AnswerLead(self.answer_lead)
        for piece in pieces:
            piece = lead.strip(piece)
            if piece:
                yield piece

    def jinja(self, has_eot: bool) -> str:
        """The same template for Hugging Face's `tokenizer_config.json` ("chat_template").

        `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` in transformers then gives
        exactly `render(messages, has_eot, add_generation_prompt=True)`. Literals are Jinja string expressions,
        so the whitespace trimming transformers turns on never touches them.
        """

        def literal(text: str) -> str:
            return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"

        lines = ["{%- for message in messages -%}"]
        for index, role in enumerate(ROLES):
            prefix, suffix = self.affixes[role]
            end = "{{ eos_token }}" if role == "assistant" and has_eot else ""
            keyword = "if" if index == 0 else "elif"
            lines.append(f"{{%- {keyword} message['role'] == '{role}' -%}}"
                         f"{literal(prefix)}{{{{ message['content'] }}}}{end}{literal(suffix)}")
        lines += [
            "{%- else -%}{{ raise_exception('unknown role ' + message['role'] + '; use system, user or assistant') }}",
            "{%- endif -%}",
            "{%- endfor -%}",
            f"{{%- if add_generation_prompt -%}}{literal(self.generation_prefix)}{{%- endif -%}}",
        ]
        return "\n".join(lines)


BUILTIN_TEMPLATES = {
    # The corpus' own form: pairs separated by a blank line, as in data/philosophy.txt.
    "qa": ChatTemplate("qa", system="{content}\n\n", user="Q: {content}\n", assistant="A: {content}\n\n"),
    # ChatML's layout with plain-text markers (no tokenizer of ours has them as special tokens).
    "im": ChatTemplate(
        "im",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
    ),
}
DEFAULT_TEMPLATE = "qa"


class AnswerLead:
    """Takes the template's `answer_lead` off the start of an answer that arrives piece by piece."""

    def __init__(self, lead: str):
        self.lead = lead
        self.held: str | None = ""  # text that may still be the lead; None once past it

    def strip(self, piece: str) -> str:
        """The part of `piece` that is answer (empty while it may still be the lead)."""
        if self.held is None:
            return piece
        self.held += piece
        if len(self.held) >= len(self.lead) or not self.lead.startswith(self.held):
            rest, self.held = self.held.removeprefix(self.lead), None
            return rest
        return ""


def turn_stop_strings(template: ChatTemplate, has_eot: bool) -> list[str]:
    """Every place an answer ends: the template's own stops (end-of-text, the next user turn), and the markers of
    any other turn a model may write inside one answer instead: a new assistant turn ("\\nA:", which a tiny
    model writes after asking itself a question) and the assistant format's closing marker ("<|im_end|>") where
    end-of-text ends answers. Used by `picogpt chat`, `serve` and `PicoGPT.chat()` alike.
    """
    stops = template.stop_strings(has_eot)
    if not isinstance(template, ChatTemplate):  # a pretrained model's Jinja template: its own stop tokens
        return stops
    assistant_suffix = template.affixes["assistant"][1]
    for role in ("user", "assistant"):
        marker = template.affixes[role][0].strip()
        if marker:  # stop_strings' rule: what comes between an answer and the marker, one newline for a blank line
            after_answer = assistant_suffix + template.affixes[role][0]
            between = after_answer[: after_answer.index(marker)]
            stops.append(("\n" if "\n" in between else between) + marker)
    if has_eot and assistant_suffix.strip():
        stops.append(assistant_suffix.rstrip())  # the answer's own closing marker, "<|im_end|>"
    return list(dict.fromkeys(stop for stop in stops if stop))


def get_template(template: str | dict | ChatTemplate | None = None) -> ChatTemplate:
    """A built-in template by name, a template from its dict (as stored in checkpoints) or that dict as JSON
    (as a command line gives it), or the default."""
    if template is None:
        return BUILTIN_TEMPLATES[DEFAULT_TEMPLATE]
    if isinstance(template, ChatTemplate) or hasattr(template, "segments"):
        return template
    if isinstance(template, str) and template.lstrip().startswith("{"):
        try:
            template = json.loads(template)
        except json.JSONDecodeError as error:
            raise PicoGPTError(f"the chat template is not valid JSON ({error})") from None
    if isinstance(template, dict) and "jinja" in template:
        from .jinja_template import JinjaChatTemplate  # a pretrained model's own template (picogpt import)

        return JinjaChatTemplate.from_dict(template)
    if isinstance(template, str):
        if template not in BUILTIN_TEMPLATES:
            raise PicoGPTError(f"unknown chat template {template!r}; use one of {', '.join(BUILTIN_TEMPLATES)} or a "
                               f"dict with system, user and assistant formats")
        return BUILTIN_TEMPLATES[template]
    return ChatTemplate.from_dict(template)


def template_from_meta(meta: dict) -> ChatTemplate:
    """The template a checkpoint was fine-tuned with (meta["chat_template"]); `qa` for one that has none."""
    return get_template(meta.get("chat_template"))
