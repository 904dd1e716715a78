"""Start-up of `picogpt fit`: `fit --help`, a mistyped option, and the first training step of a tiny run.

    python -m benchmarks.startup                                 # this checkout, 3 rounds
    python -m benchmarks.startup --other /path/to/other/checkout # and another one, alternating with this

Each figure runs a fresh `python -m picogpt_lightning.cli` process (the package found through PYTHONPATH),
so imports count; "first step" is the time from the process start to the first `on_train_batch_start` of a
1-layer, 16-wide model on a small generated text (prepared once beforehand, as a cached run would be).
Rounds alternate between the checkouts; medians are printed, with the load average before and after.
"""

from __future__ import annotations

import os
import random
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


def first_step(checkout: str, folder: Path, config: Path, round_: int) -> float:
    run_dir = folder / f"run-{abs(hash(checkout))}-{round_}"
    _, err = run(checkout, folder, ["fit", "--config", str(config), "--ckpt_dir", str(run_dir),
                                    "--trainer.callbacks+=startup_callback.FirstStep"])
    lines = [line for line in err.splitlines() if line.startswith("FIRSTSTEP")]
    if not lines:
        raise SystemExit(f"the tiny run of {checkout} failed:\n{err[-2000:]}")
    return float(lines[0].split()[1])


def main(other: str | None = None, rounds: int = 3) -> None:
    """Print medians of `fit --help`, a typo's error and the first step of a tiny run, for this checkout and
    optionally another.

    Args:
        other: Another checkout of picogpt_lightning to compare with (its root folder).
        rounds: Rounds; each runs every figure once per checkout.
    """
    here = str(Path(__file__).resolve().parent.parent)
    checkouts = [here] + ([str(Path(other).resolve())] if other else [])
    folder = Path(tempfile.mkdtemp(prefix="startup-"))
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
    figures: dict[str, dict[str, list[float]]] = {c: {"help": [], "typo": [], "first step": []} for c in checkouts}
    print(f"load average before: {load()}")
    for round_ in range(rounds):
        for checkout in checkouts:
            figures[checkout]["help"].append(run(checkout, folder, ["fit", "--help"])[0])
            figures[checkout]["typo"].append(run(checkout, folder, ["fit", "--trainer.max_step", "60"])[0])
            figures[checkout]["first step"].append(first_step(checkout, folder, config, round_))
    print(f"load average after: {load()}")
    for checkout, values in figures.items():
        shown = ", ".join(f"{name} {median(times):.2f} s ({' '.join(f'{t:.2f}' for t in times)})"
                          for name, times in values.items())
        print(f"{checkout}: {shown}")


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
