"""`picogpt fit --budget 3m`: the sized recipe (no --config) and the budget plan, applied to the parsed settings
before any data is prepared or any folder is made (budget.py plans, recipe.py sizes; this file wires them).

A resumed run keeps the plan stored in its config (trainer.max_steps and the rest): no new probe.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ..budget import BudgetPlan, Throughput, format_seconds, parse_budget, plan_budget, probe
from ..budget_keeper import BudgetKeeper
from ..errors import SettingsError, warn
from ..recipe import (CHAR_RECIPE, CONSISTENCY, TOKEN_EMA_DECAY, TOKEN_RECIPE, WARMUP_FRACTION, Recipe, Shape,
                      choose, corpus_tokens, eval_iters_for, reference_shape, vocab_for)
from ..sharding import PRECISION_ALIASES

EARLY_STOPPING = "lightning.pytorch.callbacks.EarlyStopping"
EMA = "picogpt_lightning.callbacks.EMA"
# Validations without a new best before a sized recipe's run stops (the run keeps best.ckpt and last.ckpt).
PATIENCE = 5
CHAR_VOCAB_GUESS = 128  # before the text is read, for the probe only (the output layer's share is tiny)
# A sized recipe on a CPU trains in bf16-mixed when a probe step runs at least this much faster than in float32:
# on a Xeon with AVX-512 BF16 and AMX a 4x256 took 1.4x the steps in the same 50 minutes, and reached 1.328
# nats/char on a 1 MB text against fp32's 1.349 (docs/benchmarks.md, issue 26); CPUs without bf16 units emulate
# it many times slower, and keep float32.
MIXED_PRECISION_SPEEDUP = 1.2
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
MAX_TIME_NOTE = ("trainer.max_time stops the run but the LR schedule decays over trainer.max_steps ({steps}), not "
                 "the time: pass --budget {time} instead to end the schedule at the time")


def given_options(args: list[str]) -> set[str]:
    """The dotted option names on the command line: ['--model.n_layer', '2'] -> {'model.n_layer'}."""
    return {arg[2:].split("=")[0] for arg in args if arg.startswith("--")}


def joined_budget(args: list[str]) -> list[str]:
    """`--budget -1m` as `--budget=-1m`: argparse would take a value that starts with '-' for an option and
    report a missing value instead of the bad one."""
    out = list(args)
    for index, arg in enumerate(out[:-1]):
        if arg == "--budget" and out[index + 1].startswith("-"):
            out[index:index + 2] = [f"--budget={out[index + 1]}"]
            break
    return out


class BudgetSetup:
    """Applies `--budget` (and, without --config, the sized recipe) to a parsed `fit` config."""

    def __init__(self, measure=None):
        """`measure(config) -> Throughput`: the probe (a fake one in the tests)."""
        self.measured: dict[tuple, Throughput] = {}
        self.probe_seconds = 0.0  # spent probing
        self.training_seconds = 0.0  # the budget less the probes
        self.plan: BudgetPlan | None = None
        self.recipe: Recipe | None = None
        self.measure = measure or self._probe

    def apply(self, config: Namespace, args: list[str], resuming: bool, sized: bool,
              stored_budget: str | None = None) -> None:
        """`resuming`: the run's settings come from its checkpoint, whose budget (if any) is `stored_budget`."""
        budget = config.get("budget")
        if budget is None:
            max_time = config.trainer.get("max_time")
            if max_time and not resuming:
                warn(MAX_TIME_NOTE.format(steps=config.trainer.max_steps, time=_as_budget(max_time)))
            return
        seconds = parse_budget(budget)
        if resuming and stored_budget is None:
            raise SettingsError(f"--budget {budget} plans a new run; this resume continues a run that had no budget: "
                                f"drop --budget, or pass --additional_steps N")
        if resuming:
            rank_zero_only(print)(f"budget {format_seconds(seconds)}: continuing the plan stored with the run "
                                  f"({config.trainer.max_steps:,} steps), no new probe")
            return
        given = given_options(args)
        if "trainer.max_steps" in given:
            raise SettingsError(f"--budget {budget} plans trainer.max_steps from the time; give one of "
                                f"--budget and --trainer.max_steps, not both")
        if sized:
            self.recipe = self._size(config, seconds, given)
        throughput = self.measure(config)
        warmup_fraction = self._warmup_fraction(config, given)
        # The probes' own time comes out of the budget, so the whole command keeps to it.
        left = seconds - self.probe_seconds
        val_batches = _val_batches(config)
        plan = plan_budget(left, throughput, self._tokens_per_step(config), val_batches, warmup_fraction, seconds)
        self.plan = BudgetPlan(**{**plan.to_dict(), "budget_seconds": seconds})
        if self.recipe is not None and self.recipe.data_limited:
            self.plan = _capped(self.plan, self.recipe, throughput, val_batches, warmup_fraction)
        self.training_seconds = left
        self._set(config, given, left)

    def _size(self, config: Namespace, seconds: float, given: set[str]) -> Recipe:
        size = _corpus_bytes(config.data.text_path)
        mode = config.data.mode
        vocab = config.data.vocab_size if "data.vocab_size" in given else vocab_for(size)

        def tokens_in(shape: Shape, budget: float) -> int:
            trial = _with_shape(config, shape, vocab)
            plan = plan_budget(budget, self.measure(trial), shape.tokens_per_step, 10, WARMUP_FRACTION)
            return plan.tokens

        # The probes measure the model the recipe will train: its architecture and optimizer, not the defaults.
        for key, value in (CHAR_RECIPE if mode == "char" else TOKEN_RECIPE).items():
            if f"model.{key}" not in given:
                config[f"model.{key}"] = value
        precision, why = None, ""
        if "trainer.precision" not in given and _precision(config) == "32-true":
            reference = reference_shape(size, mode, config.data.val_fraction)
            precision, why = self._faster_precision(config, reference, vocab)
            if precision:
                config.trainer.precision = precision  # the shapes below are probed in it
        recipe = replace(choose(size, mode, config.data.val_fraction, seconds, tokens_in, vocab, precision),
                         precision_reason=why)
        rank_zero_only(print)(recipe.line())
        overridden = [f"{key} {config[key]} (the recipe's {value})" for key, value in recipe.settings.items()
                      if key in given and config[key] != value]
        for key, value in recipe.settings.items():
            if key not in given and not (key == "model.block_size" and "data.block_size" in given):
                config[key] = value
        config.model.block_size = config.data.block_size  # linked at parse time; the recipe sets both
        if "data.eval_iters" not in given and {"data.batch_size", "data.block_size"} & given:
            # The recipe counted its validation batches in its own batches: a given batch or context validates
            # on the same blocks (the whole split, when it is small), not half of them.
            config.data.eval_iters = eval_iters_for(config.data.batch_size)
        if "trainer.callbacks" not in given:
            stop = Namespace(class_path=EARLY_STOPPING,
                             init_args=Namespace(monitor="val_loss", mode="min", patience=PATIENCE, min_delta=0.0))
            average = Namespace(class_path=EMA, init_args=Namespace(decay=TOKEN_EMA_DECAY))
            averaged = [average] if recipe.averaged else []
            config.trainer.callbacks = [*(config.trainer.get("callbacks") or []), *averaged, stop]
        if overridden:  # the line above describes the recipe; say what the run trains instead
            rank_zero_only(print)(f"flags override the recipe: {', '.join(overridden)}")
        return recipe

    def _faster_precision(self, config: Namespace, shape: Shape, vocab: int) -> tuple[str | None, str]:
        """bf16-mixed where it is the faster: on a GPU that has bfloat16, and on a CPU whose probe step in it is
        MIXED_PRECISION_SPEEDUP times faster than in float32; None (the trainer's float32) elsewhere. With why."""
        device = _device(config.trainer.get("accelerator"))
        if device == "cuda":
            return ("bf16-mixed", "the GPU has bfloat16") if torch.cuda.is_bf16_supported() else (None, "")
        accelerator = config.trainer.get("accelerator")
        if accelerator not in ("cpu", "auto", None) or (accelerator != "cpu" and torch.backends.mps.is_available()):
            return None, ""  # mps and the rest: float32, as configured
        trial = _with_shape(config, shape, vocab)
        single = self.measure(trial).step_seconds
        trial.trainer.precision = "bf16-mixed"
        mixed = self.measure(trial).step_seconds
        speedup = single / mixed
        if speedup >= MIXED_PRECISION_SPEEDUP:
            return "bf16-mixed", f"a step {speedup:.2g}x as fast as float32's here"
        return None, ""

    def _set(self, config: Namespace, given: set[str], left: float) -> None:
        plan = self.plan
        config.trainer.max_steps = plan.max_steps
        if "trainer.val_check_interval" not in given:
            config.trainer.val_check_interval = plan.val_check_interval
        if "model.warmup_iters" not in given:
            config.model.warmup_iters = plan.warmup_iters
        if config.model.get("lr_decay_iters") and "model.lr_decay_iters" not in given:
            config.model.lr_decay_iters = None  # decay to the planned end
        if not config.trainer.get("max_time"):
            # A guard, should the probe have been optimistic: the run stops at the budget all the same.
            guard = int(left * 1.1) + 1
            config.trainer.max_time = f"00:{guard // 3600:02d}:{guard // 60 % 60:02d}:{guard % 60:02d}"

    def _warmup_fraction(self, config: Namespace, given: set[str]) -> float:
        """The config's warmup as a share of its steps, kept when the steps change (the recipe's: 8%)."""
        if self.recipe is not None and "model.warmup_iters" not in given:
            return WARMUP_FRACTION
        steps = config.trainer.max_steps or 1
        return min(0.5, (config.model.warmup_iters or 0) / steps)

    @staticmethod
    def _tokens_per_step(config: Namespace) -> int:
        accumulate = config.trainer.get("accumulate_grad_batches") or 1
        return config.data.batch_size * config.data.block_size * accumulate

    def _probe(self, config: Namespace) -> Throughput:
        """Seconds per step of this config's model and optimizer on this machine (measured once per shape)."""
        from .. import module as lightning_module  # Lightning is imported by fit anyway

        model_settings = {key: value for key, value in config.model.as_dict().items()
                          if key not in ("vocab_size", "train_tokens", "init_from", "compile", "consistency")}
        vocab = config.data.vocab_size if config.data.mode == "token" else CHAR_VOCAB_GUESS
        autocast = AUTOCAST.get(_precision(config))
        passes = 2 if config.model.get("consistency") else 1  # R-Drop runs each batch twice
        key = tuple(sorted((k, str(v)) for k, v in model_settings.items())) + (
            vocab, config.data.batch_size, config.data.block_size, str(autocast), passes)
        if key not in self.measured:
            pl_module = lightning_module.GPTLightningModule(vocab_size=vocab, **model_settings)
            optimizer = _optimizer(pl_module)
            device = _device(config.trainer.get("accelerator"))
            started = time.perf_counter()
            self.measured[key] = probe(pl_module.model, optimizer, vocab, config.data.batch_size,
                                       config.data.block_size, device, autocast=autocast, passes=passes)
            self.probe_seconds += time.perf_counter() - started
        return self.measured[key]

    def callbacks(self) -> list:
        """The callback that keeps a new budgeted run to its time (budget_keeper.py)."""
        if self.plan is None:
            return []
        capped = self.recipe is not None and self.recipe.data_limited
        return [BudgetKeeper(self.training_seconds, self.plan.max_steps if capped else None)]

    def report(self, train_tokens: int) -> None:
        if self.plan is not None:
            rank_zero_only(print)(self.plan.line(train_tokens))


def _precision(config: Namespace) -> str:
    """The trainer's precision by its full name ("bf16" -> "bf16-mixed"; none -> "32-true")."""
    precision = config.trainer.get("precision")
    return str(PRECISION_ALIASES.get(str(precision), precision or "32-true"))


def _as_budget(max_time) -> str:
    """Lightning's max_time ("DD:HH:MM:SS" or {"minutes": 3, ...}) written as a --budget."""
    units = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
    try:
        if isinstance(max_time, dict):
            seconds = sum(float(value) * units[key] for key, value in max_time.items())
        else:
            days, hours, minutes, secs = (float(part) for part in str(max_time).split(":"))
            seconds = days * 86400 + hours * 3600 + minutes * 60 + secs
    except (KeyError, ValueError):
        return "3m"
    return format_seconds(seconds)


def _optimizer(pl_module):
    from ..optim import MuonAdamW

    current = dict(pl_module.model.named_parameters())
    return MuonAdamW([{**group, "params": [current[name] for name in group["names"]]}
                      for group in pl_module.optimizer_groups])


def _device(accelerator) -> str:
    import torch

    if accelerator in ("cpu", None) or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def _with_shape(config: Namespace, shape: Shape, vocab: int) -> Namespace:
    trial = config.clone()
    for key, value in (("model.n_layer", shape.n_layer), ("model.n_embd", shape.n_embd),
                       ("model.n_head", shape.n_head), ("model.block_size", shape.block_size),
                       ("data.block_size", shape.block_size), ("data.batch_size", shape.batch_size),
                       ("data.vocab_size", vocab),
                       ("model.consistency", CONSISTENCY if shape.passes == 2 else 0.0)):
        trial[key] = value
    return trial


def _capped(plan: BudgetPlan, recipe: Recipe, throughput: Throughput, eval_iters: int,
            warmup_fraction: float) -> BudgetPlan:
    """The plan shortened to the recipe's epoch cap: the run ends before the budget rather than memorise."""
    steps = max(10, recipe.planned_tokens // plan.tokens_per_step)
    seconds = steps * plan.step_seconds + plan.validations * throughput.val_batch_seconds * max(1, eval_iters)
    shorter = plan_budget(min(plan.budget_seconds, seconds), throughput, plan.tokens_per_step, eval_iters,
                          warmup_fraction)
    return BudgetPlan(**{**shorter.to_dict(), "budget_seconds": plan.budget_seconds})


def _val_batches(config: Namespace) -> int:
    """The batches one validation takes: eval_iters, or fewer when the val split is smaller (it is then read
    whole, once), estimated from the corpus's size before it is encoded."""
    data = config.data
    try:
        val_tokens = corpus_tokens(_corpus_bytes(data.text_path), data.mode) * data.val_fraction
    except (SettingsError, OSError, TypeError):
        return data.eval_iters
    return max(1, min(data.eval_iters, math.ceil(val_tokens / data.block_size / data.batch_size)))


def _corpus_bytes(text_path: str) -> int:
    path = Path(text_path)
    if path.is_dir():
        return sum(file.stat().st_size for file in path.glob("*.txt"))
    if not path.is_file():
        raise SettingsError(f"data.text_path {text_path} is not a file or folder: the sized recipe measures the "
                            f"corpus first; check the path")
    return path.stat().st_size

