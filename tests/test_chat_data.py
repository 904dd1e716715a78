"""The fine-tuning data module: which tokens carry loss in the batches it gives, batches that are a pure
function of (seed, rank, step), a val loss over answers only, and one line each for what it leaves out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from picogpt_lightning.chat_data import ConversationDataModule, HeldOutBlocks, ShuffledBlocks
from picogpt_lightning.checkpoint import save_checkpoint
from picogpt_lightning.chat_template import get_template
from picogpt_lightning.model import GPT, GPTConfig, next_token_loss
from picogpt_lightning.module import GPTLightningModule
from picogpt_lightning.tokenizer import ENDOFTEXT, CharTokenizer

QA = get_template("qa")
PAIRS = [("Why?", "Because."), ("What is it?", "A small thing."), ("Who?", "You."),
         ("How so?", "Slowly, then all at once.")]


def conversations_file(tmp_path, pairs=PAIRS, repeat=5, extra=()):
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for _ in range(repeat) for q, a in pairs]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([*lines, *extra]) + "\n", encoding="utf-8")
    return path


def tokenizer_file(tmp_path, text="".join(QA.render([{"role": "user", "content": q},
                                                    {"role": "assistant", "content": a}], False) for q, a in PAIRS)):
    CharTokenizer.train([text]).save(tmp_path)
    return str(tmp_path / "vocab.json")


def data_module(tmp_path, **options) -> ConversationDataModule:
    settings = dict(tokenizer_from=tokenizer_file(tmp_path), block_size=48, batch_size=3, val_fraction=0.2)
    if "path" not in options:
        settings["path"] = str(conversations_file(tmp_path))
    return ConversationDataModule(**{**settings, **options})


def test_targets_are_the_answers_and_their_end_of_text_and_never_cross_conversations(tmp_path):
    module = data_module(tmp_path)
    tokenizer = module.tokenizer
    answers = {a for _, a in PAIRS}
    inputs, targets = next(iter(module.train_dataloader()))
    assert inputs.shape == targets.shape == (3, 48) and inputs.dtype == targets.dtype == torch.int64
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist()):
        trained = [t for t in row_targets if t >= 0]
        # What carries loss is, in order, " answer<|endoftext|>" for each conversation of the block.
        pieces = tokenizer.decode(trained).split(ENDOFTEXT)
        assert pieces[-1] == "" and all(piece.removeprefix(" ") in answers for piece in pieces[:-1])
        rendered = tokenizer.decode(row_inputs)
        assert rendered.startswith("Q: ")  # a block starts with a whole conversation
        assert all(t in (-1, i) for t, i in zip(row_targets[:-1], row_inputs[1:]))  # the next token, or none
        for position, target in enumerate(row_targets):
            if target >= 0:
                context = tokenizer.decode(row_inputs[: position + 1])
                assert context[context.rfind("Q: ") :].count("\nA:") == 1  # inside an answer, after its prompt
    # The loss never crosses into the next conversation: the token after an end-of-text is never a target.
    eot = tokenizer.eot_id
    after_end = targets[:, 1:][inputs[:, 1:] == eot]
    assert (after_end == -1).all()


def test_val_holds_the_held_out_conversations_and_counts_answers_only(tmp_path):
    module = data_module(tmp_path)
    batches = list(module.val_dataloader())
    facts = module.describe()
    assert facts["conversations"]["val"] == 4 and facts["conversations"]["train"] == 16
    assert sum(int((t >= 0).sum()) for _, t in batches) == facts["val_answer_tokens"] > 0

    torch.manual_seed(0)
    lightning_module = GPTLightningModule(vocab_size=module.tokenizer_vocab_size, block_size=48, n_layer=1, n_head=2,
                                          n_embd=16)
    lightning_module.eval()
    with torch.no_grad():
        for index, batch in enumerate(batches):
            lightning_module.validation_step(batch, index)
        pooled = next_token_loss(torch.cat([lightning_module.model(i)[0] for i, _ in batches]),
                                 torch.cat([t for _, t in batches]))
    # The val loss is the mean over every answer token, however the answers fall into batches.
    assert float(lightning_module.val_loss.compute()) == pytest.approx(float(pooled), rel=1e-5)


def test_training_batches_are_a_pure_function_of_seed_rank_and_step():
    inputs = np.arange(10 * 4).reshape(10, 4)
    stream = ShuffledBlocks(inputs, inputs, batch_size=3, seed=5)
    batches = [stream.indices(k) for k in range(10)]
    # Epoch after epoch every block once, each epoch in its own order.
    flat = np.concatenate(batches)
    assert sorted(flat[:10]) == sorted(flat[10:20]) == list(range(10)) and list(flat[:10]) != list(flat[10:20])
    # A stream that starts at step 4 (a resume) gives the same batches from there.
    resumed = iter(ShuffledBlocks(inputs, inputs, batch_size=3, seed=5, first_batch=4))
    assert all(torch.equal(next(resumed)[0], torch.from_numpy(inputs[batches[k]])) for k in range(4, 8))
    # Two ranks share out each epoch's blocks without overlap.
    ranks = [ShuffledBlocks(inputs, inputs, batch_size=2, seed=5, rank=rank, world_size=2) for rank in (0, 1)]
    first_epoch = [np.concatenate([ranks[r].indices(k) for k in range(2)]) for r in (0, 1)]
    assert not set(first_epoch[0]) & set(first_epoch[1])
    assert list(ShuffledBlocks(inputs, inputs, batch_size=3, seed=6).indices(0)) != list(batches[0])



def test_held_out_batches_are_as_many_on_every_rank_and_the_padding_carries_no_loss():
    inputs = np.arange(30, dtype=np.int64).reshape(6, 5)  # 3 batches of 2 over 2 ranks: 2 + 1, and 1 of padding
    ranks = [list(HeldOutBlocks(inputs, inputs, batch_size=2, rank=rank, world_size=2)) for rank in (0, 1)]
    assert [len(batches) for batches in ranks] == [2, 2]
    assert [bool((targets >= 0).any()) for _, targets in ranks[1]] == [True, False]
    assert torch.equal(ranks[1][0][1], torch.from_numpy(inputs[2:4]))

def test_unseen_characters_and_skipped_conversations_are_one_line_each(tmp_path, capsys):
    long_answer = "Because. " * 10
    path = conversations_file(tmp_path, extra=[
        json.dumps({"messages": [{"role": "user", "content": "Why é?"}, {"role": "assistant", "content": "Ü."}]}),
        json.dumps({"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": long_answer}]}),
    ])
    module = data_module(tmp_path, path=str(path), val_fraction=0.1)
    assert module.describe()["conversations"]["skipped"] == 1
    lines = capsys.readouterr()
    warnings = [line for line in lines.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "1 conversation(s) hold 2 character(s) the model never saw, 2 time(s)" in warnings[0]
    assert "'é' -> 'e'" in warnings[0] and "mapped as generation maps them" in warnings[0]
    assert warnings[1].startswith("warning: skipped 1 of 22 conversation(s) longer than the context (49 tokens")
    assert lines.out.startswith("fine-tuning data: train packed") and lines.out.count("\n") == 1


def test_template_and_context_default_to_the_base_checkpoints(tmp_path):
    tokenizer = CharTokenizer.train(["".join(get_template("im").render([{"role": "user", "content": q},
                                     {"role": "assistant", "content": a}], False) for q, a in PAIRS)])
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "base.ckpt", model, tokenizer, chat_template=get_template("im").to_dict())
    module = ConversationDataModule(str(conversations_file(tmp_path)), tokenizer_from=str(tmp_path / "base.ckpt"))
    assert module.chat_template.name == "im" and module.data.train.inputs.shape[1] == 96
    assert tokenizer.decode(module.data.train.inputs[0].tolist()).startswith("<|im_start|>user\n")
    save_checkpoint(tmp_path / "plain.ckpt", model, tokenizer)
    assert ConversationDataModule(str(conversations_file(tmp_path)), tokenizer_from=str(tmp_path / "plain.ckpt"),
                                  chat_template=None).chat_template.name == "qa"
