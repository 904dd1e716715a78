"""Checks that a prepared folder is what its meta.json says, before anything trains on it.

Every field of meta.json is checked for type and range (a `"dtype": "float16"` read every uint16 id as a float
near 0), and each bin against a checksum written with it (ids overwritten on disk were trained on silently).

What the check costs decides how it hashes (benchmarks/prepared_check.py, docs/benchmarks.md): blake2b read
0.22 GiB/s on one core of a loaded 2-core machine, so a bin of up to FULL_CHECK_BYTES (64 MiB, 32M uint16 ids:
every corpus the configs ship) is hashed whole each time the cache is used, 0.3 s at worst against a tiny run's
~11 s start-up (the 80 KB bins of a 40 KB text: 0.14 ms). A larger bin would cost seconds on each start-up, so it
is checked by its size and the hash of SAMPLE_BLOCKS blocks spread evenly over it (16 MiB read whatever its
size, 0.06 s): that catches a truncation, a file replaced or largely overwritten, not a few flipped bytes
between two samples. The whole-file hash is stored too, for `verify_bin(..., whole=True)`; within one process a
bin already checked (same size, time and inode) is not hashed again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .errors import PicoGPTError
from .files import write_json_atomically

FULL_CHECK_BYTES = 64 << 20
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 256 << 10
READ_BYTES = 4 << 20
DIGEST_BYTES = 16  # 128 bits: against damage, not against an attacker who can also edit meta.json

MODES = ("char", "token")
_verified: dict[tuple, str] = {}  # (path, size, mtime, inode) -> digest already checked by this process


class DamagedPreparation(PicoGPTError):
    """A prepared folder whose meta.json or bins are damaged; `reason` says what, without the advice."""

    def __init__(self, folder: Path, reason: str):
        super().__init__(f"{folder}: {reason}: the preparation is damaged; delete the folder and prepare again")
        self.reason = reason


def new_hash():
    return hashlib.blake2b(digest_size=DIGEST_BYTES)


def _whole_digest(path: Path) -> str:
    digest = new_hash()
    with open(path, "rb") as file:
        while block := file.read(READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def sampled_digest(path: Path) -> str:
    """The hash of SAMPLE_BLOCKS blocks at evenly spaced offsets (first and last included), and of the size."""
    size = path.stat().st_size
    digest = new_hash()
    digest.update(str(size).encode())
    with open(path, "rb") as file:
        last = max(0, size - SAMPLE_BLOCK_BYTES)
        for index in range(SAMPLE_BLOCKS):
            file.seek(last * index // (SAMPLE_BLOCKS - 1))
            digest.update(file.read(SAMPLE_BLOCK_BYTES))
    return digest.hexdigest()


def bin_checksums(path: Path) -> dict:
    """What meta.json stores for a freshly written bin: its whole-file hash and its sampled one (reading back
    what is on disk costs a fraction of encoding it)."""
    return {"blake2b": _whole_digest(path), "sampled_blake2b": sampled_digest(path)}


def verify_bin(path: Path, stored: dict, whole: bool | None = None) -> None:
    """Raise a damage reason (ValueError) when the bin differs from its stored checksums. `whole` None: hash it
    whole when it is at most FULL_CHECK_BYTES, else sample it."""
    status = path.stat()
    whole = status.st_size <= FULL_CHECK_BYTES if whole is None else whole
    key = "blake2b" if whole else "sampled_blake2b"
    memo = (str(path.absolute()), key, status.st_size, status.st_mtime_ns, status.st_ino)
    if _verified.get(memo) == stored[key]:
        return
    found = _whole_digest(path) if whole else sampled_digest(path)
    if found != stored[key]:
        raise ValueError(f"{path.name} differs from the checksum written with it: its ids changed on disk")
    _verified[memo] = found


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise ValueError(reason)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_meta_fields(meta: dict, token_dtype) -> None:
    """Every field a reader relies on, with its type and range; raises ValueError naming the first bad one.
    `token_dtype(vocab_size)` is the dtype a preparation of that vocabulary writes."""
    _require(_count(meta.get("vocab_size")) and meta["vocab_size"] > 0, f"vocab_size is {meta.get('vocab_size')!r}")
    expected = np.dtype(token_dtype(meta["vocab_size"])).name
    _require(meta.get("dtype") == expected, f"dtype is {meta.get('dtype')!r} where {meta['vocab_size']} tokens are "
                                            f"stored as {expected}")
    for name in ("train_tokens", "val_tokens"):
        _require(_count(meta.get(name)), f"{name} is {meta.get(name)!r}")
    max_id = meta.get("max_id", -1)
    _require(isinstance(max_id, int) and not isinstance(max_id, bool) and max_id >= -1,
             f"max_id is {max_id!r}")
    _require(meta.get("mode", "token") in MODES, f"mode is {meta.get('mode')!r}")
    _require(isinstance(meta.get("backend", "char"), str), f"backend is {meta.get('backend')!r}")
    name = meta.get("tokenizer_file")
    _require(isinstance(name, str) and name == Path(name).name and name not in ("", ".", ".."),
             f"tokenizer_file is {name!r}, not a file name in the folder")
    sha = meta.get("tokenizer_sha256")
    _require(sha is None or (isinstance(sha, str) and len(sha) == 64), f"tokenizer_sha256 is {sha!r}")
    for name in ("source", "settings"):
        _require(isinstance(meta.get(name, {}), dict), f"{name} is {meta.get(name)!r}")
    source = meta.get("source", {})
    _require(all(_count(source[key]) for key in ("bytes", "chars") if key in source), "source counts are not counts")
    checksums = meta.get("checksums")
    if checksums is not None:  # preparations before checksums have none; they are checked by size as before
        for split in ("train", "val"):
            entry = checksums.get(split) if isinstance(checksums, dict) else None
            _require(isinstance(entry, dict) and all(isinstance(entry.get(key), str)
                                                     for key in ("blake2b", "sampled_blake2b")),
                     f"checksums.{split} is {entry!r}")


def check_meta(folder: Path, meta: dict, token_dtype) -> None:
    """meta.json's fields, as DamagedPreparation naming the first bad one."""
    try:
        check_meta_fields(meta, token_dtype)
    except ValueError as error:
        raise DamagedPreparation(Path(folder), f"meta.json: {error}") from None


def check_bins(folder: Path, meta: dict) -> None:
    """The bins against the checksums in meta.json (the sizes are load_prepared's), as DamagedPreparation."""
    try:
        for split, stored in (meta.get("checksums") or {}).items():
            verify_bin(Path(folder) / f"{split}.bin", stored)
    except ValueError as error:
        raise DamagedPreparation(Path(folder), str(error)) from None
    except OSError as error:
        raise DamagedPreparation(Path(folder), f"cannot read it: {error.strerror or error}") from None


def add_missing_checksums(folder: Path, meta: dict) -> None:
    """Give a cache entry prepared before checksums existed its checksums, from its bins as they are now (they
    passed every other check), so that later damage is caught; the ids, and so any run on them, stay the same."""
    if "checksums" in meta:
        return
    folder = Path(folder)
    meta = {**meta, "checksums": {split: bin_checksums(folder / f"{split}.bin") for split in ("train", "val")}}
    try:
        write_json_atomically(folder / "meta.json", meta)
    except OSError:
        return  # a read-only cache: it is used as before, checked by its fields and sizes
