"""Train and val loss and the learning rate of a run against steps, as a PNG (`picogpt plot`).

Reads the CSV logs Lightning's CSVLogger writes, `<run>/lightning_logs/version_N/metrics.csv`. Each resume
starts a new version, so all of them are merged by step; where two versions logged the same metric at the
same step (a resume from an earlier checkpoint re-runs steps), the later version wins. Lightning's `step`
column is 0-based (the row logged after optimizer step 10 says 9): the plot shows optimizer steps.

matplotlib is an optional extra, imported only here, with the Agg backend: no display is needed.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from .errors import PicoGPTError
from .files import NotARegularFile, not_found, read_regular_bytes

LOSSES = ("train_loss", "val_loss")
DEFAULT_IMAGE = "training.png"
# A metrics.csv holds about 60 bytes a logged step: 512 MB is millions of steps, and still fits in memory.
MAX_LOG_BYTES = 512 << 20


def find_metric_files(run: str | Path) -> list[Path]:
    """metrics.csv of every version of a run, oldest version first (version_10 after version_9)."""
    run = Path(run)
    if run.is_file():
        return [run]
    if not run.is_dir():
        raise PicoGPTError(f"{run} {not_found(run)}: pass the run folder of `picogpt fit` (its --ckpt_dir)")
    if (run / "metrics.csv").is_file():
        return [run / "metrics.csv"]
    files = list(run.glob("lightning_logs/version_*/metrics.csv"))
    if not files:
        raise PicoGPTError(
            f"no lightning_logs/version_*/metrics.csv in {run}: pass the run folder of `picogpt fit` "
            f"(logged with the default CSV logger; TensorBoard runs are viewed with `tensorboard --logdir {run}`)"
        )

    def version(path: Path) -> tuple[int, str]:
        found = re.fullmatch(r"version_(\d+)", path.parent.name)
        return (int(found.group(1)) if found else -1, path.parent.name)

    return sorted(files, key=version)


def _is_lr(name: str) -> bool:
    """The learning-rate columns: `lr` (older runs) and LearningRateMonitor's `lr/<parameter group>`."""
    return name == "lr" or name.startswith("lr/")


def read_metrics(files: list[Path]) -> dict[str, dict[int, float]]:
    """{metric: {optimizer step: value}} merged over the files in order, later files winning. The metrics are
    train_loss, val_loss and every learning-rate column."""
    merged: dict[str, dict[int, float]] = {name: {} for name in LOSSES}
    for path in files:
        try:
            text = read_regular_bytes(path, MAX_LOG_BYTES).decode("utf-8")
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        except NotARegularFile as error:
            raise PicoGPTError(f"cannot read {path}: {error.strerror}; a run's log is a plain CSV file: move that "
                               f"version folder out of the run") from None
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise PicoGPTError(
                f"cannot read {path} ({error}): the log is damaged; move that version folder out of the run"
            ) from None
        for line, row in enumerate(rows, start=2):
            try:
                step = int(row["step"]) + 1
            except (KeyError, TypeError, ValueError):
                continue
            for name, value in row.items():
                if (name in LOSSES or (name and _is_lr(name))) and value not in (None, ""):
                    try:
                        merged.setdefault(name, {})[step] = float(value)
                    except ValueError:
                        raise PicoGPTError(f"{path}:{line}: {name} is {value!r}, not a number: the log is damaged; "
                                           f"fix or delete that line") from None
    return merged


def draw(metrics: dict[str, dict[int, float]], image: Path, title: str) -> None:
    """Losses on top, learning rate below, sharing the step axis."""
    try:
        import matplotlib
    except ImportError:
        raise PicoGPTError("plot needs matplotlib: pip install 'picogpt_lightning[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, rates) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), height_ratios=(3, 1))
    for name, style in (("train_loss", {"linewidth": 1, "alpha": 0.8}), ("val_loss", {"marker": "o"})):
        points = sorted(metrics[name].items())
        if points:
            losses.plot(*zip(*points), label=name.replace("_", " "), **style)
    losses.set_ylabel("loss (nats/token)")
    losses.set_title(title)
    losses.grid(alpha=0.3)
    losses.legend()
    for name in sorted(name for name in metrics if _is_lr(name)):
        points = sorted(metrics[name].items())
        if points:
            rates.plot(*zip(*points), label=name.removeprefix("lr/") if name != "lr" else None)
    if rates.get_legend_handles_labels()[1]:
        rates.legend()
    rates.set_ylabel("learning rate")
    rates.set_xlabel("optimizer step")
    rates.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(image, dpi=120)
    plt.close(figure)
