"""An export is whole or absent: it is written into a temporary folder beside the target and swapped in.

Writing file by file into the target left mixed folders: a failed export (a full disk) left the new config.json
beside the old weights, and an HF export followed by a safetensors one left a folder transformers loaded with
every weight missing. Here the target is either the previous export, untouched, or the new one, whole: the new
files go into `.NAME.<random>.tmp` beside it (same filesystem, so the renames are atomic), and only when they are
all written is the old folder renamed away, the new one renamed in, and the old one deleted.

A folder that holds anything but an earlier export of ours is refused unless `overwrite` (the whole folder is
then replaced): ours are marked by the metadata of their model.safetensors (`picogpt_format`) or picogpt.json,
and folders from before the mark by holding only file names an export writes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import PicoGPTError
from .files import TEMPORARY_SUFFIX, what_path_is

MARK = "picogpt_format"  # a key of model.safetensors' metadata in every export of ours
WEIGHTS = "model.safetensors"
OWN_CONFIG = "picogpt.json"
# What exports wrote before the mark (both formats), to recognise an earlier export that lacks it.
EXPORT_FILES = {"config.json", "generation_config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", OWN_CONFIG, "chat_template.jinja"}
MAX_HEADER_BYTES = 100 << 20


def safetensors_metadata(path: Path) -> dict:
    """The `__metadata__` of a safetensors file's header (8 bytes of length, then JSON), without its tensors."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > MAX_HEADER_BYTES:
                return {}
            header = json.loads(file.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def is_our_export(folder: Path) -> bool:
    """Whether the folder holds an earlier export of ours (or nothing)."""
    names = {path.name for path in folder.iterdir()}
    if not names:
        return True
    if MARK in safetensors_metadata(folder / WEIGHTS) or (folder / OWN_CONFIG).is_file():
        return True
    return names <= EXPORT_FILES


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target that is not a folder, or a folder holding something other than an export of ours."""
    kind = what_path_is(target)
    if kind == "missing":
        return
    if kind != "a folder":
        raise PicoGPTError(f"--out_dir {target} is {kind}; pass a folder to write the exported model into")
    if not overwrite and not is_our_export(target):
        names = sorted(path.name for path in target.iterdir())
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise PicoGPTError(f"--out_dir {target} holds files that are not an export of picogpt ({shown}): pass "
                           f"an empty or new folder, or --overwrite true to replace the whole folder")


@contextmanager
def staged_export(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh folder to write the export into; on success it replaces `out_dir` whole, on any failure
    it is deleted and `out_dir` is as it was (the previous export, or nothing)."""
    target = Path(out_dir).absolute()
    check_target(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}{TEMPORARY_SUFFIX}")
        stage.mkdir()
    except OSError as error:
        raise PicoGPTError(f"cannot create {out_dir} ({error.strerror or error}): pick a writable --out_dir") from None
    try:
        yield stage
        _fsync_folder(stage)
        _swap_in(stage, target)
    except OSError as error:
        shutil.rmtree(stage, ignore_errors=True)
        before = "the previous export is intact" if target.exists() else "nothing was written"
        raise PicoGPTError(f"could not write the export to {out_dir} ({error.strerror or error}): {before}; free "
                           f"space or choose another --out_dir") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _fsync_folder(folder: Path) -> None:
    """Flush the new files (each was flushed when written) and the folder's own entries to disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a folder; the files themselves were synced
    finally:
        os.close(fd)


def _swap_in(stage: Path, target: Path) -> None:
    if not target.exists():
        os.rename(stage, target)
        return
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.old{TEMPORARY_SUFFIX}")
    os.rename(target, old)
    try:
        os.rename(stage, target)
    except BaseException:
        os.rename(old, target)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)
