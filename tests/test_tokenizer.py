import json
import sys

import pytest

from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    WordTokenizer,
    bpe_available,
    load_tokenizer,
    tokenizer_from_json,
)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20
UNICODE = "naïve café — 日本語 😀👍🏽\r\n\ttabs  and  spaces\n\n\n<|endoftext|> trailing "


def trained(kind):
    if kind == "char":
        return CharTokenizer.train([TEXT, UNICODE])
    if kind == "bpe":
        pytest.importorskip("tokenizers")
        return BPETokenizer.train([TEXT, UNICODE], vocab_size=300)
    return WordTokenizer.train([TEXT, UNICODE], vocab_size=1000)


def test_char_ids_are_positions_in_the_sorted_characters():
    tokenizer = CharTokenizer.train(["hello", " world"])
    assert tokenizer.chars == sorted(set("hello world"))
    assert tokenizer.encode("hello") == [tokenizer.chars.index(char) for char in "hello"]
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"
    assert tokenizer.vocab_size == len(set("hello world"))


def test_char_unknown_character_raises_naming_it():
    tokenizer = CharTokenizer.train(["abc"])
    with pytest.raises(PicoGPTError, match="'z'"):
        tokenizer.encode("abz")


def test_bpe_round_trips_any_text():
    tokenizer = trained("bpe")
    never_seen = "Ω≈ç√∫ 🦄 \x00\x7f ünïcödé\n\r\n"
    for text in (TEXT, UNICODE, never_seen, "", "\n\n\n", "<|endoftext|>"):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|endoftext|>") == [tokenizer.tokenizer.token_to_id("<|endoftext|>")]


def test_bpe_learns_merges_up_to_the_requested_vocab_size():
    tokenizer = trained("bpe")
    assert 258 <= tokenizer.vocab_size <= 300
    assert len(tokenizer.encode(TEXT)) < len(TEXT.encode()) / 2


@pytest.mark.parametrize("vocab_size", [257, 1_000_001])
def test_bpe_vocab_size_out_of_range_says_the_range(vocab_size):
    with pytest.raises(PicoGPTError, match="258 to 1,000,000"):
        BPETokenizer.train([TEXT], vocab_size=vocab_size)


def test_word_round_trips_when_every_token_is_known():
    tokenizer = trained("word")
    assert tokenizer.tokens[0] == "<unk>"
    for text in (TEXT, UNICODE):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_word_unknown_tokens_encode_to_unk():
    tokenizer = WordTokenizer.train(["hear me speak"], vocab_size=100)
    assert tokenizer.decode(tokenizer.encode("hear you speak!")) == "hear <unk> speak<unk>"


def test_word_keeps_the_most_frequent_tokens_and_breaks_ties_by_token():
    tokenizer = WordTokenizer.train(["b a b c"], vocab_size=3)
    assert tokenizer.tokens == ["<unk>", " ", "b"]  # " " x3, "b" x2, then "a" and "c" x1
    assert WordTokenizer.train(["c b a"], vocab_size=4).tokens == ["<unk>", " ", "a", "b"]


@pytest.mark.parametrize("vocab_size", [1, 1_000_001])
def test_word_vocab_size_out_of_range_says_the_range(vocab_size):
    with pytest.raises(PicoGPTError, match="2 to 1,000,000"):
        WordTokenizer.train([TEXT], vocab_size=vocab_size)


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_to_json_rebuilds_a_tokenizer_with_the_same_ids(kind):
    tokenizer = trained(kind)
    description = tokenizer.to_json()
    assert json.loads(description)["kind"] == kind
    rebuilt = tokenizer_from_json(description)
    assert rebuilt.kind == kind and rebuilt.vocab_size == tokenizer.vocab_size
    assert rebuilt.encode(TEXT + UNICODE) == tokenizer.encode(TEXT + UNICODE)


@pytest.mark.parametrize(
    ("kind", "file_name"), [("char", "vocab.json"), ("bpe", "tokenizer.json"), ("word", "vocab.json")]
)
def test_save_then_load_tokenizer_gives_the_same_ids(tmp_path, kind, file_name):
    tokenizer = trained(kind)
    path = tokenizer.save(tmp_path)
    assert path == tmp_path / file_name
    assert [p.name for p in tmp_path.iterdir()] == [file_name]  # no temporary file left behind
    for source in (path, tmp_path):
        loaded = load_tokenizer(source)
        assert loaded.kind == kind
        assert loaded.encode(TEXT + UNICODE) == tokenizer.encode(TEXT + UNICODE)


def test_saved_bpe_file_is_a_standard_hugging_face_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = trained("bpe")
    standard = tokenizers.Tokenizer.from_file(str(tokenizer.save(tmp_path)))
    assert standard.encode(TEXT + UNICODE).ids == tokenizer.encode(TEXT + UNICODE)


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_encode_batch_matches_encode(kind):
    tokenizer = trained(kind)
    texts = TEXT.splitlines(keepends=True)
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_decode_rejects_ids_outside_the_vocabulary(kind):
    tokenizer = trained(kind)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([0, tokenizer.vocab_size])


def test_load_tokenizer_explains_missing_or_damaged_files(tmp_path):
    with pytest.raises(PicoGPTError, match="cannot read"):
        load_tokenizer(tmp_path / "vocab.json")
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(PicoGPTError, match="not valid JSON"):
        load_tokenizer(tmp_path / "vocab.json")
    (tmp_path / "vocab.json").write_text('{"kind": "char"}')
    with pytest.raises(PicoGPTError, match="does not describe"):
        load_tokenizer(tmp_path / "vocab.json")
    with pytest.raises(PicoGPTError, match="not valid JSON"):
        tokenizer_from_json("")


def test_without_tokenizers_prepare_falls_back_to_words_with_one_warning(tmp_path, monkeypatch, capsys):
    from picogpt_lightning.prepare import prepare

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    assert not bpe_available()
    text_file = tmp_path / "input.txt"
    text_file.write_text(TEXT)
    meta = prepare(str(text_file), str(tmp_path / "out"), backend="bpe", vocab_size=300)
    assert meta["backend"] == "word" and meta["tokenizer_file"] == "vocab.json"
    assert load_tokenizer(tmp_path / "out" / "vocab.json").kind == "word"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "tokenizers" in line]
    assert len(warnings) == 1 and "word" in warnings[0]
