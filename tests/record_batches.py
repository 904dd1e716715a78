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
