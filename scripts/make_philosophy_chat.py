"""Make data/philosophy-chat.jsonl, the bundled chat fine-tuning data, from the Q/A pairs of data/philosophy.txt.

    python -m scripts.make_philosophy_chat
    python scripts/make_philosophy_chat.py --text_path data/philosophy.txt --out_path data/philosophy-chat.jsonl

Every question/answer pair of the corpus appears once, in corpus order, in the messages form that
`picogpt_lightning.conversation.read_conversations` reads. Most conversations are one pair; some join 2 or 3
consecutive pairs of the same "Questions on ..." section, whose questions follow on from one another, into a
multi-turn conversation; some start with a short system prompt, often naming the section's theme. The choices
come from a seeded generator, so the same corpus and seed always give the same file.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/make_philosophy_chat.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from picogpt_lightning.errors import PicoGPTError

MULTI_TURN_SHARE = {2: 0.12, 3: 0.05}  # share of conversations that join 2 or 3 pairs; the rest have one
SYSTEM_PROMPT_SHARE = 0.12
SYSTEM_PROMPTS = (
    "You are picoGPT. Answer questions on {topic} in a few plain sentences.",
    "You are a patient teacher of philosophy. The topic is {topic}.",
    "Answer briefly and plainly.",
    "You are picoGPT, a thoughtful assistant.",
)
SECTION_TITLE = "Questions on "


def question_answer_runs(text: str) -> list[tuple[str | None, list[tuple[str, str]]]]:
    """Runs of consecutive Q/A paragraphs, each with the theme its title names ("Questions on Time" -> "time")."""
    runs: list[tuple[str | None, list[tuple[str, str]]]] = []
    previous = ""
    for paragraph in text.split("\n\n"):
        paragraph = paragraph.strip("\n")
        lines = paragraph.split("\n")
        if len(lines) == 2 and lines[0].startswith("Q: ") and lines[1].startswith("A: "):
            if not previous.startswith("Q: "):
                theme = previous[len(SECTION_TITLE) :].lower() if previous.startswith(SECTION_TITLE) else None
                runs.append((theme, []))
            runs[-1][1].append((lines[0][3:], lines[1][3:]))
        previous = paragraph
    return runs


def conversations(text: str, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    made = []
    for theme, pairs in question_answer_runs(text):
        start = 0
        while start < len(pairs):
            draw = rng.random()
            size = 3 if draw < MULTI_TURN_SHARE[3] else 2 if draw < sum(MULTI_TURN_SHARE.values()) else 1
            messages = []
            if rng.random() < SYSTEM_PROMPT_SHARE:
                prompts = [p for p in SYSTEM_PROMPTS if theme or "{topic}" not in p]
                messages.append({"role": "system", "content": rng.choice(prompts).format(topic=theme)})
            for question, answer in pairs[start : start + size]:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            made.append({"messages": messages})
            start += size
    return made


def main(text_path: str = "data/philosophy.txt", out_path: str = "data/philosophy-chat.jsonl", seed: int = 0) -> str:
    """Write the conversations as JSONL and print what the file holds.

    Args:
        text_path: The corpus whose "Q: ...\\nA: ..." paragraphs become conversations.
        out_path: The .jsonl file to write.
        seed: Seed for which conversations are multi-turn and which have a system prompt.
    """
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except OSError as error:
        raise PicoGPTError(f"cannot read {text_path} ({error.strerror})") from None
    made = conversations(text, seed)
    if not made:
        raise PicoGPTError(f"{text_path} has no 'Q: ...' / 'A: ...' paragraphs to make conversations from")
    content = "".join(json.dumps(conversation, ensure_ascii=False) + "\n" for conversation in made)
    Path(out_path).write_text(content, encoding="utf-8")
    turns = [sum(m["role"] == "user" for m in c["messages"]) for c in made]
    with_system = sum(c["messages"][0]["role"] == "system" for c in made)
    print(f"wrote {out_path}: {len(made):,} conversations ({turns.count(1):,} single-turn, {turns.count(2)} of 2 "
          f"turns, {turns.count(3)} of 3; {with_system} with a system prompt), {sum(turns):,} Q/A pairs, "
          f"{len(content.encode()):,} bytes")
    return content


def run(argv: list[str] | None = None) -> int:
    from jsonargparse import auto_cli

    try:
        auto_cli(main, args=argv, as_positional=False)
    except PicoGPTError as error:
        print(f"make_philosophy_chat: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
