"""No error is swallowed or mislabelled (issue 24 item 4): a damaged stored tokenizer is a mismatch, a settings
error shows its cause and a bug is not called a setting, an OS error names its file and reason only when it has
one, and a missing loop-state key of Lightning is said, not skipped."""

import errno
import json

import pytest

from picogpt_lightning import callbacks as callbacks_module
from picogpt_lightning.callbacks import FinalValidation
from picogpt_lightning.cli.main import os_error_line
from picogpt_lightning.resume import tokenizer_mismatch
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.model import GPT
from picogpt_lightning.module import GPTLightningModule
from picogpt_lightning.tokenizer import CharTokenizer, fingerprint


def tiny_module(**overrides):
    return GPTLightningModule(**{**dict(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8), **overrides})


def test_a_damaged_stored_tokenizer_is_a_mismatch_never_a_pass(tmp_path):
    tokenizer = CharTokenizer("abc")
    good = {"picogpt": {"tokenizer": tokenizer.to_json()}}  # an older checkpoint: JSON only, no fingerprint
    assert tokenizer_mismatch(good, tmp_path / "a.ckpt", fingerprint(tokenizer)) is None
    damaged = {"picogpt": {"tokenizer": json.dumps({"kind": "char", "chars": 7})}}
    message = tokenizer_mismatch(damaged, tmp_path / "a.ckpt", fingerprint(tokenizer))
    assert message is not None and "a.ckpt is damaged" in message and "--allow_data_change" in message


def test_a_refused_model_setting_shows_its_cause_in_one_line():
    with pytest.raises(PicoGPTError, match=r"invalid model settings: n_embd \(10\) must be divisible by n_head") as info:
        tiny_module(n_embd=10, n_head=4)
    assert "\n" not in str(info.value) and isinstance(info.value.__cause__, ValueError)


def test_a_value_error_from_building_the_model_is_not_called_a_setting(monkeypatch):
    def broken(self, config):
        raise ValueError("a bug inside the model")

    monkeypatch.setattr(GPT, "__init__", broken)
    with pytest.raises(ValueError, match="a bug inside the model") as info:
        tiny_module()
    assert not isinstance(info.value, PicoGPTError)


def test_an_os_error_names_its_file_and_reason_and_only_then_says_file():
    full = os_error_line(OSError(errno.ENOSPC, "No space left on device", "/runs/a/last.ckpt"))
    assert full.startswith("could not use /runs/a/last.ckpt: No space left on device; free some space")
    denied = os_error_line(PermissionError(errno.EACCES, "Permission denied", "/runs/a"))
    assert "/runs/a: Permission denied; check its permissions" in denied
    socket = os_error_line(OSError(errno.EADDRINUSE, "Address already in use"))
    assert socket == "Address already in use (OSError)" and "file" not in socket


def test_a_checkpoint_without_lightnings_logging_step_counter_is_reported_not_skipped(monkeypatch):
    said = []
    monkeypatch.setattr(callbacks_module, "warn", said.append)
    callback = FinalValidation()
    callback.forced_step = 5
    trainer = type("Trainer", (), {"validating": True})()
    callback.on_save_checkpoint(trainer, None, {"global_step": 5, "loops": {"fit_loop": {}}})
    assert len(said) == 1 and "will log every step one too low" in said[0]
    stored = {"global_step": 5, "loops": {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": 4}}}}
    callback.on_save_checkpoint(trainer, None, stored)
    assert stored["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] == 5 and len(said) == 1
