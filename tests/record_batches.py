"""Callbacks for the distributed tests (test use only)."""

from pathlib import Path

import lightning as L
import torch


class RecordFirstBatch(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and batch_idx == 0:
            torch.save(batch[0], self.out_dir / f"rank{trainer.global_rank}.pt")


class PoisonRank(L.Callback):
    """Makes one rank's loss NaN from a given step on, as a diverging shard would (test use only)."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.ln_f.weight.fill_(float("nan"))


class SlowSteps(L.Callback):
    """Sleeps after each training step, so that a subprocess can be interrupted mid-run (test use only)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import time

        time.sleep(self.seconds)


class ListLogger(L.pytorch.loggers.Logger):
    """A logger a user might bring (test use only): keeps the metrics in memory."""

    logged: list = []

    def __init__(self):
        super().__init__()
        ListLogger.logged = []

    @property
    def name(self):
        return "list"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        ListLogger.logged.append((step, dict(metrics)))


class RecordCallbackOrder(L.Callback):
    """Keeps the names of the trainer's callbacks in order (test use only)."""

    order: list = []

    def on_fit_start(self, trainer, pl_module):
        RecordCallbackOrder.order = [type(callback).__name__ for callback in trainer.callbacks]


class SigtermBeforeFirstStep(L.Callback):
    """Rank `rank` sends itself SIGTERM in on_train_start, before the run's own callbacks' on_train_start (the
    user's callbacks come first): after Lightning has installed its SIGTERM handler, before the first step."""

    def __init__(self, rank: int = 1):
        self.rank = rank

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == self.rank:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
