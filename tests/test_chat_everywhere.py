"""A tiny fine-tuned model answers the same in `picogpt chat`, the Python API and transformers, and stops at
end-of-text in all three: the chat template and end-of-text travel with the checkpoint and its export."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

from picogpt_lightning.api import load
from picogpt_lightning.chat import ChatSession
from picogpt_lightning.checkpoint import save_checkpoint
from picogpt_lightning.chat_template import get_template
from picogpt_lightning.conversation import encode_conversation, pack_conversations
from picogpt_lightning.export import export_hf
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.settings import SamplingSettings
from picogpt_lightning.tokenizer import BPETokenizer, CharTokenizer

QA = get_template("qa")
PAIRS = [("What is truth?", "What remains."), ("What is virtue?", "A habit of choosing well."),
         ("Who are you?", "picoGPT, a small model."), ("And why?", "Because doubt ends.")]
SYSTEM = {"role": "system", "content": "Be brief."}
CONVERSATIONS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in PAIRS[:3]
] + [[SYSTEM, {"role": "user", "content": PAIRS[0][0]}, {"role": "assistant", "content": PAIRS[0][1]},
      {"role": "user", "content": PAIRS[3][0]}, {"role": "assistant", "content": PAIRS[3][1]}]]


def fine_tuned(kind: str, path) -> None:
    """A 1-layer model fine-tuned on CONVERSATIONS as `picogpt finetune` would: loss on answers only, each
    conversation in its own block so that it starts at position 0, as a chat prompt does."""
    text = "".join(QA.render(messages, has_eot=False) for messages in CONVERSATIONS)
    tokenizer = CharTokenizer.train([text]) if kind == "char" else BPETokenizer.train([text * 20], vocab_size=300)
    encoded = [encode_conversation(messages, QA, tokenizer) for messages in CONVERSATIONS]
    block_size = max(len(e.ids) for e in encoded)
    packed = [pack_conversations([e], block_size) for e in encoded]
    inputs = torch.from_numpy(np.concatenate([p.inputs for p in packed]))
    targets = torch.from_numpy(np.concatenate([p.targets for p in packed]))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=48,
                          dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(inputs, targets=targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05  # the answers are learnt: greedy decoding gives them back
    save_checkpoint(path, model.eval(), tokenizer, chat_template=QA.to_dict())


@pytest.fixture(scope="module")
def transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # the test must never reach the network
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_chat_api_and_transformers_give_the_same_greedy_answers_ending_at_end_of_text(tmp_path, transformers, kind):
    ckpt = tmp_path / "chat.ckpt"
    fine_tuned(kind, ckpt)
    model = load(ckpt, device="cpu")
    session = ChatSession(model.model, model.tokenizer, template=model.chat_template, system_prompt="Be brief.",
                          settings=SamplingSettings(temperature=0), max_new_tokens=60, output=io.StringIO(),
                          notes=io.StringIO())
    first = [SYSTEM, {"role": "user", "content": PAIRS[0][0]}]
    second = [*first, {"role": "assistant", "content": PAIRS[0][1]}, {"role": "user", "content": PAIRS[3][0]}]
    chat_answers = [session.reply(PAIRS[0][0]), session.reply(PAIRS[3][0])]
    api_answers = [model.chat(messages, max_new_tokens=60, temperature=0) for messages in (first, second)]
    assert chat_answers == api_answers == [PAIRS[0][1], PAIRS[3][1]]

    export_hf(str(ckpt), str(tmp_path / "hf"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    for messages, answer in zip((first, second), api_answers):
        prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                  return_tensors="pt")
        assert prompt["input_ids"][0].tolist() == encode_conversation(messages, QA, model.tokenizer, True).ids
        with torch.no_grad():
            output = hf_model.generate(**prompt, max_new_tokens=60, do_sample=False)
        new_tokens = output[0, prompt["input_ids"].size(1) :].tolist()
        assert new_tokens[-1] == hf_tokenizer.eos_token_id == model.tokenizer.eot_id  # stopped at end-of-text
        text = hf_tokenizer.decode(new_tokens[:-1])
        assert text.removeprefix(QA.answer_lead) == answer
