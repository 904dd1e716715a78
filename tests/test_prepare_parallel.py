"""Preparation on several processes: a multi-file corpus encoded by a pool of workers (the word tokenizer also
trained by them) gives exactly the ids, meta.json and tokenizer of one process (issue 22)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from picogpt_lightning import corpus as corpus_module
from picogpt_lightning import encoding
from picogpt_lightning.prepare import prepare

WORDS = ["the", "mind", "is", "wise", "café", "日本", "😀", ",", ".", "\t", "  "]


def write_corpus(folder) -> None:
    """Nine documents in nested folders, text and JSON lines, with Q/A pairs, odd whitespace and no final newline."""
    rng = np.random.default_rng(5)
    for index in range(9):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(0, 14))) for _ in range(rng.integers(20, 80))]
        if index % 3 == 0:
            lines += ["", "Q: is the mind wise?", "A: the mind is wise.", ""]
        text = "\n".join(lines) + ("\n" if index % 2 else "")
        path = folder / f"part-{index % 3}" / f"doc-{index}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    records = [json.dumps({"text": " ".join(rng.choice(WORDS, size=30))}) for _ in range(12)]
    (folder / "records.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")


@pytest.mark.parametrize(("settings"), [
    {"mode": "token", "backend": "bpe", "vocab_size": 300, "random_split": True},
    {"mode": "char"},
    {"mode": "token", "backend": "word", "vocab_size": 40, "val_fraction": 0.3},
])  # fmt: skip
def test_a_multi_file_corpus_prepared_by_two_worker_processes_has_the_ids_of_one_process(tmp_path, monkeypatch,
                                                                                          capsys, settings):
    # Small chunks and batches, so the text reaches the workers as many batches whose results must be put
    # back in order; and no minimum size for starting the workers.
    monkeypatch.setattr(corpus_module, "CHUNK_CHARS", 64)
    monkeypatch.setattr(corpus_module, "CHUNK_LOOKAHEAD", 17 * 64)
    monkeypatch.setattr(encoding, "ENCODE_BATCH_CHARS", 700)
    monkeypatch.setattr(encoding, "POOL_MIN_CHARS", 0)
    pools = []
    in_workers = encoding._in_workers
    monkeypatch.setattr(encoding, "_in_workers", lambda *args: pools.append(args[-1]) or in_workers(*args))
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    one = prepare(str(corpus), str(tmp_path / "one"), num_proc=1, **settings)
    two = prepare(str(corpus), str(tmp_path / "two"), num_proc=2, **settings)
    # The workers did the encoding, and the word tokenizer's counting before it.
    assert pools == [2] * (2 if settings.get("backend") == "word" else 1)
    assert "could not start" not in capsys.readouterr().err
    assert one == two and one["train_tokens"] > 1000 and one["val_tokens"] > 100
    for name in ("train.bin", "val.bin", one["tokenizer_file"], "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
