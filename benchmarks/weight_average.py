"""Does the average of the weights beat the trained weights? One run per seed answers it exactly.

    python -m benchmarks.weight_average --config configs/tiny.yaml --decay 0.99 --seeds '[1337, 1, 2, 3]'
    python -m benchmarks.weight_average --config configs/small.yaml --decay 0.97 \\
        --overrides '[--trainer.max_steps, "159", --model.warmup_iters, "16"]' --baseline false

The EMA callback (`picogpt_lightning.callbacks.EMA`, Lightning's `EMAWeightAveraging`) does not change training:
it keeps an average beside the trained weights, and every checkpoint holds both (`state_dict` the average,
`current_model_state` the trained weights). So one `picogpt fit` with it, then `picogpt validate` of each set
of weights in its last.ckpt, compares the two on the same trajectory, with no seed noise between them. With
`--baseline` (the default) the same run without the callback is timed too, alternating, for the average's cost
in wall time; its val must equal the trained weights' (the check that the average left training alone).
The config's own callbacks are left out of both runs (tiny.yaml's EMA would otherwise be a second average).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import cpu_name, run_cli
from benchmarks.recipes import REPO, fit
from picogpt_lightning.checkpoint import CHECKSUM_KEY, read_checkpoint, weights_sha256


def trained_weights(last: Path, out: Path) -> Path:
    """A copy of an averaging run's checkpoint whose weights are the trained ones instead of the average."""
    checkpoint = read_checkpoint(last)
    checkpoint["state_dict"] = checkpoint.pop("current_model_state")
    checkpoint["picogpt"][CHECKSUM_KEY] = weights_sha256(checkpoint["state_dict"])
    torch.save(checkpoint, out)
    return out


def validate(config: str, overrides: list[str], ckpt: Path, threads: int) -> float:
    """The val loss `picogpt validate` reports for a checkpoint, as training's validation computes it."""
    command = [sys.executable, "-m", "picogpt_lightning.cli", "validate", "--config", config, *overrides,
               "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    found = re.search(r"^val_loss (\S+)", result.stdout, re.MULTILINE)
    if result.returncode or not found:
        raise SystemExit(f"validating {ckpt} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return float(found.group(1))


def main(
    config: str = "configs/tiny.yaml",
    decay: float = 0.99,
    overrides: list[str] | None = None,
    seeds: list[int] | None = None,
    baseline: bool = True,
    threads: int = 2,
) -> None:
    """Val loss of the EMA of the weights against the trained weights of the same run, and the EMA's cost.

    Args:
        config: the picogpt config to train.
        decay: the EMA's decay per optimizer step (its horizon is about 1 / (1 - decay) steps).
        overrides: `picogpt fit` flags added to the config (and to each validation), e.g. a shorter max_steps.
        seeds: seed_everything of each run (default: the config's own seed).
        baseline: also train each seed without the average, for its wall time and the same-trajectory check.
        threads: OMP_NUM_THREADS of every run.
    """
    # Both runs replace the config's callbacks (tiny.yaml ships an EMA): one without an average, one with this one.
    overrides = ["--trainer.callbacks=[]", *(overrides or [])]
    average = ["--trainer.callbacks+=picogpt_lightning.callbacks.EMA", f"--trainer.callbacks.decay={decay}"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="weight-average-") as scratch:
        work = Path(scratch)
        for seed in seeds or [None]:
            flags = overrides + ([] if seed is None else ["--seed_everything", str(seed)])
            row = {"seed": seed}
            if baseline:
                plain = fit(config, flags, work, "plain", threads, [])
                row["plain_seconds"] = plain["seconds"]
                row["plain"] = validate(config, flags, work / "plain" / "run" / "last.ckpt", threads)
            averaged = fit(config, flags + average, work, "ema", threads, [])
            last = work / "ema" / "run" / "last.ckpt"
            row["steps"] = read_checkpoint(last)["global_step"]
            row["ema_seconds"] = averaged["seconds"]
            row["ema"] = validate(config, flags, last, threads)
            row["trained"] = validate(config, flags, trained_weights(last, work / "trained.ckpt"), threads)
            rows.append(row)
            print(f"seed {seed if seed is not None else '(config)'}: {row['steps']} steps, trained weights "
                  f"{row['trained']:.4f}, average {row['ema']:.4f} ({row['ema'] - row['trained']:+.4f}), "
                  f"wall {row['ema_seconds']:.1f} s"
                  + (f"; without the average {row['plain']:.4f}, {row['plain_seconds']:.1f} s" if baseline else ""),
                  flush=True)
    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores, {threads} threads; load average {os.getloadavg()[0]:.2f}")
    print(f"config {config}, overrides {overrides}, EMA decay {decay}")
    gains = [row["ema"] - row["trained"] for row in rows]
    print(f"average minus trained weights: {statistics.mean(gains):+.4f} nats"
          + (f" ± {statistics.stdev(gains):.4f}" if len(gains) > 1 else "")
          + f" over {len(rows)} run(s); lower in {sum(gain < 0 for gain in gains)}")
    if baseline:
        cost = statistics.mean(row["ema_seconds"] / row["plain_seconds"] - 1 for row in rows)
        same = all(row["plain"] == row["trained"] for row in rows)
        print(f"wall with the average {cost:+.1%} against without; trained weights equal a run without the "
              f"average: {'yes' if same else 'NO (the callback changed training)'}")


if __name__ == "__main__":
    run_cli(main)
