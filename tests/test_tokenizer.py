import json
import sys

import pytest

from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.tokenizer import ENDOFTEXT, BPETokenizer, CharTokenizer, WordTokenizer, bpe_available, fingerprint
from picogpt_lightning.tokenizer_files import load_tokenizer, tokenizer_from_json

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
    assert tokenizer.vocab_size == len(set("hello world")) + 1  # and <|endoftext|>, after the characters
    assert tokenizer.eot_id == len(tokenizer.chars)


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
    tokenizer = WordTokenizer.train(["b a b c"], vocab_size=4)
    assert tokenizer.tokens == ["<unk>", "<|endoftext|>", " ", "b"]  # " " x3, "b" x2, then "a" and "c" x1
    assert WordTokenizer.train(["c b a"], vocab_size=5).tokens == ["<unk>", "<|endoftext|>", " ", "a", "b"]


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


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_every_kind_trains_an_end_of_text_token_that_round_trips(kind):
    tokenizer = trained(kind)
    assert tokenizer.eot_id is not None and tokenizer.encode(ENDOFTEXT) == [tokenizer.eot_id]
    text = "All:\nSpeak, speak.<|endoftext|>\n\nFirst<|endoftext|><|endoftext|>"
    ids = tokenizer.encode(text)
    assert ids.count(tokenizer.eot_id) == 3
    assert tokenizer.decode(ids) == text
    assert tokenizer_from_json(tokenizer.to_json()).eot_id == tokenizer.eot_id


def test_the_end_of_text_literal_adds_no_characters_to_a_char_vocabulary():
    tokenizer = CharTokenizer.train(["ab<|endoftext|>ba"])
    assert tokenizer.chars == ["a", "b"] and tokenizer.vocab_size == 3
    assert tokenizer.encode_array("a<|endoftext|>b").tolist() == tokenizer.encode("a<|endoftext|>b") == [0, 2, 1]


@pytest.mark.parametrize(
    ("description", "literal_ids"),
    [
        ({"kind": "char", "chars": sorted(set(ENDOFTEXT))}, [0, 9, 3, 5, 2, 6, 4, 7, 3, 8, 7, 9, 1]),
        ({"kind": "word", "tokens": ["<unk>", "|", "<", ">", "endoftext"]}, [2, 1, 4, 1, 3]),
    ],
)
def test_char_and_word_tokenizers_saved_without_end_of_text_load_and_encode_as_before(description, literal_ids):
    tokenizer = tokenizer_from_json(json.dumps(description))
    assert tokenizer.eot_id is None
    assert tokenizer.vocab_size == len(description.get("chars") or description["tokens"])
    assert tokenizer.encode(ENDOFTEXT) == literal_ids
    assert tokenizer.decode(literal_ids) == ENDOFTEXT
    assert json.loads(tokenizer.to_json()) == description  # saved again, still the old form


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_encode_with_offsets_gives_the_ids_of_encode_and_where_each_token_starts(kind):
    tokenizer = trained(kind)
    text = "All:\nSpeak, naïve café 😀.<|endoftext|>\n\nFirst Citizen"
    ids, starts = tokenizer.encode_with_offsets(text)
    assert ids == tokenizer.encode(text) and len(starts) == len(ids)
    assert starts == sorted(starts) and starts[0] == 0
    assert starts[ids.index(tokenizer.eot_id)] == text.index(ENDOFTEXT)
    if kind != "bpe":  # whole characters per token: each token is exactly the text up to the next start
        pieces = [text[start:end] for start, end in zip(starts, starts[1:] + [len(text)])]
        assert [tokenizer.decode([i]) for i in ids] == pieces


def test_bpe_learns_no_merges_from_the_end_of_text_literal():
    """In training text the literal is the one special token, as encoding sees it, not letters to merge."""
    pytest.importorskip("tokenizers")
    tokenizer = BPETokenizer.train([f"Q: why?\nA: because.{ENDOFTEXT}\n\n" * 200], vocab_size=300)
    assert [token for token in tokenizer.tokenizer.get_vocab() if "endof" in token or "xt|" in token] == [ENDOFTEXT]
    assert tokenizer.encode(f"because.{ENDOFTEXT}")[-1] == tokenizer.eot_id


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_the_fingerprint_is_the_same_for_a_tokenizer_rebuilt_from_its_json(kind):
    tokenizer = trained(kind)
    assert fingerprint(tokenizer_from_json(tokenizer.to_json())) == fingerprint(tokenizer)
    assert fingerprint(CharTokenizer.train(["abc"])) != fingerprint(CharTokenizer.train(["abd"]))
