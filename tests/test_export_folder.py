"""`picogpt export` replaces its folder whole or not at all: never a mix of two exports or of two formats, a
failed export (a full disk) leaves the previous one or nothing, and a folder holding anything else is refused
unless --overwrite true."""

from __future__ import annotations

import json

import pytest
import torch

from picogpt_lightning import export as export_module
from picogpt_lightning.checkpoint import save_checkpoint
from picogpt_lightning.cli import main
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.export import export
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.tokenizer import CharTokenizer

from small_disk import fill, small_disk  # noqa: F401 (a fixture)

HF_FILES = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
            "tokenizer.json", "tokenizer_config.json"]


def checkpoint(tmp_path, name: str, text: str):
    torch.manual_seed(0)
    tokenizer = CharTokenizer.train([text])
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / name, model, tokenizer)
    return str(tmp_path / name)


@pytest.fixture
def two(tmp_path):
    """Two checkpoints whose exports differ (vocabularies of 14 and 6 tokens)."""
    return checkpoint(tmp_path, "a.ckpt", "abcdefghijkl\n"), checkpoint(tmp_path, "b.ckpt", "wxyz\n")


def listing(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def vocab(folder) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def test_a_second_format_into_one_folder_leaves_no_file_of_the_first(two, tmp_path):
    out = tmp_path / "out"
    export(two[0], str(out))
    assert listing(out) == HF_FILES
    export(two[1], str(out), "safetensors")  # config.json stayed, and transformers loaded random weights
    assert listing(out) == ["model.safetensors", "picogpt.json"]
    export(two[0], str(out))
    assert listing(out) == HF_FILES
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_an_export_failing_midway_leaves_the_previous_one_whole(two, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export(two[0], str(out))
    before = {name: (out / name).read_bytes() for name in listing(out)}

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "hf_tokenizer_config", broken)  # after config.json and the weights
    with pytest.raises(PicoGPTError, match="the previous export is intact"):
        export(two[1], str(out))
    assert {name: (out / name).read_bytes() for name in listing(out)} == before
    with pytest.raises(PicoGPTError, match="nothing was written"):
        export(two[1], str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_a_folder_of_other_files_is_refused_unless_overwrite(two, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", "--ckpt", two[0], "--out_dir", str(out)]) == 1
    assert "holds files that are not an export of picogpt (notes.txt)" in capsys.readouterr().err
    assert listing(out) == ["notes.txt"]
    assert main(["export", "--ckpt", two[0], "--out_dir", str(out), "--overwrite", "true"]) == 0
    assert listing(out) == HF_FILES
    (tmp_path / "file").write_text("x")
    with pytest.raises(PicoGPTError, match="is a file; pass a folder"):
        export(two[0], str(tmp_path / "file"))


def test_an_export_from_before_the_mark_is_still_replaced(two, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    for name in HF_FILES:  # what an export wrote before model.safetensors carried picogpt_format
        (out / name).write_text("{}")
    export(two[1], str(out), "safetensors")
    assert listing(out) == ["model.safetensors", "picogpt.json"]


def test_a_full_disk_leaves_the_previous_export_or_nothing(two, small_disk, capsys):  # noqa: F811
    out = small_disk / "export"
    export(two[0], str(out))
    before = {name: (out / name).read_bytes() for name in listing(out)}
    filler = fill(small_disk, leave=8 << 10)
    assert main(["export", "--ckpt", two[1], "--out_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the previous export is intact" in err
    assert {name: (out / name).read_bytes() for name in listing(out)} == before and vocab(out) == 14
    assert main(["export", "--ckpt", two[1], "--out_dir", str(small_disk / "new")]) == 1
    assert "nothing was written" in capsys.readouterr().err
    assert listing(small_disk) == ["export", "filler"]
    filler.unlink()
    assert main(["export", "--ckpt", two[1], "--out_dir", str(out)]) == 0
    assert vocab(out) == 6
