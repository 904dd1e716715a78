"""Start-up of `picogpt fit`: `fit --help`, a mistyped option, the first-hour mistakes, and the first training
step of a tiny run and of configs/tiny.yaml.

    python -m benchmarks.startup                                 # this checkout, 3 rounds
    python -m benchmarks.startup --other /path/to/other/checkout # and another one, alternating with this

Each figure runs a fresh `python -m picogpt_lightning.cli` process (the package found through PYTHONPATH),
so imports count; "first step" is the time from the process start to the first `on_train_batch_start` of a
1-layer, 16-wide model on a small generated text, "tiny.yaml first step" the same for the checkout's own
configs/tiny.yaml on its data/philosophy.txt (both prepared once beforehand, as a cached run would be). The
mistakes: a config file without --config, a --data.text_path that is not there, validate without a
checkpoint, and a new run into a folder that holds one. Rounds alternate between the checkouts; medians are
printed, with the load average before and after.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import median

CALLBACK = '''
import os, sys, time
import lightning.pytorch as L

class FirstStep(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and batch_idx == 0:
            print(f"FIRSTSTEP {time.time() - float(os.environ['STARTUP_T0'])}", file=sys.stderr, flush=True)
'''


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def run(checkout: str, folder: Path, args: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([checkout, str(folder)]), "STARTUP_T0": repr(time.time())}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "picogpt_lightning.cli", *args], capture_output=True, text=True,
                            env=env, cwd=folder)
    return time.perf_counter() - start, result.stderr


def label(checkout: str) -> str:
    """A name for the checkout's files that stays the same from one run of this script to the next."""
    return hashlib.sha256(checkout.encode()).hexdigest()[:8]


def first_step(checkout: str, folder: Path, config: Path, round_: int) -> float:
    run_dir = folder / f"run-{label(checkout)}-{round_}"
    shutil.rmtree(run_dir, ignore_errors=True)  # left by an earlier run of this script (--folder)
    _, err = run(checkout, folder, ["fit", "--config", str(config), "--ckpt_dir", str(run_dir),
                                    "--trainer.callbacks+=startup_callback.FirstStep"])
    lines = [line for line in err.splitlines() if line.startswith("FIRSTSTEP")]
    if not lines:
        raise SystemExit(f"the tiny run of {checkout} failed:\n{err[-2000:]}")
    return float(lines[0].split()[1])


def tiny_first_step(checkout: str, folder: Path, round_: int) -> float:
    """The first step of the checkout's configs/tiny.yaml, as shipped (one step, one validation batch)."""
    name = label(checkout)
    _, err = run(checkout, folder, [
        "fit", "--config", str(Path(checkout) / "configs" / "tiny.yaml"), "--ckpt_dir", str(folder / f"tiny-{name}"),
        "--overwrite", "true", "--data.text_path", str(Path(checkout) / "data" / "philosophy.txt"),
        "--data.cache_dir", str(folder / f"prepared-{name}"), "--trainer.max_steps", "1",
        "--trainer.limit_val_batches", "1", "--sample_tokens", "0", "--trainer.callbacks+=startup_callback.FirstStep"])
    lines = [line for line in err.splitlines() if line.startswith("FIRSTSTEP")]
    if not lines:
        raise SystemExit(f"the tiny.yaml run of {checkout} failed:\n{err[-2000:]}")
    return float(lines[0].split()[1])


def mistakes(folder: Path, config: Path, occupied: Path) -> dict[str, list[str]]:
    return {
        "no --config": ["fit", str(config)],
        "missing text": ["fit", "--config", str(config), "--data.text_path", "missing.txt", "--ckpt_dir",
                         str(folder / "never")],
        "validate, no ckpt": ["validate", "--config", str(config)],
        "occupied folder": ["fit", "--config", str(config), "--ckpt_dir", str(occupied)],
    }


def main(other: str | None = None, rounds: int = 3, folder: str | None = None) -> None:
    """Print medians of `fit --help`, a typo's error and the first step of a tiny run, for this checkout and
    optionally another.

    Args:
        other: Another checkout of picogpt_lightning to compare with (its root folder).
        rounds: Rounds; each runs every figure once per checkout.
        folder: A scratch folder of an earlier run of this script, to reuse its prepared data (a new one by
            default).
    """
    here = str(Path(__file__).resolve().parent.parent)
    checkouts = [here] + ([str(Path(other).resolve())] if other else [])
    folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="startup-"))
    (folder / "startup_callback.py").write_text(CALLBACK)
    rng = random.Random(0)
    words = "the a truth mind virtue friend time reason art is was seems knows asks why how".split()
    (folder / "t.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(600)))
    config = folder / "tiny.yaml"
    config.write_text(
        "seed_everything: 7\nsample_tokens: 0\n"
        "trainer: {accelerator: cpu, max_steps: 1, val_check_interval: 10, enable_progress_bar: false, "
        "enable_model_summary: false, logger: false}\n"
        "model: {n_layer: 1, n_head: 2, n_embd: 16}\n"
        f"data: {{text_path: {folder / 't.txt'}, mode: char, block_size: 16, batch_size: 4, eval_iters: 4, "
        f"cache_dir: {folder / 'prepared'}}}\n")
    first_step(here, folder, config, -1)  # prepares the data once, warms the file cache
    for checkout in checkouts:
        tiny_first_step(checkout, folder, -1)  # prepares philosophy.txt once per checkout
    occupied = folder / f"run-{label(here)}--1"
    figures: dict[str, dict[str, list[float]]] = {c: {} for c in checkouts}
    print(f"load average before: {load()}")
    for round_ in range(rounds):
        for checkout in checkouts:
            found = figures[checkout]
            found.setdefault("help", []).append(run(checkout, folder, ["fit", "--help"])[0])
            found.setdefault("typo", []).append(run(checkout, folder, ["fit", "--trainer.max_step", "60"])[0])
            for name, args in mistakes(folder, config, occupied).items():
                found.setdefault(name, []).append(run(checkout, folder, args)[0])
            found.setdefault("first step", []).append(first_step(checkout, folder, config, round_))
            found.setdefault("tiny.yaml first step", []).append(tiny_first_step(checkout, folder, round_))
            print(f"round {round_ + 1}, {checkout}: " + ", ".join(f"{name} {times[-1]:.2f}"
                                                                for name, times in found.items()), flush=True)
    print(f"load average after: {load()}")
    for number, checkout in enumerate(checkouts, start=1):
        print(f"checkout {number}: {checkout}")
    header = "".join(f"{f'checkout {number}':>34}" for number in range(1, len(checkouts) + 1))
    print(f"{'median s (each round)':<24}{header}")
    for name in figures[here]:
        cells = [f"{median(times):.2f} ({' '.join(f'{t:.2f}' for t in times)})"
                 for times in (figures[checkout][name] for checkout in checkouts)]
        print(f"{name:<24}" + "".join(f"{cell:>34}" for cell in cells))


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
