"""The text a model learns from: finding the files, reading them in pieces, and splitting train from val.

Nothing here holds a whole text in memory. Files are read in pieces of about a megabyte that end at a newline,
their documents joined with a blank line between them (a text file is one document, each record of a JSON lines
or Parquet file one: corpus_formats.py) and cut into chunks of about CHUNK_CHARS
characters at places where the byte-level BPE pre-tokenizer never joins two tokens, so that encoding chunk by
chunk gives the same ids as encoding the whole text. The split assigns chunks (random split) or a byte offset
snapped to a line end (sequential split) to val.

With `end_of_text`, each document ends with `<|endoftext|>`, as the `qa` chat template ends each answer, so a
model learns where a text (or an answer) stops: every document, and within one every question/answer pair the
text marks, a "Q: ..." line followed by an "A: ..." line that ends a paragraph, which becomes
"A: ...<|endoftext|>" followed by the blank line, exactly the qa template's rendering of a conversation.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .corpus_formats import DEFAULT_TEXT_FIELD, decode_utf8, find_files, opened, record_documents, relative_names
from .errors import PicoGPTError, warn
from .files import not_found
from .tokenizer import ENDOFTEXT

READ_BYTES = 1 << 20  # files are read in pieces of about 1 MB that end at a newline
LONGEST_LINE_BYTES = 16 << 20  # a line longer than this is cut anyway, so memory stays bounded
CHUNK_CHARS = 4096  # the unit that is encoded, and that random_split assigns to train or val
CHUNK_LOOKAHEAD = 17 * CHUNK_CHARS  # how much text _chunk_end may look at
FILE_SEPARATOR = "\n\n"  # the files of a folder are joined with a blank line

# Cuts that the byte-level BPE pre-tokenizer (GPT-2's regex) never joins across, so encoding the pieces
# one by one gives the same ids as encoding the text at once: after a newline between two non-spaces, or
# before the last newline of a whitespace run that ends at a non-space (other than <|endoftext|>); within a
# long line, before a single space between two non-spaces. (The word tokenizer may split such a run in two.)
_SAFE_LINE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\s)(?=\n[^\s<])")
_SAFE_SPACE_CUT = re.compile(r"(?<=\S)(?= \S)")
# A question/answer pair whose answer ends a paragraph (the blank line is looked at, not taken); at the end of
# a document the paragraph also ends at the end of the text.
_ANSWER = r"^Q:[^\r\n]*\r?\nA:[^\r\n]*"
_ANSWER_END = re.compile(_ANSWER + r"(?=\r?\n\r?\n)", re.MULTILINE)
_LAST_ANSWER_END = re.compile(_ANSWER + r"(?=\r?\n\r?\n|\s*\Z)", re.MULTILINE)


# ---------------------------------------------------------------------------------------------------------------
# Finding and reading


def find_text_files(text_path: str, glob: str | None = None) -> list[Path]:
    """The file itself, or the files of a folder and its subfolders that `glob` matches (default: every .txt,
    .md, .jsonl and .parquet file, plain or gzipped; not hidden ones), in the order of their paths."""
    path = Path(text_path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PicoGPTError(f"{text_path} {not_found(path)}: pass a text file or a folder of text, JSON lines or "
                           f"Parquet files")
    return find_files(path, glob)


def _last_char_start(data: bytes) -> int:
    """Where the last UTF-8 character of data begins: cutting there never splits a character."""
    start = len(data) - 1
    while start > 0 and len(data) - start < 4 and data[start] & 0xC0 == 0x80:
        start -= 1
    return start


def _byte_pieces(file) -> Iterator[bytes]:
    """Pieces of about READ_BYTES that end at a newline, or at a character edge inside a very long line."""
    pending = b""
    while block := file.read(READ_BYTES):
        pending += block
        cut = pending.rfind(b"\n") + 1
        if cut == 0 and len(pending) >= LONGEST_LINE_BYTES:
            cut = _last_char_start(pending)
        if cut:
            yield pending[:cut]
            pending = pending[cut:]
    if pending:
        yield pending


def _read_file(path: Path, warn_on_bad_bytes: bool) -> Iterator[str]:
    warned = False
    with opened(path) as file:
        for data in _byte_pieces(file):
            text, replaced = decode_utf8(data)
            if replaced and warn_on_bad_bytes and not warned:
                warn(f"{path} is not valid UTF-8; undecodable bytes were replaced with U+FFFD")
                warned = True
            yield text


def _documents(files: list[Path], warn_on_bad_bytes: bool, text_field: str) -> Iterator[Iterable[str]]:
    """Each document's pieces: a text file is one document, each record of a JSON lines or Parquet file one."""
    for path in files:
        records = record_documents(path, text_field, warn_on_bad_bytes)
        if records is None:
            yield _read_file(path, warn_on_bad_bytes)
        else:
            yield from ([text] for text in records)


def _read_text(files: list[Path], warn_on_bad_bytes: bool, end_of_text: bool = False,
               text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    for index, pieces in enumerate(_documents(files, warn_on_bad_bytes, text_field)):
        if index:
            yield FILE_SEPARATOR
        yield from end_document(pieces) if end_of_text else pieces


def _mark_answers(text: str, pattern: re.Pattern) -> str:
    """`text` with <|endoftext|> after every answer `pattern` finds (unless the text already has one there)."""
    return pattern.sub(lambda found: found.group() + ("" if found.group().endswith(ENDOFTEXT) else ENDOFTEXT), text)


def _undecided_start(text: str) -> int:
    """Where the lines start that the text after `text` may still make part of a marked pair: the last two
    complete lines and the unfinished one (an answer on the last complete line may yet be followed by a blank
    line, or the unfinished line be the answer, and each needs the question line before it)."""
    last = text.rfind("\n")
    before = text.rfind("\n", 0, max(last, 0))
    return text.rfind("\n", 0, max(before, 0)) + 1 if before != -1 else 0


def end_document(pieces: Iterable[str]) -> Iterator[str]:
    """One document's pieces with <|endoftext|> after each answer that ends a paragraph and at the end.

    Streams: only the last lines are held back until the next piece shows how they continue, so memory stays
    at a piece and a few lines. The end-of-text of the whole document goes before its trailing whitespace.
    """
    pending = ""
    open_text = False  # whether text was given out since the last end-of-text
    for piece in pieces:
        text = _mark_answers(pending + piece, _ANSWER_END)
        cut = _undecided_start(text)
        content_end = len(text[:cut].rstrip())
        if cut - content_end < CHUNK_CHARS:  # keep a short whitespace run too: the end-of-text may go before it
            cut = content_end
        if cut:
            head = text[:cut].rstrip()
            if head:
                open_text = not head.endswith(ENDOFTEXT)
            yield text[:cut]
        pending = text[cut:]
    text = _mark_answers(pending, _LAST_ANSWER_END)
    body = text.rstrip()
    if body:
        open_text = not body.endswith(ENDOFTEXT)
    yield body + (ENDOFTEXT if open_text else "") + text[len(body) :]


def chunks(files: list[Path], warn_on_bad_bytes: bool = False, end_of_text: bool = False,
           text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """The joined text of the files in chunks of about CHUNK_CHARS characters, each ending at a safe cut.

    Encoding the chunks one by one gives the same ids as encoding the whole text at once, and lets
    `encode_batch` encode many of them in parallel. With `end_of_text`, each document ends with <|endoftext|>
    (see the top of this file).
    """
    text = ""
    for piece in _read_text(files, warn_on_bad_bytes, end_of_text, text_field):
        text += piece
        start = 0
        while len(text) - start >= CHUNK_LOOKAHEAD:
            cut = _chunk_end(text, start)
            yield text[start:cut]
            start = cut
        text = text[start:]
    start = 0
    while start < len(text):
        cut = _chunk_end(text, start)
        yield text[start:cut]
        start = cut


def _chunk_end(text: str, start: int) -> int:
    """Where the chunk that begins at start ends: a safe line cut, else any newline, else a safe space cut."""
    low = start + CHUNK_CHARS
    if low >= len(text):
        return len(text)
    safe = _SAFE_LINE_CUT.search(text, low, low + CHUNK_CHARS)
    if safe:
        return safe.start()
    newline = text.find("\n", low, start + CHUNK_LOOKAHEAD)
    if newline != -1:
        return newline + 1
    space = _SAFE_SPACE_CUT.search(text, low, low + CHUNK_CHARS)
    if space:
        return space.start()
    # A long run without spaces or newlines is cut anywhere, but never inside <|endoftext|>.
    return outside_endoftext(text, min(low + CHUNK_CHARS, len(text)))


def outside_endoftext(text: str | bytes, cut: int) -> int:
    """`cut`, or the edge of the <|endoftext|> literal it would split: the literal is one token."""
    literal = ENDOFTEXT if isinstance(text, str) else ENDOFTEXT.encode()
    inside = text.find(literal, max(0, cut - len(literal) + 1), cut + len(literal) - 1)
    if inside == -1 or inside == cut:
        return cut
    return inside if inside > 0 else len(literal)


def source_sha256(files: list[Path], extra: bytes = b"") -> str:
    """sha256 over each file's name (its path from the folder that holds them all) and bytes (then extra), so
    renaming, moving or editing a file changes it."""
    digest = hashlib.sha256()
    for path, name in zip(files, relative_names(files)):
        try:
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as file:
                while block := file.read(READ_BYTES):
                    digest.update(block)
        except OSError as error:
            raise PicoGPTError(f"cannot read {path} ({error.strerror}): check the file and its permissions") from None
    digest.update(extra)
    return digest.hexdigest()


class TextStats:
    """Counts what a pass over the chunks streams past: characters, UTF-8 bytes, chunks, end-of-text markers,
    and whether any chunk is not whitespace."""

    def __init__(self) -> None:
        self.chars = 0
        self.bytes = 0
        self.chunks = 0
        self.markers = 0
        self.has_text = False

    @property
    def text_chars(self) -> int:
        """The characters of the text itself: each <|endoftext|> (one token) is left out, not counted as 13."""
        return self.chars - self.markers * len(ENDOFTEXT)

    def observe(self, chunks: Iterable[str]) -> Iterator[str]:
        for chunk in chunks:
            self.chars += len(chunk)
            self.markers += chunk.count(ENDOFTEXT)
            self.bytes += len(chunk.encode("utf-8"))
            self.chunks += 1
            self.has_text = self.has_text or not chunk.isspace()
            yield chunk

    def check(self, text_path: str, random_split: bool) -> None:
        """Refuse a text that cannot give both a train and a val split."""
        if not self.has_text:
            raise PicoGPTError(f"{text_path} is empty or only whitespace: give it some text to learn from")
        if self.chars < 2:
            raise PicoGPTError(f"{text_path} has a single character: it needs two or more, for train and for val")
        if random_split and self.chunks < 2:
            raise PicoGPTError(
                f"{text_path} is too short for random_split ({self.chars} characters make one "
                f"{CHUNK_CHARS // 1024} KB chunk): use random_split=False or give more text"
            )


# ---------------------------------------------------------------------------------------------------------------
# Splitting


def _random_val_chunks(chunk_count: int, val_fraction: float, split_seed: int) -> np.ndarray:
    """For each chunk, whether it goes to val; at least one chunk goes to each side."""
    draws = np.random.default_rng(split_seed).random(chunk_count)
    in_val = draws < val_fraction
    if not in_val.any():
        in_val[draws.argmin()] = True
    if in_val.all():
        in_val[draws.argmax()] = False
    return in_val


def _snap_to_line(data: bytes, local: int, is_last: bool) -> int:
    """A cut near byte `local` of one chunk: the next line end, else the previous one, else a character edge."""
    forward = data.find(b"\n", local)
    if forward != -1 and (forward + 1 < len(data) or not is_last):
        return forward + 1
    backward = data.rfind(b"\n", 0, local)
    if backward != -1:
        return backward + 1
    while local > 1 and data[local] & 0xC0 == 0x80:  # never split a character
        local -= 1
    return outside_endoftext(data, local)


def _sequential_parts(chunks: Iterable[str], val_start: int, total_bytes: int) -> Iterator[tuple[str, bool]]:
    """(text, is_val) with everything from about byte val_start, snapped to a line boundary, going to val."""
    offset = 0
    for chunk in chunks:
        data = chunk.encode("utf-8")
        end = offset + len(data)
        if end <= val_start or offset >= val_start:
            yield chunk, offset >= val_start
        else:
            cut = _snap_to_line(data, val_start - offset, is_last=end == total_bytes)
            yield data[:cut].decode("utf-8"), False
            yield data[cut:].decode("utf-8"), True
        offset = end


def split_parts(
    files: list[Path], stats: TextStats, val_fraction: float, random_split: bool, split_seed: int,
    end_of_text: bool = False, text_field: str = DEFAULT_TEXT_FIELD,
) -> Iterator[tuple[str, bool]]:
    """The text again, as (text, is_val) parts: the last val_fraction of it, or seeded random chunks."""
    text = chunks(files, end_of_text=end_of_text, text_field=text_field)
    if random_split:
        return zip(text, _random_val_chunks(stats.chunks, val_fraction, split_seed).tolist())
    val_start = min(max(int(stats.bytes * (1 - val_fraction)), 1), stats.bytes - 1)
    return _sequential_parts(text, val_start, stats.bytes)
