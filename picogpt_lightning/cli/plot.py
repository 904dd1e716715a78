"""`picogpt plot`: a run's loss and learning-rate curves as a PNG."""

from __future__ import annotations

from pathlib import Path

from ..errors import PicoGPTError, SettingsError
from .common import run_function

IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".eps", ".ps")


def image_path(out: str) -> Path:
    """--out as matplotlib will write it: without a suffix it appends .png, so the name printed says so too."""
    path = Path(out)
    if not path.suffix:
        return path.with_name(path.name + ".png")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise SettingsError(f"--out {out}: {path.suffix} is not an image format matplotlib writes; "
                            f"use a name ending in .png, .pdf or .svg")
    return path


def plot_command(run: str, out: str | None = None) -> None:
    """Draw train loss, val loss and learning rate against steps into a PNG, and print where it went.

    Args:
        run: The run folder of `picogpt fit` (its --ckpt_dir, e.g. checkpoints/small); every
            lightning_logs/version_*/metrics.csv in it is read, later versions (resumes) winning.
        out: The image to write: .png (added when the name has no suffix), .pdf, .svg, ... (default:
            RUN/training.png).
    """
    from ..plot import DEFAULT_IMAGE, draw, find_metric_files, read_metrics

    requested = image_path(out) if out else None

    files = find_metric_files(run)
    metrics = read_metrics(files)
    if not metrics["train_loss"] and not metrics["val_loss"]:
        raise PicoGPTError(f"no train_loss or val_loss in {', '.join(map(str, files))}: train for at least "
                           f"log_every_n_steps steps first")
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    image = requested or folder / DEFAULT_IMAGE
    image.parent.mkdir(parents=True, exist_ok=True)
    draw(metrics, image, title=folder.name)
    last_step = max(max(values, default=0) for values in metrics.values())
    val = metrics["val_loss"]
    best = f", best val loss {min(val.values()):.4f}" if val else ""
    print(f"plotted {last_step:,} steps from {len(files)} log file(s){best}: wrote {image}")


def main(args: list[str]) -> None:
    run_function("plot", plot_command, args)
