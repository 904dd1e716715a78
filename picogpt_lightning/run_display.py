"""What a run shows while it trains: a progress bar that counts total steps across resumes and redraws by time
on slow steps, and a live sample from the model after each validation."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from .callbacks import say
from .generate import make_generator, stream_text
from .module import SHARDED_STRATEGIES
from .progress import TimedRedraw
from .prompt import encode_prompt
from .settings import SamplingSettings


class StepProgressBar(TQDMProgressBar):
    """Shows optimizer steps out of trainer.max_steps, continuing from the resumed step ("Training from step
    600: 650/1000"), instead of the batches of an endless epoch ("21/?")."""

    redraw: TimedRedraw | None = None  # redraws by time during training

    def on_train_start(self, trainer: L.Trainer, *_) -> None:
        super().on_train_start(trainer)
        self.first_step = trainer.global_step
        self._count_steps(trainer)  # a resumed run restarts mid-epoch: on_train_epoch_start is not called
        # Redrawn by time as well as by steps: on a slow run (seconds a step) elapsed time and rate keep moving.
        self.redraw = TimedRedraw(self.train_progress_bar)

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.redraw is not None:  # the validation bar and the sample printed after it have the screen
            self.redraw.active = False
        super().on_validation_start(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.redraw is not None:
            self.redraw.stop()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if self.redraw is not None:
            self.redraw.stop()

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        self._count_steps(trainer)

    def _count_steps(self, trainer: L.Trainer) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # the rate counts this run's steps only
        first = getattr(self, "first_step", 0)
        bar.set_description(f"Training from step {first}" if first else "Training")
        bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version number is not a training metric
        return metrics

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.redraw.active = True
        step = trainer.global_step
        bar = self.train_progress_bar
        if step % self.refresh_rate == 0 or step >= trainer.max_steps or self.redraw.due():
            bar.n = step
            metrics = self.get_metrics(trainer, pl_module)
            # This step's loss (the module logs train_loss only at the logger's interval); Lightning divides
            # it by the accumulation count.
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if loss is not None:
                metrics["train_loss"] = f"{float(loss) * trainer.accumulate_grad_batches:.3f}"
            bar.set_postfix(metrics, refresh=False)
            bar.refresh()


class ValidationSample(Callback):
    """After each validation, a short continuation of a fixed prompt (fixed seed), so progress can be read as
    well as measured: printed on rank 0 and kept in the log folder (samples.txt, and TensorBoard's text tab
    when that logger is used).

    Strategies that shard the weights over ranks (FSDP, DeepSpeed, model parallel) leave rank 0 without a
    whole model to sample from, so there the samples are off; `picogpt sample` reads the checkpoints instead.
    """

    def __init__(self, prompt: str, max_new_tokens: int, seed: int = 1337):
        self.prompt, self.max_new_tokens, self.seed = prompt, max_new_tokens, seed

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, SHARDED_STRATEGIES):
            say(f"live samples are off under {type(trainer.strategy).__name__} (the weights are sharded over "
                f"ranks); sample from a checkpoint with `picogpt sample --ckpt ...`")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or not trainer.is_global_zero or trainer.sanity_checking:
            return
        if isinstance(trainer.strategy, SHARDED_STRATEGIES):
            return
        model, tokenizer = pl_module.model, trainer.datamodule.tokenizer
        _, prompt_ids = encode_prompt(self.prompt, tokenizer, warn=False)
        was_training = model.training
        model.eval()
        # A compiled model would recompile for every new sequence length; sampling runs eagerly instead.
        with torch.compiler.set_stance("force_eager"):
            generator = make_generator(self.seed, model.wte.weight.device)
            text = "".join(stream_text(model, tokenizer, prompt_ids, self.max_new_tokens,
                                       SamplingSettings(temperature=0.8, top_k=50), generator))
        model.train(was_training)
        step = trainer.global_step
        sample = self.prompt + text
        say(f"\n--- sample at step {step} ---\n{sample}\n---")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)  # a user's own logger may have none
            if hasattr(experiment, "add_text"):
                experiment.add_text("sample", sample, step)
        # trainer.log_dir would broadcast from rank 0, a collective that the other ranks never join here.
        log_dir = getattr(trainer.logger, "log_dir", None)
        if log_dir:
            with open(Path(log_dir) / "samples.txt", "a", encoding="utf-8") as samples:
                samples.write(f"--- step {step} ---\n{sample}\n\n")
