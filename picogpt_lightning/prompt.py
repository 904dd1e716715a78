"""Text in and out of a model: escapes typed on a command line, characters a model never saw, stop strings,
and the streaming decoder that turns generated ids into printable text.

Plain Python (no torch), shared by sampling, chat, evaluation, serving and the Python API.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from . import errors

# ----------------------------------------------------------------------------------------------- text in

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def read_escapes(text: str) -> str:
    r"""`\n`, `\t` and `\\` typed on a command line become a newline, a tab and a backslash."""
    return re.sub(r"\\([nt\\])", lambda match: _ESCAPES[match.group(1)], text)


# Stand-ins, best first, for characters that corpora written on different keyboards disagree on.
SIMILAR_CHARACTERS = {
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032`\u00b4", ("'", "\u2019")),
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", ('"', "\u201d", "'")),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", ("-", "\u2014", "\u2013")),
    **dict.fromkeys("\u00a0\u2009\u202f\t\n", (" ",)),
    "\u2026": ("...", "."),
    "'": ("\u2019", '"'),
    '"': ("\u201d", "'"),
    "-": ("\u2014", "\u2013"),
}


def _stand_in(char: str, known: set[str] | dict) -> str | None:
    """The closest known text for an unknown character: the other case, a similar mark, the letter without
    its accent; None when nothing fits."""
    stripped = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
    candidates = [char.swapcase(), char.lower(), char.upper(), *SIMILAR_CHARACTERS.get(char, ())]
    candidates += [stripped, stripped.swapcase()]
    for candidate in candidates:
        if candidate and candidate != char and all(c in known for c in candidate):
            return candidate
    return None


def fit_to_vocabulary(text: str, tokenizer) -> tuple[str, dict[str, str | None]]:
    """For a char tokenizer, `text` with each unknown character replaced by its stand-in or dropped.

    Returns the new text and {unknown character: stand-in or None when dropped}. Other tokenizers encode any
    text, so they get the text back unchanged.
    """
    if tokenizer.kind != "char":
        return text, {}
    known = tokenizer.stoi
    replacements: dict[str, str | None] = {}
    pieces = []
    for char in text:
        if char in known:
            pieces.append(char)
            continue
        if char not in replacements:
            replacements[char] = _stand_in(char, known)
        pieces.append(replacements[char] or "")
    return "".join(pieces), replacements


def describe_replacements(replacements: dict[str, str | None]) -> str:
    """One line naming each unknown character and what became of it."""
    parts = [
        f"{char!r} -> {stand_in!r}" if stand_in is not None else f"{char!r} dropped"
        for char, stand_in in replacements.items()
    ]
    return "characters the model never saw: " + ", ".join(parts)


_UNDECODABLE = re.compile("[\ud800-\udfff]")


def replace_undecodable(text: str) -> tuple[str, int]:
    """`text` with each byte that was not UTF-8 replaced by U+FFFD, and how many there were.

    Python hands such bytes of a command line or a pipe over as lone surrogates ("caf\\udce9" for the Latin-1
    "café"), which no tokenizer can encode and no terminal can print.
    """
    return _UNDECODABLE.subn("\ufffd", text)


def encode_prompt(text: str, tokenizer, warn: bool = True) -> tuple[str, list[int]]:
    """The prompt text as the model will see it, and its token ids.

    Bytes that are not UTF-8 are replaced by U+FFFD, then unknown characters are mapped, each with one warning
    line to stderr unless `warn` is off. The ids are never empty: an empty prompt becomes a newline if the model
    knows one (the usual start of a document), else token 0.
    """
    text, undecodable = replace_undecodable(text)
    if undecodable and warn:
        errors.warn(f"the input holds {undecodable} byte(s) that are not UTF-8; each was replaced by U+FFFD "
                    f"(save or type the text as UTF-8)")
    text, replacements = fit_to_vocabulary(text, tokenizer)
    if replacements and warn:
        errors.warn(describe_replacements(replacements))
    ids = list(tokenizer.encode(text)) if text else []
    if not ids:
        fitted, _ = fit_to_vocabulary("\n", tokenizer)
        ids = list(tokenizer.encode(fitted)) if fitted == "\n" else []
        ids = ids or [0]
    return text, ids


def read_stop_strings(stop: list[str] | str | None) -> list[str]:
    """Stop strings as given on a command line (one or a list, with escapes) as a list of plain strings."""
    stop = [stop] if isinstance(stop, str) else stop or []
    return [read_escapes(s) for s in stop]


def crop_note(prompt_length: int, block_size: int) -> str:
    return (
        f"note: the prompt is {prompt_length} tokens, longer than the model's context of {block_size}; "
        f"only its last {block_size} tokens are used"
    )


# ----------------------------------------------------------------------------------------------- text out


class StreamingDecoder:
    """Turns generated token ids into text as they come, holding back what is not final yet.

    Only the tokens since the text last ended on a whole character are decoded again at each step, so a
    character split over several byte-level BPE tokens is released once complete (never as a broken U+FFFD)
    and long outputs cost linear time. This relies on decoding being concatenation at character boundaries,
    true of our char, word and byte-level BPE tokenizers. Text that could be the start of a stop string is held
    back until it is known not to be one; a stop string ends the stream and is never released.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.pending_ids: list[int] = []
        self.complete_text = ""  # decoded text up to the last whole character
        self.text = ""
        self.released = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that is now safe to print (possibly empty)."""
        self.pending_ids.append(token_id)
        self.text = self.complete_text + self.tokenizer.decode(self.pending_ids)
        unfinished = len(self.text) - len(self.text.rstrip("\ufffd"))
        if not unfinished:
            self.complete_text, self.pending_ids = self.text, []
        stop_at = self._stop_position()
        if stop_at is not None:
            self.stopped = True
            return self._release(stop_at)
        end = len(self.text) - unfinished
        return self._release(end - self._partial_stop_length(end))

    def flush(self) -> str:
        """The held-back rest, at the end of generation (empty once a stop string was found)."""
        return "" if self.stopped else self._release(len(self.text))

    @property
    def output(self) -> str:
        """All text released so far."""
        return self.text[: self.released]

    def _release(self, end: int) -> str:
        end = max(end, self.released)
        delta = self.text[self.released : end]
        self.released = end
        return delta

    def _stop_position(self) -> int | None:
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, self.released - longest)
        found = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _partial_stop_length(self, end: int) -> int:
        """Length of the longest tail of text[:end] that begins some stop string."""
        tail = self.text[self.released : end]
        best = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(tail)), best, -1):
                if tail.endswith(stop[:size]):
                    best = size
                    break
        return best
