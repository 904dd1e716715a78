"""Conversations for chat fine-tuning: JSONL in, token ids and loss masks, blocks out.

A conversation is the common messages form, one JSON object per line of a .jsonl file:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}

A chat template (chat_template.py) turns one into text; the tokenizer's offsets then give token ids and a loss
mask that is on for the answers and the end-of-text after each (what the model should learn to write) and off
for everything else (what it is given). Packing puts whole conversations into fixed blocks for training. Plain
Python and numpy: no torch, no Lightning.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .chat_template import ChatTemplate, validate_messages
from .errors import PicoGPTError
from .files import not_found
from .prompt import fit_to_vocabulary
from .segments import Segment
from .tokenizer import Tokenizer

CONVERSATION_SUFFIX = ".jsonl"

# ----------------------------------------------------------------------------------------------- files


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
        raise PicoGPTError(f"{path} {not_found(path)}; pass a .jsonl file of conversations or a folder of them")
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


def empty_answers(conversations: Sequence[Conversation]) -> list[str]:
    """Where a conversation has an assistant answer that is empty or only whitespace ("file:line"): trained,
    such an answer teaches the model to end at once, which is rarely what the data meant."""
    return [conversation.source for conversation in conversations
            if any(m["role"] == "assistant" and not m["content"].strip() for m in conversation.messages)]


def describe_empty_answers(sources: Sequence[str]) -> str:
    shown = ", ".join(sources[:3]) + (f" and {len(sources) - 3:,} more" if len(sources) > 3 else "")
    return (f"{len(sources):,} conversation(s) have an empty assistant answer ({shown}): each is trained to end "
            f"its answer at once; fill them in or remove those lines if that is not meant")


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
    Only the template's own end-of-text is the special token: the same text inside a message is encoded as
    text, so a message cannot forge a turn boundary.
    """
    if hasattr(template, "source"):  # a pretrained model's Jinja template: its own encoding (jinja_template.py)
        from .jinja_template import encode_jinja_conversation

        ids, mask = encode_jinja_conversation(messages, template, tokenizer, add_generation_prompt)
        return EncodedConversation(ids, mask, UnseenCharacters())
    has_eot = tokenizer.eot_id is not None
    pieces = []
    unseen = UnseenCharacters()
    for piece in template.segments(messages, has_eot, add_generation_prompt):
        if piece.special:
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
    ids, starts = _encode_around_markup(pieces, tokenizer)
    return EncodedConversation(ids, trained_characters[np.asarray(starts, dtype=np.int64)], unseen)


def _encode_around_markup(pieces: Sequence[Segment], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Ids and start offsets of the joined pieces: each special piece is the end-of-text id, the text between
    them is encoded with special-token text as ordinary text. The tokenizers split at end-of-text anyway, so
    text without the literal encodes exactly as the whole text would."""
    ids: list[int] = []
    starts: list[int] = []
    position = 0
    run = ""  # ordinary text since the last special piece

    def encode_run() -> None:
        run_ids, run_starts = tokenizer.encode_with_offsets(run, special=False)
        ids.extend(run_ids)
        starts.extend(position - len(run) + start for start in run_starts)

    for piece in pieces:
        if piece.special:
            encode_run()
            run = ""
            ids.append(tokenizer.eot_id)
            starts.append(position)
        else:
            run += piece.text
        position += len(piece.text)
    encode_run()
    return ids, starts


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
