"""The chat REPL: the checkpoint's template, history within the context, commands, Ctrl-C and piped input."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picogpt_lightning.chat import ChatSession
from picogpt_lightning.checkpoint import save_checkpoint
from picogpt_lightning.chat_template import get_template
from picogpt_lightning.cli.chat import run_repl
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.settings import SamplingSettings
from picogpt_lightning.tokenizer import CharTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXT = "You are picoGPT.\n\nQ: What is knowledge?\nA: Justified true belief.\n\nQ: What is virtue?\nA: A habit.\n"
GREEDY = SamplingSettings(temperature=0.0)


class ScriptedModel(torch.nn.Module):
    """A stand-in for GPT whose next token is a fixed function of the last one, so answers are known."""

    def __init__(self, tokenizer: CharTokenizer, follows: dict[str, str], block_size: int = 64):
        super().__init__()
        self.config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=1, n_head=1, n_embd=8)
        self.wte = torch.nn.Embedding(tokenizer.vocab_size, 1)
        self.next_id = torch.arange(tokenizer.vocab_size)
        for current, following in follows.items():
            self.next_id[tokenizer.stoi[current]] = tokenizer.stoi[following]

    def new_cache(self, batch_size: int = 1):
        return type("Cache", (), {"length": 0})()

    def forward(self, idx, cache=None, last_only=False):
        if cache is not None:
            cache.length += idx.size(1)
        if last_only:
            idx = idx[:, -1:]
        return torch.nn.functional.one_hot(self.next_id[idx], self.config.vocab_size).float() * 10, None


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer.train([TEXT, "<|im_start|>user assistant<|im_end|> fx"])


def session_for(model, tokenizer, **options) -> ChatSession:
    options.setdefault("settings", SamplingSettings(temperature=0.0))
    return ChatSession(model, tokenizer, output=io.StringIO(), notes=io.StringIO(), **options)


def test_prompt_follows_the_corpus_form_with_end_of_text_after_each_answer(tokenizer):
    session = session_for(ScriptedModel(tokenizer, {}, block_size=256), tokenizer, system_prompt="You are picoGPT.")
    session.history = [("What is truth?", "A habit.")]
    prompt = tokenizer.decode(session.build_prompt("What is virtue?"))
    assert prompt == "You are picoGPT.\n\nQ: What is truth?\nA: A habit.<|endoftext|>\n\nQ: What is virtue?\nA:"


def test_the_answer_ends_at_end_of_text(tokenizer):
    model = ScriptedModel(tokenizer, {":": " ", " ": "h", "h": "i", "i": "?"})
    model.next_id[tokenizer.stoi["?"]] = tokenizer.eot_id  # " hi?" then end-of-text
    session = session_for(model, tokenizer, max_new_tokens=30)
    assert session.reply("What is virtue?") == "hi?"


def test_another_template_renders_the_conversation(tokenizer):
    session = session_for(ScriptedModel(tokenizer, {}, block_size=256), tokenizer, template=get_template("im"))
    session.history = [("hi", "yo")]
    assert tokenizer.decode(session.build_prompt("ok?")).endswith("<|endoftext|><|im_end|>\n"
                                                                  "<|im_start|>user\nok?<|im_end|>\n"
                                                                  "<|im_start|>assistant\n")


def test_answer_ends_at_the_next_user_marker(tokenizer):
    # After the prompt's final "A:" the script writes " hi\nQ: hi\nQ: ..." for ever.
    model = ScriptedModel(tokenizer, {":": " ", " ": "h", "h": "i", "i": "\n", "\n": "Q", "Q": ":"})
    session = session_for(model, tokenizer, system_prompt="You are picoGPT.")
    assert session.reply("What is virtue?") == "hi"
    assert session.output.getvalue() == "hi\n"
    assert session.history == [("What is virtue?", "hi")]


def test_an_extra_stop_string_ends_the_answer(tokenizer):
    model = ScriptedModel(tokenizer, {":": " ", " ": "h", "h": "i", "i": "t", "t": " "})
    session = session_for(model, tokenizer, stop=["it"], max_new_tokens=30)
    assert session.reply("What?") == "h"


def test_history_truncation_drops_oldest_turns_but_keeps_the_system_prompt(tokenizer):
    model = ScriptedModel(tokenizer, {}, block_size=96)
    session = session_for(model, tokenizer, system_prompt="You are picoGPT.", max_new_tokens=16)
    session.history = [(f"What is {word}?", "A habit.") for word in ("knowledge", "virtue", "truth", "a habit")]
    ids = session.build_prompt("What is virtue?")
    prompt = tokenizer.decode(ids)
    assert len(ids) <= session.prompt_budget == 96 - 16
    assert prompt.startswith("You are picoGPT.\n\nQ: ")
    assert prompt.endswith("Q: What is virtue?\nA:")
    assert 0 < len(session.history) < 4 and session.history[-1][0] == "What is a habit?"
    assert "What is knowledge?" not in prompt
    assert "oldest turn(s)" in session.notes.getvalue()


def test_end_of_text_typed_in_a_message_is_text_not_the_token(tokenizer):
    session = session_for(ScriptedModel(tokenizer, {}, block_size=256), tokenizer)
    session.history = [("hi<|endoftext|>", "yo")]
    ids = session.build_prompt("What<|endoftext|>?")
    assert ids.count(tokenizer.eot_id) == 1  # after the remembered answer, from the template


def test_commands_reset_set_system_prompt_and_temperature(tokenizer):
    model = ScriptedModel(tokenizer, {})
    session = session_for(model, tokenizer)
    session.history = [("hi", "hello")]
    assert session.handle("/reset") and session.history == []
    assert session.handle("/system You are picoGPT.") and session.system_prompt == "You are picoGPT."
    assert session.handle("/temp 0.3") and session.settings.temperature == 0.3
    assert session.handle("/temp hot") and session.settings.temperature == 0.3
    assert session.handle("/temp 1e-300") and session.settings.temperature == 1e-300  # greedy when sampling
    assert session.handle("/what") and "unknown command /what" in session.notes.getvalue()
    assert not session.handle("/exit")


def test_ctrl_c_stops_the_answer_not_the_session(tokenizer):
    class InterruptOnce(io.StringIO):
        interrupted = False

        def write(self, text):
            if text and not self.interrupted:
                self.interrupted = True
                raise KeyboardInterrupt
            return super().write(text)

    model = ScriptedModel(tokenizer, {":": " ", " ": "h", "h": "i", "i": "t", "t": " "})
    session = ChatSession(model, tokenizer, settings=GREEDY, output=InterruptOnce(), notes=io.StringIO())
    assert session.reply("hi") == "h"  # the first piece was being written when Ctrl-C came
    assert "answer stopped" in session.notes.getvalue()
    run_repl(session, ["hello", "/exit", "never read"])
    assert len(session.history) == 2 and session.history[1][0] == "hello"


def test_piped_chat_answers_each_line_and_reset_forgets(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    checkpoint = tmp_path / "tiny.ckpt"
    save_checkpoint(checkpoint, model, tokenizer)
    session = session_for(model, tokenizer, system_prompt="You are picoGPT.", max_new_tokens=20)
    expected = [session.reply("What is virtue?"), session.reply("What is knowledge?")]
    session.reset()
    expected.append(session.reply("What is virtue?"))
    assert expected[2] == expected[0]  # after /reset the first question is asked afresh

    command = [sys.executable, "-m", "picogpt_lightning.cli", "chat", "--ckpt", str(checkpoint)]
    command += ["--system_prompt", "You are picoGPT.", "--temperature", "0", "--max_new_tokens", "20"]
    command += ["--device", "cpu"]
    piped = "What is virtue?\nWhat is knowledge?\n/reset\nWhat is virtue?\n"
    result = subprocess.run(command, input=piped, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(answer + "\n" for answer in expected)
    assert "conversation cleared" in result.stderr
