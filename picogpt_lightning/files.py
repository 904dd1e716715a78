"""Writing files so that a crash, a kill -9 or a full disk never leaves half of one where a reader looks.

Everything the package writes (prepared data, tokenizers, checkpoints, exports) goes through a temporary file
in the destination's own folder, is flushed to disk, and is renamed over the final name: a rename within one
filesystem is atomic, so readers see the old file or the new one, never a mix. The temporary name is unique,
so two writers never collide, and it starts with a dot and ends in `.tmp`, so leftovers are easy to spot.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


def temporary_path(path: Path) -> Path:
    """A fresh name beside `path` for writing it: `.NAME.<random>.tmp`."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TEMPORARY_SUFFIX}")


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk, so the rename that follows cannot outlive its contents."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def commit(temporary: Path, path: Path) -> None:
    """Move a finished temporary file over `path`, after flushing it to disk."""
    fsync_file(temporary)
    os.replace(temporary, path)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary)` to write the file, then rename it to `path`; on any failure remove the
    temporary file and leave `path` as it was."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        write(temporary)
        commit(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json_atomically(path: str | os.PathLike, content: dict) -> Path:
    return write_text_atomically(path, json.dumps(content, indent=2, ensure_ascii=False) + "\n")
