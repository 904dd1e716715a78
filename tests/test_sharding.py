"""Sharded training (`--trainer.strategy fsdp`, FSDP2 through sharding.py) on two CPU processes against DDP, its
checkpoints, and Muon's work shared out over ranks. Two-process runs are subprocesses (see test_ddp.py)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picogpt_lightning.cli import main
from picogpt_lightning.muon_distributed import share
from picogpt_lightning.sharding import ShardedDataParallel, strategy_for

from helpers import make_config, make_text
from muon_ranks import muon_steps

TESTS = Path(__file__).resolve().parent


def picogpt(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "picogpt_lightning.cli", *args], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def two_process_config(tmp_path: Path, strategy: str, steps: int, **model) -> Path:
    """Two CPU ranks, a 2-layer model, the train loss logged at every step, gradients clipped (which would show
    gradients summed instead of averaged), the first step's gradients recorded, the schedule fixed at `steps`."""
    text = make_text(tmp_path / "t.txt")
    return make_config(
        tmp_path, text, name=strategy,
        trainer={"max_steps": steps, "val_check_interval": steps // 2, "log_every_n_steps": 1, "strategy": strategy,
                 "devices": 2, "gradient_clip_val": 0.5,
                 "callbacks": [{"class_path": "record_grads.RecordGradients",
                                "init_args": {"path": str(tmp_path / f"{strategy}.grads")}}]},
        model={"n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.0, "learning_rate": 3e-3, "warmup_iters": 2,
               "lr_decay_iters": steps, **model},
    )


def train_losses(run: Path) -> list[float]:
    """Every logged train loss of the run folder's logs, in step order, across resumed versions."""
    logs = sorted(run.glob("lightning_logs/version_*/metrics.csv"))
    rows = [row for path in logs for row in csv.DictReader(path.open())]
    by_step = {int(row["step"]): float(row["train_loss"]) for row in rows if row.get("train_loss")}
    return [by_step[step] for step in sorted(by_step)]


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_close(first: dict, second: dict, tolerance: float) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.allclose(first[name], second[name], atol=tolerance, rtol=0), name


def test_fsdp_on_two_cpu_processes_trains_as_ddp_does_and_its_checkpoint_samples(tmp_path, capsys):
    ddp = two_process_config(tmp_path, "ddp", 20)
    fsdp = two_process_config(tmp_path, "fsdp", 20)
    picogpt("fit", "--config", str(ddp))
    picogpt("fit", "--config", str(fsdp))
    fsdp_run, ddp_run = tmp_path / "checkpoints" / "fsdp", tmp_path / "checkpoints" / "ddp"

    fsdp_step, ddp_step = (torch.load(tmp_path / f"{strategy}.grads") for strategy in ("fsdp", "ddp"))
    # Sharded: rank 0 holds about half the weights (each matrix's rows), where DDP's holds them all.
    assert ddp_step["held"] == ddp_step["total"] == fsdp_step["total"]
    assert fsdp_step["held"] < 0.6 * fsdp_step["total"]
    # Gradients averaged over the ranks, as DDP's (not summed: PyTorch issue #162338 on gloo).
    assert_close(fsdp_step["grads"], ddp_step["grads"], 1e-7)
    fsdp_losses, ddp_losses = train_losses(fsdp_run), train_losses(ddp_run)
    assert len(fsdp_losses) == len(ddp_losses) == 20
    assert fsdp_losses == pytest.approx(ddp_losses, abs=1e-5)
    # One consolidated file, with whole weights and the optimizer state laid out as DDP's, that the commands
    # read without Lightning.
    fsdp_last, ddp_last = (torch.load(run / "last.ckpt", weights_only=True) for run in (fsdp_run, ddp_run))
    assert_close(fsdp_last["state_dict"], ddp_last["state_dict"], 1e-5)
    fsdp_adam, ddp_adam = (last["optimizer_states"][0]["state"] for last in (fsdp_last, ddp_last))
    assert fsdp_adam.keys() == ddp_adam.keys()
    for index in ddp_adam:
        assert_close(fsdp_adam[index], ddp_adam[index], 1e-5)
    assert fsdp_last["global_step"] == 20
    assert main(["sample", "--ckpt", str(fsdp_run / "last.ckpt"), "--max_new_tokens", "8", "--seed", "0"]) == 0
    assert main(["info", "--ckpt", str(fsdp_run / "last.ckpt")]) == 0
    assert "step 20" in capsys.readouterr().out
    assert main(["export", "--ckpt", str(fsdp_run / "last.ckpt"), "--out_dir", str(tmp_path / "hf")]) == 0


def test_the_modern_recipe_muon_and_the_ema_under_fsdp_trains_as_under_ddp_and_resumes(tmp_path):
    """gpt2-124m.yaml's recipe in miniature: Muon, the EMA of the weights, rotary, RMSNorm, QK-norm, SwiGLU,
    zero-init, no biases, tied embeddings."""
    recipe = dict(optimizer="muon", position="rotary", norm="rms", qk_norm=True, mlp="swiglu", zero_init=True,
                  bias=False, tie_weights=True)
    ema = ["--trainer.callbacks", '[{"class_path": "picogpt_lightning.callbacks.EMA", "init_args": {"decay": 0.8}}]']
    ddp, fsdp = (two_process_config(tmp_path, strategy, 10, **recipe) for strategy in ("ddp", "fsdp"))
    picogpt("fit", "--config", str(ddp), *ema)
    picogpt("fit", "--config", str(fsdp), *ema, "--trainer.max_steps", "5")
    picogpt("fit", "--config", str(fsdp), *ema, "--ckpt_path", "last", "--trainer.max_steps", "10")
    fsdp_run, ddp_run = tmp_path / "checkpoints" / "fsdp", tmp_path / "checkpoints" / "ddp"
    # Muon's Newton-Schulz runs in bfloat16 where the CPU has bf16 units (and on GPUs): the last bits in which
    # FSDP's reduce-scatter and DDP's all-reduce round the gradients can flip its roundings. On an Intel Xeon
    # (AMX) the losses then agreed within 1e-5 and Muon's matrices within 1e-4; on an AMD EPYC (AVX-512 BF16)
    # within 5e-5 and 1.2e-3 (the average within 8e-4).
    assert train_losses(fsdp_run) == pytest.approx(train_losses(ddp_run), abs=1e-4)
    fsdp_last, ddp_last = (torch.load(run / "last.ckpt", weights_only=True) for run in (fsdp_run, ddp_run))
    # The average (state_dict) and the trained weights, whole, within those roundings.
    assert_close(fsdp_last["state_dict"], ddp_last["state_dict"], 3e-3)
    assert_close(fsdp_last["current_model_state"], ddp_last["current_model_state"], 3e-3)
    assert fsdp_last["averaging_state"]["n_averaged"] == ddp_last["averaging_state"]["n_averaged"] == 10
    assert fsdp_last["picogpt"]["best_val_loss"] == pytest.approx(ddp_last["picogpt"]["best_val_loss"], abs=1e-5)


def test_the_fsdp_strategy_name_means_ours_on_every_accelerator_and_other_names_are_lightnings():
    assert all(isinstance(strategy_for(name), ShardedDataParallel) for name in ("fsdp", "FSDP"))
    assert strategy_for("ddp") == "ddp" and strategy_for(None) is None


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_muon_shared_out_over_two_ranks_equals_one_process_with_each_matrix_orthogonalised_once(tmp_path,
                                                                                               strategy):
    """Replicated weights (ddp) or sharded ones (fsdp): a matrix skipped or applied twice would show in the
    weights, and the ranks' counts add up to the matrices of one process (3 layers x 4 matrices x 3 steps)."""
    out = tmp_path / "two_ranks.pt"
    from serving import free_port  # a fixed port collides with another run still on it

    subprocess.run([sys.executable, str(TESTS / "muon_ranks.py"), str(out), str(free_port()), strategy],
                   check=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    two_ranks = torch.load(out, weights_only=True)
    assert_close(two_ranks["weights"], muon_steps(), 1e-6)
    assert two_ranks["orthogonalised"] == [24, 12]  # each shape's 3 matrices: 2 on rank 0, 1 on rank 1


def test_each_rank_orthogonalises_a_contiguous_share_and_every_matrix_is_someones():
    assert [list(share(3, rank, 2)) for rank in range(2)] == [[0, 1], [2]]
    assert [list(share(12, rank, 8)) for rank in range(8)] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [], []]
    assert [list(share(2, rank, 4)) for rank in range(4)] == [[0], [1], [], []]
