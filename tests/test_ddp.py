"""Lightning's DDP on two CPU processes: ranks draw different blocks, the val loss is the single-process
one, one writer of files, and resume works. Run as subprocesses (in-process DDP would re-launch pytest)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picogpt_lightning.cli import main

from helpers import make_config, make_text

TESTS = Path(__file__).resolve().parent


def picogpt(*args, expect: int = 0):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "picogpt_lightning.cli", *args], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def test_two_process_ddp_fit_validate_warm_start_and_resume(tmp_path, capsys):
    text = make_text(tmp_path / "t.txt")
    config = make_config(
        tmp_path, text, name="ddp",
        trainer={"max_steps": 10, "val_check_interval": 5, "strategy": "ddp", "devices": 2,
                 "callbacks": [{"class_path": "record_batches.RecordFirstBatch",
                                "init_args": {"out_dir": str(tmp_path)}}]},
    )
    picogpt("fit", "--config", str(config))
    run = tmp_path / "checkpoints" / "ddp"

    # Each rank trained on its own blocks.
    assert not torch.equal(torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt"))

    # The distributed val loss at step 10 equals a single-process evaluation of the same weights.
    rows = list(csv.DictReader(next(run.glob("lightning_logs/version_*/metrics.csv")).open()))
    ddp_loss = [float(r["val_loss"]) for r in rows if r.get("val_loss") and int(r["step"]) == 9][0]
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 10
    # One writer: no leftovers of concurrent writes, one prepared folder.
    assert not list(tmp_path.rglob("*.tmp"))
    assert len(list((tmp_path / "prepared").iterdir())) == 1
    assert main(["validate", "--config", str(config), "--trainer.strategy", "auto", "--trainer.devices", "1",
                 "--trainer.callbacks", "[]", "--ckpt_path", str(run / "last.ckpt")]) == 0
    single = [l for l in capsys.readouterr().out.splitlines() if l.startswith("val_loss")][-1]
    assert float(single.split()[1]) == pytest.approx(ddp_loss, abs=1e-4)

    # Every rank runs the command; rank 0 alone prints its result lines.
    validated = picogpt("validate", "--config", str(config), "--ckpt_path", str(run / "last.ckpt"))
    assert len([line for line in validated.stdout.splitlines() if line.startswith("val_loss")]) == 1
    warm = picogpt("fit", "--config", str(config), "--model.init_from", str(run / "last.ckpt"),
                   "--trainer.max_steps", "2", "--ckpt_dir", str(tmp_path / "warm"))
    assert len([line for line in warm.stdout.splitlines() if line.startswith("warm start: loaded")]) == 1

    picogpt("fit", "--config", str(config), "--ckpt_path", "last", "--additional_steps", "4")
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 14
    # Validate and resume read the text with the checkpoint's tokenizer: a second preparation, made once.
    assert not list(tmp_path.rglob("*.tmp"))
    assert len(list((tmp_path / "prepared").iterdir())) == 2


def test_nan_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    """A NaN seen by rank 1 only must stop both ranks at the same check (no rank left waiting in a collective,
    no traceback), say so once, and leave the last good checkpoint alone."""
    text = make_text(tmp_path / "t.txt")
    config = make_config(
        tmp_path, text, name="nan",
        trainer={"max_steps": 20, "val_check_interval": 5, "strategy": "ddp", "devices": 2,
                 "callbacks": [{"class_path": "record_batches.PoisonRank", "init_args": {"rank": 1, "step": 7}}]},
    )
    result = picogpt("fit", "--config", str(config), expect=1)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "NaN or inf at steps 6-10" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = torch.load(tmp_path / "checkpoints" / "nan" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5
