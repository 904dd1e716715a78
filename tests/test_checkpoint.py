"""Checkpoints load safely: weights_only, clear one-line errors, nothing in a crafted file ever runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picogpt_lightning import checkpoint as checkpoint_module
from picogpt_lightning.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.tokenizer import BPETokenizer, CharTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXT = "Q: What is knowledge?\nA: Justified true belief.\n"


class CreatesFileWhenUnpickled:
    """Unpickling this calls open(path, "w"): the file appearing proves that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tiny_model(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()


@pytest.fixture
def saved(tmp_path) -> tuple[Path, GPT, CharTokenizer]:
    tokenizer = CharTokenizer.train([TEXT])
    model = tiny_model(tokenizer.vocab_size)
    path = tmp_path / "tiny.ckpt"
    save_checkpoint(path, model, tokenizer, global_step=7)
    return path, model, tokenizer


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip_restores_weights_tokenizer_and_step(tmp_path, kind):
    tokenizer = CharTokenizer.train([TEXT]) if kind == "char" else BPETokenizer.train([TEXT * 4], vocab_size=270)
    model = tiny_model(tokenizer.vocab_size)
    save_checkpoint(tmp_path / "m.ckpt", model, tokenizer, global_step=7)
    loaded = load_checkpoint(tmp_path / "m.ckpt")
    ids = torch.tensor([tokenizer.encode("What is")])
    assert torch.equal(loaded.model(ids)[0], model(ids)[0])
    assert loaded.tokenizer.kind == kind and loaded.tokenizer.to_json() == tokenizer.to_json()
    assert loaded.global_step == 7 and not loaded.model.training


def test_loading_passes_weights_only(saved, monkeypatch):
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "load", recording_load)
    load_checkpoint(saved[0])
    assert calls == [True]


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    live_marker, marker = tmp_path / "proof_the_payload_works", tmp_path / "must_not_exist"
    torch.save({"state_dict": {}, "picogpt": CreatesFileWhenUnpickled(live_marker)}, tmp_path / "live.ckpt")
    torch.load(tmp_path / "live.ckpt", weights_only=False)  # an unsafe load does run it
    assert live_marker.exists()

    torch.save({"state_dict": {}, "picogpt": CreatesFileWhenUnpickled(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(PicoGPTError, match="refused to load"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(PicoGPTError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")


def test_truncated_file_is_one_clear_error(saved, tmp_path):
    data = saved[0].read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(PicoGPTError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "cut.ckpt")


def test_other_files_are_one_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(PicoGPTError, match="notes.txt"):
        read_checkpoint(tmp_path / "notes.txt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(PicoGPTError, match="not a picogpt checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")


def test_cli_reports_bad_checkpoints_in_one_line_without_running_them(tmp_path):
    marker = tmp_path / "must_not_exist"
    torch.save({"state_dict": {}, "picogpt": CreatesFileWhenUnpickled(marker)}, tmp_path / "evil.ckpt")
    command = [sys.executable, "-m", "picogpt_lightning.cli", "sample", "--ckpt", str(tmp_path / "evil.ckpt")]
    result = subprocess.run(command + ["--device", "cpu"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "refused to load" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()


def flip_bytes_in_the_weights(path: Path, count: int = 1000) -> None:
    """Damage the largest tensor's bytes inside the zip, as a bad disk or copy would (the zip CRC, which torch
    does not check, is left alone)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entry = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as file:
        file.seek(entry.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", file.read(4))
        start = entry.header_offset + 30 + name_length + extra_length
        file.seek(start)
        data = bytearray(file.read(min(count, entry.file_size)))
        file.seek(start)
        file.write(bytes(b ^ 0x5A for b in data))


def test_flipped_bytes_in_the_weights_are_refused_by_the_checksum(saved):
    path, _, _ = saved
    assert read_checkpoint(path)["picogpt"]["weights_sha256"]
    flip_bytes_in_the_weights(path)
    torch.load(path, weights_only=True)  # torch itself loads it without a word
    with pytest.raises(PicoGPTError, match="is damaged: its weights differ from the checksum"):
        load_checkpoint(path)


def test_non_finite_weights_are_refused_in_one_line(saved, tmp_path, capsys):
    from picogpt_lightning.cli import main

    path, model, tokenizer = saved
    with torch.no_grad():
        model.ln_f.weight[0] = float("nan")
    save_checkpoint(tmp_path / "nan.ckpt", model, tokenizer)
    assert main(["sample", "--ckpt", str(tmp_path / "nan.ckpt"), "--max_new_tokens", "3"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "NaN or infinite weights (model.ln_f.weight)" in error


def test_a_checkpoint_without_a_checksum_still_loads(saved, tmp_path):
    path, model, _ = saved
    old = torch.load(path, weights_only=True)
    del old["picogpt"]["weights_sha256"], old["picogpt"]["tokenizer_sha256"]
    torch.save(old, tmp_path / "old.ckpt")
    assert load_checkpoint(tmp_path / "old.ckpt").model.config == model.config
