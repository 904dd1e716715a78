"""One home per group of settings (issue 24 item 1): each dataclass owns its defaults and checks itself, the
LightningModule's and the data module's flags take their defaults from them, and the CLI only turns their
errors into one line."""

import inspect
from dataclasses import fields

import pytest

from picogpt_lightning.cli import main
from picogpt_lightning.data import BlockSettings, GPTDataModule
from picogpt_lightning.model import GPTConfig
from picogpt_lightning.module import GPTLightningModule, settings_from_flags
from picogpt_lightning.optim import OptimizerSettings, ScheduleSettings

from helpers import make_config, make_text


def signature_defaults(cls) -> dict:
    return {name: parameter.default for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if parameter.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("settings, owner", [(GPTConfig, GPTLightningModule), (OptimizerSettings, GPTLightningModule),
                                             (ScheduleSettings, GPTLightningModule), (BlockSettings, GPTDataModule)])
def test_every_flag_takes_its_default_from_the_settings_that_own_it(settings, owner):
    flags = signature_defaults(owner)
    shared = [field for field in fields(settings) if field.name in flags and field.name not in ("vocab_size",
                                                                                                 "tie_weights")]
    assert shared
    for field in shared:
        assert flags[field.name] == field.default, field.name


def test_the_optimizer_users_get_by_default_is_adamw_at_6e_4_defined_once():
    assert (OptimizerSettings().optimizer, OptimizerSettings().learning_rate) == ("adamw", 6e-4)
    _, optimizer, schedule = settings_from_flags(signature_defaults(GPTLightningModule) | {"vocab_size": 10})
    assert optimizer == OptimizerSettings() and schedule == ScheduleSettings()


def test_every_model_setting_reaches_the_settings_and_the_older_cosine_lr_switch_is_read_once():
    flags = signature_defaults(GPTLightningModule) | dict(vocab_size=10, rope_theta=500.0, muon_lr=0.1,
                                                          warmup_iters=7, cosine_lr=False, lr_schedule="linear")
    config, optimizer, schedule = settings_from_flags(flags)
    assert (config.rope_theta, optimizer.muon_lr, schedule.warmup_iters) == (500.0, 0.1, 7)
    assert schedule.lr_schedule == "constant"
    assert all(field.name in signature_defaults(GPTLightningModule) for field in fields(GPTConfig))


@pytest.mark.parametrize("settings, values, message", [
    (OptimizerSettings, dict(learning_rate=0.0), "learning_rate must be a number > 0, got 0.0"),
    (OptimizerSettings, dict(beta2=1.0), r"beta2 must be in \[0, 1\), got 1.0"),
    (OptimizerSettings, dict(label_smoothing=-0.1), "label_smoothing must be in"),
    (OptimizerSettings, dict(muon_weight_decay=float("nan")), "muon_weight_decay must be a number >= 0"),
    (OptimizerSettings, dict(consistency=-1.0), "consistency must be a number >= 0"),
    (ScheduleSettings, dict(min_lr=-1.0), "min_lr must be a number >= 0"),
    (ScheduleSettings, dict(warmup_iters=-1), "warmup_iters must be a number of steps >= 0"),
    (ScheduleSettings, dict(lr_decay_iters=0), "lr_decay_iters must be a positive number of steps"),
    (ScheduleSettings, dict(lr_schedule="step"), "lr_schedule 'step' is unknown"),
    (GPTConfig, dict(vocab_size=10, rope_theta=float("inf")), "rope_theta must be a number > 0"),
    (BlockSettings, dict(batch_size=0), "data.batch_size must be a positive integer, got 0"),
])
def test_each_settings_dataclass_refuses_what_cannot_work(settings, values, message):
    with pytest.raises(ValueError if settings is not BlockSettings else Exception, match=message):
        settings(**values)


def test_the_command_line_turns_a_settings_error_into_one_line_before_any_data_is_prepared(tmp_path, capsys):
    config = make_config(tmp_path, make_text(tmp_path / "t.txt", sentences=50), name="bad")
    for flag, value, expected in (("--model.min_lr", "-1", "model.min_lr must be a number >= 0, got -1.0"),
                                  ("--model.n_head", "3", "model.n_embd (16) must be divisible by n_head (3)"),
                                  ("--model.lr_decay_iters", "0", "model.lr_decay_iters must be a positive"),
                                  ("--model.consistency", "1", "without dropout they are the same; set "
                                                               "--model.dropout above 0")):
        assert main(["fit", "--config", str(config), flag, value]) == 2
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and expected in errors[0], errors
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "checkpoints").exists()
