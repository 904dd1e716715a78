import json
import os
import re

import numpy as np
import pytest

from picogpt_lightning import corpus as corpus_module
from picogpt_lightning import prepare as prepare_module
from picogpt_lightning.cli.prepare import prepare_command as prepare_cli
from picogpt_lightning.corpus import find_text_files
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.prepare import FORMAT, cached_prepare, load_prepared, prepare, token_dtype
from picogpt_lightning.tokenizer import ENDOFTEXT

WORDS = ["the", "king", "queen", "speak", "hear", "me", "café", "日本", "😀", ",", "."]


def sample_text(lines: int = 120, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    rows = [" ".join(rng.choice(WORDS, size=rng.integers(0, 12))) for _ in range(lines)]
    return "\n".join(rows) + "\n"


def ended(text: str) -> str:
    """`text` as one document ends in prepared data: <|endoftext|> before its trailing whitespace."""
    body = text.rstrip()
    return body + ENDOFTEXT + text[len(body) :]


def write(folder, name, text):
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def open_bins(folder, meta):
    return tuple(np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r") for split in ("train", "val"))


def decoded_splits(folder):
    meta, tokenizer = load_prepared(folder)
    train, val = open_bins(folder, meta)
    return tokenizer.decode(train), tokenizer.decode(val)


@pytest.mark.parametrize(("mode", "backend"), [("char", "bpe"), ("token", "bpe"), ("token", "word")])
def test_prepare_writes_bins_tokenizer_and_meta(tmp_path, mode, backend):
    text = sample_text()
    path = write(tmp_path, "input.txt", text)
    meta = prepare(str(path), str(tmp_path / "out"), mode=mode, backend=backend, vocab_size=300)
    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["format"] == FORMAT and meta["mode"] == mode and meta["dtype"] == "uint16"
    assert meta["backend"] == ("char" if mode == "char" else backend)
    assert meta["source"]["files"] == ["input.txt"] and meta["source"]["bytes"] == len(text.encode())
    assert meta["settings"] == {"val_fraction": 0.1, "random_split": False, "split_seed": 1337, "vocab_size": 300,
                                "end_of_text": True, "tokenizer_from": None, "glob": None, "text_field": "text"}
    assert meta["train_tokens"] > 5 * meta["val_tokens"] > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["meta.json", "train.bin", "val.bin", meta["tokenizer_file"]]
    )
    train, val = decoded_splits(tmp_path / "out")
    assert train + val == ended(text)  # word too: its vocabulary holds every token of this small text


def test_val_is_the_end_of_the_text_from_a_line_start(tmp_path):
    text = sample_text(lines=200)
    path = write(tmp_path, "input.txt", text)
    prepare(str(path), str(tmp_path / "out"), mode="char", val_fraction=0.2)
    train, val = decoded_splits(tmp_path / "out")
    assert train.endswith("\n") and ended(text).endswith(val)
    assert 0.15 < len(val.encode()) / len(ended(text).encode()) <= 0.2


def question_answer_text(pairs: int = 40, seed: int = 0) -> str:
    """Q/A paragraphs, some followed by an extra line, a Windows line end or another Q line."""
    rng = np.random.default_rng(seed)
    paragraphs = []
    for index in range(pairs):
        question, answer = (" ".join(rng.choice(WORDS[:6], size=rng.integers(1, 6))) for _ in range(2))
        ending = ["", "", "\nnot an answer", "\r"][index % 4]
        paragraphs.append(f"Q: {question}?\nA: {answer}.{ending}")
    return "\n\n".join(paragraphs) + "\n\nQ: no answer\n\nA: no question\n\n"


def test_prepared_bpe_ids_are_what_the_tokenizer_gives_the_same_text(tmp_path, monkeypatch):
    # Small chunks and small reads, so the text is read, marked, cut and encoded in many pieces: neither the
    # cuts nor the end-of-text marks may depend on where the pieces end.
    monkeypatch.setattr(corpus_module, "CHUNK_CHARS", 64)
    monkeypatch.setattr(corpus_module, "CHUNK_LOOKAHEAD", 17 * 64)
    monkeypatch.setattr(corpus_module, "READ_BYTES", 50)
    text = (sample_text() + "  indented\n\n\n  \t lines\r\n<|endoftext|>\n" + question_answer_text()
            + sample_text(seed=1) + question_answer_text(seed=1))
    path = write(tmp_path, "input.txt", text)
    prepare(str(path), str(tmp_path / "out"), vocab_size=300)
    meta, tokenizer = load_prepared(tmp_path / "out")
    train, val = open_bins(tmp_path / "out", meta)
    assert train.tolist() == tokenizer.encode(tokenizer.decode(train))
    # Each answer that ends a paragraph ends with end-of-text, as the qa chat template renders it.
    marked = re.sub(r"(?m)^(Q:[^\n]*\nA:[^\r\n]*)(?=\r?\n\r?\n)", r"\1" + ENDOFTEXT, text)
    assert marked.count(ENDOFTEXT) == 1 + 2 * 30  # the literal, and 3 of every 4 pairs
    assert tokenizer.decode(train) + tokenizer.decode(val) == ended(marked)
    assert tokenizer.decode(train).count("A: the.<|endoftext|>\n\nQ:") > 0


def test_folder_joins_its_txt_files_with_a_blank_line(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    write(folder, "b.txt", "second book\n")
    write(folder, "a.txt", "first book")
    write(folder, "notes.csv", "not a supported file")
    write(folder, ".hidden.txt", "hidden files are left out")
    assert [p.name for p in find_text_files(str(folder))] == ["a.txt", "b.txt"]
    meta = prepare(str(folder), str(tmp_path / "out"), mode="char", val_fraction=0.5)
    assert meta["source"]["files"] == ["a.txt", "b.txt"] and meta["source"]["name"] == "books"
    assert "".join(decoded_splits(tmp_path / "out")) == "first book<|endoftext|>\n\nsecond book<|endoftext|>\n"
    prepare(str(folder), str(tmp_path / "plain"), mode="char", val_fraction=0.5, end_of_text=False)
    assert "".join(decoded_splits(tmp_path / "plain")) == "first book\n\nsecond book\n"


def test_random_split_depends_only_on_the_seed(tmp_path):
    path = write(tmp_path, "input.txt", sample_text(lines=2000))  # about ten 4 KB chunks

    def val_text(seed, out):
        meta = prepare(str(path), str(tmp_path / out), mode="char", random_split=True, split_seed=seed,
                       end_of_text=False)
        assert meta["train_tokens"] > 0 and meta["val_tokens"] > 0
        assert meta["train_tokens"] + meta["val_tokens"] == meta["source"]["chars"]
        return decoded_splits(tmp_path / out)[1]

    assert val_text(1, "a") == val_text(1, "b")
    assert val_text(2, "c") != val_text(1, "a")


def test_random_split_of_a_too_short_text_says_what_to_do(tmp_path):
    path = write(tmp_path, "input.txt", "just one small chunk\n")
    with pytest.raises(PicoGPTError, match="random_split=False"):
        prepare(str(path), str(tmp_path / "out"), mode="char", random_split=True)


def test_dtype_is_uint16_up_to_65536_tokens_then_uint32():
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32


def test_cached_prepare_reuses_a_finished_folder_untouched(tmp_path, capsys):
    path = write(tmp_path, "input.txt", sample_text())
    folder = cached_prepare(str(path), str(tmp_path / "cache"), mode="char")
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("input-") and len(folder.name) == 18
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    capsys.readouterr()
    assert cached_prepare(str(path), str(tmp_path / "cache"), mode="char") == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert capsys.readouterr().out == ""


def test_cached_prepare_uses_a_new_folder_when_text_or_settings_change(tmp_path):
    path = write(tmp_path, "input.txt", sample_text())
    cache = str(tmp_path / "cache")
    first = cached_prepare(str(path), cache, mode="char")
    assert cached_prepare(str(path), cache, mode="char", val_fraction=0.2) != first
    write(tmp_path, "input.txt", sample_text() + "one more line\n")
    assert cached_prepare(str(path), cache, mode="char") != first
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_cached_prepare_on_another_rank_waits_for_the_writer(tmp_path):
    path = write(tmp_path, "input.txt", sample_text())
    cache = str(tmp_path / "cache")
    with pytest.raises(PicoGPTError, match="rank 0"):
        cached_prepare(str(path), cache, is_writer=False, wait_timeout=0.05, mode="char")
    folder = cached_prepare(str(path), cache, mode="char")
    assert cached_prepare(str(path), cache, is_writer=False, wait_timeout=0.05, mode="char") == folder


def test_load_prepared_detects_a_truncated_bin(tmp_path):
    path = write(tmp_path, "input.txt", sample_text())
    meta = prepare(str(path), str(tmp_path / "out"), mode="char")
    with open(tmp_path / "out" / "train.bin", "r+b") as file:
        file.truncate(2 * 1000)
    message = f"train.bin has 1000 tokens but meta.json says {meta['train_tokens']}: the preparation is damaged"
    with pytest.raises(PicoGPTError, match=message):
        load_prepared(tmp_path / "out")


def test_load_prepared_without_meta_is_unfinished(tmp_path):
    with pytest.raises(PicoGPTError, match="no meta.json"):
        load_prepared(tmp_path)


def test_missing_path_empty_text_and_folder_without_txt_are_explained(tmp_path):
    with pytest.raises(PicoGPTError, match="does not exist"):
        prepare(str(tmp_path / "nothing.txt"), str(tmp_path / "out"))
    for text in ("", " \n\t\n"):
        path = write(tmp_path, "empty.txt", text)
        with pytest.raises(PicoGPTError, match="empty.txt is empty or only whitespace"):
            prepare(str(path), str(tmp_path / "out"), mode="char")
    (tmp_path / "folder").mkdir()
    write(tmp_path / "folder", "table.csv", "no text here")
    with pytest.raises(PicoGPTError, match="has no file to read .no .txt, .md, .jsonl, .parquet file"):
        prepare(str(tmp_path / "folder"), str(tmp_path / "out"))


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"val_fraction": 0.0}, r"\(0, 0.5\]"), ({"val_fraction": 0.6}, r"\(0, 0.5\]"),
     ({"mode": "bytes"}, "'char' or 'token'"), ({"backend": "sentencepiece"}, "'bpe' or 'word'"),
     ({"vocab_size": 100}, "258 to 1,000,000"), ({"num_proc": 0}, "num_proc must be a whole number >= 1")],
)  # fmt: skip
def test_bad_settings_are_refused_before_any_work(tmp_path, setting, message):
    path = write(tmp_path, "input.txt", sample_text())
    with pytest.raises(PicoGPTError, match=message):
        prepare(str(path), str(tmp_path / "out"), **setting)
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_warns_once_and_still_prepares(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1") * 50 + b"fine\n")
    prepare(str(path), str(tmp_path / "out"), mode="char")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "UTF-8" in line]
    assert warnings == [f"warning: {path} is not valid UTF-8; undecodable bytes were replaced with U+FFFD"]
    assert "".join(decoded_splits(tmp_path / "out")) == "caf\ufffd\n" * 50 + "fine<|endoftext|>\n"


def test_read_only_out_dir_is_explained(tmp_path):
    path = write(tmp_path, "input.txt", sample_text())
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user can write to read-only folders (root)")
        with pytest.raises(PicoGPTError, match="cannot write the prepared data to .*locked"):
            prepare(str(path), str(locked), mode="char")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_out_dir_that_cannot_be_created_is_explained(tmp_path):
    path = write(tmp_path, "input.txt", sample_text())
    with pytest.raises(PicoGPTError, match="cannot write the prepared data to .*input.txt/out"):
        prepare(str(path), str(path / "out"), mode="char")


def test_a_failed_write_keeps_the_previous_preparation_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    path = write(tmp_path, "input.txt", sample_text())
    out = tmp_path / "out"
    before = prepare(str(path), str(out), mode="char")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_module.os, "replace", disk_full)
    with pytest.raises(PicoGPTError, match="No space left on device"):
        prepare(str(path), str(out), mode="char", val_fraction=0.2)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin", "vocab.json"]
    assert load_prepared(out)[0] == before


def test_prepare_cli_prints_a_summary_and_fills_the_cache_that_fit_uses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "input.txt", sample_text())
    prepare_cli("input.txt", mode="char")
    output = capsys.readouterr().out
    (folder,) = (tmp_path / "data" / "prepared").iterdir()
    meta, _ = load_prepared(folder)
    assert f"{meta['train_tokens']:,} train" in output and str(folder.relative_to(tmp_path)) in output
    assert cached_prepare("input.txt", mode="char").resolve() == folder


def test_a_given_tokenizer_encodes_the_text_and_keys_the_cache_by_its_sha256(tmp_path):
    path = write(tmp_path, "input.txt", sample_text())
    cache = str(tmp_path / "cache")
    trained = cached_prepare(str(path), cache, mode="token", vocab_size=300)
    _, tokenizer = load_prepared(trained)
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    tokenizer.save(copy)
    # The same tokenizer from two places is one preparation, with the trained one's ids; mode and vocab_size
    # play no part then.
    given = cached_prepare(str(path), cache, tokenizer_from=str(trained / "tokenizer.json"))
    assert given != trained
    assert cached_prepare(str(path), cache, tokenizer_from=str(copy), mode="char", vocab_size=999) == given
    assert (given / "train.bin").read_bytes() == (trained / "train.bin").read_bytes()
    meta, loaded = load_prepared(given)
    assert meta["mode"] == "token" and meta["backend"] == "bpe" and loaded.to_json() == tokenizer.to_json()
    other = cached_prepare(str(path), str(tmp_path / "cache"), mode="token", vocab_size=280)
    assert cached_prepare(str(path), cache, tokenizer_from=str(other)) not in (given, trained)


def test_a_given_char_tokenizer_refuses_characters_it_does_not_know_in_one_line(tmp_path):
    path = write(tmp_path, "input.txt", "abc abc\n")
    prepare(str(path), str(tmp_path / "abc"), mode="char")
    write(tmp_path, "input.txt", "abc xyz\n")
    with pytest.raises(PicoGPTError, match=r"3 character\(s\) that the char tokenizer of .*abc does not know "
                                           r"\('x', 'y', 'z'\)"):
        prepare(str(path), str(tmp_path / "out"), tokenizer_from=str(tmp_path / "abc"))


def test_a_tokenizer_without_end_of_text_prepares_the_text_as_it_was(tmp_path):
    """Old char and word tokenizers have no end-of-text token: their text is prepared without it."""
    path = write(tmp_path, "input.txt", "Q: why?\nA: because.\n\nQ: how?\nA: so.\n")
    old = tmp_path / "vocab.json"
    old.write_text(json.dumps({"kind": "char", "chars": sorted(set(path.read_text()))}))
    meta = prepare(str(path), str(tmp_path / "out"), tokenizer_from=str(old), val_fraction=0.5)
    assert meta["vocab_size"] == len(set(path.read_text()))
    assert "".join(decoded_splits(tmp_path / "out")) == path.read_text()
    prepare(str(path), str(tmp_path / "new"), mode="char", val_fraction=0.5)
    assert "".join(decoded_splits(tmp_path / "new")) == (
        "Q: why?\nA: because.<|endoftext|>\n\nQ: how?\nA: so.<|endoftext|>\n")


def test_end_of_text_is_a_setting_of_the_cache_key(tmp_path):
    path = write(tmp_path, "input.txt", "Q: why?\nA: because.\n\n" * 30)
    cache = str(tmp_path / "cache")
    plain = cached_prepare(str(path), cache, mode="char", end_of_text=False)
    assert cached_prepare(str(path), cache, mode="char") != plain
    assert ENDOFTEXT not in "".join(decoded_splits(plain))


# ---------------------------------------------------------------------------------------------------------------
# Nothing silently wrong (issue 14, items 12, 14 and 19)


def test_a_failed_prepare_over_a_good_preparation_removes_nothing(tmp_path):
    good = write(tmp_path, "good.txt", sample_text())
    out = tmp_path / "out"
    before = prepare(str(good), str(out), mode="char")
    stamps = {p.name: p.read_bytes() for p in out.iterdir()}
    empty = write(tmp_path, "empty.txt", "")
    with pytest.raises(PicoGPTError, match="empty"):
        prepare(str(empty), str(out), mode="char")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == stamps
    assert load_prepared(out)[0] == before


def test_a_failed_preparation_leaves_no_folder_and_a_killed_one_is_cleaned_on_the_next_run(tmp_path):
    cache = tmp_path / "cache"
    empty = write(tmp_path, "empty.txt", " \n")
    with pytest.raises(PicoGPTError, match="empty"):
        cached_prepare(str(empty), str(cache), mode="char")
    assert not cache.exists()  # neither the cache folder nor the preparation's own folder stays behind

    # What a kill -9 leaves: a folder without meta.json, temporary bins and a staged tokenizer.
    abandoned = cache / "other-0123456789ab"
    (abandoned / ".tokenizer.abc.tmp").mkdir(parents=True)
    (abandoned / ".train.bin.abc.tmp").write_bytes(b"\0" * 10)
    (abandoned / "train.bin").write_bytes(b"\0" * 10)
    mine = cached_prepare(str(write(tmp_path, "input.txt", sample_text())), str(cache), mode="char")
    assert sorted(p.name for p in cache.iterdir()) == [mine.name]
    assert not list(mine.glob(".*"))  # no temporary files, and the lock is gone


def test_the_largest_id_and_the_tokenizer_fingerprint_are_recorded_and_checked(tmp_path):
    path = write(tmp_path, "input.txt", sample_text())
    meta = prepare(str(path), str(tmp_path / "out"), vocab_size=300)
    train, val = open_bins(tmp_path / "out", meta)
    assert meta["max_id"] == max(int(train.max()), int(val.max())) < meta["vocab_size"]
    # An edited tokenizer.json of the same size: two merges swapped, so the same text gives other ids.
    tokenizer_file = tmp_path / "out" / "tokenizer.json"
    description = json.loads(tokenizer_file.read_text())
    vocab = description["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[260:262]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer_file.write_text(json.dumps(description))
    with pytest.raises(PicoGPTError, match="tokenizer.json was changed after the data was prepared"):
        load_prepared(tmp_path / "out")


def test_ids_beyond_the_vocabulary_are_one_clear_error_not_an_index_error(tmp_path):
    from picogpt_lightning.data import GPTDataModule

    path = write(tmp_path, "input.txt", sample_text(lines=400))
    prepare(str(path), str(tmp_path / "out"), mode="char")
    meta, tokenizer = load_prepared(tmp_path / "out")
    with open(tmp_path / "out" / "train.bin", "r+b") as file:  # same length, one id out of range everywhere
        np.full(meta["train_tokens"], tokenizer.vocab_size + 5, dtype=meta["dtype"]).tofile(file)
    del meta["checksums"]  # as in a folder prepared before checksums: the ids are then checked as they are read
    (tmp_path / "out" / "meta.json").write_text(json.dumps(meta))
    data = GPTDataModule(prepared_dir=str(tmp_path / "out"), block_size=8, batch_size=2)
    with pytest.raises(PicoGPTError, match=f"holds token id {tokenizer.vocab_size + 5}, beyond the tokenizer"):
        next(iter(data.train_dataloader()))


def test_a_long_preparation_says_what_it_is_doing_in_a_log(tmp_path, monkeypatch, capsys):
    from picogpt_lightning import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a line at every update, instead of every 10 s
    path = write(tmp_path, "input.txt", sample_text())
    prepare(str(path), str(tmp_path / "out"), vocab_size=300)
    err = capsys.readouterr().err
    assert f"training the BPE tokenizer on {path}: " in err and "(100%)" in err
    assert f"encoding {path} into train.bin and val.bin: " in err
    assert re.search(r"chars/s, \d+ s left", err)  # the rate and the time left


def test_a_folder_lock_names_its_holder_and_is_free_once_the_holder_is_gone(tmp_path, monkeypatch):
    from picogpt_lightning import files
    from picogpt_lightning.files import FolderInUse, FolderLock

    with FolderLock(tmp_path):
        with pytest.raises(FolderInUse) as busy:
            FolderLock(tmp_path).acquire()
        assert busy.value.pid == str(os.getpid())
    assert not (tmp_path / ".lock").exists()
    # Where flock is missing, the pid decides: a pid that is no longer a process is a stale lock.
    monkeypatch.setattr(files, "_try_lock", lambda fd, path: files._holder_is_gone(path))
    (tmp_path / ".lock").write_text("999999999\n")
    with FolderLock(tmp_path) as lock:
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid()) and lock.fd is not None
