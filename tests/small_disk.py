"""A real small filesystem for tests of full disks: a 4 MB tmpfs mounted where the test may mount one (root, as
in CI), else the test is skipped with the reason. Import the fixture: `from small_disk import small_disk`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SIZE = "4m"


@pytest.fixture
def small_disk(tmp_path) -> Path:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs the tests as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` with one file, leaving about `leave` bytes free; returns the file (delete it to free space)."""
    status = os.statvfs(disk)
    free = status.f_bfree * status.f_frsize
    filler = disk / "filler"
    with open(filler, "wb") as file:
        file.write(b"\0" * max(0, free - leave))
    return filler
