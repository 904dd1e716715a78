"""A callback whose training step never ends (a Python loop, as building a batch of a billion blocks was), for
tests/test_sigterm.py; it touches `marker` once it is stuck."""

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StuckStep(Callback):
    def __init__(self, marker: str, at_step: int = 2):
        self.marker, self.at_step = Path(marker), at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.at_step:
            self.marker.touch()
            while True:
                time.sleep(0.01)
