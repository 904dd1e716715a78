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

import pytest
import torch

from helpers import make_config, make_text

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm_fit.sbatch"
FAKE_SRUN = """#!/bin/bash
# srun's stand-in: the job's tasks, all on this machine, each with the variables srun gives it.
while [[ "$1" == -* ]]; do shift; done
if [ -n "${FAKE_SRUN_PRINT:-}" ]; then echo "srun: $*"; exit 0; fi
tasks=()
for ((task = 0; task < SLURM_NTASKS; task++)); do
    # Each task's output to its own file: the test shows what each rank printed.
    SLURM_PROCID=$task SLURM_LOCALID=$((task % SLURM_NTASKS_PER_NODE)) \\
        SLURM_NODEID=$((task / SLURM_NTASKS_PER_NODE)) "$@" > "$FAKE_SLURM/task-$task.log" 2>&1 &
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
    and the SIGTERM that a requeue sends to every task at once stops them together at one step. A run that does
    not get there in time fails with each rank's output and, for a rank still running, where it was stuck."""
    text = make_text(tmp_path / "t.txt")
    config = make_config(tmp_path, text, trainer={"max_steps": 100000, "val_check_interval": 2})
    env = {**fake_slurm(tmp_path), "PYTHONFAULTHANDLER": "1"}  # SIGABRT: each thread's stack, then the end
    # Output to files: a pipe left unread while the tasks train could fill and block a rank (and so both).
    out_file = tempfile.TemporaryFile("w+")
    job = subprocess.Popen(["bash", str(SCRIPT), str(config), "--sample_tokens", "0"], stdout=out_file,
                           stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "run" / "last.ckpt").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if not (tmp_path / "run" / "last.ckpt").exists():
            fail_with_output(job, tmp_path, out_file, "no last.ckpt within 180 s, or the job ended before it")
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@90 sends 90 s before the time limit
        try:
            job.wait(timeout=90)  # one step, a save and the exit; sigterm_clock ends a rank stuck 60 s
        except subprocess.TimeoutExpired:
            fail_with_output(job, tmp_path, out_file, "the job did not end within 90 s of USR1")
    finally:
        end_job(job, tmp_path)
    out, rank_0 = read(out_file), task_log(tmp_path, 0)
    report = f"job:\n{out[-2000:]}\nrank 0:\n{rank_0[-3000:]}\nrank 1:\n{task_log(tmp_path, 1)[-3000:]}"
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n", report
    assert "slurm_fit: the time limit is near: requeueing job 4242" in out, report
    saved = re.search(r"Interrupted at step (\d+); saved (\S+)\.", rank_0)
    assert saved and Path(saved.group(2)) == tmp_path / "run" / "last.ckpt", report
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["global_step"] == int(saved.group(1))
    assert "Traceback" not in report and "error:" not in report, report
    assert len(list((tmp_path / "prepared").iterdir())) == 1

    requeued = subprocess.run(["bash", str(SCRIPT), str(config), "--sample_tokens", "0"], capture_output=True,
                              text=True, env={**env, "SLURM_RESTART_COUNT": "1", "FAKE_SRUN_PRINT": "1"}, timeout=60)
    command = next(line for line in requeued.stdout.splitlines() if line.startswith("srun: "))
    assert command == (f"srun: picogpt fit --config {config} --ckpt_dir {tmp_path / 'run'} --trainer.num_nodes 2 "
                       f"--trainer.devices 1 --trainer.strategy ddp --ckpt_path last --sample_tokens 0")


def read(file) -> str:
    file.seek(0)
    return file.read()


def task_log(tmp_path: Path, task: int) -> str:
    path = tmp_path / f"task-{task}.log"
    return path.read_text(errors="replace") if path.exists() else "(no output: the task never started)"


def task_pids(tmp_path: Path) -> list[int]:
    path = tmp_path / "tasks.pid"
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


def end_job(job: subprocess.Popen, tmp_path: Path, stop: signal.Signals = signal.SIGKILL) -> None:
    """End the tasks (`stop`) and the batch script, so that no rank outlives the test."""
    for pid in task_pids(tmp_path):
        try:
            os.kill(pid, stop)
        except ProcessLookupError:
            pass
    if job.poll() is None:
        job.kill()
    job.wait(timeout=30)


def fail_with_output(job: subprocess.Popen, tmp_path: Path, out_file, why: str) -> None:
    """End the tasks with SIGABRT (faulthandler then prints where each thread of a rank still running was), and
    fail with the job's and each rank's output."""
    end_job(job, tmp_path, stop=signal.SIGABRT)
    time.sleep(1)  # the stacks reach the logs
    ranks = "\n".join(f"--- rank {task} ---\n{task_log(tmp_path, task)[-6000:]}" for task in (0, 1))
    pytest.fail(f"{why}\n--- job ---\n{read(out_file)[-2000:]}\n{ranks}", pytrace=False)
