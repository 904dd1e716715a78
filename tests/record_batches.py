"""A callback for the distributed test: each rank saves its first training batch (test use only)."""

from pathlib import Path

import lightning as L
import torch


class RecordFirstBatch(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and batch_idx == 0:
            torch.save(batch[0], self.out_dir / f"rank{trainer.global_rank}.pt")
