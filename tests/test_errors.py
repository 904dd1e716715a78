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
    (root / "no_txt" / "notes.csv").write_text("not a text, JSON lines or Parquet file")
    (root / "not_a_ckpt.ckpt").write_text("hello")
    (root / "a_file").write_text("a regular file where a folder should be")
    (root / "bad_key.yaml").write_text("model:\n  n_layerz: 3\n")
    (root / "bad_type.yaml").write_text("model:\n  n_layer: three\n")
    damaged = root / "damaged" / "lightning_logs" / "version_0"
    damaged.mkdir(parents=True)
    (damaged / "metrics.csv").write_text("epoch,step,train_loss\n0,9,3.1\n0,19,oops\n")
    assert main(["prepare", "--text_path", str(text), "--out_dir", str(root / "bpe"), "--vocab_size", "300"]) == 0
    prepared = root / "truncated"
    assert main(["prepare", "--text_path", str(text), "--out_dir", str(prepared), "--mode", "char"]) == 0
    train_bin = prepared / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:100])
    return root, config


# row: (arguments, text the one error line holds, exit status: 2 for a bad setting, refused before any work)
ROWS = {
    "missing text file": (["fit", "--data.text_path", "{root}/missing.txt"], "does not exist", 1),
    "empty text file": (["fit", "--data.text_path", "{root}/empty.txt"], "empty", 1),
    "folder without a text file": (["fit", "--data.text_path", "{root}/no_txt"], "has no file to read (no .txt", 1),
    "text shorter than a block": (["fit", "--data.text_path", "{root}/short.txt"], "fewer than block_size + 1", 1),
    "vocab_size too small": (["fit", "--data.mode", "token", "--data.vocab_size", "100"], "vocab_size", 2),
    "vocab_size too large": (["fit", "--data.mode", "token", "--data.vocab_size", "5000000"], "vocab_size", 2),
    "n_embd not divisible by n_head": (["fit", "--model.n_head", "3"], "divisible by n_head", 2),
    "block_size larger than val split": (["fit", "--data.block_size", "4000"], "val split has", 1),
    "unknown config key": (["fit", "--config", "{root}/bad_key.yaml"], "n_layerz", 2),
    "wrong type in config": (["fit", "--config", "{root}/bad_type.yaml"], "n_layer", 2),
    "ckpt_path missing": (["fit", "--ckpt_path", "{root}/nope.ckpt"], "does not exist", 1),
    "ckpt_path not a checkpoint": (["fit", "--ckpt_path", "{root}/not_a_ckpt.ckpt"], "not a readable checkpoint", 1),
    "resume with another model shape": (["fit", "--ckpt_path", "last", "--model.n_layer", "2"],
                                        "n_layer 1 in checkpoint vs 2 now", 1),
    "warm start, other vocab, strict": (["fit", "--data.mode", "token", "--data.prepared_dir", "{root}/bpe",
                                         "--model.init_from", "{root}/checkpoints/good/last.ckpt"], "init_strict false",
                                        1),
    "char checkpoint, BPE tokenizer": (["sample", "--ckpt", "{root}/checkpoints/good/last.ckpt",
                                        "--tokenizer_path", "{root}/bpe/tokenizer.json"], "char", 1),
    "unknown accelerator": (["fit", "--trainer.accelerator", "tpu9"], "accelerator", 1),
    "accelerator not present": (["fit", "--trainer.accelerator", "mps"], "accelerator", 1),
    "meta.json and bins disagree": (["fit", "--data.prepared_dir", "{root}/truncated"], "delete the folder", 1),
    "output folder not writable": (["fit", "--ckpt_dir", "{root}/a_file/run"], "cannot write checkpoints", 1),
    # Settings that used to end in a traceback, a NaN or a silent no-op (issue 14, items 15, 16, 16b).
    "learning rate 0": (["fit", "--model.learning_rate", "0"], "model.learning_rate must be a number > 0", 2),
    "negative learning rate": (["fit", "--model.learning_rate", "-0.01"], "model.learning_rate must be", 2),
    "beta1 above 1": (["fit", "--model.beta1", "1.5"], "model.beta1 must be in [0, 1)", 2),
    "accumulate 0 batches": (["fit", "--trainer.accumulate_grad_batches", "0"], "accumulate_grad_batches", 2),
    "validate every 0 batches": (["fit", "--trainer.val_check_interval", "0"], "val_check_interval", 2),
    "negative num_workers": (["fit", "--data.num_workers", "-1"], "data.num_workers", 2),
    "max_steps 0": (["fit", "--trainer.max_steps", "0"], "trainer.max_steps must be a positive", 2),
    "negative additional steps": (["fit", "--ckpt_path", "last", "--additional_steps", "-50"],
                                  "--additional_steps must be a positive", 2),
    "resume with nothing to train": (["fit", "--ckpt_path", "last"], "nothing to train", 2),
    "seed_everything out of range": (["fit", "--seed_everything", "-1"], "seed_everything must be", 2),
    "abbreviated trainer flag": (["fit", "--trainer.max_step", "60"],
                                 "unknown option --trainer.max_step; did you mean --trainer.max_steps?", 2),
    "misspelt section": (["fit", "--trainr.max_steps", "60"], "did you mean --trainer.max_steps?", 2),
    "misspelt sample option": (["sample", "--ckpt", "{root}/checkpoints/good/last.ckpt", "--temprature", "2"],
                               "unknown option --temprature; did you mean --temperature?", 2),
    "sample seed too large": (["sample", "--ckpt", "{root}/checkpoints/good/last.ckpt", "--seed",
                               "100000000000000000000000"], "seed must be a whole number from 0 to 2**64 - 1", 2),
    "sample temperature nan": (["sample", "--ckpt", "{root}/checkpoints/good/last.ckpt", "--temperature", "nan"],
                               "temperature", 2),
    "validate without a checkpoint": (["validate"], "validate needs --ckpt_path", 2),
    "plot a damaged log": (["plot", "--run", "{root}/damaged"], "train_loss is 'oops', not a number", 1),
    "plot into a text file": (["plot", "--run", "{root}/checkpoints/good", "--out", "{root}/plot.txt"],
                              "not an image format", 2),
    # A run folder is never silently overwritten or mixed (items 1, 4b).
    "new run into a folder holding one": (["fit", "--ckpt_dir", "{root}/checkpoints/good"],
                                          "already holds a run (last.ckpt at step 4)", 1),
    "resume on another split": (["fit", "--ckpt_path", "last", "--additional_steps", "2", "--data.val_fraction",
                                 "0.2"], "trained on other data", 1),
}


@pytest.mark.parametrize("row", list(ROWS), ids=list(ROWS))
def test_bad_input_gives_one_clear_line(world, row, capsys):
    root, config = world
    args, expected, status = ROWS[row]
    args = [a.format(root=root) for a in args]
    if args[0] in ("fit", "validate"):
        # New runs go to a fresh folder, so that the row meets its own error, not the folder's.
        fresh = [] if "--ckpt_path" in args else ["--ckpt_dir", str(root / "checkpoints" / "fresh")]
        args[1:1] = ["--config", str(config), *fresh]
    before = snapshot(root)
    paths_before = {str(p) for p in root.rglob("*")}
    capsys.readouterr()
    assert main(args) == status
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"picogpt {args[0]}: error: ") and expected in errors[0], errors[0]
    assert "Traceback" not in err
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before
    if status == 2:  # refused before any work: no data prepared, no folder made
        assert {str(p) for p in root.rglob("*")} == paths_before


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
    assert "no space left on device while writing" in err and "earlier checkpoints are intact" in err
    assert "Traceback" not in err
    assert last.read_bytes() == saved


def test_extreme_temperatures_never_end_a_sample_or_a_chat_session(world, monkeypatch, capsys):
    """A tiny temperature is greedy in the limit (not NaN), and `/temp nan` is refused with a note (item 16)."""
    import io

    root, _ = world
    ckpt = str(root / "checkpoints" / "good" / "last.ckpt")
    assert main(["sample", "--ckpt", ckpt, "--max_new_tokens", "5", "--temperature", "1e-45", "--seed", "0"]) == 0
    tiny = capsys.readouterr().out
    assert main(["sample", "--ckpt", ckpt, "--max_new_tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tiny
    monkeypatch.setattr("sys.stdin", io.StringIO("/temp nan\n/temp 1e-45\nthe mind\n/temp inf\nthe truth\n"))
    assert main(["chat", "--ckpt", ckpt, "--max_new_tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("/temp needs a number >= 0") == 2 and "Traceback" not in captured.err
    assert captured.out.count("\n") == 2  # both messages answered (a tiny model may answer with nothing)
