"""Corpora as they come: the files of a folder (searched recursively), and the documents each file holds.

A `.txt` or `.md` file is one document; each line of a JSON lines file (`.jsonl`) and each row of a Parquet
file (`.parquet`) is one, its text taken from the field or column `text_field`. Any of them may be gzipped
(`name.jsonl.gz`). corpus.py joins the documents (a blank line between them, each ended by end-of-text) exactly
as it joins the `.txt` files of a folder, so the same text gives the same ids in every format.

Everything streams: text files in pieces, JSON lines a line at a time, Parquet a batch of rows at a time (a
gzipped Parquet file, which needs random access, is first decompressed to a temporary file). pyarrow is needed
only for Parquet, and imported only when a Parquet file is read.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import PicoGPTError, warn

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES  # each also gzipped: name.jsonl.gz
DEFAULT_TEXT_FIELD = "text"
PARQUET_BATCH_ROWS = 1024  # rows read at a time: memory stays at a batch of documents
READ_BUFFER_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------------------------
# Finding


def _format_suffix(path: Path) -> str:
    """The suffix that says how the file is read: `.jsonl` for both data.jsonl and data.jsonl.gz."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def is_supported(path: Path) -> bool:
    return _format_suffix(path) in SUPPORTED


def find_files(folder: Path, glob: str | None) -> list[Path]:
    """The files under `folder`, at any depth, that `glob` matches (default: every supported file), hidden
    files and folders left out, in the order of their paths (so the text is joined in the same order on every
    machine)."""
    found = []
    for path in folder.rglob(glob or "*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if glob is not None or is_supported(path):
            found.append(path)
    if not found:
        wanted = f"--data.glob {glob!r}" if glob is not None else (
            f"no {', '.join(SUPPORTED)} file (plain or .gz)")
        raise PicoGPTError(f"{folder} has no file to read ({wanted}, searched in every subfolder): put your text "
                           f"in such files, pass a file, or set --data.glob")
    return sorted(found, key=lambda path: path.relative_to(folder).parts)


def relative_names(files: list[Path]) -> list[str]:
    """Each file's path from the folder that holds them all: its name for one file or a flat folder."""
    if len(files) == 1:
        return [files[0].name]
    root = os.path.commonpath([str(path.parent) for path in files])
    return [Path(os.path.relpath(path, root)).as_posix() for path in files]


def sizes_are_text_sizes(files: list[Path]) -> bool:
    """Whether the files' sizes on disk are the size of their text (not compressed, not records)."""
    return all(_format_suffix(path) in TEXT_SUFFIXES and path.suffix != ".gz" for path in files)


def reading_key(glob: str | None, text_field: str) -> dict:
    """The reading settings that can change the text read, for the cache key: none at their defaults, so the key of a .txt file or folder is what it was before these settings existed."""
    key = {}
    if glob is not None:
        key["glob"] = glob
    if text_field != DEFAULT_TEXT_FIELD:
        key["text_field"] = text_field
    return key


# ---------------------------------------------------------------------------------------------------------------
# Reading


def decode_utf8(data: bytes) -> tuple[str, bool]:
    """The text, and whether undecodable bytes had to be replaced."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


@contextmanager
def opened(path: Path) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed when its name ends in .gz; a failed read is one line naming the file."""
    try:
        with open(path, "rb") as raw:
            if path.suffix != ".gz":
                yield raw
                return
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield unzipped
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise PicoGPTError(f"{path} is not complete gzip data ({error}): compress it again with gzip, or remove "
                           f".gz from its name if it is not compressed") from None
    except OSError as error:
        raise PicoGPTError(f"cannot read {path} ({error.strerror or error}): check the file and its "
                           f"permissions") from None


def record_documents(path: Path, text_field: str, warn_on_bad_bytes: bool) -> Iterator[str] | None:
    """The texts of a JSON lines or Parquet file's records, one per document; None for a text file. With
    `warn_on_bad_bytes` (the first of the two passes over the text), what is replaced or left out is said."""
    suffix = _format_suffix(path)
    if suffix in JSONL_SUFFIXES:
        return _jsonl_texts(path, text_field, warn_on_bad_bytes)
    if suffix in PARQUET_SUFFIXES:
        return _parquet_texts(path, text_field, warn_on_bad_bytes)
    return None


def _jsonl_texts(path: Path, text_field: str, warn_on_bad_bytes: bool) -> Iterator[str]:
    warned = False
    with opened(path) as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            text, replaced = decode_utf8(line)
            if replaced and warn_on_bad_bytes and not warned:
                warn(f"{path} is not valid UTF-8; undecodable bytes were replaced with U+FFFD")
                warned = True
            yield _record_text(text, path, number, text_field)


def _record_text(line: str, path: Path, number: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise PicoGPTError(f"{path} line {number} is not JSON ({getattr(error, 'msg', error)}): each line of a "
                           f"JSON lines file must be one JSON object") from None
    if not isinstance(record, dict) or text_field not in record:
        raise PicoGPTError(f"{path} line {number} has no {text_field!r} field: set --data.text_field to the field "
                           f"that holds the text")
    text = record[text_field]
    if not isinstance(text, str):
        raise PicoGPTError(f"{path} line {number}: its {text_field!r} field is {type(text).__name__}, not a string; "
                           f"set --data.text_field to the field that holds the text")
    return text


def _import_parquet():
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise PicoGPTError("reading Parquet files needs pyarrow: pip install picogpt_lightning[parquet] "
                           "(or pip install pyarrow)") from None
    return parquet


@contextmanager
def _seekable(path: Path) -> Iterator[Path]:
    """The Parquet file itself, or a gzipped one decompressed to a temporary file (Parquet needs to seek)."""
    if path.suffix != ".gz":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="picogpt-parquet-") as folder:
        plain = Path(folder) / path.stem
        with opened(path) as source, open(plain, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        yield plain


def _parquet_texts(path: Path, column: str, say_skipped: bool) -> Iterator[str]:
    parquet = _import_parquet()
    import pyarrow as arrow

    with _seekable(path) as plain:
        try:
            # Streamed reads of 1 MB, not whole column chunks buffered ahead: memory stays at a batch of rows.
            file = parquet.ParquetFile(plain, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
        except (arrow.ArrowException, OSError) as error:
            raise PicoGPTError(f"{path} is not a readable Parquet file ({error}): check the file") from None
        schema = file.schema_arrow
        if column not in schema.names:
            raise PicoGPTError(f"{path} has no column {column!r} (its columns: {', '.join(schema.names)}): set "
                               f"--data.text_field to the column that holds the text")
        kind = schema.field(column).type
        if not (arrow.types.is_string(kind) or arrow.types.is_large_string(kind)):
            raise PicoGPTError(f"{path}: column {column!r} holds {kind}, not text; set --data.text_field to the "
                               f"column that holds the text")
        empty = 0
        for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    empty += 1
                else:
                    yield text
        if empty and say_skipped:
            warn(f"{path}: {empty:,} row(s) have no {column!r} (null) and were left out")
