"""Training speed of `picogpt fit` against a plain PyTorch loop, alternating in one run.

    python -m benchmarks.train_speed --config configs/shakespeare-char-cpu.yaml
    python -m benchmarks.train_speed --config configs/small.yaml --steps 5 --rounds 4 --threads 2
    python -m benchmarks.train_speed --config configs/gpt2-124m.yaml --steps 50      # on a GPU

"Ours" is the real `picogpt fit` (LightningCLI, our module, data module, callbacks, logger and progress bar)
run in this process; a callback only observes it. The reference is the loop nanoGPT's train.py runs, written
here without Lightning: the same GPT class and weights, the same random-block batches (RandomBlocks), AdamW with
the same groups, learning-rate schedule, precision, gradient clipping and accumulation. After a warm-up of both,
the callback pauses Lightning every `steps` steps and runs `steps` reference steps (A/B/A/B), so both see the
same state of a shared machine. Validation is moved past the timed steps: it is work the reference does not do.

Each round gives one time per step for each loop; the figures are medians over rounds, and the ratio is the
median of the per-round ratios reference/ours (1.0: Lightning costs nothing; below 1: ours is slower).
MFU is achieved model FLOP/s (GPT.flops_per_token) over the matmul peak measured in this run in the dtype
the config trains in.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import (
    machine_line,
    matmul_peak,
    median,
    override_args,
    run_cli,
    run_fit,
    set_threads,
    si,
    spec_sheet_peak,
    synchronize,
    training_dtype,
)
from picogpt_lightning.data import RandomBlocks
from picogpt_lightning.model import GPT, next_token_loss
from picogpt_lightning.optim import MuonAdamW


class ReferenceLoop:
    """nanoGPT's training step in plain PyTorch, set up like the Lightning run it is compared with."""

    def __init__(self, trainer: L.Trainer, module: L.LightningModule, compile: bool,
                 batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """`batches` replaces the run's own random blocks (benchmarks.quality replays nanoGPT's sampling)."""
        self.device = module.device
        self.model = GPT(module.model.config).to(self.device)
        self.model.load_state_dict(module.model.state_dict())
        self.model.train()
        if compile:
            self.model.compile()
        # The module's own optimizer and parameter groups (AdamW, or Muon + AdamW), over this loop's copy.
        current = dict(self.model.named_parameters())
        groups = [{**group, "params": [current[name] for name in group["names"]]} for group in module.optimizer_groups]
        self.optimizer = MuonAdamW(groups)
        self.peak_lrs = [group["lr"] for group in self.optimizer.param_groups]
        # The module's own schedule (this passed cosine_lr, a bool, as the schedule's shape: a linear decay).
        peak, max_steps = module.optimizer_settings.learning_rate, trainer.max_steps
        self.lr = lambda step: module.schedule.factor(step, peak, max_steps)
        self.label_smoothing = module.optimizer_settings.label_smoothing
        self.clip = trainer.gradient_clip_val
        self.accumulate = trainer.accumulate_grad_batches
        self.autocast = self._autocast(str(trainer.precision))
        if batches is None:
            data = trainer.datamodule
            folder, meta, _ = data.prepared
            batches = iter(RandomBlocks(str(folder / "train.bin"), meta["dtype"], data.hparams.block_size,
                                        data.hparams.batch_size, data.hparams.seed, rank=0))
        self.batches = batches
        self.pin = self.device.type == "cuda"
        self.step_index = 0

    def _autocast(self, precision: str):
        if precision in ("32-true", "32"):
            return contextlib.nullcontext
        if precision == "bf16-mixed":
            return lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        raise SystemExit(f"the reference loop supports precision 32-true and bf16-mixed, not {precision}")

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = next(self.batches)
        if self.pin:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def step(self) -> None:
        scale = self.lr(self.step_index)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * scale
        for _ in range(self.accumulate):
            inputs, targets = self._next_batch()
            with self.autocast():
                logits, _ = self.model(inputs)
                loss = next_token_loss(logits, targets, self.label_smoothing)
            (loss / self.accumulate).backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return (time.perf_counter() - start) / steps


@dataclass
class Timings:
    """Seconds per step, one entry per round, for ours and for each reference loop."""

    ours: list[float] = field(default_factory=list)
    references: dict[str, list[float]] = field(default_factory=dict)
    first_step_ours: float = 0.0
    profiles: dict[str, str] = field(default_factory=dict)
    probe_at_start: int | None = None
    probe_at_end: int | None = None


class ABTimer(Callback):
    """Times Lightning's steps between consecutive on_train_batch_start calls (so every hook, the logger, the
    progress bar and the data fetch of a step are counted) and runs the reference loops in between.

    `references` maps a name to a function (trainer, module) -> ReferenceLoop, called once Lightning has put
    the module on its device. Rounds: `steps` Lightning steps, then `steps` steps of each reference.
    `probe`, if given, is called when timing starts and when it ends (e.g. to count compiled graphs).
    """

    def __init__(self, references: dict, warmup: int, steps: int, rounds: int, profile: bool = False,
                 probe=None):
        self.make_references = references
        self.warmup, self.steps, self.rounds = warmup, steps, rounds
        self.profile = profile
        self.probe = probe
        self.timings = Timings()
        self.loops: dict[str, ReferenceLoop] = {}
        self.segment_start = None
        self.train_start = None
        self.profiler = None

    @property
    def max_steps(self) -> int:
        # One more step than timed, so the last timed segment ends at a step start like the others.
        return self.warmup + self.steps * self.rounds + 1

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches:
            return  # a later micro-batch of the same optimizer step
        step = trainer.global_step
        if step == 1:
            synchronize(pl_module.device)
            self.timings.first_step_ours = time.perf_counter() - self.train_start
        if step < self.warmup or (step - self.warmup) % self.steps:
            return
        synchronize(pl_module.device)
        if step == self.warmup:
            self._warm_up_references(trainer, pl_module)
        else:
            self.timings.ours.append((time.perf_counter() - self.segment_start) / self.steps)
            if self.profiler is not None:
                self.timings.profiles["ours"] = self._stop_profile()
        round_index = (step - self.warmup) // self.steps
        if round_index == self.rounds:
            self.timings.probe_at_end = self.probe() if self.probe else None
            return
        last_round = round_index == self.rounds - 1
        self._run_references(profile=self.profile and last_round)
        if round_index == 0 and self.probe:
            self.timings.probe_at_start = self.probe()
        if self.profile and last_round:
            self._start_profile()
        self.segment_start = time.perf_counter()

    def _run_references(self, profile: bool) -> None:
        for name, loop in self.loops.items():
            if profile:
                self._start_profile()
            self.timings.references[name].append(loop.run(self.steps))
            if profile:
                self.timings.profiles[name] = self._stop_profile()

    def _warm_up_references(self, trainer, pl_module) -> None:
        for name, make in self.make_references.items():
            loop = make(trainer, pl_module)
            loop.run(max(self.warmup, 1))
            self.loops[name] = loop
            self.timings.references[name] = []

    def _start_profile(self) -> None:
        self.profiler = cProfile.Profile()
        self.profiler.enable()

    def _stop_profile(self) -> str:
        self.profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(self.profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(40)
        self.profiler = None
        return text.getvalue()


@dataclass
class RunFacts:
    """What the figures are normalised by, captured from the Lightning run."""

    tokens_per_step: int = 0
    flops_per_token: int = 0
    device: torch.device = torch.device("cpu")
    precision: str = "32-true"
    description: str = ""
    peaks: list[float] = field(default_factory=list)
    spec_peak: float | None = None
    load: list[float] = field(default_factory=list)


class FactsCallback(Callback):
    """Reads the model and batch size from the run, and measures the matmul peak at its start and end (the
    best of the two is the peak: the busier moment of a shared machine would only lower it)."""

    def __init__(self, facts: RunFacts):
        self.facts = facts

    def on_train_start(self, trainer, pl_module) -> None:
        facts, data = self.facts, trainer.datamodule.hparams
        facts.device, facts.precision = pl_module.device, str(trainer.precision)
        facts.tokens_per_step = data.batch_size * data.block_size * trainer.accumulate_grad_batches
        facts.flops_per_token = pl_module.model.flops_per_token(data.block_size)
        cfg = pl_module.model.config
        facts.description = (
            f"model: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, vocab {cfg.vocab_size}, "
            f"{pl_module.model.num_params() / 1e6:.2f}M parameters; block {data.block_size}, batch "
            f"{data.batch_size} x {trainer.accumulate_grad_batches} accumulated = {facts.tokens_per_step} "
            f"tokens/step; precision {facts.precision}; compile {pl_module.hparams.compile}"
        )
        facts.peaks.append(matmul_peak(facts.device, training_dtype(facts.precision)))
        facts.spec_peak = spec_sheet_peak(facts.device, training_dtype(facts.precision))
        facts.load.append(os.getloadavg()[0])

    def on_train_end(self, trainer, pl_module) -> None:
        self.facts.peaks.append(matmul_peak(self.facts.device, training_dtype(self.facts.precision)))
        self.facts.load.append(os.getloadavg()[0])


def fit_with_timer(config: str, timer: ABTimer, facts: RunFacts, overrides: list[str], inspect_run=None):
    """`picogpt fit --config CONFIG` observed by `timer`, in a throwaway run folder, validating only after the
    timed steps; returns inspect_run(run folder) if given, called before the folder is deleted."""
    with tempfile.TemporaryDirectory(prefix="picogpt-bench-") as run_dir:
        args = ["--config", config, "--ckpt_dir", run_dir,
                "--trainer.max_steps", str(timer.max_steps),
                "--trainer.val_check_interval", str(timer.max_steps + 1),
                *override_args(overrides)]
        run_fit(args, [FactsCallback(facts), timer])
        return inspect_run(Path(run_dir)) if inspect_run else None


def print_figures(name: str, seconds: list[float], facts: RunFacts, peak: float) -> None:
    step = median(seconds)
    tokens = facts.tokens_per_step / step
    achieved = tokens * facts.flops_per_token
    print(f"{name} ms/step: {step * 1e3:.2f} (median of {len(seconds)} rounds; min {min(seconds) * 1e3:.2f})")
    print(f"{name} tokens/s: {tokens:,.0f}")
    line = f"{name} achieved: {si(achieved, 'FLOP/s')}, MFU {achieved / peak:.1%} of the measured peak"
    if facts.spec_peak:
        line += f", {achieved / facts.spec_peak:.1%} of the {si(facts.spec_peak, 'FLOP/s')} spec sheet peak"
    print(line)


def paired_ratio(reference: list[float], ours: list[float]) -> float:
    """Median over rounds of reference time / our time: above 1 ours is faster."""
    return median([r / o for r, o in zip(reference, ours)])


def print_header(facts: RunFacts, config: str, overrides: list[str]) -> float:
    peak = max(facts.peaks)
    print(f"{machine_line(facts.device)}; lightning {L.__version__}")
    print(f"config: {config}" + (f" with {' '.join(overrides)}" if overrides else ""))
    print(facts.description)
    print(f"model FLOPs per token: {si(facts.flops_per_token, 'FLOP')}")
    print(f"matmul peak ({training_dtype(facts.precision)}): {si(peak, 'FLOP/s')}, best of the run's start and end")
    if facts.device.type == "cpu":
        # Other processes on a shared machine slow both loops, and torch's thread pool suffers most.
        print(f"load average at start and end: {facts.load[0]:.2f}, {facts.load[-1]:.2f} ({os.cpu_count()} cores)")
    return peak


def main(
    config: str = "configs/shakespeare-char-cpu.yaml",
    steps: int = 20,
    rounds: int = 5,
    warmup: int = 10,
    threads: int | None = None,
    overrides: list[str] | None = None,
    profile: bool = False,
) -> None:
    """Time `picogpt fit` against a plain PyTorch loop: ms/step, tokens/s, MFU, ratio ours/reference.

    Args:
        config: a picogpt YAML config (its model, data, precision, compile and clipping are used by both loops).
        steps: optimizer steps per timed segment.
        rounds: timed segments of each loop, alternating ours and reference.
        warmup: untimed steps of each loop before the first segment (compilation happens here).
        threads: torch CPU threads (torch.set_num_threads); null keeps torch's default (one per core).
        overrides: extra `picogpt fit` settings as KEY=VALUE, e.g. data.num_workers=1 trainer.enable_progress_bar=false.
        profile: print cProfile's top functions (by cumulative time) for the last round of each loop (that
            round's times then include the profiler's overhead).
    """
    overrides = list(overrides or [])
    set_threads(threads)
    facts = RunFacts()

    def reference(trainer, module):
        return ReferenceLoop(trainer, module, compile=bool(module.hparams.compile))

    timer = ABTimer({"reference": reference}, warmup, steps, rounds, profile)
    fit_with_timer(config, timer, facts, overrides)
    peak = print_header(facts, config, overrides)
    times = timer.timings
    print_figures("ours", times.ours, facts, peak)
    print_figures("reference", times.references["reference"], facts, peak)
    print(f"ratio ours/reference (speed): {paired_ratio(times.references['reference'], times.ours):.3f}")
    for name, text in times.profiles.items():
        print(f"\n--- cProfile, last segment of {name} ({steps} steps) ---\n{text}")


if __name__ == "__main__":
    run_cli(main)
