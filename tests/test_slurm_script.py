"""scripts/slurm_fit.sbatch run by bash as SLURM would run it, with stand-ins for srun and scontrol (no SLURM
here): its picogpt command line trains under Lightning's SLURM environment on two tasks, USR1 (the time limit is
near) requeues the job and the run saves last.ckpt on its way out, and the requeued job's command resumes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from helpers import make_config, make_text

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm_fit.sbatch"
FAKE_SRUN = """#!/bin/bash
# srun's stand-in: the job's tasks, all on this machine, each with the variables srun gives it.
while [[ "$1" == -* ]]; do shift; done
if [ -n "${FAKE_SRUN_PRINT:-}" ]; then echo "srun: $*"; exit 0; fi
tasks=()
for ((task = 0; task < SLURM_NTASKS; task++)); do
    SLURM_PROCID=$task SLURM_LOCALID=$((task % SLURM_NTASKS_PER_NODE)) \\
        SLURM_NODEID=$((task / SLURM_NTASKS_PER_NODE)) "$@" &
    tasks+=($!)
done
echo "${tasks[*]}" > "$FAKE_SLURM/tasks.pid"
status=0
for task in "${tasks[@]}"; do wait "$task" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_SLURM/scontrol.log"
# Requeueing a running job ends it: SLURM sends SIGTERM to every task.
if [ "$1" = requeue ]; then kill -TERM $(cat "$FAKE_SLURM/tasks.pid"); fi
"""


def sbatch_lines() -> dict[str, str]:
    return dict(line[len("#SBATCH "):].partition("=")[::2] for line in SCRIPT.read_text().splitlines()
                if line.startswith("#SBATCH "))


def fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {**os.environ, "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
            "FAKE_SLURM": str(tmp_path), "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "picogpt",
            "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NTASKS": "2", "SLURM_NODELIST": "localhost",
            "MASTER_PORT": str(port), "RUN_DIR": str(tmp_path / "run")}


def test_the_sbatch_script_asks_for_a_signal_before_the_time_limit_and_a_requeue():
    lines = sbatch_lines()
    assert lines["--signal"] == "B:USR1@90" and "--requeue" in lines
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_the_sbatch_script_trains_on_two_nodes_requeues_on_usr1_saving_last_ckpt_and_resumes_when_requeued(tmp_path):
    """Two tasks as two nodes of one task each, on one disk: SLURM's ranks decide who writes and who prepares,
    and the SIGTERM that a requeue sends to every task at once stops them together at one step."""
    text = make_text(tmp_path / "t.txt")
    config = make_config(tmp_path, text, trainer={"max_steps": 100000, "val_check_interval": 2})
    env = fake_slurm(tmp_path)
    # Output to files: a pipe left unread while the tasks train could fill and block a rank (and so both).
    out_file, err_file = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    job = subprocess.Popen(["bash", str(SCRIPT), str(config), "--sample_tokens", "0"], stdout=out_file,
                           stderr=err_file, text=True, env=env)

    def output() -> tuple[str, str]:
        out_file.seek(0), err_file.seek(0)
        return out_file.read(), err_file.read()

    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "last.ckpt").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job.poll() is None, output()[1][-3000:]
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@90 sends 90 s before the time limit
        job.wait(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
    out, err = output()
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert "slurm_fit: the time limit is near: requeueing job 4242" in out
    saved = re.search(r"Interrupted at step (\d+); saved (\S+)\.", err)
    assert saved and Path(saved.group(2)) == tmp_path / "run" / "last.ckpt", err[-3000:]
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["global_step"] == int(saved.group(1))
    assert "Traceback" not in err and "error:" not in err, err[-3000:]
    assert len(list((tmp_path / "prepared").iterdir())) == 1

    requeued = subprocess.run(["bash", str(SCRIPT), str(config), "--sample_tokens", "0"], capture_output=True,
                              text=True, env={**env, "SLURM_RESTART_COUNT": "1", "FAKE_SRUN_PRINT": "1"})
    command = next(line for line in requeued.stdout.splitlines() if line.startswith("srun: "))
    assert command == (f"srun: picogpt fit --config {config} --ckpt_dir {tmp_path / 'run'} --trainer.num_nodes 2 "
                       f"--trainer.devices 1 --trainer.strategy ddp --ckpt_path last --sample_tokens 0")
