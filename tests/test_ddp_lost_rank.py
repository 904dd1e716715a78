"""A DDP worker killed mid-run: the survivor exits at once with one line naming the rank that died and how to
resume, not gloo's "Connection reset by peer" traceback. Two CPU processes, run as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import make_config, make_text


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker through /proc (Linux)")
def test_a_killed_ddp_worker_leaves_one_line_naming_it_and_the_resume(tmp_path):
    text = make_text(tmp_path / "t.txt")
    config = make_config(tmp_path, text, name="ddp",
                         trainer={"max_steps": 100000, "val_check_interval": 2, "strategy": "ddp", "devices": 2})
    run = tmp_path / "checkpoints" / "ddp"
    launcher = subprocess.Popen([sys.executable, "-m", "picogpt_lightning.cli", "fit", "--config", str(config),
                                 "--sample_tokens", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.ckpt").exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = children(launcher.pid)
        assert launcher.poll() is None and workers, "the run did not start two processes"
        os.kill(workers[0], signal.SIGKILL)  # rank 1, started by rank 0's launcher
        err = launcher.communicate(timeout=60)[1]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1
    assert "Traceback" not in err and "Connection reset by peer" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert "rank 1 of this distributed run stopped" in errors[0]
    assert f"resume with: picogpt fit --config {config} --ckpt_path last" in errors[0]
