"""DDP on several CPU processes against one process: time per step and scaling efficiency of `picogpt fit`.

    python -m benchmarks.ddp_scaling --config configs/tiny.yaml --steps 60 --rounds 3
    python -m benchmarks.ddp_scaling --config configs/small.yaml --processes 2 --steps 20 --rounds 2

Each round runs the real `picogpt fit` twice, as subprocesses, one after the other: one process
(`--trainer.devices 1`) and N processes (`--trainer.strategy ddp --trainer.devices N`, Lightning's own launcher,
gloo), each process with one torch thread and the config's per-process batch. That is weak scaling: N processes
train on N times the tokens per step, so the scaling efficiency is t(1 process) / t(N processes) per step (1.0:
N times the work in the same time) and the speed-up in tokens/s is N times that. A callback (StepTimes) records
the wall time between the ends of consecutive training steps on rank 0 after `warmup` steps; validation and
samples are moved past the run, and the config's callbacks are left out, so both runs do the same work.
Figures: per round and median over rounds (alternating runs see the same state of a shared machine).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import cpu_name, run_cli


class StepTimes(Callback):
    """Writes the seconds between consecutive training step ends, measured on rank 0, to `out` (JSON)."""

    def __init__(self, out: str):
        self.out, self.ends = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            steps = [later - earlier for earlier, later in zip(self.ends, self.ends[1:])]
            Path(self.out).write_text(json.dumps(steps))


def run(config: str, processes: int, steps: int, warmup: int, folder: Path) -> float:
    """Median seconds per step of one `picogpt fit` with `processes` processes."""
    out = folder / f"steps-{processes}.json"
    callback = [{"class_path": "benchmarks.ddp_scaling.StepTimes", "init_args": {"out": str(out)}}]
    strategy = ["--trainer.strategy", "ddp"] if processes > 1 else []
    command = [sys.executable, "-m", "picogpt_lightning.cli", "fit", "--config", config,
               "--trainer.accelerator", "cpu", "--trainer.devices", str(processes), *strategy,
               "--trainer.max_steps", str(warmup + steps + 1), "--trainer.val_check_interval", str(warmup + steps + 1),
               "--trainer.enable_progress_bar", "false", "--trainer.callbacks", json.dumps(callback),
               "--sample_tokens", "0", "--ckpt_dir", str(folder / f"run-{processes}"), "--overwrite", "true",
               "--data.cache_dir", str(folder / "prepared"), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"picogpt fit with {processes} process(es) failed: {result.stderr.strip()[-2000:]}")
    return statistics.median(json.loads(out.read_text())[warmup:])


def main(config: str = "configs/tiny.yaml", processes: int = 2, steps: int = 60, warmup: int = 10,
         rounds: int = 3) -> None:
    """Time per step of `picogpt fit` on one CPU process against `processes` DDP processes.

    Args:
        config: the picogpt config to train (its model and per-process batch).
        processes: DDP processes of the second run (one torch thread each).
        steps: timed steps of each run, after the warm-up.
        warmup: steps of each run that are not timed.
        rounds: pairs of runs; the figures are medians over them.
    """
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; one torch thread per process")
    print(f"config {config}: {processes} DDP processes against 1, {steps} timed steps after {warmup}, {rounds} rounds")
    single, several = [], []
    with tempfile.TemporaryDirectory(prefix="ddp-scaling-") as scratch:
        for round_index in range(rounds):
            single.append(run(config, 1, steps, warmup, Path(scratch)))
            several.append(run(config, processes, steps, warmup, Path(scratch)))
            print(f"round {round_index + 1}: 1 process {single[-1] * 1e3:.1f} ms/step, {processes} processes "
                  f"{several[-1] * 1e3:.1f} ms/step, efficiency {single[-1] / several[-1]:.2f}")
    one, many = statistics.median(single), statistics.median(several)
    efficiency = statistics.median(a / b for a, b in zip(single, several))
    print(f"median: 1 process {one * 1e3:.1f} ms/step, {processes} processes {many * 1e3:.1f} ms/step; scaling "
          f"efficiency {efficiency:.2f} (tokens/s x{processes * efficiency:.2f} with {processes} processes)")


if __name__ == "__main__":
    run_cli(main)
