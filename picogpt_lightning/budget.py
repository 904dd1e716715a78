"""Time budgets: `--budget 3m` turned into a number of steps the LR schedule ends at.

A probe (a few optimizer steps of the run's own model, optimizer and batch shape on random tokens, in plain
torch) measures the seconds one step and one validation batch take on this machine; the plan is then the number
of steps that, with its validations, fills the budget. The schedule (warmup, decay to min_lr) is stretched to
those steps, so the learning rate reaches its end at the last step -- unlike `--trainer.max_time`, which stops a
run wherever its schedule stands. The plan is stored in the run's config (trainer.max_steps and the rest), so a
resume continues it without a new probe.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass

import torch

from .errors import SettingsError

UNITS = {"s": 1, "m": 60, "h": 3600}
# How long the validations may take, as a share of the budget; and how many there are at most. At 5% (was 10%) a
# sized run on a 1 MB text validated 13 times instead of 28 and trained 7% more steps (docs/benchmarks.md, issue 26).
VALIDATION_SHARE = 0.05
MAX_VALIDATIONS = 40
# Lightning's own work per step (logging, callbacks, the data loader) on top of the probe's bare steps.
LIGHTNING_OVERHEAD = 1.08


def parse_budget(text: str) -> float:
    """'90s', '3m', '1h', '1h30m' or a plain number of seconds -> seconds (> 0)."""
    cleaned = str(text).strip().lower().replace(" ", "")
    parts = re.fullmatch(r"((?:\d+(?:\.\d+)?[smh])+|\d+(?:\.\d+)?)", cleaned)
    if not parts:
        raise SettingsError(f"--budget {text!r} is not a duration: write it as 90s, 3m, 1h or 1h30m")
    if cleaned[-1].isdigit():
        seconds = float(cleaned)
    else:
        seconds = sum(float(number) * UNITS[unit] for number, unit in re.findall(r"(\d+(?:\.\d+)?)([smh])", cleaned))
    if not seconds > 0:
        raise SettingsError(f"--budget {text!r} is no time at all: give a positive duration such as 90s, 3m or 1h")
    return seconds


def format_seconds(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.3g}h"
    if seconds >= 60:
        return f"{seconds / 60:.3g}m"
    return f"{seconds:.3g}s"


@dataclass(frozen=True)
class Throughput:
    """What the probe measured: seconds of one optimizer step and of one validation batch."""

    step_seconds: float
    val_batch_seconds: float


@dataclass(frozen=True)
class BudgetPlan:
    budget_seconds: float
    step_seconds: float
    max_steps: int
    warmup_iters: int
    val_check_interval: int
    validations: int
    tokens_per_step: int

    @property
    def tokens(self) -> int:
        return self.max_steps * self.tokens_per_step

    def epochs(self, train_tokens: int) -> float:
        return self.tokens / train_tokens if train_tokens else float("nan")

    def line(self, train_tokens: int = 0) -> str:
        epochs = f", {self.epochs(train_tokens):.2g} epochs of the training split" if train_tokens else ""
        return (f"budget {format_seconds(self.budget_seconds)}: {self.max_steps:,} steps of {self.step_seconds:.3g}s "
                f"(measured), {self.tokens:,} tokens{epochs}; warmup {self.warmup_iters}, validation every "
                f"{self.val_check_interval} steps ({self.validations} in all), the schedule ends at the last step")

    def to_dict(self) -> dict:
        return asdict(self)


def plan_budget(seconds: float, throughput: Throughput, tokens_per_step: int, eval_iters: int,
                warmup_fraction: float, budget_seconds: float | None = None) -> BudgetPlan:
    """The steps that fill `seconds` of training with their validations (each `eval_iters` batches).

    Validations take at most VALIDATION_SHARE of the budget and happen at most MAX_VALIDATIONS times, evenly
    spaced (by steps, which at a steady step time is by time too). A budget that cannot hold one step and one
    validation is refused, saying what would fit. `seconds` is what is left of `budget_seconds` (the
    user's) after the probes."""
    step = throughput.step_seconds * LIGHTNING_OVERHEAD
    validation = throughput.val_batch_seconds * max(1, eval_iters)
    smallest = step * 10 + validation
    if seconds < smallest:
        budget = budget_seconds or seconds
        probing = budget - seconds
        needed = math.ceil(smallest + probing)
        raise SettingsError(
            f"--budget {format_seconds(budget)} is too short for this model here: a step takes {step:.3g}s and a "
            f"validation {validation:.3g}s" + (f", the probe took {probing:.3g}s" if probing > 0.5 else "")
            + f", so at least {format_seconds(needed)} is needed for 10 steps and one validation; give a longer "
            f"--budget or a smaller model"
        )
    validations = max(1, min(MAX_VALIDATIONS, int(VALIDATION_SHARE * seconds / validation)))
    steps = max(10, int((seconds - validations * validation) / step))
    interval = max(1, steps // validations)
    warmup = min(steps - 1, round(warmup_fraction * steps))
    return BudgetPlan(budget_seconds=seconds, step_seconds=round(step, 5), max_steps=steps, warmup_iters=warmup,
                      val_check_interval=interval, validations=steps // interval, tokens_per_step=tokens_per_step)


def probe(model: torch.nn.Module, optimizer: torch.optim.Optimizer, vocab_size: int, batch_size: int,
          block_size: int, device: str, steps: int = 3, warmup_steps: int = 2,
          autocast: torch.dtype | None = None, passes: int = 1) -> Throughput:
    """Seconds of an optimizer step (forward, backward, clipping, step) and of a no-grad forward, measured on
    random tokens with `model` and `optimizer` as they are built for the run (their state is thrown away).
    `autocast`: the dtype of a mixed-precision run's forward (bfloat16 for bf16-mixed), None for float32.
    `passes`: how many times a training step runs its batch (2 with R-Drop's consistency; validation once)."""
    model.to(device).train()
    tokens = torch.randint(0, vocab_size, (batch_size, block_size + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    trained = (inputs.repeat(passes, 1), targets.repeat(passes, 1)) if passes > 1 else (inputs, targets)
    device_type = str(device).split(":")[0]

    def forward(batch: tuple[torch.Tensor, torch.Tensor]):
        with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
            return model(*batch)

    def train_step() -> None:
        _, loss = forward(trained)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def eval_step() -> None:
        with torch.no_grad():
            forward((inputs, targets))

    step_seconds = _timed(train_step, steps, warmup_steps, device)
    model.eval()
    val_seconds = _timed(eval_step, steps, 1, device)
    model.train()
    return Throughput(step_seconds=step_seconds, val_batch_seconds=val_seconds)


def _timed(function, repeats: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        function()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
