"""Does the default recipe train as well as nanoGPT's? Val loss and wall time of a full `picogpt fit`.

    python -m benchmarks.quality                                   # nanoGPT's CPU recipe, target 1.88
    python -m benchmarks.quality --threads 1 --reference false     # ours only
    python -m benchmarks.quality --config configs/shakespeare-char.yaml --target 1.4697   # on a GPU

The recipe runs through the real `picogpt fit` in this process (a callback only records each validation). The
target is the figure nanoGPT publishes for the same recipe. As a same-run reference, the plain PyTorch loop of
`benchmarks.train_speed` then trains from the same initial weights on the same batches for the same steps, and
is evaluated on the same validation blocks: with dropout 0 the two curves should agree to a few decimals, which
shows that Lightning trains exactly what a hand-written loop trains.
"""

from __future__ import annotations

import tempfile
import time

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import machine_line, override_args, run_cli, run_fit, set_threads
from benchmarks.train_speed import ReferenceLoop


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


@torch.no_grad()
def nanogpt_estimate(module, iters: int = 20, seed: int = 1337) -> float:
    """The val loss as nanoGPT's estimate_loss reports it: the mean loss of `iters` batches of random blocks
    (nanoGPT's CPU recipe uses 20). A noisier figure than the whole-split loss; printed to compare like with
    like against nanoGPT's published number."""
    data = module.trainer.datamodule
    folder, meta, _ = data.prepared
    val = np.memmap(folder / "val.bin", dtype=meta["dtype"], mode="r")
    block, batch = data.hparams.block_size, data.hparams.batch_size
    generator = torch.Generator().manual_seed(seed)
    model = module.model
    model.eval()
    losses = []
    for _ in range(iters):
        starts = torch.randint(len(val) - block, (batch,), generator=generator).tolist()
        rows = torch.from_numpy(np.stack([val[s : s + block + 1] for s in starts]).astype(np.int64)).to(module.device)
        losses.append(float(model(rows[:, :-1], rows[:, 1:])[1]))
    model.train()
    return sum(losses) / len(losses)


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


def main(
    config: str = "configs/shakespeare-char-cpu.yaml",
    target: float = 1.88,
    threads: int | None = None,
    reference: bool = True,
    overrides: list[str] | None = None,
) -> None:
    """Train CONFIG with `picogpt fit`; print its val loss against TARGET and its wall time (and the reference's).

    Args:
        config: a picogpt YAML config, run as written (plus overrides).
        target: the val loss to reach (nanoGPT's published figure for the recipe).
        threads: torch CPU threads (torch.set_num_threads); null keeps torch's default (one per core).
        reference: also train the plain PyTorch loop from the same weights on the same batches.
        overrides: extra `picogpt fit` settings as KEY=VALUE, e.g. trainer.max_steps=300.
    """
    overrides = list(overrides or [])
    set_threads(threads)
    recorder = ValidationRecorder()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="picogpt-quality-") as run_dir:
        run_fit(["--config", config, "--ckpt_dir", run_dir, *override_args(overrides)], [recorder])
    fit_seconds = time.perf_counter() - start
    if not recorder.curve:
        raise SystemExit("the run never validated: check trainer.val_check_interval and trainer.max_steps")
    trainer = recorder.trainer
    estimate = nanogpt_estimate(recorder.module)
    steps = trainer.global_step
    interval = int(trainer.val_check_interval) if trainer.val_check_interval > 1 else steps
    ref_curve, ref_seconds = train_reference(recorder, steps, interval) if reference else ([], 0.0)

    print(f"{machine_line(recorder.module.device)}; lightning {L.__version__}")
    print(f"config: {config}" + (f" with {' '.join(overrides)}" if overrides else ""))
    final = recorder.curve[-1][1]
    print(f"ours val_loss at step {recorder.curve[-1][0]}: {final:.4f} (target {target}; "
          f"{'met' if final <= target else 'NOT met'}; ratio target/ours {target / final:.3f})")
    print(f"ours best val_loss: {min(loss for _, loss, _ in recorder.curve):.4f}")
    print(f"ours val_loss as nanoGPT estimates it (mean of 20 random val batches, seed 1337): {estimate:.4f}")
    print(f"ours wall time: {fit_seconds:.1f} s for `picogpt fit` (training and validation {recorder.train_seconds:.1f} s)")
    if ref_curve:
        ref_final = ref_curve[-1][1]
        print(f"reference val_loss at step {ref_curve[-1][0]}: {ref_final:.4f} "
              f"(ours - reference {final - ref_final:+.4f})")
        print(f"reference wall time: {ref_seconds:.1f} s (training and validation; "
              f"ratio ours/reference in speed {ref_seconds / recorder.train_seconds:.3f})")


if __name__ == "__main__":
    run_cli(main)
