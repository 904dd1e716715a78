"""Callbacks and the checkpoint writer that make a run safe to interrupt and easy to follow: checkpoints
written atomically with a checksum, best.ckpt and last.ckpt at the true end (a last validation included),
graceful Ctrl-C, a stop on non-finite loss, and an exponential moving average of the weights that resumes
exactly. What a run shows (progress bar, live samples) is in run_display.py."""

from __future__ import annotations

import errno
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint, ModelSummary
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.optim.swa_utils import get_ema_avg_fn
from tqdm import tqdm

from . import sigterm_clock
from .checkpoint import CHECKSUM_KEY, weights_sha256
from .disk import no_space_message, save_torch
from .errors import PicoGPTError, warn
from .files import write_atomically
from .lightning_adapter import (LightningChanged, average_model, count_one_more_logged_step, set_average_model,
                                replace_sigterm_notifier, stop_at_next_step, summary_table)
from .module import refuse_under_sharding
from .sharding import reshard, restore_sharded_average, sharded_average, whole_tensors


log = logging.getLogger("lightning.pytorch.callbacks.model_summary")


@rank_zero_only
def say(message: str) -> None:
    """One message for the user on stderr, from rank 0 only; progress bars are cleared first and drawn again
    below it, so neither garbles the other on a terminal."""
    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its own folder, flushes it to disk and renames it into
    place (files.write_atomically), with the checksum of its weights in it (checkpoint.weights_sha256).

    Lightning's own writer stages the file through fsspec in $TMPDIR and moves it: when /tmp is another
    filesystem (tmpfs is common) that move is a copy, and a kill -9 during it leaves a truncated last.ckpt.
    Remote paths (s3://...) are left to Lightning's writer. A full disk is one line (disk.py) that gives
    `resume_command`."""

    def __init__(self, resume_command: str | None = None):
        super().__init__()
        self.resume_command = resume_command

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(checkpoint.get("picogpt"), dict):
            checkpoint["picogpt"][CHECKSUM_KEY] = weights_sha256(checkpoint["state_dict"])
        try:
            write_atomically(path, lambda temporary: save_torch(checkpoint, temporary))
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise PicoGPTError(no_space_message(path, self.resume_command)) from None


class BestCheckpoint(ModelCheckpoint):
    """Our best.ckpt and last.ckpt, told apart from a ModelCheckpoint the user brings (both may run)."""

    def __init__(self, ckpt_dir: str):
        super().__init__(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1,
                         save_last=True, auto_insert_metric_name=False, enable_version_counter=False)


class FinalValidation(Callback):
    """Validates after the last step when that step is not a validation step, so every run ends with a val
    loss, best.ckpt exists, and the final line is true (a run of 5 steps validating every 10 would otherwise end
    without either). Lightning validates after any batch at which `should_stop` is set."""

    def __init__(self):
        self.forced_step = None
        self.rng_state = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps and not trainer.should_stop:
            batches = trainer.fit_loop.epoch_loop.total_batch_idx + 1
            interval = trainer.val_check_batch
            if not (isinstance(interval, int) and batches % interval == 0):
                trainer.should_stop = True
                self.forced_step = trainer.global_step
                # Starting the val loader draws from torch's generator; a longer run would not have validated
                # here, so its dropout masks would differ from a resumed run's unless the draw is undone.
                self.rng_state = torch.get_rng_state()

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        # Before ModelCheckpoint (Lightning runs checkpoint callbacks last) saves the state to resume from.
        if self.rng_state is not None:
            torch.set_rng_state(self.rng_state)
            self.rng_state = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        # A checkpoint written during validation has its logging step counter one behind; Lightning catches up
        # on resume only when the step was a scheduled validation step. For ours, catch up here, or a resumed
        # run would log every step one too low.
        if self.forced_step is not None and checkpoint.get("global_step") == self.forced_step and trainer.validating:
            try:
                count_one_more_logged_step(checkpoint)
            except LightningChanged as error:
                warn(f"a run resumed from the checkpoint of step {self.forced_step} will log every step one too "
                     f"low: {error} (please report it with your Lightning version)")


class QuietFlopsSummary(ModelSummary):
    """Lightning's model summary without its FLOPs column and "Total Flops" line when they are 0, as they
    always are here: FLOPs are only counted for a model with an `example_input_array`."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        if total_flops:
            return ModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                          total_training_modes, total_flops, **summarize_kwargs)
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *columns)
        log.info("\n" + table.rsplit("\n", 1)[0])


class LastCheckpoint(Callback):
    """Keeps `last.ckpt` at the newest step.

    ModelCheckpoint writes last.ckpt only when it validates, so a run whose max_steps is not a multiple of the
    validation interval, or that is interrupted, would otherwise resume from an older step.
    """

    def __init__(self, ckpt_dir: str, resume_command: str, save: bool = True):
        self.path = Path(ckpt_dir) / "last.ckpt"
        self.resume_command = resume_command
        self.saved_step = -1
        self.enabled = save  # False with --trainer.enable_checkpointing false: report interrupts, save nothing

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_step = max(self.saved_step, checkpoint["global_step"])

    def save(self, trainer: L.Trainer) -> None:
        if self.enabled and trainer.global_step > 0 and trainer.global_step != self.saved_step:
            trainer.save_checkpoint(self.path, weights_only=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException at a step boundary, so the state saved here is a consistent one.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            if not self.enabled:
                say(f"\nInterrupted at step {trainer.global_step}; nothing was saved (checkpointing is off)")
                return
            self.save(trainer)
            say(
                f"\nInterrupted at step {trainer.global_step}; saved {self.path}. "
                f"Resume with: {self.resume_command}"
            )


class GracefulInterrupt(Callback):
    """The first Ctrl-C stops training at the next step boundary (on every rank), like SIGTERM does in
    Lightning, so last.ckpt holds a consistent state; a second Ctrl-C aborts at once.

    SIGTERM also starts sigterm_clock, so that a step that never ends cannot make the run ignore it."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._signalled = False  # by a signal, under several processes (_stop_every_rank)
        if threading.current_thread() is threading.main_thread():
            # What SIGTERM did before this run: Lightning's teardown puts it back before ours runs, and ours must
            # not then put back Lightning's handler, which would outlive the run (and, in a process that trains
            # again, be chained into the next run's, with this run's notifier inside).
            self._sigterm_before_run = signal.getsignal(signal.SIGTERM)
        if stage == "fit":
            # Lightning installs its SIGTERM handler before on_train_start: from then on, SIGTERM is ours too
            # (a signal between the two used to reach Lightning's broadcasting notifier).
            replace_sigterm_notifier(trainer, lambda signum, frame: self._on_sigterm(trainer, signum))

    def _on_sigterm(self, trainer: L.Trainer, signum: int) -> None:
        if getattr(self, "_deadline", None) is None:
            self._deadline = sigterm_clock.start()
        if trainer.world_size > 1:
            self._stop_every_rank(trainer, signum)
        else:
            stop_at_next_step(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.getsignal(signal.SIGINT)
        lightning_sigterm = signal.getsignal(signal.SIGTERM)

        def on_sigint(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("\nStopping after this step (press Ctrl-C again to abort without saving)...", file=sys.stderr)
            if trainer.world_size > 1:
                self._stop_every_rank(trainer, signum)
            elif callable(lightning_sigterm):
                lightning_sigterm(signum, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)

        def on_sigterm(signum, frame):
            if trainer.world_size > 1:
                self._on_sigterm(trainer, signum)
            elif callable(lightning_sigterm):
                lightning_sigterm(signum, frame)  # Lightning's, which calls _on_sigterm (setup) among its own
            else:
                raise SystemExit(143)

        signal.signal(signal.SIGTERM, on_sigterm)

    def _stop_every_rank(self, trainer: L.Trainer, signum: int) -> None:
        """Several processes: pass the signal on to the ones this process started (as Lightning's handler
        does) and note it; every rank then stops at the same step (on_train_batch_end). Lightning's own handler
        broadcasts from inside the signal handler, and each rank stops when its own flag is set: with every
        process signalled at once (SLURM's requeue, Ctrl-C) ranks stopped a step apart or hung."""
        launcher = trainer.strategy.launcher
        if launcher is not None and not self._signalled:
            launcher.kill(signum)
        self._signalled = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # One small all-reduce a step, beside the broadcast Lightning already makes each step for the same purpose.
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            stop_at_next_step(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        previous = getattr(self, "_previous", None)
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, getattr(self, "_sigterm_before_run", signal.SIG_DFL))
            self._previous = None
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._deadline = None


class NonFiniteLossGuard(Callback):
    """Stops training when the loss becomes NaN or inf, before any checkpoint can store the broken weights.

    On one CPU process the check costs nothing and runs every step. On accelerators it would force a host sync
    per step, so the flag is accumulated on the device and read only at logging and validation boundaries.
    With several processes the decision is reduced over all of them (any rank's NaN stops every rank), at
    those same boundaries, so no rank is left waiting in a collective for one that stopped.
    """

    def __init__(self, ckpt_dir: str):
        self.ckpt_dir = Path(ckpt_dir)
        self.bad = None
        self.first_checked_step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        bad = ~torch.isfinite(loss.detach())
        self.bad = bad if self.bad is None else self.bad | bad
        every_step = loss.device.type == "cpu" and trainer.world_size == 1
        if every_step or trainer.global_step % trainer.log_every_n_steps == 0:
            self.check(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self.check(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer)

    def check(self, trainer: L.Trainer) -> None:
        bad = self.bad is not None and bool(self.bad)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            last = self.ckpt_dir / "last.ckpt"
            where = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was saved yet"
            steps = (f"step {trainer.global_step}" if trainer.global_step - self.first_checked_step <= 1
                     else f"steps {self.first_checked_step + 1}-{trainer.global_step}")
            raise PicoGPTError(
                f"the training loss became NaN or inf at {steps}; {where} (not overwritten). Try a lower "
                f"--model.learning_rate, gradient clipping (--trainer.gradient_clip_val 1.0), or more warmup "
                f"(--model.warmup_iters)"
            )
        self.bad = None
        self.first_checked_step = trainer.global_step


def check_average(decay: float, update_every_n_steps: int, update_starting_at_step: int | None) -> None:
    """EMA's settings that would average nothing, or never move (Lightning's own takes decay 1 and every 0 steps)."""
    if not 0 <= decay < 1:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}: the average moves by 1 - decay of the way "
                         "to the trained weights each step (0.99 averages about the last 100 steps)")
    if update_every_n_steps < 1:
        raise ValueError(f"EMA update_every_n_steps must be 1 or more, got {update_every_n_steps}")
    if update_starting_at_step is not None and update_starting_at_step < 0:
        raise ValueError(f"EMA update_starting_at_step must be 0 or more (or null), got {update_starting_at_step}")


class EMA(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights, for validation and for the weights every
    checkpoint stores (`state_dict`; the trained weights go under `current_model_state`, so resume continues
    from them). Configs switch it on with `trainer.callbacks: [{class_path: picogpt_lightning.callbacks.EMA}]`.

    Three changes to Lightning's: buffers are not averaged by default (the rotary cos/sin tables are constants
    that averaging would only round); the average is not copied over the trained weights when training ends
    (last.ckpt is written after that moment, and would then resume from the average instead of from where an
    uninterrupted run stands; every checkpoint already carries the average); and until the average's first
    update (`update_starting_at_step`) it is the trained weights, where Lightning's would validate and save the
    weights the run started from. A resume that adds it to a run without one starts the average there; one that
    drops it goes on from the trained weights (GPTLightningModule.on_load_checkpoint), not from the average.
    """

    def __init__(self, decay: float = 0.99, update_starting_at_step: int | None = None, use_buffers: bool = False,
                 update_every_n_steps: int = 1, **kwargs):
        check_average(decay, update_every_n_steps, update_starting_at_step)
        self.average_args = dict(use_buffers=use_buffers, avg_fn=get_ema_avg_fn(decay), **kwargs)
        super().__init__(decay=decay, update_starting_at_step=update_starting_at_step, use_buffers=use_buffers,
                         update_every_n_steps=update_every_n_steps, **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Under ModelParallelStrategy (fsdp here) the model is sharded before the average copies it (Lightning's
        # setup calls configure_model first), so the average is sharded as the weights are.
        if stage == "fit" and not isinstance(trainer.strategy, ModelParallelStrategy):
            refuse_under_sharding(trainer.strategy, "the EMA of the weights", "Lightning's average keeps a whole "
                                  "copy of the model, and this strategy holds a shard of it on each rank",
                                  "--trainer.strategy ddp or fsdp (FSDP2), or train without it "
                                  "(--trainer.callbacks '[]')")
        if stage == "fit" and isinstance(trainer.strategy, ModelParallelStrategy):
            set_average_model(self, sharded_average(pl_module, trainer.strategy.root_device, **self.average_args))
        else:
            with warnings.catch_warnings():  # said of any module with configure_model; ours shards only under fsdp
                warnings.filterwarnings("ignore", message=".*WeightAveraging doesn't support sharding")
                super().setup(trainer, pl_module, stage)
        start = self.update_starting_at_step
        if stage == "fit" and start is not None and 0 < trainer.max_steps <= start and trainer.is_global_zero:
            warn(f"the EMA starts averaging at step {start}, but this run ends at step {trainer.max_steps}: "
                 "validation and the checkpoints use the trained weights")

    def _follow_until_first_update(self, pl_module: L.LightningModule) -> None:
        """Before its first update the average holds the weights of the start: make it the trained weights."""
        average = average_model(self)
        if average is None or average.n_averaged.item() > 0:
            return
        with torch.no_grad():
            for kept, trained in zip(average.module.state_dict().values(), pl_module.state_dict().values()):
                kept.copy_(trained)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._follow_until_first_update(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reshard(pl_module)  # under fsdp, so that the weights swapped back are slices, as the average's are
        super().on_validation_epoch_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # A run that had no average (the resume line lists the callback added): the average begins at its
        # first update, and until then it is the trained weights (_follow_until_first_update).
        if average_model(self) is not None and "averaging_state" not in checkpoint:
            return
        if average_model(self) is not None and "state_dict" not in checkpoint:
            restore_sharded_average(average_model(self), pl_module, checkpoint)  # sharding.py
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._follow_until_first_update(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if average_model(self) is not None and isinstance(trainer.strategy, ModelParallelStrategy):
            # The average's slices, gathered whole (every rank takes part; rank 0 writes them), as the weights are.
            checkpoint["state_dict"] = whole_tensors(checkpoint["state_dict"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass
