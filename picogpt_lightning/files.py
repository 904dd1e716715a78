"""Writing files so that a crash, a kill -9 or a full disk never leaves half of one where a reader looks.

Everything the package writes (prepared data, tokenizers, checkpoints, exports) goes through a temporary file
in the destination's own folder, is flushed to disk, and is renamed over the final name: a rename within one
filesystem is atomic, so readers see the old file or the new one, never a mix. The temporary name is unique,
so two writers never collide, and it starts with a dot and ends in `.tmp`, so leftovers are easy to spot.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
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
    for path in [folder, *folder.parents]:
        kind = what_path_is(path)
        if kind not in ("missing", "a folder"):
            what = "it" if path == folder else str(path)
            raise NotADirectoryError(errno.ENOTDIR, f"{what} is {kind}, not a folder", str(path))
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


def what_path_is(path: str | os.PathLike) -> str:
    """What stands at `path`, in words for a message: "a file", "a folder", "a named pipe (FIFO)", "a character
    device", "a symbolic link loop", "a broken symbolic link", "missing"... The one place that tells a missing
    path from one that exists but is no regular file, so that no message says "does not exist" of /dev/zero."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symbolic link loop"
        if error.errno == errno.EACCES:
            return "not accessible (permission denied)"
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)})"
        return "missing"
    for test, words in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def not_found(path: str | os.PathLike) -> str:
    """The end of "PATH ..." for a path that is not what was asked for: "does not exist", or what it is instead
    ("is a named pipe (FIFO), not a regular file")."""
    kind = what_path_is(path)
    if kind == "missing":
        return "does not exist"
    if kind.startswith("not "):
        return f"is {kind}"
    return f"is {kind}, not a regular file" if kind != "a folder" else "is a folder, not a regular file"


def is_special(path: str | os.PathLike) -> bool:
    """Whether `path` exists as something that is neither a regular file nor a folder (a FIFO, a device, a
    socket, a symbolic link loop or broken link): reading such a thing blocks or never ends."""
    return what_path_is(path) not in ("a file", "a folder", "missing")


class NotARegularFile(OSError):
    """A path that was to be read is a FIFO, a device, a loop... or a file larger than the reader allows."""


def read_regular_bytes(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; else NotARegularFile saying what it is. Opened without
    blocking, so a named pipe is refused at once instead of waiting for a writer; a symbolic link to /dev/zero is
    refused instead of read without end."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotARegularFile(errno.ELOOP, "it is a symbolic link loop", str(path)) from None
        raise
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise NotARegularFile(errno.EINVAL, f"it is {what_path_is(path)}, not a regular file", str(path))
        if status.st_size > limit:
            raise NotARegularFile(errno.EFBIG, f"it is {status.st_size:,} bytes, more than the {limit:,} allowed",
                                  str(path))
        data = file.read(limit + 1)
    if len(data) > limit:  # grew while read
        raise NotARegularFile(errno.EFBIG, f"it holds more than the {limit:,} bytes allowed", str(path))
    return data
