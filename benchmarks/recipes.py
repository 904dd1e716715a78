"""Old recipe against new on the bundled corpus, at equal wall time: which default should a config ship?

    python -m benchmarks.recipes --config configs/tiny.yaml \\
        --old '[--model.optimizer, adamw, --model.position, learned, ...]' --new '[...]'
    python -m benchmarks.recipes --config configs/small.yaml --budget 600     # a 10-minute budget per recipe

Each recipe is the config plus its overrides. A short probe (`--probe_steps`, in this process, after a
warm-up) measures each recipe's seconds per step; each then trains, as a separate `picogpt fit` process, for
the number of steps that fills the budget (the LR schedule stretched to it; with `--warmup_fraction`, the
warmup too), validating `--validations` times. The budget defaults to the old recipe's own run of the config
as written. Reported: best val loss, wall time, steps, and seconds per step, with the machine and load, and
each recipe's best val within the shorter run's wall (the probe's estimate can miss); the recipes alternate
when `--rounds` > 1.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import cpu_name, run_cli

REPO = Path(__file__).resolve().parent.parent
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--sample_tokens", "0"]


def fit(config: str, overrides: list[str], work: Path, name: str, threads: int, extra: list[str]) -> dict:
    """One `picogpt fit` process: wall seconds and every validation's (step, val_loss)."""
    folder = work / name
    records = folder / "validations.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    records.unlink(missing_ok=True)
    clock = {"class_path": "benchmarks.speedrun.ValidationClock",
             "init_args": {"out": str(records), "started": time.time()}}
    command = [sys.executable, "-m", "picogpt_lightning.cli", "fit", "--config", config, *overrides, *extra,
               "--ckpt_dir", str(folder / "run"), "--overwrite", "true", *QUIET,
               f"--trainer.callbacks+={json.dumps(clock)}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    started = time.time()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.time() - started
    if result.returncode:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    curve = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    return {"seconds": seconds, "curve": curve, "best": best_within(curve, math.inf)}


def best_within(curve: list[dict], seconds: float) -> float:
    """The lowest val loss validated within `seconds` of the run's start (nan when none was)."""
    return min((point["val_loss"] for point in curve if point["seconds"] <= seconds), default=float("nan"))


def run_flags(steps: int, validations: int, warmup_fraction: float | None) -> list[str]:
    """The `picogpt fit` flags that stretch a config to `steps`: validations evenly spaced, and the warmup a
    fraction of the steps when `warmup_fraction` is given."""
    flags = ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(max(1, steps // validations))]
    if warmup_fraction is not None:
        flags += ["--model.warmup_iters", str(round(warmup_fraction * steps))]
    return flags


def seconds_per_step(config: str, overrides: list[str], work: Path, threads: int, steps: int) -> float:
    """Steady-state seconds per step: two short runs of different length, so start-up and validation cancel."""
    runs = []
    for count in (steps, 2 * steps):
        extra = ["--trainer.max_steps", str(count), "--trainer.val_check_interval", str(10 * count)]
        runs.append(fit(config, overrides, work, f"probe-{count}", threads, extra)["seconds"])
    return max(1e-3, (runs[1] - runs[0]) / steps)


def main(
    config: str = "configs/tiny.yaml",
    old: list[str] | None = None,
    new: list[str] | None = None,
    budget: float | None = None,
    probe_steps: int = 30,
    validations: int = 5,
    rounds: int = 1,
    threads: int = 2,
    warmup_fraction: float | None = None,
) -> None:
    """Best val loss of the old and the new recipe of a config, each trained for the same wall time.

    Args:
        config: the picogpt config both recipes start from.
        old: overrides that make the old recipe (default: the config as written).
        new: overrides that make the new recipe.
        budget: seconds of training per recipe (default: the old recipe's steps as the config has them).
        probe_steps: steps of each probe run that measures a recipe's seconds per step.
        validations: validations per run (the val split is evaluated this many times, evenly spaced).
        rounds: repetitions, alternating the recipes.
        threads: OMP_NUM_THREADS of every run.
        warmup_fraction: warm up for this fraction of each run's steps (default: the config's warmup_iters,
            whatever the budget).
    """
    recipes = {"old": old or [], "new": new or []}
    results: dict[str, list[dict]] = {name: [] for name in recipes}
    with tempfile.TemporaryDirectory(prefix="recipes-") as scratch:
        work = Path(scratch)
        speed = {name: seconds_per_step(config, overrides, work, threads, probe_steps)
                 for name, overrides in recipes.items()}
        if budget is None:
            import yaml

            budget = speed["old"] * yaml.safe_load(Path(config).read_text())["trainer"]["max_steps"]
        for _ in range(rounds):
            for name, overrides in recipes.items():
                steps = max(10, round(budget / speed[name]))
                run = fit(config, overrides, work, name, threads, run_flags(steps, validations, warmup_fraction))
                run["steps"] = steps
                results[name].append(run)
                print(f"{name}: {steps} steps, best val {run['best']:.4f}, wall {run['seconds']:.0f} s", flush=True)
    load = os.getloadavg()[0]
    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores, {threads} threads; load average {load:.2f}")
    print(f"config {config}, budget {budget:.0f} s of training per recipe"
          + (f", warmup {warmup_fraction:.0%} of the steps" if warmup_fraction is not None else ""))
    for name, runs in results.items():
        best = [run["best"] for run in runs]
        print(f"{name}: {speed[name] * 1000:.1f} ms/step, {runs[0]['steps']} steps, best val "
              f"{statistics.mean(best):.4f}" + (f" ± {statistics.stdev(best):.4f}" if len(best) > 1 else "")
              + f", wall {statistics.mean(run['seconds'] for run in runs):.0f} s; overrides {recipes[name]}")
    # The probe's estimate of seconds per step can miss, so the runs' walls can differ: the fair figure is each
    # recipe's best validation within the shorter run's last validation.
    for index in range(rounds):
        common = min(max((p["seconds"] for p in runs[index]["curve"]), default=0.0) for runs in results.values())
        print(f"round {index + 1}, at equal wall ({common:.0f} s from the start): " + ", ".join(
            f"{name} best val {best_within(runs[index]['curve'], common):.4f}" for name, runs in results.items()))


if __name__ == "__main__":
    run_cli(main)
