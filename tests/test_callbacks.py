"""Callbacks in isolation, where a real run cannot reach the case (a strategy that needs GPUs)."""

from types import SimpleNamespace

from lightning.pytorch.strategies import FSDPStrategy

from picogpt_lightning.run_display import ValidationSample


class Untouchable:
    """A module stand-in that fails the test if the callback tries to run the model."""

    @property
    def model(self):
        raise AssertionError("sampled from a model whose weights are sharded over ranks")


def test_no_weight_average_when_the_strategy_shards_the_weights():
    from picogpt_lightning.callbacks import EMA
    from picogpt_lightning.errors import PicoGPTError

    trainer = SimpleNamespace(strategy=FSDPStrategy(), max_steps=10, is_global_zero=True)
    with pytest.raises(PicoGPTError, match="cannot run under FSDPStrategy.*--trainer.strategy ddp"):
        EMA().setup(trainer, Untouchable(), "fit")  # before it copies the model


def test_no_live_sample_when_the_strategy_shards_the_weights(capsys):
    trainer = SimpleNamespace(strategy=FSDPStrategy(), state=SimpleNamespace(fn="fit"), is_global_zero=True,
                              sanity_checking=False)
    callback = ValidationSample("Q:", max_new_tokens=5)
    callback.on_fit_start(trainer, Untouchable())
    callback.on_validation_end(trainer, Untouchable())
    assert "live samples are off under FSDPStrategy" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The Lightning features users bring (issue 14, items 6, 17, 18)

import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from picogpt_lightning.cli import main  # noqa: E402

from helpers import make_config, make_text  # noqa: E402


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return make_text(tmp_path_factory.mktemp("callbacks") / "t.txt", sentences=200)


def fit(tmp_path, text, name, *args, **trainer):
    config = make_config(tmp_path, text, name=name, trainer={"max_steps": 4, "val_check_interval": 2, **trainer})
    return main(["fit", "--config", str(config), *args]), tmp_path / "checkpoints" / name


def test_a_run_in_process_leaves_the_signal_handlers_as_it_found_them(tmp_path, text):
    """Lightning's SIGTERM handler, left behind, was chained into the next run's: calling it (a later SIGTERM)
    started a finished run's sigterm clock, which ended the process 60 s later."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert fit(tmp_path, text, "signals")[0] == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.parametrize("bar", [
    {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 3}},
    {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
], ids=["tqdm", "rich"])
def test_a_users_own_progress_bar_replaces_ours(tmp_path, text, bar):
    order = {"class_path": "record_batches.RecordCallbackOrder"}
    status, run = fit(tmp_path, text, "bar", callbacks=[bar, order], enable_progress_bar=True)
    assert status == 0 and (run / "best.ckpt").is_file()
    from record_batches import RecordCallbackOrder

    assert bar["class_path"].rsplit(".", 1)[1] in RecordCallbackOrder.order
    assert "StepProgressBar" not in RecordCallbackOrder.order


def test_a_users_own_model_checkpoint_runs_beside_ours_and_best_stays_known(tmp_path, text, capsys):
    theirs = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
              "init_args": {"dirpath": str(tmp_path / "theirs"), "every_n_train_steps": 2, "save_top_k": -1}}
    status, run = fit(tmp_path, text, "own", callbacks=[theirs])
    assert status == 0
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) != []
    out = capsys.readouterr().out
    assert f"in {run / 'best.ckpt'}" in out  # the end-of-run summary is still there
    assert main(["info", "--ckpt", str(run / "best.ckpt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["best_val_loss"] is not None  # and info knows the best


def test_checkpointing_off_saves_nothing_and_says_so(tmp_path, text, capsys):
    status, run = fit(tmp_path, text, "off", "--trainer.enable_checkpointing", "false")
    assert status == 0
    assert not list(run.glob("*.ckpt"))
    assert "no best.ckpt was written (checkpointing is off)" in capsys.readouterr().out


def test_metrics_csv_is_written_whatever_loggers_are_installed_or_given(tmp_path, text, monkeypatch, capsys):
    """A user's logger is added to ours; an installed tensorboard no longer replaces metrics.csv (item 6)."""
    from picogpt_lightning.cli import fit as fit_module
    from record_batches import ListLogger

    status, run = fit(tmp_path, text, "given", "--trainer.logger", "record_batches.ListLogger", log_every_n_steps=1)
    assert status == 0 and ListLogger.logged  # theirs got the metrics...
    assert len(list(run.glob("lightning_logs/version_0/metrics.csv"))) == 1  # ...and so did ours

    made = []

    class FakeTensorBoardLogger(ListLogger):
        def __init__(self, save_dir, name="lightning_logs", version=None, **kwargs):
            super().__init__()
            made.append(save_dir)

    monkeypatch.setattr(fit_module, "tensorboard_installed", lambda: True)
    monkeypatch.setattr(fit_module, "TensorBoardLogger", FakeTensorBoardLogger)
    status, run = fit(tmp_path, text, "tensorboard")
    assert status == 0 and made  # tensorboard "installed": its logger is used, as Lightning would...
    assert (run / "lightning_logs" / "version_0" / "metrics.csv").is_file()  # ...beside our CSV metrics
    assert main(["plot", "--run", str(run)]) == 0 or pytest.importorskip("matplotlib")


def test_the_summary_survives_ddp_spawn(tmp_path, text):
    """Under ddp_spawn the main process gets back a trainer without the best score: the final line is read
    from best.ckpt itself (item 18)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    config = make_config(tmp_path, text, name="spawn", trainer={"max_steps": 2, "val_check_interval": 2,
                                                                  "strategy": "ddp_spawn", "devices": 1})
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "picogpt_lightning.cli", "fit", "--config", str(config)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step 2 in {tmp_path / 'checkpoints' / 'spawn' / 'best.ckpt'}" in result.stdout


def test_resumed_progress_counts_total_steps_and_the_summary_has_no_zero_flops(tmp_path, text, capsys, caplog):
    order = {"class_path": "record_batches.RecordCallbackOrder"}
    status, run = fit(tmp_path, text, "bar", callbacks=[order])
    assert status == 0
    caplog.set_level(logging.INFO)
    assert main(["fit", "--ckpt_path", str(run / "last.ckpt"), "--trainer.max_steps", "6",
                 "--trainer.enable_progress_bar", "true", "--trainer.enable_model_summary", "true"]) == 0
    out = capsys.readouterr().out
    assert "Training from step 4" in out and "6/6" in out and "/?" not in out.split("Training from step 4")[1]
    summary = caplog.text
    assert "Total params" in summary and "Flops" not in summary and "FLOPs" not in summary
    from record_batches import RecordCallbackOrder

    # The bar closes its validation bar before the sample is printed under it.
    assert RecordCallbackOrder.order.index("StepProgressBar") < RecordCallbackOrder.order.index("ValidationSample")


# ---------------------------------------------------------------------------------------------------------------
# The average of the weights (picogpt_lightning.callbacks.EMA)
import csv  # noqa: E402

from picogpt_lightning.checkpoint import read_checkpoint  # noqa: E402


def ema(**init_args) -> list[dict]:
    return [{"class_path": "picogpt_lightning.callbacks.EMA", "init_args": {"decay": 0.9, **init_args}}]


def val_losses(run) -> dict[int, float]:
    rows = csv.DictReader(next(run.glob("lightning_logs/version_*/metrics.csv")).open())
    return {int(row["step"]): float(row["val_loss"]) for row in rows if row.get("val_loss")}


def test_the_average_is_the_trained_weights_until_its_first_update(tmp_path, text, capsys):
    steps = {"max_steps": 8, "val_check_interval": 4}
    assert fit(tmp_path, text, "plain", **steps)[0] == 0
    code, late = fit(tmp_path, text, "late", **steps, callbacks=ema(update_starting_at_step=5))
    assert code == 0
    plain, averaged = val_losses(tmp_path / "checkpoints" / "plain"), val_losses(late)
    # Lightning's own would validate (and save) the weights of step 0 before it starts averaging.
    assert averaged[3] == plain[3] and averaged[7] != plain[7]
    code, never = fit(tmp_path, text, "never", **steps, callbacks=ema(update_starting_at_step=100))
    assert code == 0
    assert "the EMA starts averaging at step 100, but this run ends at step 8" in capsys.readouterr().err
    assert val_losses(never) == plain
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = read_checkpoint(never / name)
        for key, value in checkpoint["state_dict"].items():
            assert torch.equal(value, checkpoint["current_model_state"][key]), key


@pytest.mark.parametrize("init_args, message", [
    ({"decay": 1.5}, "EMA decay must be in [0, 1), got 1.5"),
    ({"decay": 1.0}, "EMA decay must be in [0, 1), got 1.0"),
    ({"update_every_n_steps": 0}, "EMA update_every_n_steps must be 1 or more, got 0"),
    ({"update_starting_at_step": -1}, "EMA update_starting_at_step must be 0 or more"),
], ids=["decay-above-1", "decay-1", "every-0-steps", "negative-start"])
def test_an_average_that_cannot_work_is_refused_in_one_line(tmp_path, text, capsys, init_args, message):
    code, run = fit(tmp_path, text, "bad", callbacks=ema(**init_args))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert "picogpt_lightning.callbacks.EMA" in err[0] and not run.exists()
    assert not (tmp_path / "prepared").exists()  # found before any data is prepared


def test_a_users_callback_that_refuses_its_arguments_is_one_line(tmp_path, text, capsys):
    stopping = [{"class_path": "lightning.pytorch.callbacks.EarlyStopping",
                 "init_args": {"monitor": "val_loss", "mode": "sideways"}}]
    code, run = fit(tmp_path, text, "bad", callbacks=stopping)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not run.exists(), err
    assert "`mode` can be min, max, got sideways (lightning.pytorch.callbacks.EarlyStopping)" in err[0]


def test_two_weight_averages_are_refused_in_one_line(tmp_path, text, capsys):
    code, run = fit(tmp_path, text, "two", callbacks=ema() + ema(decay=0.5))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not run.exists(), err
    assert "trainer.callbacks holds 2 weight averages" in err[0] and "--trainer.callbacks.decay=X" in err[0]
