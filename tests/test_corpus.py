"""Guards the bundled corpus that every README command trains on."""

import re
from collections import Counter
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "data" / "philosophy.txt"


def text() -> str:
    return CORPUS.read_text(encoding="utf-8")


def test_corpus_is_at_least_200_kb():
    assert CORPUS.stat().st_size >= 200_000


def test_corpus_has_1500_question_answer_pairs_in_the_documented_form():
    pairs = re.findall(r"(?:^|\n\n)Q: [^\n]+\nA: [^\n]+(?=\n\n|\n?$)", text())
    assert len(pairs) >= 1500
    # Every Q: line is directly followed by its A: line.
    lines = text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Q: "):
            assert lines[i + 1].startswith("A: "), f"line {i + 1}: Q without A"


def test_character_set_is_small_enough_for_char_level_models():
    assert len(set(text())) < 100


def test_no_paragraph_is_repeated():
    counts = Counter(p for p in text().split("\n\n") if p.strip())
    repeated = [p[:60] for p, n in counts.items() if n > 1]
    assert not repeated


def test_plain_ascii_unix_newlines_no_trailing_whitespace():
    raw = CORPUS.read_bytes()
    assert b"\r" not in raw and b"\t" not in raw
    assert all(b < 128 for b in raw)
    assert not re.search(r" +\n", text())
