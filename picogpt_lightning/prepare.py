"""Text files -> a tokenizer, train.bin/val.bin of token ids and meta.json, the way nanoGPT prepares data.

Everything streams, so a text far larger than memory prepares in a few hundred MB:
pass 1 reads the text and trains the tokenizer; pass 2 reads it again, splits it into train and val,
encodes it piece by piece and appends the ids to the bins. Files are written under temporary names and
renamed into place, and meta.json is written last: a folder with meta.json is a finished preparation.

`cached_prepare` keeps one folder per (text, settings), named by their hash, so `picogpt fit` prepares
a text once and reuses it on every later run and on every rank of a distributed job.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
    bpe_available,
    load_tokenizer,
)

DEFAULT_CACHE_DIR = "data/prepared"
FORMAT = 1  # bump when the layout of a prepared folder changes; old caches are then prepared again
READ_BYTES = 1 << 20  # files are read in pieces of about 1 MB that end at a newline
LONGEST_LINE_BYTES = 16 << 20  # a line longer than this is cut anyway, so memory stays bounded
CHUNK_CHARS = 4096  # the unit that is encoded, and that random_split assigns to train or val
CHUNK_LOOKAHEAD = 17 * CHUNK_CHARS  # how much text _chunk_end may look at
ENCODE_BATCH_CHARS = 4 << 20  # chunks are encoded about 1,000 at a time: enough for every core
FILE_SEPARATOR = "\n\n"  # the files of a folder are joined with a blank line

# Cuts that the byte-level BPE pre-tokenizer (GPT-2's regex) never joins across, so encoding the pieces
# one by one gives the same ids as encoding the text at once: after a newline between two non-spaces, or
# before the last newline of a whitespace run that ends at a non-space (other than <|endoftext|>); within a
# long line, before a single space between two non-spaces. (The word tokenizer may split such a run in two.)
_SAFE_LINE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\s)(?=\n[^\s<])")
_SAFE_SPACE_CUT = re.compile(r"(?<=\S)(?= \S)")


# ---------------------------------------------------------------------------------------------------------------
# Reading the text


def find_text_files(text_path: str) -> list[Path]:
    """The file itself, or the .txt files of a folder (not its subfolders, not hidden files), sorted by name."""
    path = Path(text_path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PicoGPTError(f"{text_path} does not exist: pass a UTF-8 text file or a folder of .txt files")
    files = sorted(file for file in path.glob("*.txt") if file.is_file() and not file.name.startswith("."))
    if not files:
        raise PicoGPTError(f"{text_path} has no .txt files: put your text in files ending in .txt, or pass a file")
    return files


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _decode(data: bytes) -> tuple[str, bool]:
    """The text, and whether undecodable bytes had to be replaced."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


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


def _read_file(path: Path, warn: bool) -> Iterator[str]:
    warned = False
    try:
        with open(path, "rb") as file:
            for data in _byte_pieces(file):
                text, replaced = _decode(data)
                if replaced and warn and not warned:
                    _warn(f"{path} is not valid UTF-8; undecodable bytes were replaced with U+FFFD")
                    warned = True
                yield text
    except OSError as error:
        raise PicoGPTError(f"cannot read {path} ({error.strerror}): check the file and its permissions") from None


def _read_text(files: list[Path], warn: bool) -> Iterator[str]:
    for index, path in enumerate(files):
        if index:
            yield FILE_SEPARATOR
        yield from _read_file(path, warn)


def _chunks(files: list[Path], warn: bool = False) -> Iterator[str]:
    """The joined text of the files in chunks of about CHUNK_CHARS characters, each ending at a safe cut.

    Encoding the chunks one by one gives the same ids as encoding the whole text at once, and lets
    `encode_batch` encode many of them in parallel.
    """
    text = ""
    for piece in _read_text(files, warn):
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
    return space.start() if space else min(low + CHUNK_CHARS, len(text))


def _source_sha256(files: list[Path], extra: bytes = b"") -> str:
    """sha256 over each file's name and bytes (then extra), so renaming or editing a file changes it."""
    digest = hashlib.sha256()
    for path in files:
        try:
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as file:
                while block := file.read(READ_BYTES):
                    digest.update(block)
        except OSError as error:
            raise PicoGPTError(f"cannot read {path} ({error.strerror}): check the file and its permissions") from None
    digest.update(extra)
    return digest.hexdigest()


class _TextStats:
    """Counts what pass 1 streams past: characters, UTF-8 bytes, chunks, and whether any is not whitespace."""

    def __init__(self) -> None:
        self.chars = 0
        self.bytes = 0
        self.chunks = 0
        self.has_text = False

    def observe(self, chunks: Iterable[str]) -> Iterator[str]:
        for chunk in chunks:
            self.chars += len(chunk)
            self.bytes += len(chunk.encode("utf-8"))
            self.chunks += 1
            self.has_text = self.has_text or not chunk.isspace()
            yield chunk


# ---------------------------------------------------------------------------------------------------------------
# Settings, tokenizer and split


def _check_settings(mode: str, backend: str, vocab_size: int, val_fraction: float) -> None:
    if mode not in ("char", "token"):
        raise PicoGPTError(f"mode {mode!r} is unknown: use 'char' or 'token'")
    if mode == "token" and backend not in ("bpe", "word"):
        raise PicoGPTError(f"backend {backend!r} is unknown: use 'bpe' or 'word'")
    if mode == "token":
        (BPETokenizer if backend == "bpe" else WordTokenizer).check_vocab_size(vocab_size)
    if not 0 < val_fraction <= 0.5:
        raise PicoGPTError(f"val_fraction {val_fraction} is out of range: choose a value in (0, 0.5], e.g. 0.1")


def _usable_backend(mode: str, backend: str, quiet: bool = False) -> str:
    """The tokenizer kind that will be built: BPE falls back to words when `tokenizers` is not installed."""
    if mode == "char":
        return "char"
    if backend == "bpe" and not bpe_available():
        if not quiet:
            _warn("`tokenizers` is not installed, so the word tokenizer is used instead of BPE: pip install tokenizers")
        return "word"
    return backend


def _train_tokenizer(kind: str, vocab_size: int, chunks: Iterable[str]) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.train(chunks)
    if kind == "bpe":
        return BPETokenizer.train(chunks, vocab_size)
    return WordTokenizer.train(chunks, vocab_size)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the bins whenever every id fits in it, which covers GPT-2's 50,257 tokens."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


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
    return local


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


def _split_parts(
    files: list[Path], stats: _TextStats, val_fraction: float, random_split: bool, split_seed: int
) -> Iterator[tuple[str, bool]]:
    if random_split:
        return zip(_chunks(files), _random_val_chunks(stats.chunks, val_fraction, split_seed).tolist())
    val_start = min(max(int(stats.bytes * (1 - val_fraction)), 1), stats.bytes - 1)
    return _sequential_parts(_chunks(files), val_start, stats.bytes)


def _check_text(text_path: str, stats: _TextStats, random_split: bool) -> None:
    if not stats.has_text:
        raise PicoGPTError(f"{text_path} is empty or only whitespace: give it some text to learn from")
    if stats.chars < 2:
        raise PicoGPTError(f"{text_path} has a single character: it needs two or more, for train and for val")
    if random_split and stats.chunks < 2:
        raise PicoGPTError(
            f"{text_path} is too short for random_split ({stats.chars} characters make one "
            f"{CHUNK_CHARS // 1024} KB chunk): use random_split=False or give more text"
        )


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _temp_file(folder: Path, name: str) -> tuple[BinaryIO, Path]:
    """A new file to write `name` under a unique temporary name, renamed into place once complete."""
    temp = folder / f".{name}.{uuid.uuid4().hex[:12]}.tmp"
    return open(temp, "xb"), temp


def _batches(parts: Iterable[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    """Parts grouped into lists of about ENCODE_BATCH_CHARS characters, for encode_batch."""
    batch, size = [], 0
    for text, is_val in parts:
        batch.append((text, is_val))
        size += len(text)
        if size >= ENCODE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    """The ids of texts, concatenated. Characters go through CharTokenizer.encode_array: a Python int per
    character would cap char preparation near 18 MB/s (benchmarks/prepare_speed.py)."""
    if isinstance(tokenizer, CharTokenizer):
        arrays = [tokenizer.encode_array(text) for text in texts]
        return np.concatenate(arrays).astype(dtype) if arrays else np.empty(0, dtype=dtype)
    return np.fromiter(itertools.chain.from_iterable(tokenizer.encode_batch(texts)), dtype=dtype)


def _write_bins(
    folder: Path, tokenizer: Tokenizer, parts: Iterable[tuple[str, bool]], dtype: np.dtype
) -> tuple[dict[str, Path], dict[str, int]]:
    """Encode the parts into temporary train and val files; returns their paths and token counts."""
    temps: dict[str, Path] = {}
    counts = {"train": 0, "val": 0}
    try:
        train_file, temps["train"] = _temp_file(folder, "train.bin")
        with train_file:
            val_file, temps["val"] = _temp_file(folder, "val.bin")
            with val_file:
                for batch in _batches(parts):
                    for split, file in (("train", train_file), ("val", val_file)):
                        texts = [text for text, is_val in batch if is_val == (split == "val") and text]
                        tokens = _encode(tokenizer, texts, dtype)
                        tokens.tofile(file)
                        counts[split] += len(tokens)
    except BaseException:
        for path in temps.values():
            path.unlink(missing_ok=True)
        raise
    return temps, counts


def _write_json(path: Path, content: dict) -> None:
    file, temp = _temp_file(path.parent, path.name)
    try:
        with file:
            file.write(json.dumps(content, indent=2).encode("utf-8"))
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _source_meta(text_path: str, files: list[Path], stats: _TextStats) -> dict:
    return {
        "name": Path(text_path).name,
        "files": [path.name for path in files],
        "bytes": sum(path.stat().st_size for path in files),
        "chars": stats.chars,
        "sha256": _source_sha256(files),
    }


def _make_writable_folder(folder: Path) -> None:
    """Create the folder, mark it unfinished, and try a write: fail in a second, not after reading the text."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)
        probe, probe_path = _temp_file(folder, "probe")
        probe.close()
        probe_path.unlink()
    except OSError as error:
        raise _write_failed(folder, error) from None


def _write_failed(folder: Path, error: OSError) -> PicoGPTError:
    reason = error.strerror or str(error)
    return PicoGPTError(
        f"cannot write the prepared data to {folder} ({reason}): choose a writable folder with free space"
    )


# ---------------------------------------------------------------------------------------------------------------
# Public API


def prepare(
    text_path: str,
    out_dir: str,
    mode: str = "token",
    backend: str = "bpe",
    vocab_size: int = 8000,
    val_fraction: float = 0.1,
    random_split: bool = False,
    split_seed: int = 1337,
) -> dict:
    """Prepare text_path into out_dir (see `prepare_cli` for the settings) and return the meta it wrote."""
    _check_settings(mode, backend, vocab_size, val_fraction)
    files = find_text_files(text_path)
    kind = _usable_backend(mode, backend)
    folder = Path(out_dir)
    _make_writable_folder(folder)
    stats = _TextStats()
    tokenizer = _train_tokenizer(kind, vocab_size, stats.observe(_chunks(files, warn=True)))
    _check_text(text_path, stats, random_split)
    dtype = token_dtype(tokenizer.vocab_size)
    parts = _split_parts(files, stats, val_fraction, random_split, split_seed)
    temps: dict[str, Path] = {}
    try:
        temps, counts = _write_bins(folder, tokenizer, parts, dtype)
        tokenizer_path = tokenizer.save(folder)
        for split, temp in temps.items():
            os.replace(temp, folder / f"{split}.bin")
        meta = {
            "format": FORMAT,
            "mode": mode,
            "backend": kind,
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "tokenizer_file": tokenizer_path.name,
            "source": _source_meta(text_path, files, stats),
            "settings": {
                "val_fraction": val_fraction,
                "random_split": random_split,
                "split_seed": split_seed,
                "vocab_size": vocab_size,
            },
        }
        _write_json(folder / "meta.json", meta)  # last: its presence marks a finished preparation
    except OSError as error:
        raise _write_failed(folder, error) from None
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    return meta


def _cache_key(files: list[Path], kind: str, settings: dict) -> str:
    """12 hex digits of sha256 over the files and the settings that change the result (not the ignored ones)."""
    relevant = {
        "format": FORMAT,
        "kind": kind,
        "vocab_size": None if kind == "char" else settings["vocab_size"],
        "val_fraction": settings["val_fraction"],
        "random_split": settings["random_split"],
        "split_seed": settings["split_seed"] if settings["random_split"] else None,
    }
    return _source_sha256(files, json.dumps(relevant, sort_keys=True).encode())[:12]


def _is_prepared(folder: Path) -> bool:
    if not (folder / "meta.json").exists():
        return False
    try:
        load_prepared(folder)
    except PicoGPTError:
        return False
    return True


def _settings(
    mode: str = "token",
    backend: str = "bpe",
    vocab_size: int = 8000,
    val_fraction: float = 0.1,
    random_split: bool = False,
    split_seed: int = 1337,
) -> dict:
    """prepare's settings with their defaults filled in; an unknown name is a TypeError, as in a call."""
    _check_settings(mode, backend, vocab_size, val_fraction)
    return {
        "mode": mode,
        "backend": backend,
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "random_split": random_split,
        "split_seed": split_seed,
    }


def cached_prepare(
    text_path: str,
    cache_dir: str = DEFAULT_CACHE_DIR,
    *,
    is_writer: bool = True,
    wait_timeout: float = 3600.0,
    **settings,
) -> Path:
    """The folder under cache_dir that holds text_path prepared with these settings, preparing it if needed.

    Only the writer (rank 0 of a distributed job) prepares; the other ranks wait for its meta.json.
    """
    settings = _settings(**settings)
    files = find_text_files(text_path)
    kind = _usable_backend(settings["mode"], settings["backend"], quiet=not is_writer)
    path = Path(text_path)
    name = path.stem if path.is_file() else path.name
    folder = Path(cache_dir) / f"{name}-{_cache_key(files, kind, settings)}"
    if _is_prepared(folder):
        return folder
    if is_writer:
        print(f"preparing {text_path} into {folder} (once: later runs with the same text and settings reuse it)")
        if kind == "word":  # the fallback has been announced already
            settings["backend"] = "word"
        prepare(text_path, str(folder), **settings)
        return folder
    deadline = time.monotonic() + wait_timeout
    while not _is_prepared(folder):
        if time.monotonic() >= deadline:
            raise PicoGPTError(
                f"waited {wait_timeout:.0f} s for rank 0 to prepare {folder}: check rank 0's output for an error, "
                "or run `picogpt prepare` first"
            )
        time.sleep(min(1.0, wait_timeout))
    return folder


def load_prepared(folder: str | os.PathLike) -> tuple[dict, Tokenizer]:
    """meta.json and the tokenizer of a prepared folder, after checking that the bins match the meta."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PicoGPTError(f"{folder} has no meta.json: it is not a finished preparation; prepare the text") from None
    except (OSError, ValueError) as error:
        raise PicoGPTError(f"cannot read {folder}/meta.json ({error}): delete the folder and prepare again") from None
    required = ("format", "vocab_size", "dtype", "train_tokens", "val_tokens", "tokenizer_file")
    if not isinstance(meta, dict) or any(key not in meta for key in required) or meta["format"] != FORMAT:
        raise PicoGPTError(f"{folder}/meta.json is damaged or from another version: delete the folder, prepare again")
    tokenizer = load_tokenizer(folder / meta["tokenizer_file"])
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise PicoGPTError(
            f"{folder / meta['tokenizer_file']} has {tokenizer.vocab_size} tokens but meta.json says "
            f"{meta['vocab_size']}: the preparation is damaged; delete the folder and run again"
        )
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        if not path.is_file():
            raise PicoGPTError(f"{path} is missing: the preparation is damaged; delete the folder and run again")
        size, expected = path.stat().st_size, meta[f"{split}_tokens"]
        if size != expected * itemsize:
            raise PicoGPTError(
                f"{path} has {size // itemsize} tokens but meta.json says {expected}: "
                "the preparation is damaged; delete the folder and run again"
            )
    return meta, tokenizer


def open_bins(folder: str | os.PathLike, meta: dict) -> tuple[np.memmap, np.memmap]:
    """Read-only memory maps of train.bin and val.bin: the OS pages in only the blocks that are sampled."""
    folder = Path(folder)
    train = np.memmap(folder / "train.bin", dtype=meta["dtype"], mode="r")
    val = np.memmap(folder / "val.bin", dtype=meta["dtype"], mode="r")
    return train, val


def prepare_cli(
    text_path: str,
    out_dir: str | None = None,
    mode: Literal["char", "token"] = "token",
    backend: Literal["bpe", "word"] = "bpe",
    vocab_size: int = 8000,
    val_fraction: float = 0.1,
    random_split: bool = False,
    split_seed: int = 1337,
) -> None:
    """Turn text into a tokenizer and train.bin/val.bin of token ids, ready for `picogpt fit`.

    Args:
        text_path: A UTF-8 text file, or a folder whose .txt files are joined with a blank line between them.
        out_dir: Where to write. By default the cache folder that `picogpt fit` looks for, so fit reuses it.
        mode: 'char' for one token per character (vocab_size and backend are ignored), 'token' for subwords.
        backend: In token mode, 'bpe' (byte-level BPE, needs `tokenizers`) or 'word' (pure Python fallback).
        vocab_size: The number of tokens to learn in token mode (bpe: 258 or more, word: 2 or more).
        val_fraction: The share of the text held out for validation, in (0, 0.5].
        random_split: Hold out random 4 KB chunks instead of the end of the text.
        split_seed: The seed that picks the chunks when random_split is on.
    """
    settings = _settings(mode, backend, vocab_size, val_fraction, random_split, split_seed)
    if out_dir is None:
        folder = cached_prepare(text_path, **settings)
        meta, _ = load_prepared(folder)
    else:
        folder, meta = Path(out_dir), prepare(text_path, out_dir, **settings)
    source = meta["source"]
    print(f"text:      {text_path} ({len(source['files'])} file(s), {source['chars']:,} characters)")
    print(f"tokenizer: {meta['backend']}, {meta['vocab_size']:,} tokens ({meta['tokenizer_file']})")
    print(f"tokens:    {meta['train_tokens']:,} train, {meta['val_tokens']:,} val, stored as {meta['dtype']}")
    print(f"saved to:  {folder}")
