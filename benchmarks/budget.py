"""Today's shipped config against the corpus-sized recipe, both under the same `--budget`, on corpora of different
sizes (benchmarks/corpora.py makes them):

    python -m benchmarks.corpora --out _runs/corpora
    OMP_NUM_THREADS=1 python -m benchmarks.budget --corpora '[_runs/corpora/small.txt, _runs/corpora/medium.txt]' \\
        --budget 8m --out _runs/budget.jsonl

With `--as_shipped true`, the shipped config runs as a user runs it (its own max_steps, no --budget) and the sized
recipe gets `--budget B`, which should be what the shipped config takes (issue 26's comparison); with
`--together true` both recipes of a corpus, and every corpus, run at once (one process each, one thread each), so
that they meet the same load, and the sized budget must then be what the shipped run takes beside the others.

Each round runs, one after the other as separate `picogpt fit` processes, `--config CONFIG --budget B` (the
shipped recipe with its schedule fitted to the budget) and `--budget B` without a config (the sized recipe), in
alternating order from round to round, so both meet the same load on a shared machine; the load average
(`uptime`) before each run is recorded beside it. Reported per run: wall seconds, planned steps, best and last
val loss (the last is the final validation: what last.ckpt holds), and the best val within the shorter run's wall.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--sample_tokens", "0"]


def run(name: str, args: list[str], work: Path, threads: int) -> dict:
    """One `picogpt fit` process: wall seconds, its printed plan lines and every validation."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    records = folder / "validations.jsonl"
    records.unlink(missing_ok=True)
    started = time.time()
    clock = {"class_path": "benchmarks.speedrun.ValidationClock",
             "init_args": {"out": str(records), "started": started}}
    command = [sys.executable, "-m", "picogpt_lightning.cli", "fit", *args, "--ckpt_dir", str(folder / "run"),
               "--overwrite", "true", "--trainer.accelerator", "cpu", *QUIET,
               f"--trainer.callbacks+={json.dumps(clock)}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    load = os.getloadavg()[0]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.time() - started
    if result.returncode:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    curve = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    plan = [line for line in result.stdout.splitlines() if line.startswith(("budget ", "recipe "))]
    return {"name": name, "seconds": round(seconds, 1), "load": load, "plan": plan, "curve": curve,
            "steps": curve[-1]["step"] if curve else 0,
            "best": min(point["val_loss"] for point in curve) if curve else float("nan"),
            "last": curve[-1]["val_loss"] if curve else float("nan")}


def best_within(curve: list[dict], seconds: float) -> float:
    return min((point["val_loss"] for point in curve if point["seconds"] <= seconds), default=float("nan"))


def main(corpora: list[str], budget: str = "8m", config: str = "configs/char.yaml", mode: str = "char",
         rounds: int = 1, threads: int = 1, out: str = "_runs/budget.jsonl", work: str = "_runs/budget",
         only: str | None = None, as_shipped: bool = False, together: bool = False) -> None:
    """Measure the shipped config against the sized recipe on each corpus under one budget.

    Args:
        corpora: text files to train on.
        budget: the --budget of every run (with as_shipped, of the sized recipe only).
        config: the shipped config to compare against.
        mode: data.mode of both (char or token).
        rounds: alternating rounds per corpus.
        threads: OMP/torch threads per run.
        out: JSON-lines file the results are appended to.
        work: folder for the runs.
        only: run this recipe alone (shipped or sized), e.g. to measure a changed rule against an earlier run.
        as_shipped: run the shipped config with its own steps rather than fitted to the budget.
        together: run every recipe of every corpus at once instead of one after the other.
    """
    jobs = []
    for corpus in corpora:
        shipped = ["--config", config, "--data.text_path", corpus, "--data.mode", mode]
        recipes = {"shipped": shipped if as_shipped else [*shipped, "--budget", budget],
                   "sized": ["--data.text_path", corpus, "--data.mode", mode, "--budget", budget]}
        if only:
            recipes = {only: recipes[only]}
        for index in range(rounds):
            order = list(recipes) if index % 2 == 0 else list(reversed(recipes))
            jobs.append([(corpus, index, name, recipes[name]) for name in order])
    if together:
        with ThreadPoolExecutor(max_workers=sum(len(group) for group in jobs)) as pool:
            futures = [[pool.submit(run, f"{Path(corpus).stem}-{mode}-{name}-{index}", args, Path(work), threads)
                        for corpus, index, name, args in group] for group in jobs]
            outcomes = [[future.result() for future in group] for group in futures]
    else:
        outcomes = [[run(f"{Path(corpus).stem}-{mode}-{name}-{index}", args, Path(work), threads)
                     for corpus, index, name, args in group] for group in jobs]
    for group, results in zip(jobs, outcomes):
        shorter = min(result["seconds"] for result in results)
        for (corpus, index, name, _), result in zip(group, results):
            result.update(corpus=corpus, mode=mode, recipe=name, budget=budget, round=index, config=config,
                          as_shipped=as_shipped, best_within_shorter=best_within(result["curve"], shorter))
            with open(out, "a", encoding="utf-8") as file:
                file.write(json.dumps(result) + "\n")
            print(f"{Path(corpus).stem:8} {mode:5} {name:8} load {result['load']:.1f}  {result['seconds']:6.0f}s  "
                  f"{result['steps']:5d} steps  best {result['best']:.4f}  last {result['last']:.4f}  "
                  f"best within {shorter:.0f}s {result['best_within_shorter']:.4f}", flush=True)
            for line in result["plan"]:
                print("    " + line, flush=True)


if __name__ == "__main__":
    from benchmarks.common import run_cli

    run_cli(main)
