"""Checkpoints written before the architecture options, Muon and the layout change (tests/data holds one,
made by the code of commit aca1417 from tests/helpers.py's text and config) still load, sample, validate,
resume and export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
import torch

from picogpt_lightning.api import load
from picogpt_lightning.checkpoint import load_checkpoint
from picogpt_lightning.cli import main
from picogpt_lightning.model import CLASSIC

from helpers import make_config, make_text

OLD = Path(__file__).parent / "data" / "old-format-char-step6.ckpt"


@pytest.fixture
def old_run(tmp_path):
    """The old checkpoint as last.ckpt of a run folder, with the text and config it was trained with."""
    text = make_text(tmp_path / "corpus.txt")
    config = make_config(tmp_path, text, name="old", trainer={"max_steps": 6, "val_check_interval": 3},
                         model={"dropout": 0.1})
    run = tmp_path / "checkpoints" / "old"
    run.mkdir(parents=True)
    shutil.copy(OLD, run / "last.ckpt")
    return config, run


def test_an_old_checkpoint_loads_as_the_classic_model_and_samples(capsys):
    loaded = load_checkpoint(OLD)
    assert {key: getattr(loaded.config, key) for key in CLASSIC} == CLASSIC
    assert loaded.global_step == 6
    assert len(load(OLD, device="cpu").generate("The", max_new_tokens=20, seed=1)) == 20
    assert main(["sample", "--ckpt", str(OLD), "--prompt", "The", "--max_new_tokens", "10", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_an_old_checkpoint_validates_and_resumes(old_run, capsys):
    config, run = old_run
    assert main(["validate", "--config", str(config), "--ckpt_path", str(run / "last.ckpt")]) == 0
    assert "val_loss" in capsys.readouterr().out
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--additional_steps", "2"]) == 0
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 8


def test_an_old_checkpoint_exports(tmp_path, capsys):
    assert main(["export", "--ckpt", str(OLD), "--out_dir", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "config.json").is_file()
    assert main(["info", "--ckpt", str(OLD)]) == 0


def test_resuming_encodes_the_text_with_the_checkpoints_own_tokenizer(old_run, capsys):
    """A tokenizer trained again on a changed text would give other ids (the old one has no end-of-text, a new
    character shifts the rest): resume uses the checkpoint's, and says what it cannot encode."""
    config, run = old_run
    text = Path(yaml.safe_load(config.read_text())["data"]["text_path"])
    text.write_text(text.read_text().replace("w", "%"), encoding="utf-8")
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--additional_steps", "2"]) == 1
    assert "pass --allow_data_change true if this is deliberate" in capsys.readouterr().err  # another text
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--additional_steps", "2",
                 "--allow_data_change", "true"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "1 character(s) that the char tokenizer of" in error and "('%')" in error
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 6  # untouched
