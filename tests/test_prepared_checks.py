"""Damaged prepared data is never trained on: the bins carry checksums and every meta.json field is checked when
the cache is used; a damaged cache entry is prepared again with one line saying so, and a damaged folder given
as --data.prepared_dir is one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from picogpt_lightning import prepared_checks
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.prepare import cached_prepare, load_prepared, prepare

from helpers import make_text


@pytest.fixture
def text(tmp_path):
    return make_text(tmp_path / "text.txt", sentences=300)


def overwrite_most_ids(folder) -> None:
    """Most ids of train.bin replaced with one valid id: the size and the largest id stay as they were."""
    ids = np.memmap(folder / "train.bin", dtype=np.uint16, mode="r+")
    ids[: len(ids) * 9 // 10] = 5
    ids.flush()
    del ids


def edit_meta(folder, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


def test_overwritten_ids_are_refused_by_the_checksum(text, tmp_path):
    prepare(str(text), str(tmp_path / "out"), mode="char")
    overwrite_most_ids(tmp_path / "out")
    with pytest.raises(PicoGPTError, match="train.bin differs from the checksum written with it"):
        load_prepared(tmp_path / "out")


@pytest.mark.parametrize("changes, named", [
    ({"dtype": "float16"}, "dtype is 'float16' where"),  # every id read as a float near 0
    ({"dtype": "uint32"}, "dtype is 'uint32' where"),
    ({"train_tokens": -3}, "train_tokens is -3"),
    ({"val_tokens": "many"}, "val_tokens is 'many'"),
    ({"vocab_size": 0}, "vocab_size is 0"),
    ({"max_id": 1.5}, "max_id is 1.5"),
    ({"mode": "bytes"}, "mode is 'bytes'"),
    ({"tokenizer_file": "../../etc/passwd"}, "tokenizer_file is '../../etc/passwd', not a file name"),
    ({"tokenizer_sha256": 7}, "tokenizer_sha256 is 7"),
    ({"source": "text.txt"}, "source is 'text.txt'"),
    ({"checksums": {"train": "abc"}}, "checksums.train is 'abc'"),
])
def test_every_meta_field_is_checked(text, tmp_path, changes, named):
    prepare(str(text), str(tmp_path / "out"), mode="char")
    edit_meta(tmp_path / "out", **changes)
    with pytest.raises(PicoGPTError, match=f"meta.json: {re.escape(named)}"):
        load_prepared(tmp_path / "out")


def test_a_damaged_cache_entry_is_prepared_again_with_one_line_saying_so(text, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    folder = cached_prepare(str(text), cache, mode="char")
    good = (folder / "train.bin").read_bytes()
    overwrite_most_ids(folder)
    capsys.readouterr()
    assert cached_prepare(str(text), cache, mode="char") == folder
    err = capsys.readouterr().err
    assert "is damaged (train.bin differs from the checksum written with it" in err and "preparing it again" in err
    assert (folder / "train.bin").read_bytes() == good
    edit_meta(folder, dtype="float16")
    cached_prepare(str(text), cache, mode="char")
    assert "dtype is 'float16'" in capsys.readouterr().err
    assert json.loads((folder / "meta.json").read_text())["dtype"] == "uint16"
    cached_prepare(str(text), cache, mode="char")
    assert capsys.readouterr().err == ""  # an undamaged entry is reused in silence


def test_a_large_bin_is_checked_by_sampled_blocks(text, tmp_path, monkeypatch):
    monkeypatch.setattr(prepared_checks, "FULL_CHECK_BYTES", 16)  # every bin counts as large
    monkeypatch.setattr(prepared_checks, "SAMPLE_BLOCK_BYTES", 64)
    prepare(str(text), str(tmp_path / "out"), mode="char")
    load_prepared(tmp_path / "out")
    overwrite_most_ids(tmp_path / "out")
    with pytest.raises(PicoGPTError, match="train.bin differs from the checksum"):
        load_prepared(tmp_path / "out")


def test_a_preparation_without_checksums_still_loads(text, tmp_path):
    """Folders prepared before checksums existed are checked by their fields and sizes, as before."""
    prepare(str(text), str(tmp_path / "out"), mode="char")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    del meta["checksums"]
    (tmp_path / "out" / "meta.json").write_text(json.dumps(meta))
    assert load_prepared(tmp_path / "out")[0]["train_tokens"] == meta["train_tokens"]


def test_a_cache_entry_from_before_checksums_gets_them_and_then_catches_damage(text, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    folder = cached_prepare(str(text), cache, mode="char")
    meta = json.loads((folder / "meta.json").read_text())
    stored = meta.pop("checksums")
    (folder / "meta.json").write_text(json.dumps(meta))
    ids = (folder / "train.bin").read_bytes()
    assert cached_prepare(str(text), cache, mode="char") == folder
    assert json.loads((folder / "meta.json").read_text())["checksums"] == stored  # the same ids, the same sums
    assert (folder / "train.bin").read_bytes() == ids
    overwrite_most_ids(folder)
    capsys.readouterr()
    cached_prepare(str(text), cache, mode="char")
    assert "train.bin differs from the checksum" in capsys.readouterr().err
