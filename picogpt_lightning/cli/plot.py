"""`picogpt plot`: a run's loss and learning-rate curves as a PNG."""

from __future__ import annotations

from pathlib import Path

from ..errors import PicoGPTError
from .common import run_function


def plot_command(run: str, out: str | None = None) -> None:
    """Draw train loss, val loss and learning rate against steps into a PNG, and print where it went.

    Args:
        run: The run folder of `picogpt fit` (its --ckpt_dir, e.g. checkpoints/small); every
            lightning_logs/version_*/metrics.csv in it is read, later versions (resumes) winning.
        out: The PNG to write (default: RUN/training.png).
    """
    from ..plot import DEFAULT_IMAGE, draw, find_metric_files, read_metrics

    files = find_metric_files(run)
    metrics = read_metrics(files)
    if not metrics["train_loss"] and not metrics["val_loss"]:
        raise PicoGPTError(f"no train_loss or val_loss in {', '.join(map(str, files))}: train for at least "
                           f"log_every_n_steps steps first")
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    image = Path(out) if out else folder / DEFAULT_IMAGE
    image.parent.mkdir(parents=True, exist_ok=True)
    draw(metrics, image, title=folder.name)
    last_step = max(max(values, default=0) for values in metrics.values())
    val = metrics["val_loss"]
    best = f", best val loss {min(val.values()):.4f}" if val else ""
    print(f"plotted {last_step:,} steps from {len(files)} log file(s){best}: wrote {image}")


def main(args: list[str]) -> None:
    run_function("plot", plot_command, args)
