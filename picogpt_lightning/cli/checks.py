"""The settings of `fit`, `finetune` and `validate` that can be checked before any data is prepared or any folder
made: a bad one stops the command in one line with exit status 2 (SettingsError)."""

from __future__ import annotations

import importlib
import math

from jsonargparse import Namespace
from lightning.pytorch.callbacks import WeightAveraging

from ..callbacks import EMA, check_average
from ..data import BlockSettings
from ..errors import SettingsError
from ..memory import check_run_memory
from ..module import recipe_from_flags, settings_from_flags
from ..settings import PrepareSettings
from .launch_checks import check_launch

MAX_SEED_EVERYTHING = 2**32 - 1  # Lightning's seed_everything (numpy's legacy seeding) takes 0 to 2**32 - 1


def check_trainer_settings(subcommand: str, trainer: Namespace) -> None:
    """The Trainer settings whose wrong values Lightning reports late, or as a traceback, or not at all."""
    if trainer.get("fast_dev_run"):
        return
    for name in ("accumulate_grad_batches", "log_every_n_steps") + (("max_steps",) if subcommand == "fit" else ()):
        value = trainer.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            what = "optimizer steps to train (the LR schedule needs a total)" if name == "max_steps" else "whole number"
            raise SettingsError(f"trainer.{name} must be a positive {what}, got {value}")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, float) and interval.is_integer():
        interval = int(interval)
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
        raise SettingsError(f"trainer.val_check_interval counts training batches here (the training set is an "
                            f"endless stream): pass a whole number >= 1, got {interval}")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not (math.isfinite(clip) and clip >= 0):
        raise SettingsError(f"trainer.gradient_clip_val must be a number >= 0 (or null for none), got {clip}")
    callbacks = trainer.get("callbacks")
    callbacks = [callback for callback in (callbacks if isinstance(callbacks, list) else [callbacks])
                 if isinstance(callback, Namespace) and callback.get("class_path")]
    averages = [callback.class_path for callback in callbacks
                if issubclass(_class(callback.class_path), WeightAveraging)]
    if len(averages) > 1:
        raise SettingsError(f"trainer.callbacks holds {len(averages)} weight averages ({', '.join(averages)}), which "
                            f"would swap each other's weights: keep one (the config's EMA takes another decay with "
                            f"--trainer.callbacks.decay=X; --trainer.callbacks '[]' removes the config's callbacks)")
    for callback in callbacks:
        if callback.class_path == f"{EMA.__module__}.{EMA.__name__}":
            args = callback.get("init_args") or Namespace()
            try:
                check_average(args.get("decay", 0.99), args.get("update_every_n_steps", 1),
                              args.get("update_starting_at_step"))
            except ValueError as error:
                raise SettingsError(f"{error} ({callback.class_path})") from None


def _class(class_path: str) -> type:
    """The class a `class_path` of the settings names (the parser has already imported it)."""
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def check_model_settings(flags: dict, architecture: bool = True) -> None:
    """The --model.* flags, checked by the settings dataclasses they build (model.GPTConfig,
    optim.OptimizerSettings, optim.ScheduleSettings), before any data is prepared; the vocabulary is known only
    then, so a placeholder stands in for it. Without `architecture` (finetune, which takes the base model's and
    says which flags disagree with it) the recipe alone."""
    try:
        if architecture:
            settings_from_flags({**flags, "vocab_size": flags.get("vocab_size") or 1})
        else:
            recipe_from_flags(flags)
    except ValueError as error:
        raise SettingsError(f"model.{' '.join(str(error).split())}") from None


def check_settings(subcommand: str, config: Namespace, sized: bool = False) -> None:
    """Every setting that can be checked without data or a model, so that a bad one stops the command before
    any data is prepared or any folder made. `sized`: the sized recipe has yet to set the model (its dropout
    among them), so what depends on it is checked after it (check_model_settings again)."""
    seed = config.get("seed_everything")
    if not isinstance(seed, bool) and not (isinstance(seed, int) and 0 <= seed <= MAX_SEED_EVERYTHING):
        raise SettingsError(f"seed_everything must be a whole number from 0 to 2**32 - 1 (or true for a random "
                            f"one), got {seed}")
    if config.get("additional_steps") is not None and config.additional_steps < 1:
        raise SettingsError(f"--additional_steps must be a positive number of steps, got {config.additional_steps}")
    if config.get("sample_tokens", 0) < 0:
        raise SettingsError(f"--sample_tokens must be >= 0 (0 turns the samples off), got {config.sample_tokens}")
    check_trainer_settings(subcommand, config.trainer)
    check_launch(config.trainer)
    data = config.data
    model = config.model.as_dict()
    check_model_settings({**model, "consistency": 0.0} if sized else model, architecture="text_path" in data)
    check_run_memory(config.model.as_dict(), config.data.as_dict(), config.trainer.as_dict())
    if "text_path" not in data:
        return  # finetune's conversation data: checked by its module once the base model is known
    BlockSettings(data.block_size, data.batch_size, data.eval_iters, data.seed, data.num_workers)
    if data.prepared_dir is None:
        PrepareSettings(**{name: data[name] for name in PrepareSettings.__dataclass_fields__})
