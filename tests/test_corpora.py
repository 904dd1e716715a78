"""Corpora as they come: text, JSON lines and Parquet files, plain or gzipped, alone or in nested folders."""

import gzip
import json
import re
import sys

import numpy as np
import pytest

from picogpt_lightning import prepare as prepare_module
from picogpt_lightning.cli import main
from picogpt_lightning.corpus import chunks, find_text_files
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.prepare import cached_prepare, prepare
from picogpt_lightning.settings import PrepareSettings

# Three documents: one with a marked question/answer pair, one ending without a newline, one with blank lines.
DOCUMENTS = [
    "On doubt.\nDoubt is often treated as the enemy of knowledge.\n\nQ: Is it?\nA: Not always.\n\nThe end.\n",
    "A second text, with an accent: café",
    "Third one.\n\n\nAfter three newlines, the rest.\n",
]


def bins(folder) -> tuple[bytes, bytes]:
    return (folder / "train.bin").read_bytes(), (folder / "val.bin").read_bytes()


def write_jsonl(path, documents, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as file:
        for document in documents:
            file.write(json.dumps({"id": 1, field: document}) + "\n")
    return path


def write_parquet(path, documents, column="text"):
    arrow = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (pip install picogpt_lightning[parquet])")
    import pyarrow.parquet as parquet

    parquet.write_table(arrow.table({column: documents, "id": list(range(len(documents)))}), path)
    return path


def corpus_forms(tmp_path) -> dict:
    """The same three documents as a flat folder of .txt files, JSON lines, gzipped JSON lines, Parquet (plain
    and gzipped) and a nested folder mixing the formats."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, document in enumerate(DOCUMENTS):
        (flat / f"{index}.txt").write_text(document, encoding="utf-8")
    nested = tmp_path / "nested"
    (nested / "1").mkdir(parents=True)
    (nested / "2" / "deeper").mkdir(parents=True)
    (nested / "1" / "doc.md").write_text(DOCUMENTS[0], encoding="utf-8")
    with gzip.open(nested / "2" / "deeper" / "doc.txt.gz", "wt", encoding="utf-8") as file:
        file.write(DOCUMENTS[1])
    write_jsonl(nested / "3.jsonl", DOCUMENTS[2:])
    (nested / ".hidden").mkdir()
    (nested / ".hidden" / "skip.txt").write_text("never read", encoding="utf-8")
    (nested / "notes.csv").write_text("not a supported file", encoding="utf-8")
    forms = {
        "flat .txt folder": flat,
        "jsonl": write_jsonl(tmp_path / "corpus.jsonl", DOCUMENTS),
        "jsonl.gz": write_jsonl(tmp_path / "corpus.jsonl.gz", DOCUMENTS, opener=gzip.open),
        "nested folder": nested,
    }
    parquet_path = write_parquet(tmp_path / "corpus.parquet", DOCUMENTS)
    (tmp_path / "corpus.parquet.gz").write_bytes(gzip.compress(parquet_path.read_bytes()))
    forms.update({"parquet": parquet_path, "parquet.gz": tmp_path / "corpus.parquet.gz"})
    return forms


def test_the_same_text_as_txt_jsonl_gz_parquet_and_a_nested_folder_gives_the_same_ids(tmp_path):
    forms = corpus_forms(tmp_path)
    expected = "<|endoftext|>\n\n".join(text.rstrip() for text in DOCUMENTS).replace(
        "A: Not always.", "A: Not always.<|endoftext|>") + "<|endoftext|>\n"
    reference = None
    for name, path in forms.items():
        files = find_text_files(str(path))
        text = "".join(chunks(files, end_of_text=True))
        assert text.replace("\n\n\n", "\n\n") == expected.replace("\n\n\n", "\n\n"), name
        out = tmp_path / "out" / name
        meta = prepare(str(path), str(out), mode="char", val_fraction=0.3)
        if reference is None:
            reference = bins(out)
        assert bins(out) == reference, name
        assert meta["source"]["chars"] + len("<|endoftext|>") * meta["source"]["end_of_text_markers"] == len(text)
    nested_files = find_text_files(str(forms["nested folder"]))
    assert [path.relative_to(forms["nested folder"]).as_posix() for path in nested_files] == [
        "1/doc.md", "2/deeper/doc.txt.gz", "3.jsonl"]


def test_a_folder_keeps_the_cache_key_it_had_before_other_formats_were_read(tmp_path):
    # The key of a flat .txt folder (and of one file) is what earlier versions computed, so existing caches
    # are reused; the figures were computed with the version before this one.
    folder = tmp_path / "flat"
    folder.mkdir()
    (folder / "a.txt").write_text("one\n", encoding="utf-8")
    (folder / "b.txt").write_text("two two\n", encoding="utf-8")
    settings = PrepareSettings()
    assert prepare_module._cache_key(find_text_files(str(folder)), "bpe", settings) == "f7767305542c"
    assert prepare_module._cache_key(find_text_files(str(folder / "a.txt")), "bpe", settings) == "2b3723fd4bf5"


def test_a_changed_glob_or_text_field_changes_the_cache_key(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["one text"])
    write_jsonl(tmp_path / "b.jsonl", ["one text"], field="body")
    files = find_text_files(str(tmp_path))
    keys = {prepare_module._cache_key(files, "char", PrepareSettings(mode="char", **changed))
            for changed in ({}, {"glob": "*.jsonl"}, {"glob": "**/*.jsonl"}, {"text_field": "body"})}
    assert len(keys) == 4


def test_glob_and_text_field_choose_the_files_and_the_field(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "a.jsonl", ["first body"], field="body")
    (tmp_path / "b.txt").write_text("a text file\n", encoding="utf-8")
    files = find_text_files(str(tmp_path), glob="*.jsonl")
    assert [path.name for path in files] == ["a.jsonl"]
    assert "".join(chunks(files, text_field="body")) == "first body"
    folder = cached_prepare(str(tmp_path), str(tmp_path / "cache"), mode="char", glob="*.jsonl", text_field="body",
                            val_fraction=0.5)
    assert json.loads((folder / "meta.json").read_text())["source"]["files"] == ["a.jsonl"]


def refusal_cases(tmp_path) -> dict:
    (tmp_path / "lines").mkdir()
    write_jsonl(tmp_path / "lines" / "missing.jsonl", ["fine", "fine"])
    with open(tmp_path / "lines" / "missing.jsonl", "a", encoding="utf-8") as file:
        file.write('{"body": "no text field"}\n')
    (tmp_path / "not_json.jsonl").write_text('{"text": "fine"}\n\n{"text": oops}\n', encoding="utf-8")
    (tmp_path / "not_gzip.txt.gz").write_text("plain text under a .gz name", encoding="utf-8")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "empty_folder" / "data.csv").write_text("a,b\n", encoding="utf-8")
    cases = {
        "a JSONL line without the text field": (tmp_path / "lines", [], r"missing.jsonl line 3 has no 'text' field"),
        "a JSONL line that is not JSON": (tmp_path / "not_json.jsonl", [], r"not_json.jsonl line 3 is not JSON"),
        "a .gz that is not gzip": (tmp_path / "not_gzip.txt.gz", [], r"not_gzip.txt.gz is not complete gzip data"),
        "a folder with no supported file": (tmp_path / "empty_folder", [], r"has no file to read \(no .txt, .md"),
        "a glob that matches nothing": (tmp_path / "lines", ["--glob", "*.txt"], r"--data.glob '\*.txt'"),
    }
    try:
        write_parquet(tmp_path / "other.parquet", ["a text"], column="body")
        cases["a Parquet file without the column"] = (tmp_path / "other.parquet", [],
                                                      r"other.parquet has no column 'text' \(its columns: body, id\)")
    except pytest.skip.Exception:
        pass
    return cases


def test_bad_corpora_are_refused_in_one_line_and_nothing_is_written(tmp_path, capsys):
    for name, (path, flags, message) in refusal_cases(tmp_path).items():
        out = tmp_path / "out" / name.replace(" ", "_")
        assert main(["prepare", "--text_path", str(path), "--mode", "char", "--out_dir", str(out), *flags]) == 1
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and re.search(message, error), (name, error)
        assert not out.exists(), name
        cache = tmp_path / "cache"
        settings = {"glob": flags[1]} if flags else {}
        with pytest.raises(PicoGPTError, match=message):
            cached_prepare(str(path), str(cache), mode="char", **settings)
        assert not cache.exists() or not any(cache.iterdir()), name  # no prepared-data entry


def test_parquet_without_pyarrow_is_one_line_that_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "corpus.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    with pytest.raises(PicoGPTError, match=r"needs pyarrow: pip install picogpt_lightning\[parquet\]"):
        list(chunks(find_text_files(str(tmp_path))))


def test_records_are_read_one_at_a_time(tmp_path):
    # A JSON lines file is streamed: the records before a broken line come out before the refusal.
    path = tmp_path / "big.jsonl"
    write_jsonl(path, ["x" * 10_000] * 20)
    with open(path, "a", encoding="utf-8") as file:
        file.write("broken\n")
    read = []
    with pytest.raises(PicoGPTError, match="line 21 is not JSON"):
        for chunk in chunks([path]):
            read.append(chunk)
    assert sum(map(len, read)) >= 10_000


def test_bad_utf8_in_json_lines_is_replaced_with_one_warning(tmp_path, capsys):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"text": "caf\xe9 one"}\n{"text": "caf\xe9 two"}\n')
    meta = prepare(str(path), str(tmp_path / "out"), mode="char", val_fraction=0.5)
    assert capsys.readouterr().err.count("not valid UTF-8") == 1
    assert meta["source"]["files"] == ["bytes.jsonl"]
    assert np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16).size > 0


def test_an_empty_glob_or_text_field_is_a_bad_setting(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text\n", encoding="utf-8")
    for flag in ("--glob", "--text_field"):
        assert main(["prepare", "--text_path", str(tmp_path), "--out_dir", str(tmp_path / "out"), flag, ""]) == 2
        assert f"{flag[2:]} is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
