"""The bad-input matrix: each row gives one line naming the problem and the fix, a non-zero exit, no
traceback, and leaves every existing file as it was."""

import errno
import hashlib
from pathlib import Path

import pytest
import torch

from picogpt_lightning.cli import main

from helpers import make_config, make_text


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained char run, a BPE prepared folder and a few bad files, shared by the rows."""
    root = tmp_path_factory.mktemp("errors")
    text = make_text(root / "good.txt")
    config = make_config(root, text, name="good", trainer={"max_steps": 4, "val_check_interval": 2})
    assert main(["fit", "--config", str(config)]) == 0
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("Tiny text.\nTwo lines.\n")
    (root / "no_txt").mkdir()
    (root / "no_txt" / "notes.md").write_text("not a txt file")
    (root / "not_a_ckpt.ckpt").write_text("hello")
    (root / "a_file").write_text("a regular file where a folder should be")
    (root / "bad_key.yaml").write_text("model:\n  n_layerz: 3\n")
    (root / "bad_type.yaml").write_text("model:\n  n_layer: three\n")
    assert main(["prepare", "--text_path", str(text), "--out_dir", str(root / "bpe"), "--vocab_size", "300"]) == 0
    prepared = root / "truncated"
    assert main(["prepare", "--text_path", str(text), "--out_dir", str(prepared), "--mode", "char"]) == 0
    train_bin = prepared / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:100])
    return root, config


ROWS = {
    "missing text file": (["fit", "--data.text_path", "{root}/missing.txt"], "does not exist"),
    "empty text file": (["fit", "--data.text_path", "{root}/empty.txt"], "empty"),
    "folder without .txt": (["fit", "--data.text_path", "{root}/no_txt"], ".txt"),
    "text shorter than a block": (["fit", "--data.text_path", "{root}/short.txt"], "fewer than block_size + 1"),
    "vocab_size too small": (["fit", "--data.mode", "token", "--data.vocab_size", "100"], "vocab_size"),
    "vocab_size too large": (["fit", "--data.mode", "token", "--data.vocab_size", "5000000"], "vocab_size"),
    "n_embd not divisible by n_head": (["fit", "--model.n_head", "3"], "divisible by n_head"),
    "block_size larger than val split": (["fit", "--data.block_size", "4000"], "val split has"),
    "unknown config key": (["fit", "--config", "{root}/bad_key.yaml"], "n_layerz"),
    "wrong type in config": (["fit", "--config", "{root}/bad_type.yaml"], "n_layer"),
    "ckpt_path missing": (["fit", "--ckpt_path", "{root}/nope.ckpt"], "does not exist"),
    "ckpt_path not a checkpoint": (["fit", "--ckpt_path", "{root}/not_a_ckpt.ckpt"], "not a readable checkpoint"),
    "resume with another model shape": (["fit", "--ckpt_path", "last", "--model.n_layer", "2"],
                                        "n_layer 1 in checkpoint vs 2 now"),
    "warm start, other vocab, strict": (["fit", "--data.mode", "token", "--data.prepared_dir", "{root}/bpe",
                                         "--model.init_from", "{root}/checkpoints/good/last.ckpt"], "init_strict false"),
    "char checkpoint, BPE tokenizer": (["sample", "--ckpt", "{root}/checkpoints/good/last.ckpt",
                                        "--tokenizer_path", "{root}/bpe/tokenizer.json"], "char"),
    "unknown accelerator": (["fit", "--trainer.accelerator", "tpu9"], "accelerator"),
    "accelerator not present": (["fit", "--trainer.accelerator", "mps"], "accelerator"),
    "meta.json and bins disagree": (["fit", "--data.prepared_dir", "{root}/truncated"], "delete the folder"),
    "output folder not writable": (["fit", "--ckpt_dir", "{root}/a_file/run"], "cannot write checkpoints"),
}


@pytest.mark.parametrize("row", list(ROWS), ids=list(ROWS))
def test_bad_input_gives_one_clear_line(world, row, capsys):
    root, config = world
    args, expected = ROWS[row]
    args = [a.format(root=root) for a in args]
    if args[0] == "fit":
        args[1:1] = ["--config", str(config)]
    before = snapshot(root)
    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert expected in errors[0], errors[0]
    assert "Traceback" not in err
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before


def test_non_utf8_text_is_decoded_with_replacement_and_one_warning(tmp_path, capsys):
    text = make_text(tmp_path / "latin1.txt")
    text.write_bytes(text.read_bytes() + "Caf\xe9 au lait.\n".encode("latin-1"))
    config = make_config(tmp_path, text, name="latin1", trainer={"max_steps": 2, "val_check_interval": 2})
    assert main(["fit", "--config", str(config)]) == 0
    warnings = [l for l in capsys.readouterr().err.splitlines() if "UTF-8" in l]
    assert len(warnings) == 1 and "replaced" in warnings[0]


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    text = make_text(tmp_path / "t.txt")
    config = make_config(tmp_path, text, name="full", trainer={"max_steps": 4, "val_check_interval": 2})
    assert main(["fit", "--config", str(config)]) == 0
    last = tmp_path / "checkpoints" / "full" / "last.ckpt"
    saved = last.read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(last))

    monkeypatch.setattr(torch, "save", no_space)
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--additional_steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert last.read_bytes() == saved
