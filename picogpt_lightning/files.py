"""Writing files so that a crash, a kill -9 or a full disk never leaves half of one where a reader looks.

Everything the package writes (prepared data, tokenizers, checkpoints, exports) goes through a temporary file
in the destination's own folder, is flushed to disk, and is renamed over the final name: a rename within one
filesystem is atomic, so readers see the old file or the new one, never a mix. The temporary name is unique,
so two writers never collide, and it starts with a dot and ends in `.tmp`, so leftovers are easy to spot.
"""

from __future__ import annotations

import json
import os
import shutil
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


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files (`.NAME.<random>.tmp`) a killed writer left in `folder`. Call it only while
    holding the folder's lock, so that no live writer's file is taken."""
    removed = []
    for path in Path(folder).glob(f".*{TEMPORARY_SUFFIX}"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


class FolderInUse(Exception):
    """Another live process holds the folder's lock; `pid` says which."""

    def __init__(self, folder: Path, pid: str):
        super().__init__(f"{folder} is in use by process {pid}")
        self.folder, self.pid = folder, pid


class FolderLock:
    """An exclusive lock on a folder while one process writes into it (a run folder, a prepared-data folder).

    The lock is `fcntl.flock` on `FOLDER/.lock`, which the kernel releases when the process ends, however it
    ends: after a kill -9 the file stays but is no longer locked, and the next process simply takes it (and
    rewrites the pid in it). The file holds the holder's pid, so a refused process can name it. Where flock is
    missing (Windows) the pid alone is used: a lock whose process no longer exists is stale and is taken over.
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock, or raise FolderInUse. The folder must exist."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not _try_lock(fd, self.path):
                    raise FolderInUse(self.folder, _read_pid(self.path))
                # The holder may have removed the file between our open and our lock: lock the file that is there.
                if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _try_lock(fd: int, path: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the pid file alone
        return _holder_is_gone(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without locks (some network mounts): the pid file alone
        return _holder_is_gone(path)
    return True


def _holder_is_gone(path: Path) -> bool:
    """Without flock: the lock is free unless the pid in it is another process that still exists."""
    pid = _read_pid(path)
    return not (pid.isdigit() and int(pid) != os.getpid() and _process_exists(int(pid)))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_folders(folder: Path) -> list[Path]:
    """Create `folder` and any missing parents; returns the folders it created, deepest first, so that a
    failure can remove exactly those again (`remove_empty_folders`)."""
    created = [path for path in [folder, *folder.parents] if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return created


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) as long as each is empty: what a failed step created and left empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
