"""The callback that keeps a `--budget` run to its time when the machine turns out slower or faster than the
probe measured (a shared machine whose load changes, the data loader, logging): every twentieth of the plan it
projects the end from the run's own pace so far and, when that misses the budget by more than REPLAN_TOLERANCE,
moves the last step and the end of the LR schedule together, so the schedule still ends at the last step and the
last step near the budget. The stored plan (the run's config, trainer.max_steps) follows, so a resume continues
the new one.
"""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from .lightning_adapter import set_max_steps

REPLAN_TOLERANCE = 0.05
MIN_STEPS_TO_JUDGE = 20
CHECKS_PER_RUN = 20


class BudgetKeeper(Callback):
    def __init__(self, seconds: float, most_steps: int | None = None):
        """`seconds`: the training time the plan has (the budget less the probe); `most_steps`: a cap the plan
        never moves past (a sized recipe's epoch cap)."""
        self.seconds = seconds
        self.most_steps = most_steps
        self.started: float | None = None
        self.first_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.started = time.monotonic()
        self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """Judged every CHECKS_PER_RUN-th of the plan (and at least MIN_STEPS_TO_JUDGE steps in): a config
        that validates once, at its end, is kept to its time too."""
        if (batch_idx + 1) % trainer.accumulate_grad_batches or self.started is None:
            return
        done = trainer.global_step - self.first_step
        every = max(MIN_STEPS_TO_JUDGE, trainer.max_steps // CHECKS_PER_RUN)
        if done < MIN_STEPS_TO_JUDGE or done % every or trainer.global_step >= trainer.max_steps:
            return
        elapsed = time.monotonic() - self.started
        pace = elapsed / done  # seconds per step, the validations so far included
        target = trainer.global_step + max(1, int((self.seconds - elapsed) / pace))
        if self.most_steps:
            target = min(target, self.most_steps)
        planned = trainer.max_steps
        if abs(target - planned) <= REPLAN_TOLERANCE * planned:
            return
        self.replan(trainer, pl_module, target)
        rank_zero_only(print)(f"budget: steps take {pace:.3g}s here, so the plan moves from {planned:,} to "
                              f"{target:,} steps; the schedule ends at the new last step")

    @staticmethod
    def replan(trainer: L.Trainer, pl_module, max_steps: int) -> None:
        set_max_steps(trainer, max_steps)
        schedule, peak = pl_module.schedule, pl_module.optimizer_settings.learning_rate
        if schedule.lr_decay_iters is None:  # the decay ends at the last step: it moves with it
            for config in trainer.lr_scheduler_configs:
                lambdas = getattr(config.scheduler, "lr_lambdas", None)
                if lambdas is not None:
                    config.scheduler.lr_lambdas = [
                        (lambda step: schedule.factor(step, peak, max_steps)) for _ in lambdas]
        run_config = getattr(pl_module, "run_config", None)
        if isinstance(run_config, dict) and isinstance(run_config.get("trainer"), dict):
            run_config["trainer"]["max_steps"] = max_steps
