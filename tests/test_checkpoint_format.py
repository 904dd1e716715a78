"""Checkpoints from a newer picogpt_lightning, or whose stored settings were edited, are refused in one line by
every command that reads them, instead of being read as if old, losing a setting, or ending in a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from picogpt_lightning.checkpoint import load_checkpoint, save_checkpoint
from picogpt_lightning.cli import main
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.export import export
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.tokenizer import CharTokenizer

from helpers import make_config, make_text


@pytest.fixture
def original(tmp_path) -> Path:
    torch.manual_seed(0)
    tokenizer = CharTokenizer.train(["abcdefgh \n"])
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "original.ckpt", model, tokenizer, global_step=3)
    return tmp_path / "original.ckpt"


def edited(original: Path, name: str, edit) -> Path:
    checkpoint = torch.load(original, weights_only=True)
    edit(checkpoint["picogpt"])
    path = original.with_name(name)
    torch.save(checkpoint, path)
    return path


def set_format(meta): meta["format"] = 99
def add_key(meta): meta["model_config"]["swirl"] = 3
def geglu(meta): meta["model_config"]["mlp"] = "geglu"
def three_layers(meta): meta["model_config"]["n_layer"] = 3


CASES = [(set_format, "written by a newer picogpt_lightning .*upgrade"),
         (add_key, "does not know \\(swirl: 3\\)"),
         (geglu, "invalid stored model settings: mlp 'geglu' is unknown"),
         (three_layers, "its settings do not match its weights: no weights for blocks.2")]


@pytest.mark.parametrize("edit, message", CASES, ids=[case[0].__name__ for case in CASES])
def test_every_command_that_reads_it_refuses_it_in_one_line(original, tmp_path, capsys, edit, message):
    path = edited(original, "edited.ckpt", edit)
    with pytest.raises(PicoGPTError, match=message):
        load_checkpoint(path)
    with pytest.raises(PicoGPTError, match=message):
        export(str(path), str(tmp_path / "export"))
    for command in (["sample", "--ckpt", str(path), "--max_new_tokens", "2"],
                    ["export", "--ckpt", str(path), "--out_dir", str(tmp_path / "export")],
                    *([["info", "--ckpt", str(path)]] if edit is not three_layers else [])):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "export").exists()


def test_a_future_checkpoint_is_not_validated_nor_resumed_nor_rewritten_as_older(tmp_path, capsys):
    text = make_text(tmp_path / "text.txt", sentences=200)
    config = make_config(tmp_path, text, trainer={"max_steps": 2, "val_check_interval": 2})
    assert main(["fit", "--config", str(config)]) == 0
    last = tmp_path / "checkpoints" / "run" / "last.ckpt"
    future = edited(last, "last.ckpt", set_format)  # in place: the run's own newest checkpoint
    before = future.read_bytes()
    capsys.readouterr()
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--additional_steps", "2"]) == 1
    assert "written by a newer picogpt_lightning" in capsys.readouterr().err
    assert main(["validate", "--config", str(config), "--ckpt_path", str(future)]) == 1
    assert "written by a newer picogpt_lightning" in capsys.readouterr().err
    assert future.read_bytes() == before  # a resume did not rewrite it as format 1
