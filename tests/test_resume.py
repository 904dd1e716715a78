"""A run is never lost: exact resume, graceful interrupts, kill -9, non-finite loss."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from picogpt_lightning.checkpoint import read_checkpoint
from picogpt_lightning.cli import main
from picogpt_lightning.module import GPTLightningModule

from helpers import make_config, make_text


def train_losses(run: Path) -> dict[int, float]:
    losses = {}
    for metrics in sorted(run.glob("lightning_logs/version_*/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train_loss"):
                losses[int(row["step"])] = float(row["train_loss"])
    return losses


def same(a, b) -> bool:
    """Equal to the bit, tensors included, through nested dicts and lists."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("accumulate", [1, 2], ids=["plain", "accumulating"])
def test_n_steps_plus_resume_equals_2n_steps_exactly(tmp_path, accumulate, optimizer):
    text = make_text(tmp_path / "t.txt")
    settings = dict(trainer={"max_steps": 16, "val_check_interval": 8 * accumulate, "log_every_n_steps": 1,
                             "accumulate_grad_batches": accumulate},
                    model={"dropout": 0.1, "optimizer": optimizer})
    straight = make_config(tmp_path, text, name="straight", **settings)
    split = make_config(tmp_path, text, name="split", **settings)
    assert main(["fit", "--config", str(straight)]) == 0
    # An interrupted 16-step run: same schedule (lr_decay_iters follows max_steps 16), stopped at step 8.
    assert main(["fit", "--config", str(split), "--trainer.max_steps", "8", "--model.lr_decay_iters", "16"]) == 0
    assert main(["fit", "--config", str(split), "--ckpt_path", "last"]) == 0

    runs = tmp_path / "checkpoints"
    expected, resumed = train_losses(runs / "straight"), train_losses(runs / "split")
    assert len(expected) == 16 and resumed == expected  # bit-identical, step by step
    a = read_checkpoint(runs / "straight" / "last.ckpt")
    b = read_checkpoint(runs / "split" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 16
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert same(a["optimizer_states"], b["optimizer_states"])  # momentum buffers, Adam moments, steps


def test_resume_is_exact_with_the_weight_average_and_checkpoints_hold_the_average(tmp_path):
    text = make_text(tmp_path / "t.txt")
    ema = [{"class_path": "picogpt_lightning.callbacks.EMA", "init_args": {"decay": 0.9}}]
    settings = dict(trainer={"max_steps": 16, "val_check_interval": 8, "log_every_n_steps": 1, "callbacks": ema},
                    model={"dropout": 0.1})
    straight = make_config(tmp_path, text, name="straight", **settings)
    split = make_config(tmp_path, text, name="split", **settings)
    assert main(["fit", "--config", str(straight)]) == 0
    # Stopped at step 6, between validations: last.ckpt is written at the very end of training.
    assert main(["fit", "--config", str(split), "--trainer.max_steps", "6", "--model.lr_decay_iters", "16"]) == 0
    assert main(["fit", "--config", str(split), "--ckpt_path", "last"]) == 0
    runs = tmp_path / "checkpoints"
    assert train_losses(runs / "split") == train_losses(runs / "straight")
    a, b = (read_checkpoint(runs / name / "last.ckpt") for name in ("straight", "split"))
    assert same(a["state_dict"], b["state_dict"]) and same(a["current_model_state"], b["current_model_state"])
    # The checkpoint's weights are the average, not the trained weights (which resume from current_model_state).
    assert not same(a["state_dict"], a["current_model_state"])


def start_long_run(tmp_path, name="long"):
    text = make_text(tmp_path / "t.txt")
    config = make_config(tmp_path, text, name=name,
                         trainer={"max_steps": 100_000, "val_check_interval": 5, "log_every_n_steps": 5})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "picogpt_lightning.cli", "fit", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return process, config, tmp_path / "checkpoints" / name


def wait_for(path: Path, process, timeout=120.0):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_saves_last_and_says_how_to_resume_then_resume_continues(tmp_path, signum):
    process, config, run = start_long_run(tmp_path)
    wait_for(run / "best.ckpt", process)
    time.sleep(0.5)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "Traceback" not in err, err
    assert "Resume with: picogpt fit --config" in err and "--ckpt_path last" in err
    stopped_at = read_checkpoint(run / "last.ckpt")["global_step"]
    assert stopped_at > 5 and f"Interrupted at step {stopped_at}" in err

    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--additional_steps", "3"]) == 0
    assert read_checkpoint(run / "last.ckpt")["global_step"] == stopped_at + 3


def test_kill_9_at_any_moment_leaves_loadable_checkpoints(tmp_path):
    for attempt in range(3):
        process, _, run = start_long_run(tmp_path, name=f"kill{attempt}")
        wait_for(run / "best.ckpt", process)
        time.sleep(0.3 + 0.37 * attempt)
        process.kill()
        process.communicate()
        for name in ("best.ckpt", "last.ckpt"):
            if (run / name).exists():
                read_checkpoint(run / name)  # raises if half-written


def test_non_finite_loss_stops_with_advice_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    text = make_text(tmp_path / "t.txt")
    config = make_config(tmp_path, text, name="nan", trainer={"max_steps": 30, "val_check_interval": 10})
    original = GPTLightningModule.training_step

    def breaks_at_step_17(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= 16 else loss

    monkeypatch.setattr(GPTLightningModule, "training_step", breaks_at_step_17)
    assert main(["fit", "--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert "NaN or inf at step 17" in error and "gradient_clip_val" in error and "learning_rate" in error
    last = read_checkpoint(tmp_path / "checkpoints" / "nan" / "last.ckpt")
    assert last["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
