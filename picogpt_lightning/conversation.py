"""Conversations for chat fine-tuning and serving: JSONL in, chat templates, loss masks, blocks out.

A conversation is the common messages form, one JSON object per line of a .jsonl file:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}

A `ChatTemplate` turns one into text. The default, `qa`, is the corpus' own form, so a model pretrained on
data/philosophy.txt already knows it:

    SYSTEM PROMPT

    Q: first question
    A: first answer<|endoftext|>

    Q: next question
    A: next answer<|endoftext|>

The tokenizer's offsets then give token ids and a loss mask that is on for the answers and the end-of-text
after each (what the model should learn to write) and off for everything else (what it is given). Packing puts
whole conversations into fixed blocks for training. Plain Python and numpy: no torch, no Lightning.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import PicoGPTError
from .prompt import fit_to_vocabulary
from .tokenizer import ENDOFTEXT, Tokenizer

ROLES = ("system", "user", "assistant")
CONVERSATION_SUFFIX = ".jsonl"

# ----------------------------------------------------------------------------------------------- messages


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


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    source: str  # "file:line", to name it in messages


def conversation_files(path: str | Path) -> list[Path]:
    """A .jsonl file, or the .jsonl files of a folder (not recursive) in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == CONVERSATION_SUFFIX and p.is_file())
        if not files:
            raise PicoGPTError(f"{path} holds no {CONVERSATION_SUFFIX} files; pass a .jsonl file or a folder of them")
        return files
    if not path.is_file():
        raise PicoGPTError(f"{path} does not exist; pass a .jsonl file of conversations or a folder of them")
    return [path]


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation in `path` (see `conversation_files`); blank lines are skipped.

    Any bad line is a PicoGPTError naming file:line and what is wrong, so nothing trains on half a dataset.
    """
    conversations = []
    for file in conversation_files(path):
        try:
            lines = file.read_bytes().split(b"\n")
        except OSError as error:
            raise PicoGPTError(f"cannot read {file} ({error.strerror})") from None
        for number, line in enumerate(lines, start=1):
            if line.strip():
                conversations.append(_parse_line(line, f"{file}:{number}"))
    if not conversations:
        raise PicoGPTError(f"{path} holds no conversations; each line should be {{\"messages\": [...]}}")
    return conversations


def _parse_line(line: bytes, source: str) -> Conversation:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise PicoGPTError(f"{source}: the line is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise PicoGPTError(f"{source}: malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise PicoGPTError(f'{source}: not a JSON object; each line should be {{"messages": [...]}}')
    try:
        messages = validate_messages(record.get("messages"))
    except PicoGPTError as error:
        raise PicoGPTError(f"{source}: {error}") from None
    return Conversation(messages, source)


def split_conversations(
    conversations: Sequence[Conversation], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Conversation], list[Conversation]]:
    """A seeded random choice of whole conversations for validation (at least one when val_fraction > 0).

    Each part keeps the order of the files, so the same seed gives the same parts whatever ran before.
    """
    if not 0 <= val_fraction < 1:
        raise PicoGPTError(f"val_fraction must be in [0, 1), got {val_fraction}")
    count = len(conversations)
    val_count = max(1, round(count * val_fraction)) if val_fraction > 0 else 0
    if val_count >= count:
        raise PicoGPTError(f"{count} conversation(s) are too few to hold {val_count} out for validation; "
                           f"bring more or lower val_fraction")
    chosen = set(np.random.default_rng(seed).permutation(count)[:val_count].tolist())
    train = [c for i, c in enumerate(conversations) if i not in chosen]
    val = [c for i, c in enumerate(conversations) if i in chosen]
    return train, val


# ----------------------------------------------------------------------------------------------- templates


class Segment(NamedTuple):
    text: str
    trained: bool  # the model learns to write it: an answer and its end


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
                pieces += [Segment(self.answer_lead + content, True), Segment(ENDOFTEXT, True), Segment(suffix, False)]
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
        lead = self.answer_lead
        held: str | None = ""  # text that may still be the lead; None once past it
        for piece in pieces:
            if held is None:
                yield piece
                continue
            held += piece
            if len(held) >= len(lead) or not lead.startswith(held):
                rest, held = held.removeprefix(lead), None
                if rest:
                    yield rest

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


def get_template(template: str | dict | ChatTemplate | None = None) -> ChatTemplate:
    """A built-in template by name, a template from its dict (as stored in checkpoints) or that dict as JSON
    (as a command line gives it), or the default."""
    if template is None:
        return BUILTIN_TEMPLATES[DEFAULT_TEMPLATE]
    if isinstance(template, ChatTemplate):
        return template
    if isinstance(template, str) and template.lstrip().startswith("{"):
        try:
            template = json.loads(template)
        except json.JSONDecodeError as error:
            raise PicoGPTError(f"the chat template is not valid JSON ({error})") from None
    if isinstance(template, str):
        if template not in BUILTIN_TEMPLATES:
            raise PicoGPTError(f"unknown chat template {template!r}; use one of {', '.join(BUILTIN_TEMPLATES)} or a "
                               f"dict with system, user and assistant formats")
        return BUILTIN_TEMPLATES[template]
    return ChatTemplate.from_dict(template)


def template_from_meta(meta: dict) -> ChatTemplate:
    """The template a checkpoint was fine-tuned with (meta["chat_template"]); `qa` for one that has none."""
    return get_template(meta.get("chat_template"))


# ----------------------------------------------------------------------------------------------- tokens


@dataclass
class UnseenCharacters:
    """Characters a char-level model never saw, mapped as generation maps them: what became of each, how
    often it occurred and in how many conversations."""

    stand_ins: dict[str, str | None] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    conversations: int = 0

    def add(self, other: UnseenCharacters) -> None:
        self.stand_ins.update(other.stand_ins)
        self.counts.update(other.counts)
        self.conversations += other.conversations

    def describe(self) -> str:
        """One line for the user, e.g. "2 conversation(s) hold 3 character(s) the model never saw: ..."."""
        shown = [
            f"{char!r} {'-> ' + repr(self.stand_ins[char]) if self.stand_ins[char] is not None else 'dropped'} "
            f"x{count}"
            for char, count in self.counts.most_common(10)
        ]
        more = ", ..." if len(self.counts) > 10 else ""
        return (f"{self.conversations} conversation(s) hold {len(self.counts)} character(s) the model never saw, "
                f"{sum(self.counts.values())} time(s): {', '.join(shown)}{more}")


@dataclass
class EncodedConversation:
    ids: list[int]
    loss_mask: np.ndarray  # bool per token: True where the model learns to write this token
    unseen: UnseenCharacters


def encode_conversation(
    messages: Sequence[dict[str, str]],
    template: ChatTemplate,
    tokenizer: Tokenizer,
    add_generation_prompt: bool = False,
) -> EncodedConversation:
    """Token ids of the rendered conversation and which of them carry loss.

    A token carries loss when it starts inside an answer or is the end-of-text after one. Characters a char
    model never saw are mapped piece by piece (never inside the end-of-text literal, which is one token).
    """
    has_eot = tokenizer.eot_id is not None
    pieces = []
    unseen = UnseenCharacters()
    for piece in template.segments(messages, has_eot, add_generation_prompt):
        if piece.text == ENDOFTEXT:
            pieces.append(piece)
            continue
        fitted, replacements = fit_to_vocabulary(piece.text, tokenizer)
        unseen.stand_ins.update(replacements)
        unseen.counts.update({char: piece.text.count(char) for char in replacements})
        pieces.append(Segment(fitted, piece.trained))
    unseen.conversations = int(bool(unseen.counts))
    text = "".join(piece.text for piece in pieces)
    trained_characters = np.zeros(len(text) + 1, dtype=bool)
    position = 0
    for piece in pieces:
        trained_characters[position : position + len(piece.text)] = piece.trained
        position += len(piece.text)
    ids, starts = tokenizer.encode_with_offsets(text)
    return EncodedConversation(list(ids), trained_characters[np.asarray(starts, dtype=np.int64)], unseen)


def encode_conversations(
    conversations: Iterable[Conversation], template: ChatTemplate, tokenizer: Tokenizer
) -> tuple[list[EncodedConversation], UnseenCharacters]:
    """Every conversation encoded for training, and the characters a char model never saw in any of them."""
    encoded = []
    unseen = UnseenCharacters()
    for conversation in conversations:
        encoded.append(encode_conversation(conversation.messages, template, tokenizer))
        unseen.add(encoded[-1].unseen)
    return encoded, unseen


# ----------------------------------------------------------------------------------------------- blocks


@dataclass
class PackedBlocks:
    inputs: np.ndarray  # (blocks, block_size) token ids
    targets: np.ndarray  # (blocks, block_size) the next token's id where it carries loss, else -1
    conversations: int  # packed
    tokens: int  # tokens of the packed conversations (the rest of each block is padding)
    skipped: int  # left out: longer than one block

    def describe(self) -> str:
        blocks, block_size = self.inputs.shape
        filled = self.tokens / max(1, blocks * (block_size + 1))
        trained = int((self.targets >= 0).sum())
        skipped = f"; skipped {self.skipped} longer than a block ({block_size + 1} tokens)" if self.skipped else ""
        return (f"packed {self.conversations:,} conversation(s) into {blocks:,} block(s) of {block_size} tokens "
                f"({filled:.0%} filled, {trained:,} answer tokens carry loss){skipped}")


def pack_conversations(
    encoded: Sequence[EncodedConversation], block_size: int, pad_id: int = 0
) -> PackedBlocks:
    """Whole conversations, in the given order, into blocks of block_size + 1 tokens (inputs and targets).

    A conversation starts a new block when it does not fit in what is left of the current one, so a block
    never starts in the middle of a conversation, which would train answers on questions the model cannot
    see. One longer than a block is skipped and counted, not truncated: cutting it would drop the end of its
    answer and the end-of-text, teaching the model not to stop. The first token of every conversation is
    never a target, so the loss never crosses from one conversation into the next; padding is never a target.
    """
    span = block_size + 1
    blocks: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []
    mask: list[bool] = []
    packed = tokens = skipped = 0
    for conversation in encoded:
        length = len(conversation.ids)
        if length > span:
            skipped += 1
            continue
        if len(ids) + length > span:
            blocks.append((ids, mask))
            ids, mask = [], []
        ids += conversation.ids
        mask += [False] + conversation.loss_mask[1:].tolist()
        packed += 1
        tokens += length
    if ids:
        blocks.append((ids, mask))
    if not blocks:
        raise PicoGPTError(f"none of the {len(encoded)} conversation(s) fits in the context of {block_size} tokens; "
                           f"use a model with a longer context or shorter conversations")
    token_blocks = np.full((len(blocks), span), pad_id, dtype=np.int64)
    loss_blocks = np.zeros((len(blocks), span), dtype=bool)
    for row, (block_ids, block_mask) in enumerate(blocks):
        token_blocks[row, : len(block_ids)] = block_ids
        loss_blocks[row, : len(block_mask)] = block_mask
    targets = np.where(loss_blocks[:, 1:], token_blocks[:, 1:], -1)
    return PackedBlocks(token_blocks[:, :-1], targets, packed, tokens, skipped)
