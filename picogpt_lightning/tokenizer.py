"""Three tokenizers behind one small interface: characters, byte-level BPE and words.

Every tokenizer has `kind`, `vocab_size`, `eot_id`, `encode`, `encode_with_offsets`, `encode_batch`, `decode`,
`to_json` and `save`, so the rest of the package never asks which one it holds. `to_json` is complete: a
checkpoint that stores it can rebuild the tokenizer without any other file.

End of text: tokenizers trained now have one `<|endoftext|>` token (`eot_id`), which ends documents and chat
answers so that a model learns to stop. The literal text `<|endoftext|>` encodes to that one id and decodes
back to it. Char and word tokenizers saved before this existed load unchanged: their `eot_id` is None and the
literal is plain text to them.

- `CharTokenizer`: one id per character, like nanoGPT's Shakespeare example. Tiny vocabulary, long sequences.
- `BPETokenizer`: GPT-2 style byte-level BPE trained with Hugging Face `tokenizers`; any text encodes.
- `WordTokenizer`: words, punctuation and whitespace runs in pure Python, for when `tokenizers` is missing.

This file imports neither torch nor Lightning, and `tokenizers` only when a BPE tokenizer is built.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from picogpt_lightning.errors import PicoGPTError, SettingsError
from picogpt_lightning.files import write_atomically, write_text_atomically

if TYPE_CHECKING:
    import tokenizers

ENDOFTEXT = "<|endoftext|>"
UNKNOWN = "<unk>"
VOCAB_FILE = "vocab.json"  # char and word tokenizers: our own JSON
BPE_FILE = "tokenizer.json"  # BPE: the standard Hugging Face file


class Tokenizer(Protocol):
    """What the rest of the package may rely on, whichever tokenizer it holds."""

    kind: str
    eot_id: int | None  # the id of <|endoftext|>, or None for tokenizers saved without one

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_with_offsets(self, text: str, special: bool = True) -> tuple[list[int], list[int]]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_json(self) -> str: ...

    def save(self, folder: str | os.PathLike) -> Path: ...


def bpe_available() -> bool:
    """Whether Hugging Face `tokenizers` can be imported (it is optional)."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as error:
        raise PicoGPTError(
            "the BPE tokenizer needs the `tokenizers` package: run `pip install tokenizers`, "
            "or use the word tokenizer (backend=word)"
        ) from error
    return tokenizers


def _check_vocab_size(kind: str, vocab_size: int, smallest: int, largest: int) -> None:
    if not smallest <= vocab_size <= largest:
        raise SettingsError(
            f"vocab_size {vocab_size} is out of range for the {kind} tokenizer: "
            f"choose a value from {smallest:,} to {largest:,}"
        )


def _checked_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    """Ids as plain ints (numpy scalars included); out-of-range ids are a bug in the caller, not the user."""
    checked = [int(i) for i in ids]
    for i in checked:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (0 to {vocab_size - 1})")
    return checked


def _around_endoftext(
    text: str, eot_id: int | None, encode_piece: Callable[[str], tuple[list[int], list[int]]]
) -> tuple[list[int], list[int]]:
    """Ids and start offsets of `text` in which each literal <|endoftext|> is the single id `eot_id`.

    `encode_piece` gives the ids and start offsets of the text between them. Without an `eot_id` the literal is
    ordinary text, as it was for tokenizers saved before end-of-text existed.
    """
    if eot_id is None or ENDOFTEXT not in text:
        return encode_piece(text)
    ids: list[int] = []
    starts: list[int] = []
    position = 0
    for index, piece in enumerate(text.split(ENDOFTEXT)):
        if index:
            ids.append(eot_id)
            starts.append(position)
            position += len(ENDOFTEXT)
        piece_ids, piece_starts = encode_piece(piece)
        ids += piece_ids
        starts += [position + start for start in piece_starts]
        position += len(piece)
    return ids, starts


def _code_points(text: str) -> np.ndarray:
    """The code points of `text` as a uint32 array (lone surrogates included, as `ord` gives them)."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


class CharTokenizer:
    """One id per character; ids are positions in the sorted character list, then `<|endoftext|>` if present.

    `chars` and `stoi` hold the characters only, so "is this character known?" never confuses the special
    token with text.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], endoftext: bool = False):
        chars = list(chars)
        if any(not isinstance(char, str) or len(char) != 1 for char in chars):
            raise PicoGPTError("a char tokenizer's vocabulary must be single characters: the file is damaged")
        self.chars = sorted(set(chars))
        self.stoi = {char: i for i, char in enumerate(self.chars)}
        self.eot_id = len(self.chars) if endoftext else None
        # The id of every code point up to the largest one known, -1 for the others: encode_array looks a whole
        # text up at once instead of looping over its characters in Python.
        points = [ord(char) for char in self.chars]
        self.ids_by_code_point = np.full(max(points, default=0) + 2, -1, dtype=np.int32)
        self.ids_by_code_point[points] = np.arange(len(points), dtype=np.int32)

    @classmethod
    def train(cls, chunks: Iterable[str]) -> CharTokenizer:
        """Every character of the text, and end-of-text (whose literal does not count as characters)."""
        seen = np.zeros(0x110000, dtype=bool)  # one flag per Unicode code point
        for chunk in chunks:
            seen[_code_points(chunk.replace(ENDOFTEXT, ""))] = True
        return cls((chr(point) for point in np.flatnonzero(seen)), endoftext=True)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + (self.eot_id is not None)

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str, special: bool = True) -> tuple[list[int], list[int]]:
        """The ids of `text` and the position in `text` where each token starts; with `special` off a literal
        <|endoftext|> is ordinary text (a user's message must not forge the token)."""
        return _around_endoftext(text, self.eot_id if special else None, self._encode_characters)

    def _encode_characters(self, text: str) -> tuple[list[int], list[int]]:
        try:
            return [self.stoi[char] for char in text], list(range(len(text)))
        except KeyError:
            unknown = sorted(set(text) - self.stoi.keys())
            shown = ", ".join(repr(char) for char in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
            raise PicoGPTError(
                f"the text has {len(unknown)} character(s) this tokenizer never saw in training ({shown}): "
                "remove or replace them"
            ) from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of `text` as an int32 array, like `encode` but about 30x faster on long texts."""
        if self.eot_id is None or ENDOFTEXT not in text:
            return self._character_array(text)
        arrays = []
        for index, piece in enumerate(text.split(ENDOFTEXT)):
            if index:
                arrays.append(np.array([self.eot_id], dtype=np.int32))
            arrays.append(self._character_array(piece))
        return np.concatenate(arrays)

    def _character_array(self, text: str) -> np.ndarray:
        table = self.ids_by_code_point
        ids = table[np.minimum(_code_points(text), len(table) - 1)]
        if ids.size and ids.min() < 0:
            self._encode_characters(text)  # raises the error that names the unknown characters
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(ENDOFTEXT if i == self.eot_id else self.chars[i] for i in _checked_ids(ids, self.vocab_size))

    def to_json(self) -> str:
        description = {"kind": self.kind, "chars": self.chars}
        if self.eot_id is not None:
            description["endoftext"] = True  # absent in files saved before end-of-text existed
        return json.dumps(description)

    def save(self, folder: str | os.PathLike) -> Path:
        return write_text_atomically(Path(folder) / VOCAB_FILE, self.to_json())


class BPETokenizer:
    """GPT-2 style byte-level BPE from Hugging Face `tokenizers`, with one special token, `<|endoftext|>`.

    Byte level means the 256 byte values are always in the vocabulary, so any text encodes and
    decode(encode(text)) == text. Saved as a standard `tokenizer.json` that `tokenizers.Tokenizer.from_file`
    and `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` both load.
    """

    kind = "bpe"
    min_vocab_size = 258  # 256 bytes, <|endoftext|> and at least one merge
    max_vocab_size = 1_000_000

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.tokenizer = tokenizer
        self.eot_id = tokenizer.token_to_id(ENDOFTEXT)  # None in a tokenizer.json made without it
        self._ordinary: tokenizers.Tokenizer | None = None

    @classmethod
    def check_vocab_size(cls, vocab_size: int) -> None:
        _check_vocab_size(cls.kind, vocab_size, cls.min_vocab_size, cls.max_vocab_size)

    @classmethod
    def train(cls, chunks: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train from a stream of text; the library counts words as they come, never holding all the text."""
        cls.check_vocab_size(vocab_size)
        tk = _import_tokenizers()
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[ENDOFTEXT],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
            show_progress=False,
        )
        # The text between end-of-text tokens, as encoding sees it: the literal is one special token, never
        # text to learn merges from.
        pieces = (piece for chunk in chunks for piece in chunk.split(ENDOFTEXT))
        tokenizer.train_from_iterator(pieces, trainer=trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_with_offsets(self, text: str, special: bool = True) -> tuple[list[int], list[int]]:
        """The ids of `text` and the position in `text` where each token starts; with `special` off the text of
        a special token (<|endoftext|>) is encoded as ordinary text (a user's message must not forge it).

        The library reports positions in characters; the byte-level pieces of one character all start where
        that character does.
        """
        encoding = (self.tokenizer if special else self._ordinary_tokenizer()).encode(text)
        return encoding.ids, [start for start, _ in encoding.offsets]

    def _ordinary_tokenizer(self) -> tokenizers.Tokenizer:
        """A copy that encodes special-token text as ordinary text (the library's own switch; a copy rather than
        flipping it on the shared tokenizer, which other threads may be using)."""
        if self._ordinary is None:
            self._ordinary = _import_tokenizers().Tokenizer.from_str(self.tokenizer.to_str())
            self._ordinary.encode_special_tokens = True
        return self._ordinary

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel threads (the library's own batch encoding)."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch_fast(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        # Keep <|endoftext|> in the output: dropping it would break decode(encode(text)) == text.
        return self.tokenizer.decode(_checked_ids(ids, self.vocab_size), skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokenizer": json.loads(self.tokenizer.to_str())})

    def save(self, folder: str | os.PathLike) -> Path:
        return write_atomically(Path(folder) / BPE_FILE, lambda path: self.tokenizer.save(str(path)))


class WordTokenizer:
    """Words, single punctuation characters and whitespace runs, in pure Python.

    Every character belongs to exactly one token, so decoding is plain concatenation and
    decode(encode(text)) == text whenever all of the text's tokens are in the vocabulary; others become `<unk>`.
    The vocabulary starts with `<unk>`, then `<|endoftext|>` in tokenizers trained since it exists. The pattern
    cuts that literal into five tokens, so no older vocabulary can hold it by accident: its presence is the mark.
    """

    kind = "word"
    min_vocab_size = 2  # <unk> and <|endoftext|>
    max_vocab_size = 1_000_000
    pattern = re.compile(r"\w+|\s+|[^\w\s]")

    def __init__(self, tokens: Sequence[str]):
        if not tokens or tokens[0] != UNKNOWN or len(set(tokens)) != len(tokens):
            raise PicoGPTError(f"a word tokenizer's vocabulary must start with {UNKNOWN} and have no repeats")
        self.tokens = list(tokens)
        self.stoi = {token: i for i, token in enumerate(self.tokens)}
        self.eot_id = self.stoi.get(ENDOFTEXT)

    @classmethod
    def check_vocab_size(cls, vocab_size: int) -> None:
        _check_vocab_size(cls.kind, vocab_size, cls.min_vocab_size, cls.max_vocab_size)

    @classmethod
    def train(cls, chunks: Iterable[str], vocab_size: int) -> WordTokenizer:
        """Keep the vocab_size - 2 most frequent tokens (counted in this process; prepare.py counts them on
        every core with encoding.word_counts and calls `from_counts`)."""
        cls.check_vocab_size(vocab_size)
        return cls.from_counts(cls.count(chunks), vocab_size)

    @classmethod
    def count(cls, chunks: Iterable[str]) -> Counter:
        """How often each token occurs in the chunks (a literal <|endoftext|> is not a word)."""
        counts: Counter[str] = Counter()
        for chunk in chunks:
            for piece in chunk.split(ENDOFTEXT):
                counts.update(cls.pattern.findall(piece))
        return counts

    @classmethod
    def from_counts(cls, counts: Counter, vocab_size: int) -> WordTokenizer:
        """The vocab_size - 2 most frequent tokens; equal counts are ordered by the token itself, so the
        vocabulary does not depend on the order in which the counts were added up."""
        cls.check_vocab_size(vocab_size)
        frequent = heapq.nsmallest(vocab_size - 2, counts.items(), key=lambda item: (-item[1], item[0]))
        return cls([UNKNOWN, ENDOFTEXT] + [token for token, _ in frequent])

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        if self.eot_id is None or ENDOFTEXT not in text:
            return [self.stoi.get(token, 0) for token in self.pattern.findall(text)]  # the fast common case
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str, special: bool = True) -> tuple[list[int], list[int]]:
        """The ids of `text` and the position in `text` where each token starts; with `special` off a literal
        <|endoftext|> is ordinary text."""
        return _around_endoftext(text, self.eot_id if special else None, self._encode_words)

    def _encode_words(self, text: str) -> tuple[list[int], list[int]]:
        matches = list(self.pattern.finditer(text))
        return [self.stoi.get(match.group(), 0) for match in matches], [match.start() for match in matches]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.tokens[i] for i in _checked_ids(ids, self.vocab_size))

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokens": self.tokens})

    def save(self, folder: str | os.PathLike) -> Path:
        return write_text_atomically(Path(folder) / VOCAB_FILE, self.to_json())


def fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (keys sorted, no spaces): two tokenizers with the same
    fingerprint give the same ids. Stored in prepared data and checkpoints, and compared wherever ids made by
    one tokenizer meet a model trained with another (resume, validate, warm start, prepared data)."""
    canonical = json.dumps(json.loads(tokenizer.to_json()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def vocabulary(tokenizer: Tokenizer) -> list[str]:
    """The token each id stands for, as the tokenizer writes it (byte-level BPE: its own byte alphabet), so
    that two tokenizers of the same kind can be matched token by token (a warm start with a new vocabulary)."""
    if isinstance(tokenizer, CharTokenizer):
        return list(tokenizer.chars)
    if isinstance(tokenizer, WordTokenizer):
        return list(tokenizer.tokens)
    by_id = {index: token for token, index in tokenizer.tokenizer.get_vocab(with_added_tokens=True).items()}
    return [by_id.get(index, "") for index in range(tokenizer.vocab_size)]
