"""A full disk while a checkpoint is written, said in one line.

torch.save does not raise OSError(ENOSPC) when the disk fills: its zip writer ends in a RuntimeError such as
"[enforce fail at inline_container.cc:672] . unexpected pos" or "basic_ios::clear: iostream error". `save_torch`
turns such a failure into OSError(ENOSPC) when the disk it wrote to has (almost) no space left, so that the
writers (all atomic: files.write_atomically) can say what happened and that the earlier files are intact.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

ALMOST_FULL_BYTES = 1 << 20  # a failed write that leaves less than this free was a full disk


def free_bytes(folder: str | os.PathLike) -> int:
    """The bytes this process may still write on folder's filesystem (root may use the reserved blocks)."""
    status = os.statvfs(folder)
    blocks = status.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else status.f_bavail
    return blocks * status.f_frsize


def save_torch(content: object, path: Path) -> None:
    """torch.save(content, path); a write failure on a full disk is OSError(ENOSPC) naming the path."""
    try:
        torch.save(content, path)
    except RuntimeError as error:
        try:
            full = free_bytes(Path(path).parent) < ALMOST_FULL_BYTES
        except OSError:
            full = False
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from error
        raise


def no_space_message(path: Path, resume_command: str | None) -> str:
    """The one line for a checkpoint that did not fit on the disk."""
    last = Path(path).parent / "last.ckpt"
    if resume_command and last.is_file():
        then = f"earlier checkpoints are intact; free space and resume with: {resume_command}"
    elif last.is_file():
        then = f"earlier checkpoints are intact; free space and resume with --ckpt_path {last}"
    else:
        then = "nothing was saved yet; free space (or choose another --ckpt_dir) and run again"
    return f"no space left on device while writing {path}: {then}"
