"""resume.py: what a checkpoint must share with the run that continues or starts from it (issue 24 item 2), and
the rope_theta resume that was listed as a change but not refused."""

from dataclasses import fields

import torch

from picogpt_lightning.checkpoint import save_checkpoint
from picogpt_lightning.cli import main
from picogpt_lightning.cli.finetune import BASE_MODEL_KEYS
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.resume import (ARCHITECTURE_KEYS, MAY_CHANGE, SETTLED_BY_DATA, SETTLED_BY_SETTINGS,
                                      model_mismatch_message, same_tokenizer)
from picogpt_lightning.tokenizer import CharTokenizer, fingerprint
from picogpt_lightning.warm_start import TokenMapping, token_mapping, warm_start_weights

from helpers import make_config, make_text


def test_the_architecture_is_every_gptconfig_field_but_dropout_and_the_initialisation():
    assert set(ARCHITECTURE_KEYS) == {field.name for field in fields(GPTConfig)} - {"dropout", "zero_init"}
    assert "rope_theta" in ARCHITECTURE_KEYS and set(MAY_CHANGE) == {"dropout", "zero_init"}
    assert set(SETTLED_BY_DATA) | set(SETTLED_BY_SETTINGS) == set(ARCHITECTURE_KEYS)
    assert "rope_theta" in BASE_MODEL_KEYS and "vocab_size" not in BASE_MODEL_KEYS


def test_rope_theta_is_architecture_for_rotary_positions_only():
    rotary = dict(vocab_size=20, position="rotary", rope_theta=10000.0)
    assert "rope_theta 10000.0 in checkpoint vs 500.0 now" in model_mismatch_message(rotary, {**rotary, "rope_theta": 500.0})
    learned = dict(vocab_size=20, position="learned")
    assert model_mismatch_message(learned, {**learned, "rope_theta": 500.0}) is None


def test_a_resume_that_changes_rope_theta_is_refused_before_any_data_is_prepared(tmp_path, capsys):
    config = make_config(tmp_path, make_text(tmp_path / "t.txt", sentences=100), name="rope",
                         trainer={"max_steps": 2, "val_check_interval": 2}, model={"position": "rotary"})
    assert main(["fit", "--config", str(config)]) == 0
    last = tmp_path / "checkpoints" / "rope" / "last.ckpt"
    before = last.read_bytes()
    capsys.readouterr()
    assert main(["fit", "--ckpt_path", str(last), "--additional_steps", "1", "--model.rope_theta", "500"]) == 1
    err = capsys.readouterr().err
    assert "the checkpoint's model does not match this config (rope_theta 10000.0 in checkpoint vs 500.0 now)" in err
    assert last.read_bytes() == before
    assert main(["validate", "--ckpt_path", str(last), "--model.rope_theta", "500"]) == 1


def test_one_tokenizer_identity_a_damaged_stored_tokenizer_is_never_the_same():
    tokenizer = CharTokenizer("abc")
    assert same_tokenizer({"tokenizer": tokenizer.to_json()}, tokenizer)
    assert same_tokenizer({"tokenizer_sha256": fingerprint(tokenizer)}, fingerprint(tokenizer))
    assert same_tokenizer({}, tokenizer)  # nothing stored: nothing to compare
    assert not same_tokenizer({"tokenizer": tokenizer.to_json()}, CharTokenizer("abd"))
    assert not same_tokenizer({"tokenizer": "{not json"}, tokenizer)


def test_warm_start_maps_rows_by_token_and_says_so(tmp_path):
    theirs, ours = CharTokenizer("abcd"), CharTokenizer("xbdc")
    model = GPT(GPTConfig(vocab_size=4, block_size=4, n_layer=1, n_head=1, n_embd=4, tie_weights=False))
    save_checkpoint(tmp_path / "a.ckpt", model, theirs)
    mapping = token_mapping(torch.load(tmp_path / "a.ckpt", weights_only=True), ours)
    assert isinstance(mapping, TokenMapping)
    pairs = {tuple(pair) for pair in mapping.rows.tolist()}
    assert pairs == {(1, 0), (2, 1), (3, 2)} and "3 of this data's 4 tokens" in mapping.note  # ids: sorted
    fresh = GPT(GPTConfig(vocab_size=4, block_size=4, n_layer=1, n_head=1, n_embd=4, tie_weights=False))
    message = warm_start_weights(fresh, str(tmp_path / "a.ckpt"), strict=False, tokenizer=ours)
    assert "mapped wte.weight, lm_head.weight token by token" in message
    assert torch.equal(fresh.wte.weight[0], model.wte.weight[1]) and torch.equal(fresh.wte.weight[2], model.wte.weight[3])
    assert token_mapping(torch.load(tmp_path / "a.ckpt", weights_only=True), theirs) is None
