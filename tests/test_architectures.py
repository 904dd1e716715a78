"""Every architecture option through every path that uses a model: cached generation equals the full forward
(past several slides of the window), and sample, chat, the Python API, evaluate and save/load all work."""

from __future__ import annotations

import math

import pytest
import torch

from picogpt_lightning.api import load
from picogpt_lightning.chat import ChatSession
from picogpt_lightning.checkpoint import load_checkpoint, save_checkpoint
from picogpt_lightning.cli.sample import sample_command
from picogpt_lightning.evaluate import evaluate_text
from picogpt_lightning.generate import generate
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.settings import SamplingSettings
from picogpt_lightning.tokenizer import CharTokenizer

TEXT = "Q: What is knowledge?\nA: Justified true belief.\n\nQ: What is virtue?\nA: A habit of the good.\n"
GREEDY = SamplingSettings(temperature=0.0)
VARIANTS = {
    "classic": {},
    "rotary": dict(position="rotary"),
    "rms": dict(norm="rms"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp="relu2"),
    "swiglu": dict(mlp="swiglu", bias=False),
    "zero_init": dict(zero_init=True),
    "modern": dict(position="rotary", norm="rms", qk_norm=True, mlp="relu2", zero_init=True, bias=False,
                   tie_weights=False),
    "qwen3-like": dict(position="rotary", norm="rms", qk_norm=True, mlp="swiglu", bias=False),
}


def model_of(variant: str, vocab_size: int, block_size: int = 16) -> GPT:
    """Random weights spread wide (std 0.3) so that greedy choices are never near-ties, which a last-bit
    difference between the cached and uncached computation orders could flip."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16,
                       **VARIANTS[variant])
    model = GPT(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer() -> CharTokenizer:
    return CharTokenizer.train([TEXT])


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture
def checkpoint(tmp_path, variant, tokenizer):
    model = model_of(variant, tokenizer.vocab_size)
    path = tmp_path / f"{variant}.ckpt"
    save_checkpoint(path, model, tokenizer)
    return path, model


def test_cached_generation_equals_the_full_forward_past_several_slides(checkpoint):
    _, model = checkpoint
    block_size = model.config.block_size
    cached = list(generate(model, [1, 2, 3], 4 * block_size, GREEDY, use_cache=True))
    assert cached == list(generate(model, [1, 2, 3], 4 * block_size, GREEDY, use_cache=False))


def test_save_and_load_give_the_same_logits(checkpoint):
    path, model = checkpoint
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
    assert torch.equal(load_checkpoint(path).model(idx)[0], model(idx)[0])


def test_sample_chat_and_api_agree(checkpoint, tokenizer, capsys):
    path, model = checkpoint
    sample_command(str(path), prompt="Q:", max_new_tokens=40, temperature=0.0, device="cpu", stream=False)
    sampled = capsys.readouterr().out
    generated = load(path, device="cpu").generate("Q:", max_new_tokens=40, temperature=0.0)
    assert sampled == "Q:" + generated + "\n"
    assert len(tokenizer.encode(generated)) == 40  # past two slides of a 16-token window
    session = ChatSession(model, tokenizer, settings=GREEDY, max_new_tokens=30, output=open("/dev/null", "w"))
    assert isinstance(session.reply("What is virtue?"), str)


def test_evaluate_scores_like_the_full_forward(checkpoint, tokenizer):
    _, model = checkpoint
    text = TEXT[: model.config.block_size + 1]  # one window: every target scored with the model's own forward
    ids = torch.tensor([tokenizer.encode(text)])
    logits, _ = model(ids[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item()
    assert evaluate_text(model, tokenizer, text).loss == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(evaluate_text(model, tokenizer, TEXT).loss)
