"""The bundled chat data is what its script makes from the corpus, and reads as conversations."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from picogpt_lightning.conversation import read_conversations

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `scripts` is a folder of the repository, not of the installed package
    sys.path.insert(0, str(REPO_ROOT))

from scripts import make_philosophy_chat  # noqa: E402

CORPUS = REPO_ROOT / "data" / "philosophy.txt"
CHAT = REPO_ROOT / "data" / "philosophy-chat.jsonl"


def test_the_committed_file_is_what_the_script_makes(tmp_path, capsys):
    content = make_philosophy_chat.main(str(CORPUS), str(tmp_path / "chat.jsonl"))
    assert (tmp_path / "chat.jsonl").read_text(encoding="utf-8") == content == CHAT.read_text(encoding="utf-8")
    assert "1,427 conversations" in capsys.readouterr().out


def test_every_corpus_pair_is_used_once_in_order_with_some_multi_turn_and_system_prompts():
    conversations = read_conversations(CHAT)
    pairs = [m["content"] for c in conversations for m in c.messages if m["role"] != "system"]
    corpus_pairs = re.findall(r"^Q: (.+)\nA: (.+)$", CORPUS.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert pairs == [text for pair in corpus_pairs for text in pair]
    turns = [sum(m["role"] == "user" for m in c.messages) for c in conversations]
    assert set(turns) == {1, 2, 3} and turns.count(1) > len(turns) / 2
    assert 0 < sum(c.messages[0]["role"] == "system" for c in conversations) < len(conversations) / 4
