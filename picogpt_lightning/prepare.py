"""Text -> a tokenizer, train.bin/val.bin of token ids and meta.json, the way nanoGPT prepares data.

Everything streams (corpus.py reads the text in chunks), so a text far larger than memory prepares in a few
hundred MB: pass 1 reads the text and trains the tokenizer; pass 2 reads it again, splits it into train and
val, encodes it batch by batch (in worker processes on every core: encoding.py) and appends the ids to the
bins in the order of the text. Files are written under temporary names and renamed into place, and meta.json
is written last: a folder with meta.json is a finished preparation.

`cached_prepare` keeps one folder per (text, settings), named by their hash, so `picogpt fit` prepares
a text once and reuses it on every later run and on every rank of a distributed job. With `tokenizer_from` (a
given tokenizer, e.g. the checkpoint's own when a run resumes) the key holds that tokenizer's sha256 instead
of the settings that train one.

`FORMAT` is the version of this layout: a folder of another format is never reused (its cache key differs and
`load_prepared` refuses its meta.json), so the text is prepared again, once. A checkpoint trained on older data
resumes and validates with its own tokenizer (`tokenizer_from`). How the format changed: CHANGELOG.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
import numpy as np

from .corpus import TextStats, chunks, find_text_files, source_sha256, split_parts
from .corpus_formats import reading_key, relative_names, sizes_are_text_sizes
from .encoding import check_not_starting_worker, encoded_batches, word_counts
from .errors import PicoGPTError, warn
from .files import (FolderInUse, FolderLock, commit, make_folders, remove_empty_folders, remove_leftovers,
                    temporary_path, write_json_atomically)
from .prepared_checks import DamagedPreparation, add_missing_checksums, bin_checksums, check_bins, check_meta
from .progress import Progress
from .settings import PrepareSettings
from .tokenizer import BPE_FILE, VOCAB_FILE, BPETokenizer, CharTokenizer, Tokenizer, WordTokenizer, fingerprint
from .tokenizer_files import load_tokenizer
from .tokenizer_source import note_given_tokenizer, tokenizer_from_path

DEFAULT_CACHE_DIR = "data/prepared"
FORMAT = 2  # bump when the layout of a prepared folder changes; old caches are then prepared again (2: end-of-text)
TOKENIZER_FILES = (BPE_FILE, VOCAB_FILE)
PREPARED_FILES = ("meta.json", "train.bin", "val.bin", *TOKENIZER_FILES)
FIRST_PASS = {"char": "reading the characters of", "bpe": "training the BPE tokenizer on",
              "word": "counting the words of"}
NOT_IN_META = ("mode", "backend", "num_proc")  # num_proc: the ids are the same whatever the number of processes
CACHE_FOLDER = re.compile(r".+-[0-9a-f]{12}")  # NAME-<cache key>, as cached_prepare names its folders


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and ids


def _train_tokenizer(kind: str, vocab_size: int, text_chunks: Iterable[str], num_proc: int = 1,
                     size: int | None = None) -> Tokenizer:
    """BPE trains on the library's own threads; words are counted in `num_proc` processes (encoding.py)."""
    if kind == "char":
        return CharTokenizer.train(text_chunks)
    if kind == "bpe":
        return BPETokenizer.train(text_chunks, vocab_size)
    WordTokenizer.check_vocab_size(vocab_size)
    return WordTokenizer.from_counts(word_counts(text_chunks, num_proc, size), vocab_size)


def _check_characters(tokenizer: CharTokenizer, text_chunks: Iterable[str], source: str) -> None:
    """A char tokenizer given a text must know all its characters: ids for unknown ones do not exist."""
    unknown = sorted(set(CharTokenizer.train(text_chunks).chars) - set(tokenizer.chars))
    if unknown:
        shown = ", ".join(repr(char) for char in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise PicoGPTError(f"the text has {len(unknown)} character(s) that the char tokenizer of {source} does not "
                           f"know ({shown}): remove or replace them, or prepare without tokenizer_from")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the bins whenever every id fits in it, which covers GPT-2's 50,257 tokens."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _write_bins(folder: Path, tokenizer: Tokenizer, parts: Iterable[tuple[str, bool]], dtype: np.dtype,
                num_proc: int, progress: Progress) -> tuple[dict[str, Path], dict[str, int], int]:
    """Encode the parts into temporary train and val files (in num_proc processes, written in the order of the
    text); returns their paths, token counts and the largest id written (recorded in meta.json, so that
    loading can check it against the vocabulary for free)."""
    temps = {split: temporary_path(folder / f"{split}.bin") for split in ("train", "val")}
    counts = {"train": 0, "val": 0}
    max_id = -1
    try:
        with open(temps["train"], "xb") as train_file, open(temps["val"], "xb") as val_file:
            for chars, *ids in encoded_batches(tokenizer, parts, dtype, num_proc, progress.total):
                for split, file, tokens in (("train", train_file, ids[0]), ("val", val_file, ids[1])):
                    tokens.tofile(file)
                    counts[split] += len(tokens)
                    if len(tokens):
                        max_id = max(max_id, int(tokens.max()))
                progress.update(chars)
    except BaseException:
        for path in temps.values():
            path.unlink(missing_ok=True)
        raise
    return temps, counts, max_id


def _source_meta(text_path: str, files: list[Path], stats: TextStats) -> dict:
    return {
        "name": Path(text_path).name,
        "files": relative_names(files),
        "bytes": sum(path.stat().st_size for path in files),
        "chars": stats.text_chars,
        "end_of_text_markers": stats.markers,
        "sha256": source_sha256(files),
    }


def _make_writable_folder(folder: Path) -> list[Path]:
    """Create the folder (returning the folders created, for clean-up after a failure) and try a write: fail in
    a second, not after reading the text. An existing preparation in it is left alone until the new one is
    complete."""
    try:
        created = make_folders(folder)
        probe = temporary_path(folder / "probe")
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as error:
        raise _write_failed(folder, error) from None
    return created


def _write_failed(folder: Path, error: OSError) -> PicoGPTError:
    reason = error.strerror or str(error)
    return PicoGPTError(
        f"cannot write the prepared data to {folder} ({reason}): choose a writable folder with free space"
    )


# ---------------------------------------------------------------------------------------------------------------
# Public API


def prepare(text_path: str, out_dir: str, **settings) -> dict:
    """Prepare text_path into out_dir with the given `PrepareSettings` fields; returns the meta it wrote."""
    checked = PrepareSettings(**settings)
    given = tokenizer_from_path(checked.tokenizer_from) if checked.tokenizer_from is not None else None
    return _prepare(text_path, Path(out_dir), checked, given.kind if given else checked.tokenizer_kind(), given)


def _prepare(text_path: str, folder: Path, settings: PrepareSettings, kind: str, given: Tokenizer | None = None,
             wait_if_busy: bool = False, announce: str | None = None) -> dict:
    """Prepare under the folder's lock; what the folder held before is replaced only once the new preparation
    is complete, and a failure leaves no temporary file (and no folder it created) behind. A folder another
    process is preparing is refused, or with `wait_if_busy` reported by raising FolderInUse. With `given`, the
    text is encoded with that tokenizer instead of one trained on it."""
    check_not_starting_worker()
    files = find_text_files(text_path, settings.glob)
    created = _make_writable_folder(folder)
    try:
        with _locked(folder, wait_if_busy):
            remove_leftovers(folder)  # of a writer killed earlier: nobody else can be writing here now
            if announce:
                print(announce, flush=True)
            return _prepare_locked(text_path, files, folder, settings, kind, given)
    except BaseException:
        remove_empty_folders(created)
        raise


def _locked(folder: Path, wait_if_busy: bool) -> FolderLock:
    try:
        return FolderLock(folder).acquire()
    except FolderInUse as busy:
        if wait_if_busy:
            raise
        raise PicoGPTError(f"{folder} is being prepared by process {busy.pid}; wait for it to finish, or "
                           f"prepare into another folder") from None
    except OSError as error:
        raise _write_failed(folder, error) from None


def clean_abandoned(cache_dir: Path) -> None:
    """Remove what killed preparations left in the cache: folders without meta.json that nobody is writing."""
    if not cache_dir.is_dir():
        return
    for folder in cache_dir.iterdir():
        if not folder.is_dir() or not CACHE_FOLDER.fullmatch(folder.name) or (folder / "meta.json").exists():
            continue
        try:
            with FolderLock(folder):
                remove_leftovers(folder)
                for name in PREPARED_FILES:
                    (folder / name).unlink(missing_ok=True)
        except (FolderInUse, OSError):
            continue
        remove_empty_folders([folder])


def _prepare_locked(text_path: str, files: list[Path], folder: Path, settings: PrepareSettings, kind: str,
                    given: Tokenizer | None) -> dict:
    stats = TextStats()
    # Newly trained tokenizers have end-of-text; one given without it (an old checkpoint's) keeps its old text.
    end_of_text = settings.end_of_text and (given is None or given.eot_id is not None)
    if given is not None:
        note_given_tokenizer(given, settings.tokenizer_from, settings.end_of_text)
    first_pass = FIRST_PASS[kind] if given is None else "reading"
    size = sum(path.stat().st_size for path in files) if sizes_are_text_sizes(files) else None  # else: unknown
    with Progress(f"{first_pass} {text_path}", size) as progress:
        def observed() -> Iterator[str]:
            for chunk in stats.observe(chunks(files, warn_on_bad_bytes=True, end_of_text=end_of_text,
                                              text_field=settings.text_field)):
                yield chunk
                progress.update(stats.bytes - progress.done)

        if given is None:
            tokenizer = _train_tokenizer(kind, settings.vocab_size, observed(), settings.processes(), size)
        elif isinstance(given, CharTokenizer):
            _check_characters(given, observed(), settings.tokenizer_from)
            tokenizer = given
        else:
            for _ in observed():  # counts the text for the split; bpe and word encode any text
                pass
            tokenizer = given
    stats.check(text_path, settings.random_split)
    dtype = token_dtype(tokenizer.vocab_size)
    encoding = Progress(f"encoding {text_path} into train.bin and val.bin", stats.chars, unit="chars")
    parts = split_parts(files, stats, settings.val_fraction, settings.random_split, settings.split_seed,
                        end_of_text, settings.text_field)
    temps: dict[str, Path] = {}
    staging = temporary_path(folder / "tokenizer")  # a folder: the tokenizer saves itself by name into it
    try:
        temps, counts, max_id = _write_bins(folder, tokenizer, parts, dtype, settings.processes(), encoding)
        staging.mkdir()
        staged = tokenizer.save(staging)
        meta = {
            "format": FORMAT,
            "mode": "char" if kind == "char" else "token",
            "backend": kind,
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "max_id": max_id,
            "tokenizer_file": staged.name,
            "tokenizer_sha256": fingerprint(tokenizer),
            "checksums": {split: bin_checksums(temp) for split, temp in temps.items()},
            "source": _source_meta(text_path, files, stats),
            "settings": {key: value for key, value in asdict(settings).items() if key not in NOT_IN_META},
        }
        # Complete: now the old preparation (if any) is replaced. Without meta.json the folder reads as
        # unfinished, so a crash between these renames is never taken for a finished preparation.
        (folder / "meta.json").unlink(missing_ok=True)
        for split, temp in temps.items():
            commit(temp, folder / f"{split}.bin")
        commit(staged, folder / staged.name)
        for name in TOKENIZER_FILES:
            if name != staged.name:
                (folder / name).unlink(missing_ok=True)  # an earlier preparation's other kind of tokenizer
        write_json_atomically(folder / "meta.json", meta)  # last: its presence marks a finished preparation
    except OSError as error:
        raise _write_failed(folder, error) from None
    finally:
        encoding.close()
        for temp in temps.values():
            temp.unlink(missing_ok=True)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return meta


def _cache_key(files: list[Path], kind: str, settings: PrepareSettings, given: Tokenizer | None = None) -> str:
    """12 hex digits of sha256 over the files and the settings that change the result (not the ignored ones).

    A given tokenizer counts by its sha256 (what it is), not by where it was read from; the settings that
    would train one then play no part.
    """
    relevant = {
        "format": FORMAT,
        "kind": kind,
        "vocab_size": None if kind == "char" else settings.vocab_size,
        "val_fraction": settings.val_fraction,
        "random_split": settings.random_split,
        "split_seed": settings.split_seed if settings.random_split else None,
        "end_of_text": settings.end_of_text,
    }
    if given is not None:
        relevant.update(kind=None, vocab_size=None, tokenizer_sha256=fingerprint(given))
    relevant.update(reading_key(settings.glob, settings.text_field))
    return source_sha256(files, json.dumps(relevant, sort_keys=True).encode())[:12]


def _is_prepared(folder: Path, say_damage: bool = False) -> bool:
    """Whether the folder holds a finished, undamaged preparation; with `say_damage`, a damaged one is said in
    one line (it is then prepared again)."""
    if not (folder / "meta.json").exists():
        return False
    try:
        meta, _ = load_prepared(folder)
        if say_damage:
            add_missing_checksums(folder, meta)
    except DamagedPreparation as damage:
        if say_damage:
            warn(f"the prepared data in {folder} is damaged ({damage.reason}): preparing it again")
        return False
    except PicoGPTError:
        return False
    return True


def cached_prepare(
    text_path: str,
    cache_dir: str = DEFAULT_CACHE_DIR,
    *,
    is_writer: bool = True,
    wait_timeout: float = 3600.0,
    **settings,
) -> Path:
    """The folder under cache_dir that holds text_path prepared with these `PrepareSettings` fields, preparing
    it if needed. Only the writer (rank 0 of a distributed job) prepares; the other ranks wait for its meta.json.
    """
    settings = PrepareSettings(**settings)
    files = find_text_files(text_path, settings.glob)
    given = tokenizer_from_path(settings.tokenizer_from) if settings.tokenizer_from is not None else None
    kind = given.kind if given is not None else settings.tokenizer_kind(quiet=not is_writer)
    path = Path(text_path)
    name = path.stem if path.is_file() else path.name
    folder = Path(cache_dir) / f"{name}-{_cache_key(files, kind, settings, given)}"
    if _is_prepared(folder, say_damage=is_writer):
        return folder
    if is_writer:
        clean_abandoned(Path(cache_dir))
    deadline = time.monotonic() + wait_timeout
    said = False
    while not _is_prepared(folder):
        if is_writer:
            # Another process (a second run on the same text) may be preparing it: wait for that one.
            try:
                _prepare(text_path, folder, settings, kind, given, wait_if_busy=True,
                         announce=f"preparing {text_path} into {folder} (once: later runs with the same text and "
                                  f"settings reuse it)")
                return folder
            except FolderInUse as busy:
                if not said:
                    print(f"waiting for process {busy.pid}, which is preparing {folder}")
                    said = True
        elif time.monotonic() >= deadline:
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
        raise DamagedPreparation(folder, f"cannot read its meta.json: {error}") from None
    required = ("format", "vocab_size", "dtype", "train_tokens", "val_tokens", "tokenizer_file")
    if not isinstance(meta, dict) or any(key not in meta for key in required) or meta["format"] != FORMAT:
        raise PicoGPTError(f"{folder}/meta.json is damaged or from another version: delete the folder, prepare again")
    check_meta(folder, meta, token_dtype)
    tokenizer = load_tokenizer(folder / meta["tokenizer_file"])
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise DamagedPreparation(folder, f"{meta['tokenizer_file']} has {tokenizer.vocab_size} tokens but meta.json "
                                         f"says {meta['vocab_size']}")
    if meta.get("tokenizer_sha256") not in (None, fingerprint(tokenizer)):
        raise PicoGPTError(
            f"{folder / meta['tokenizer_file']} was changed after the data was prepared (it is not the tokenizer "
            f"that made these ids): prepare the text again"
        )
    if meta.get("max_id", -1) >= tokenizer.vocab_size:
        raise DamagedPreparation(folder, f"it holds token ids up to {meta['max_id']}, beyond its tokenizer's "
                                         f"{tokenizer.vocab_size} tokens")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        if not path.is_file():
            raise DamagedPreparation(folder, f"{path.name} is missing")
        size, expected = path.stat().st_size, meta[f"{split}_tokens"]
        if size != expected * itemsize:
            raise DamagedPreparation(folder, f"{path.name} has {size // itemsize} tokens but meta.json says {expected}")
    check_bins(folder, meta)
    return meta, tokenizer
