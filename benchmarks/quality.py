"""Does the default recipe train as well as nanoGPT's? Val loss and wall time of a full `picogpt fit`.

    python -m benchmarks.quality                                   # nanoGPT's CPU recipe, target 1.88
    python -m benchmarks.quality --threads 1 --reference false     # ours only
    python -m benchmarks.quality --seeds '[1337,1,2,3,4]'          # the spread over five seeds
    python -m benchmarks.quality --reference false --nanogpt_replay true   # also nanoGPT's own protocol
    python -m benchmarks.quality --config configs/shakespeare-char.yaml --target 1.4697   # on a GPU

The recipe runs through the real `picogpt fit` in this process (a callback only records each validation). The
target is the figure nanoGPT publishes for the same recipe. As a same-run reference, the plain PyTorch loop of
`benchmarks.train_speed` then trains from the same initial weights on the same batches for the same steps, and
is evaluated on the same validation blocks: with dropout 0 the two curves should agree to a few decimals, which
shows that Lightning trains exactly what a hand-written loop trains. `--seeds` trains once per seed (the
reference only for the first) and prints the spread; `--nanogpt_replay` also trains our GPT the way nanoGPT's
train.py does and prints the noisy 20-batch estimate its README quotes, next to the same model's loss on the
whole val split.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import machine_line, override_args, run_cli, run_fit, set_threads
from benchmarks.train_speed import ReferenceLoop
from picogpt_lightning.model import GPT


class ValidationRecorder(Callback):
    """Keeps (step, val_loss, seconds since train start) of every validation, the initial weights, and the
    trainer and module for the reference run."""

    def __init__(self):
        self.curve: list[tuple[int, float, float]] = []
        self.initial_state = None
        self.trainer = self.module = None
        self.train_start = self.train_seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.trainer, self.module = trainer, pl_module
        self.initial_state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.train_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        loss = float(trainer.callback_metrics["val_loss"])
        self.curve.append((trainer.global_step, loss, time.perf_counter() - self.train_start))
        print(f"ours step {trainer.global_step}: val_loss {loss:.4f}", flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_seconds = time.perf_counter() - self.train_start


@torch.no_grad()
def evaluate(loop: ReferenceLoop, batches) -> float:
    """Token-weighted mean cross-entropy over the validation batches, as the Lightning module computes it."""
    loop.model.eval()
    total, tokens = 0.0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(loop.device), targets.to(loop.device)
        with loop.autocast():
            _, loss = loop.model(inputs, targets)
        total += float(loss) * targets.numel()
        tokens += targets.numel()
    loop.model.train()
    return total / tokens


def random_blocks(tokens: np.ndarray, block: int, batch: int, device: torch.device,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` blocks at uniform random starts drawn with torch's RNG, as nanoGPT's get_batch draws them."""
    starts = torch.randint(len(tokens) - block, (batch,), generator=generator).tolist()
    rows = torch.from_numpy(np.stack([tokens[s : s + block + 1] for s in starts]).astype(np.int64)).to(device)
    return rows[:, :-1], rows[:, 1:]


def split_tokens(module, split: str) -> np.ndarray:
    folder, meta, _ = module.trainer.datamodule.prepared
    return np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r")


@torch.no_grad()
def nanogpt_estimate(module, iters: int = 20, seed: int = 1337) -> float:
    """The val loss as nanoGPT's estimate_loss reports it: the mean loss of `iters` batches of random blocks
    (nanoGPT's CPU recipe uses 20). A noisier figure than the whole-split loss; printed to compare like with
    like against nanoGPT's published number."""
    hp = module.trainer.datamodule.hparams
    val = split_tokens(module, "val")
    generator = torch.Generator().manual_seed(seed)
    module.model.eval()
    losses = [float(module.model(*random_blocks(val, hp.block_size, hp.batch_size, module.device, generator))[1])
              for _ in range(iters)]
    module.model.train()
    return sum(losses) / len(losses)


class NanoGPTReplay:
    """nanoGPT's train.py protocol, replayed with our GPT class and the run's hyperparameters.

    As nanoGPT does: seed torch, build the model (its initialisation draws from torch's global RNG), then draw
    every batch from that same RNG: the first training batch before the loop, then at each evaluation
    `eval_iters` train batches and `eval_iters` val batches, and the next training batch at each step. The
    printed val loss is that evaluation's 20-batch mean, the figure nanoGPT's README quotes. (nanoGPT draws the
    next batch after the forward pass; the same thing with dropout 0, when the forward pass draws nothing.)
    """

    def __init__(self, trainer, module, seed: int, eval_iters: int = 20):
        hp = trainer.datamodule.hparams
        self.block, self.batch, self.eval_iters = hp.block_size, hp.batch_size, eval_iters
        self.tokens = {split: split_tokens(module, split) for split in ("train", "val")}
        self.device = module.device
        torch.manual_seed(seed)
        initial = GPT(module.model.config).state_dict()
        rng_after_init = torch.get_rng_state()
        self.loop = ReferenceLoop(trainer, module, compile=False, batches=self)
        self.loop.model.load_state_dict(initial)
        torch.set_rng_state(rng_after_init)
        self.pending = self.draw("train")

    def draw(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return random_blocks(self.tokens[split], self.block, self.batch, self.device)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, self.pending = self.pending, self.draw("train")
        return batch

    @torch.no_grad()
    def estimate(self, split: str) -> float:
        model = self.loop.model
        model.eval()
        with self.loop.autocast():
            losses = [float(model(*self.draw(split))[1]) for _ in range(self.eval_iters)]
        model.train()
        return sum(losses) / len(losses)

    def run(self, steps: int, interval: int) -> list[tuple[int, float, float]]:
        """(step, val estimate, train estimate) at step 0, every `interval` steps and at the end."""
        curve = []
        for step in range(steps + 1):
            if step % interval == 0 or step == steps:
                train = self.estimate("train")  # nanoGPT evaluates the train split first
                curve.append((step, self.estimate("val"), train))
            if step < steps:
                self.loop.step()
        return curve


def train_reference(recorder: ValidationRecorder, steps: int, interval: int) -> tuple[list[tuple[int, float, float]], float]:
    """The plain loop from the same initial weights, validated every `interval` steps; returns its curve and
    its training wall time."""
    trainer, module = recorder.trainer, recorder.module
    module.model.load_state_dict(recorder.initial_state)  # the reference copies its weights from the module
    loop = ReferenceLoop(trainer, module, compile=bool(module.hparams.compile))
    val_batches = list(trainer.datamodule.val_dataloader())
    curve = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loop.step()
        if step % interval == 0 or step == steps:
            loss = evaluate(loop, val_batches)
            curve.append((step, loss, time.perf_counter() - start))
            print(f"reference step {step}: val_loss {loss:.4f}", flush=True)
    return curve, time.perf_counter() - start


def run_recipe(config: str, overrides: list[str]) -> tuple[ValidationRecorder, float]:
    """One `picogpt fit` of CONFIG; returns what the recorder saw and the command's wall time."""
    recorder = ValidationRecorder()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="picogpt-quality-") as run_dir:
        run_fit(["--config", config, "--ckpt_dir", run_dir, *override_args(overrides)], [recorder])
    if not recorder.curve:
        raise SystemExit("the run never validated: check trainer.val_check_interval and trainer.max_steps")
    return recorder, time.perf_counter() - start


def spread(values: list[float]) -> str:
    """'1.9060 +- 0.0070 (min 1.8951, max 1.9114)' over several runs; the value alone for one."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return (f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f} "
            f"(min {min(values):.4f}, max {max(values):.4f})")


def validation_interval(trainer) -> int:
    check = trainer.val_check_interval
    return int(check) if check > 1 else trainer.global_step


def main(
    config: str = "configs/shakespeare-char-cpu.yaml",
    target: float = 1.88,
    seeds: list[int] | None = None,
    threads: int | None = None,
    reference: bool = True,
    nanogpt_replay: bool = False,
    overrides: list[str] | None = None,
) -> None:
    """Train CONFIG with `picogpt fit`; print its val loss against TARGET and its wall time (and the reference's).

    Args:
        config: a picogpt YAML config, run as written (plus overrides).
        target: the val loss to reach (nanoGPT's published figure for the recipe).
        seeds: train once per seed (seed_everything and data.seed); several seeds give the run-to-run spread
            that a single published figure hides. Default: the config's own seed, once.
        threads: torch CPU threads (torch.set_num_threads); null keeps torch's default (one per core).
        reference: also train the plain PyTorch loop from the same weights on the same batches (first run only).
        nanogpt_replay: also train with nanoGPT's own protocol (its seeding, its torch-RNG batches, its 20-batch
            val estimate) for each seed: the figure nanoGPT's README quotes, from our GPT class.
        overrides: extra `picogpt fit` settings as KEY=VALUE, e.g. trainer.max_steps=300.
    """
    overrides = list(overrides or [])
    set_threads(threads)
    runs, replays = [], []  # (seed, whole-split val loss, 20-batch estimate)
    ref_curve, ref_seconds, first, first_seconds = [], 0.0, None, 0.0
    for seed in seeds or [None]:
        seed_overrides = [] if seed is None else [f"seed_everything={seed}", f"data.seed={seed}"]
        recorder, fit_seconds = run_recipe(config, overrides + seed_overrides)
        trainer, module = recorder.trainer, recorder.module
        run_seed, steps, interval = trainer.datamodule.hparams.seed, trainer.global_step, validation_interval(trainer)
        runs.append((run_seed, recorder.curve[-1][1], nanogpt_estimate(module, seed=run_seed)))
        print(f"seed {run_seed}: val_loss {runs[-1][1]:.4f} (whole split), nanoGPT-style estimate "
              f"{runs[-1][2]:.4f}, {fit_seconds:.1f} s", flush=True)
        if first is None:
            first, first_seconds = recorder, fit_seconds
            if reference:
                ref_curve, ref_seconds = train_reference(recorder, steps, interval)
        if nanogpt_replay:
            replay = NanoGPTReplay(trainer, module, seed=run_seed)
            curve = replay.run(steps, interval)
            whole = evaluate(replay.loop, list(trainer.datamodule.val_dataloader()))
            replays.append((run_seed, whole, curve[-1][1]))
            print(f"seed {run_seed}: nanoGPT protocol replayed with our GPT: step {curve[-1][0]}: train loss "
                  f"{curve[-1][2]:.4f}, val loss {curve[-1][1]:.4f} (its 20-batch estimate); whole split "
                  f"{whole:.4f}", flush=True)

    print(f"{machine_line(first.module.device)}; lightning {L.__version__}")
    print(f"config: {config}" + (f" with {' '.join(overrides)}" if overrides else ""))
    final = first.curve[-1][1]
    print(f"ours val_loss at step {first.curve[-1][0]}, seed {runs[0][0]}: {final:.4f} (target {target}; "
          f"{'met' if final <= target else 'NOT met'}; ratio target/ours {target / final:.3f})")
    print(f"ours best val_loss, seed {runs[0][0]}: {min(loss for _, loss, _ in first.curve):.4f}")
    print(f"ours val_loss as nanoGPT estimates it (mean of 20 random val batches), seed {runs[0][0]}: {runs[0][2]:.4f}")
    print(f"ours wall time: {first_seconds:.1f} s for `picogpt fit` (training and validation {first.train_seconds:.1f} s)")
    summaries = [("ours", runs)] if len(runs) > 1 else []
    summaries += [("nanoGPT protocol replayed", replays)] if replays else []
    for name, results in summaries:
        whole, estimates = [r[1] for r in results], [r[2] for r in results]
        print(f"{name}, {len(results)} seed(s) ({', '.join(str(r[0]) for r in results)}): whole-split val_loss "
              f"{spread(whole)}, at or under the target: {sum(v <= target for v in whole)} of {len(results)}")
        print(f"{name}, {len(results)} seed(s): 20-batch estimate {spread(estimates)}, at or under the target: "
              f"{sum(v <= target for v in estimates)} of {len(results)}")
    if ref_curve:
        ref_final = ref_curve[-1][1]
        print(f"reference val_loss at step {ref_curve[-1][0]}: {ref_final:.4f} "
              f"(ours - reference {final - ref_final:+.4f})")
        print(f"reference wall time: {ref_seconds:.1f} s (training and validation; "
              f"ratio ours/reference in speed {ref_seconds / first.train_seconds:.3f})")


if __name__ == "__main__":
    run_cli(main)
