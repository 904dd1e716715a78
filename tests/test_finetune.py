"""`picogpt finetune`: a base checkpoint trained further on conversations, resumed exactly, its chat template
stored and used by `picogpt chat`, and every bad input refused in one line before anything is written."""

from __future__ import annotations

import io
import re
import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml

from picogpt_lightning.chat import ChatSession
from picogpt_lightning.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from picogpt_lightning.cli import main
from picogpt_lightning.chat_template import get_template
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.settings import SamplingSettings
from picogpt_lightning.tokenizer import CharTokenizer

from helpers import WORDS
from test_resume import train_losses

BASE = dict(vocab_size=0, block_size=160, n_layer=1, n_head=2, n_embd=16, dropout=0.1)


def make_conversations(path: Path, count: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)

    def sentence(low, high, end):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + end

    lines = []
    for index in range(count):
        messages = [{"role": "system", "content": "Be brief."}] if index % 5 == 0 else []
        messages += [{"role": "user", "content": sentence(2, 4, "?")},
                     {"role": "assistant", "content": sentence(2, 6, ".")}]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A base checkpoint (random 1-layer char model, context 160) and conversations it knows every character of."""
    folder = tmp_path_factory.mktemp("base")
    conversations = make_conversations(folder / "chat.jsonl")
    text = "".join(get_template(name).render(json.loads(line)["messages"], has_eot=False)
                   for line in conversations.read_text().splitlines() for name in ("qa", "im"))
    tokenizer = CharTokenizer.train([text])
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, "vocab_size": tokenizer.vocab_size})).eval()
    save_checkpoint(folder / "base.ckpt", model, tokenizer)
    return folder / "base.ckpt", conversations


def finetune_config(tmp_path: Path, base: tuple[Path, Path], name: str = "chat", **overrides) -> Path:
    config = {
        "seed_everything": 7,
        "ckpt_dir": str(tmp_path / "checkpoints" / name),
        "sample_tokens": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 12, "val_check_interval": 6, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"init_from": str(base[0]), "learning_rate": 3e-3, "warmup_iters": 2},
        "data": {"path": str(base[1]), "batch_size": 4, "val_fraction": 0.2},
    }
    for section, values in overrides.items():
        config[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory) -> Path:
    """An uninterrupted 12-step fine-tuning run with the im template; returns its run folder."""
    tmp_path = tmp_path_factory.mktemp("straight")
    assert main(["finetune", "--config", str(finetune_config(tmp_path, base)), "--data.chat_template", "im"]) == 0
    return tmp_path / "checkpoints" / "chat"


def test_n_steps_plus_resume_equals_2n_steps_exactly(base, straight, tmp_path):
    config = finetune_config(tmp_path, base, name="split")
    # Stopped at step 6 of a 12-step schedule (lr_decay_iters follows max_steps 12), then resumed.
    assert main(["finetune", "--config", str(config), "--data.chat_template", "im", "--trainer.max_steps", "6",
                 "--model.lr_decay_iters", "12"]) == 0
    assert main(["finetune", "--config", str(config), "--ckpt_path", "last"]) == 0  # the template: the run's own
    split = tmp_path / "checkpoints" / "split"
    expected, resumed = train_losses(straight), train_losses(split)
    assert len(expected) == 12 and resumed == expected  # bit-identical, step by step
    a, b = read_checkpoint(straight / "last.ckpt"), read_checkpoint(split / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 12
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["picogpt"]["chat_template"] == b["picogpt"]["chat_template"] == get_template("im").to_dict()
    # Another template would train the rest of the run on other text: refused, before anything is written.
    assert main(["finetune", "--config", str(config), "--ckpt_path", "last", "--data.chat_template", "qa"]) == 1


def test_the_fine_tuned_checkpoint_starts_from_the_base_and_keeps_its_tokenizer_and_shape(base, straight):
    tuned, original = read_checkpoint(straight / "best.ckpt"), read_checkpoint(base[0])
    assert tuned["picogpt"]["tokenizer"] == original["picogpt"]["tokenizer"]
    assert tuned["picogpt"]["model_config"] == original["picogpt"]["model_config"]
    data = tuned["picogpt"]["data"]
    assert data["kind"] == "conversations" and data["chat_template"] == "im"
    assert data["conversations"] == {"train": 32, "val": 8, "skipped": 0, "with_unseen_characters": 0}
    assert 0 < data["train_answer_tokens"] < data["train_tokens"]


def test_the_stored_template_is_the_one_picogpt_chat_uses(straight, monkeypatch, capsys):
    ckpt = straight / "best.ckpt"
    loaded = load_checkpoint(ckpt)
    assert read_checkpoint(ckpt)["picogpt"]["chat_template"]["name"] == "im"

    def answer(template):
        session = ChatSession(loaded.model, loaded.tokenizer, template=get_template(template),
                              settings=SamplingSettings(temperature=0), max_new_tokens=30, output=io.StringIO(),
                              notes=io.StringIO())
        return session.reply("Why is time good?")

    monkeypatch.setattr(sys, "stdin", io.StringIO("Why is time good?\n"))
    capsys.readouterr()
    assert main(["chat", "--ckpt", str(ckpt), "--temperature", "0", "--max_new_tokens", "30", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == answer("im") + "\n"
    assert answer("im") != answer("qa")  # so the equality above says which template chat used


def test_without_a_base_checkpoint_the_error_says_what_to_pass(base, tmp_path, capsys):
    config = finetune_config(tmp_path, base, model={"init_from": None})
    assert main(["finetune", "--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--model.init_from CHECKPOINT" in error
    assert not (tmp_path / "checkpoints").exists()


def bad_conversations(tmp_path: Path, line: str) -> list[str]:
    good = '{"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "So."}]}'
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{line}\n", encoding="utf-8")
    return ["--data.path", str(path)]


def checkpoint_without_tokenizer(tmp_path: Path, base: Path) -> list[str]:
    checkpoint = torch.load(base, weights_only=True)
    checkpoint["picogpt"]["tokenizer"] = None
    torch.save(checkpoint, tmp_path / "no-tokenizer.ckpt")
    return ["--model.init_from", str(tmp_path / "no-tokenizer.ckpt")]


BAD_INPUTS = {
    "malformed line": (lambda tmp, base: bad_conversations(tmp, '{"messages": [}'),
                       r"bad.jsonl:2: malformed JSON \(Expecting value at column 15\)"),
    "unknown role": (lambda tmp, base: bad_conversations(tmp, '{"messages": [{"role": "bot", "content": "x"}]}'),
                     r"bad.jsonl:2: message 1 has the unknown role 'bot'"),
    "no answer": (lambda tmp, base: bad_conversations(tmp, '{"messages": [{"role": "user", "content": "x"}]}'),
                  r"bad.jsonl:2: no assistant message"),
    "no tokenizer": (checkpoint_without_tokenizer, r"no-tokenizer.ckpt holds no tokenizer"),
    "template": (lambda tmp, base: ["--data.chat_template", '{"system": "{content}", "user": "U: {content}\\n", '
                                                            '"assistant": "A: {answer}"}'],
                 r"the assistant format 'A: \{answer\}' does not render: it needs \{content\} exactly once"),
    "shape": (lambda tmp, base: ["--model.n_layer", "3", "--model.n_embd", "32"],
              r"keeps the architecture of .*base.ckpt \(n_layer 3 here vs 1 in the base, n_embd 32 here vs 16"),
    "context": (lambda tmp, base: ["--data.block_size", "64"], r"block_size 64 here vs 160 in the base"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_a_non_zero_exit_and_nothing_written(base, tmp_path, capsys, case):
    make_args, message = BAD_INPUTS[case]
    config = finetune_config(tmp_path, base)
    assert main(["finetune", "--config", str(config), *make_args(tmp_path, base[0])]) == 1
    error = capsys.readouterr().err
    assert error.startswith("picogpt finetune: error: ") and error.count("\n") == 1, error
    assert re.search(message, error), error
    assert not (tmp_path / "checkpoints").exists()
