"""The run folder of `fit` and `finetune` (`--ckpt_dir`): where it is, what shows that it holds a run, and the
lock that keeps two runs out of one folder. Nothing here imports Lightning."""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import PicoGPTError
from ..launch import is_global_rank_zero
from ..files import FolderInUse, FolderLock, make_folders, remove_empty_folders, remove_leftovers

LOGS = "lightning_logs"
RUN_FILES = ("best.ckpt", "last.ckpt", LOGS, "training.png")  # what --overwrite deletes


def default_ckpt_dir(config_files) -> Path:
    """checkpoints/<stem of the last --config file>, or checkpoints/default without one."""
    files = [f for f in config_files or [] if f is not None]
    if files:
        return Path("checkpoints") / Path(str(files[-1])).stem
    return Path("checkpoints") / "default"


def is_rank_zero() -> bool:
    """Before the Trainer exists only the launcher's environment tells the processes of a job apart; rank 0
    alone checks, locks and cleans the run folder."""
    return is_global_rank_zero()


class RunFolder:
    """The run folder of a `fit`: created if needed, locked while the run writes into it, and removed again
    when the run failed before writing anything into a folder it created."""

    def __init__(self):
        self.lock: FolderLock | None = None
        self.created: list[Path] = []  # the folders open() made, deepest first

    def open(self, path: Path) -> None:
        try:
            self.created = make_folders(path.absolute())
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
            self.lock = FolderLock(path).acquire()
            remove_leftovers(path)  # half-written checkpoints of a run killed in this folder
        except FolderInUse as busy:
            raise PicoGPTError(
                f"{path} is in use by another run (process {busy.pid}): wait for it to finish, stop it, or pass "
                f"another --ckpt_dir"
            ) from None
        except OSError as error:
            raise PicoGPTError(
                f"cannot write checkpoints to {path} ({error.strerror or error}); pass --ckpt_dir with a writable "
                f"folder"
            ) from None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        remove_empty_folders(self.created)  # only if the run left nothing in them


def holds_run(folder: Path) -> str | None:
    """What shows that `folder` holds a run (its checkpoints), or None."""
    for name in ("last.ckpt", "best.ckpt"):
        if (folder / name).is_file():
            return name
    return None


def clear_run(folder: Path) -> None:
    """Delete the run in `folder` (--overwrite): its checkpoints, logs and plot."""
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def next_version(logs: Path) -> int:
    """The number of the next `version_N` log folder under `logs`."""
    numbers = [int(m.group(1)) for p in logs.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(numbers, default=-1) + 1


def peek(path: Path) -> dict:
    """A checkpoint's plain facts without reading its weights (memory-mapped): for messages and the summary."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a damaged file: the facts are only for a message
        return {}


def summary_line(command: str, trainer, config, vocab: int) -> str:
    """The last line of a run, from what is on disk (so it never names a file that is not there, and holds
    also where the trainer's own record is lost, as under ddp_spawn)."""
    metrics = trainer.callback_metrics
    if command == "validate":
        if "val_loss" not in metrics:
            return "no validation batches: nothing was measured (check --trainer.limit_val_batches)"
        return f"val_loss {float(metrics['val_loss']):.4f}  val_ppl {float(metrics['val_ppl']):.2f}"
    untrained = (f"untrained ~ ln({vocab}) = {math.log(vocab):.2f}" if command == "fit"
                 else "on the held-out conversations' answers")
    if config.trainer.get("fast_dev_run"):
        return f"fast_dev_run: {trainer.global_step} step(s) and a validation ran; nothing was saved"
    best = Path(config.ckpt_dir) / "best.ckpt"
    facts = peek(best) if best.is_file() else {}
    loss = (facts.get("picogpt") or {}).get("best_val_loss")
    if loss is not None:
        return (f"best val_loss {loss:.4f} (perplexity {math.exp(loss):.1f}; {untrained}) at step "
                f"{facts.get('global_step')} in {best}")
    if "val_loss" in metrics:
        loss = float(metrics["val_loss"])
        return (f"val_loss {loss:.4f} at step {trainer.global_step} (perplexity {math.exp(loss):.1f}; {untrained}); "
                f"no best.ckpt was written (checkpointing is off)")
    return f"trained to step {trainer.global_step}; no validation ran, so no best.ckpt"
