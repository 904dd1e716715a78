"""A run is never lost: exact resume, graceful interrupts, kill -9, non-finite loss."""

import csv
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from picogpt_lightning.checkpoint import read_checkpoint
from picogpt_lightning.cli import main
from picogpt_lightning.module import GPTLightningModule
from picogpt_lightning.prepare import prepare

from helpers import make_config, make_text


def train_losses(run: Path) -> dict[int, float]:
    losses = {}
    for metrics in sorted(run.glob("lightning_logs/version_*/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train_loss"):
                losses[int(row["step"])] = float(row["train_loss"])
    return losses


def same(a, b) -> bool:
    """Equal to the bit, tensors included, through nested dicts and lists."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("accumulate", [1, 2], ids=["plain", "accumulating"])
def test_n_steps_plus_resume_equals_2n_steps_exactly(tmp_path, accumulate, optimizer):
    text = make_text(tmp_path / "t.txt")
    settings = dict(trainer={"max_steps": 16, "val_check_interval": 8 * accumulate, "log_every_n_steps": 1,
                             "accumulate_grad_batches": accumulate},
                    model={"dropout": 0.1, "optimizer": optimizer})
    straight = make_config(tmp_path, text, name="straight", **settings)
    split = make_config(tmp_path, text, name="split", **settings)
    assert main(["fit", "--config", str(straight)]) == 0
    # An interrupted 16-step run: same schedule (lr_decay_iters follows max_steps 16), stopped at step 8.
    assert main(["fit", "--config", str(split), "--trainer.max_steps", "8", "--model.lr_decay_iters", "16"]) == 0
    assert main(["fit", "--config", str(split), "--ckpt_path", "last"]) == 0

    runs = tmp_path / "checkpoints"
    expected, resumed = train_losses(runs / "straight"), train_losses(runs / "split")
    assert len(expected) == 16 and resumed == expected  # bit-identical, step by step
    a = read_checkpoint(runs / "straight" / "last.ckpt")
    b = read_checkpoint(runs / "split" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 16
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert same(a["optimizer_states"], b["optimizer_states"])  # momentum buffers, Adam moments, steps


def test_resume_is_exact_with_the_weight_average_and_checkpoints_hold_the_average(tmp_path):
    text = make_text(tmp_path / "t.txt")
    ema = [{"class_path": "picogpt_lightning.callbacks.EMA", "init_args": {"decay": 0.9}}]
    settings = dict(trainer={"max_steps": 16, "val_check_interval": 8, "log_every_n_steps": 1, "callbacks": ema},
                    model={"dropout": 0.1})
    straight = make_config(tmp_path, text, name="straight", **settings)
    split = make_config(tmp_path, text, name="split", **settings)
    assert main(["fit", "--config", str(straight)]) == 0
    # Stopped at step 6, between validations: last.ckpt is written at the very end of training.
    assert main(["fit", "--config", str(split), "--trainer.max_steps", "6", "--model.lr_decay_iters", "16"]) == 0
    assert main(["fit", "--config", str(split), "--ckpt_path", "last"]) == 0
    runs = tmp_path / "checkpoints"
    assert train_losses(runs / "split") == train_losses(runs / "straight")
    a, b = (read_checkpoint(runs / name / "last.ckpt") for name in ("straight", "split"))
    assert same(a["state_dict"], b["state_dict"]) and same(a["current_model_state"], b["current_model_state"])
    # The checkpoint's weights are the average, not the trained weights (which resume from current_model_state).
    assert not same(a["state_dict"], a["current_model_state"])


def test_a_resume_without_the_average_continues_from_the_trained_weights(tmp_path):
    """A checkpoint of an averaging run leads with the average; resuming it without the callback must go on
    from where training stood (current_model_state), as the uninterrupted run did."""
    text = make_text(tmp_path / "t.txt")
    ema = [{"class_path": "picogpt_lightning.callbacks.EMA", "init_args": {"decay": 0.9}}]
    settings = dict(trainer={"max_steps": 12, "val_check_interval": 6, "log_every_n_steps": 1, "callbacks": ema})
    straight = make_config(tmp_path, text, name="straight", **settings)
    split = make_config(tmp_path, text, name="split", **settings)
    assert main(["fit", "--config", str(straight)]) == 0
    assert main(["fit", "--config", str(split), "--trainer.max_steps", "6", "--model.lr_decay_iters", "12"]) == 0
    assert main(["fit", "--config", str(split), "--ckpt_path", "last", "--trainer.callbacks", "[]"]) == 0
    runs = tmp_path / "checkpoints"
    assert train_losses(runs / "split") == train_losses(runs / "straight")
    trained = read_checkpoint(runs / "straight" / "last.ckpt")["current_model_state"]
    assert same(read_checkpoint(runs / "split" / "last.ckpt")["state_dict"], trained)


def test_a_resume_that_adds_the_average_says_so_and_trains_on_unchanged(tmp_path, capsys, recwarn):
    text = make_text(tmp_path / "t.txt")
    settings = dict(trainer={"max_steps": 12, "val_check_interval": 6, "log_every_n_steps": 1})
    straight = make_config(tmp_path, text, name="straight", **settings)
    split = make_config(tmp_path, text, name="split", **settings)
    assert main(["fit", "--config", str(straight)]) == 0
    assert main(["fit", "--config", str(split), "--trainer.max_steps", "6", "--model.lr_decay_iters", "12"]) == 0
    capsys.readouterr()
    assert main(["fit", "--config", str(split), "--ckpt_path", "last",
                 "--trainer.callbacks+=picogpt_lightning.callbacks.EMA"]) == 0
    out, err = capsys.readouterr()
    assert "trainer.callbacks None -> [{'class_path': 'picogpt_lightning.callbacks.EMA'" in out
    # Lightning's own note about it (a warning with its file and line) is replaced by that line.
    assert "WeightAveraging" not in err and not [w for w in recwarn if "WeightAveraging" in str(w.message)]
    runs = tmp_path / "checkpoints"
    assert train_losses(runs / "split") == train_losses(runs / "straight")
    resumed = read_checkpoint(runs / "split" / "last.ckpt")
    assert same(resumed["current_model_state"], read_checkpoint(runs / "straight" / "last.ckpt")["state_dict"])


TESTS = Path(__file__).resolve().parent


def subprocess_env() -> dict:
    """The test's own environment, with tests/ importable (for the callbacks of record_batches.py)."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def start_long_run(tmp_path, name="long", *flags):
    text = make_text(tmp_path / "t.txt")
    config = make_config(tmp_path, text, name=name,
                         trainer={"max_steps": 100_000, "val_check_interval": 5, "log_every_n_steps": 5})
    process = subprocess.Popen([sys.executable, "-m", "picogpt_lightning.cli", "fit", "--config", str(config), *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    return process, config, tmp_path / "checkpoints" / name


def wait_for(path: Path, process, timeout=120.0):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_saves_last_and_the_printed_resume_command_continues_the_same_run(tmp_path, signum):
    """The command printed on interrupt, run as printed, continues the run with its own text, model and trainer
    settings, though they were given as flags (issue 14, item 1)."""
    other = make_text(tmp_path / "other.txt", seed=5)
    run = tmp_path / "elsewhere"
    process, _, _ = start_long_run(
        tmp_path, "long", "--data.text_path", str(other), "--model.n_embd", "24", "--ckpt_dir", str(run),
        "--trainer.max_steps", "40", "--trainer.callbacks+=record_batches.SlowSteps",
        "--trainer.callbacks.seconds", "0.05")
    wait_for(run / "best.ckpt", process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "Traceback" not in err, err
    stopped_at = read_checkpoint(run / "last.ckpt")["global_step"]
    assert 5 <= stopped_at < 40 and f"Interrupted at step {stopped_at}" in err
    command = err.split("Resume with: ", 1)[1].splitlines()[0]
    assert command == f"picogpt fit --ckpt_path {run / 'last.ckpt'}"  # short, and all it takes

    arguments = shlex.split(command)[1:]
    if signum == signal.SIGINT:  # as a user types it
        resumed = subprocess.run([sys.executable, "-m", "picogpt_lightning.cli", *arguments], capture_output=True,
                                 text=True, env=subprocess_env(), timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    else:
        assert main(arguments) == 0
    last = read_checkpoint(run / "last.ckpt")
    assert last["global_step"] == 40  # continued to the run's own max_steps
    assert last["picogpt"]["model_config"]["n_embd"] == 24
    assert last["picogpt"]["data"]["source"]["name"] == "other.txt"
    resumed_steps = [int(row["step"]) for row in csv.DictReader((run / "lightning_logs/version_1/metrics.csv").open())
                     if row.get("train_loss")]
    assert min(resumed_steps) >= stopped_at - 1 and max(resumed_steps) == 39  # went on from there, not over


def test_kill_9_at_any_moment_leaves_loadable_checkpoints_and_a_lock_the_next_run_takes_over(tmp_path, capsys):
    for attempt in range(3):
        process, _, run = start_long_run(tmp_path, name=f"kill{attempt}")
        wait_for(run / "best.ckpt", process)
        if attempt == 0:  # while it runs, a second run into its folder is refused, naming it (item 11)
            assert main(["fit", "--ckpt_path", str(run / "last.ckpt"), "--additional_steps", "1"]) == 1
            assert f"is in use by another run (process {process.pid})" in capsys.readouterr().err
        time.sleep(0.3 + 0.37 * attempt)
        process.kill()
        process.communicate()
        for name in ("best.ckpt", "last.ckpt"):
            if (run / name).exists():
                read_checkpoint(run / name)  # raises if half-written
    # The killed run's lock is stale: the next run takes it over, and removes it when it ends.
    assert (run / ".lock").read_text().strip() == str(process.pid)
    step = read_checkpoint(run / "last.ckpt")["global_step"]
    assert main(["fit", "--ckpt_path", str(run / "last.ckpt"), "--additional_steps", "1"]) == 0
    assert read_checkpoint(run / "last.ckpt")["global_step"] == step + 1
    assert not (run / ".lock").exists() and not list(run.glob(".*.tmp"))


def test_checkpoints_are_staged_in_their_own_folder_never_in_tmpdir(tmp_path, monkeypatch):
    """A rename within one filesystem is atomic; Lightning's own writer stages checkpoints in $TMPDIR, and when
    that is another filesystem (tmpfs) its move is a copy that kill -9 can cut short (item 9)."""
    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), real_replace(src, dst)))
    config = make_config(tmp_path, make_text(tmp_path / "t.txt"), name="atomic",
                         trainer={"max_steps": 4, "val_check_interval": 2})
    assert main(["fit", "--config", str(config)]) == 0
    written = [(src, dst) for src, dst in renames if dst.suffix == ".ckpt"]
    assert {dst.name for _, dst in written} == {"best.ckpt", "last.ckpt"}
    assert all(src.parent == dst.parent for src, dst in written)
    assert list(elsewhere.iterdir()) == []


def test_a_failed_save_is_an_error_and_no_line_names_a_file_that_is_not_there(tmp_path, monkeypatch, capsys):
    """The folder turns unwritable mid-run (item 10): the run fails in one line, and does not claim a best.ckpt."""
    from picogpt_lightning import callbacks

    real_write = callbacks.write_atomically
    saves = []

    def unwritable_after_the_first_save(path, write):
        saves.append(path)
        if len(saves) > 1:
            raise PermissionError(13, "Permission denied", str(path))
        return real_write(path, write)

    monkeypatch.setattr(callbacks, "write_atomically", unwritable_after_the_first_save)
    config = make_config(tmp_path, make_text(tmp_path / "t.txt"), name="fails",
                         trainer={"max_steps": 6, "val_check_interval": 2})
    assert main(["fit", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert "Permission denied" in captured.err and "Traceback" not in captured.err
    assert "best val_loss" not in captured.out


def test_an_old_checkpoint_resumes_with_its_own_settings(tmp_path):
    """Checkpoints from before the tie_weights rework (model.auto_tie_weights, no tokenizer fingerprint, no
    checksum) resume, rebuilt as they were trained."""
    config = make_config(tmp_path, make_text(tmp_path / "t.txt"), name="old",
                         trainer={"max_steps": 4, "val_check_interval": 4})
    assert main(["fit", "--config", str(config)]) == 0
    last = tmp_path / "checkpoints" / "old" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    meta = checkpoint["picogpt"]
    assert meta["model_config"]["tie_weights"]  # auto tied this small corpus
    meta["config"]["model"].update(tie_weights=False, auto_tie_weights=True)
    for key in ("tokenizer_sha256", "weights_sha256"):
        del meta[key]
    torch.save(checkpoint, last)
    assert main(["fit", "--ckpt_path", str(last), "--additional_steps", "2"]) == 0
    resumed = read_checkpoint(last)
    assert resumed["global_step"] == 6 and resumed["picogpt"]["model_config"]["tie_weights"]


def test_resume_and_validate_refuse_another_tokenizer_of_the_same_size_unless_allowed(tmp_path, capsys):
    """Two more lines in the corpus retrain the BPE tokenizer: same vocab size, other ids (item 2)."""
    text = make_text(tmp_path / "t.txt")
    config = make_config(tmp_path, text, name="bpe", trainer={"max_steps": 2, "val_check_interval": 2},
                         data={"mode": "token", "vocab_size": 300})
    assert main(["fit", "--config", str(config)]) == 0
    last = tmp_path / "checkpoints" / "bpe" / "last.ckpt"
    first = read_checkpoint(last)
    text.write_text(text.read_text() + "Zebras quote Xenophon.\nQuartz jugs vex.\n")
    capsys.readouterr()
    for command in (["fit", "--ckpt_path", str(last), "--additional_steps", "1"], ["validate", "--ckpt_path", str(last)]):
        assert main(command) == 1
        assert f"the text differs from the one {last} was trained on" in capsys.readouterr().err
    assert main(["fit", "--ckpt_path", str(last), "--additional_steps", "1", "--allow_data_change", "true"]) == 0
    assert read_checkpoint(last)["global_step"] == 3
    # The changed text was encoded with the checkpoint's tokenizer, never one trained again on it.
    assert read_checkpoint(last)["picogpt"]["tokenizer_sha256"] == first["picogpt"]["tokenizer_sha256"]
    # The run's stored settings do not pin the tokenizer to that file: a later resume takes its own checkpoint's.
    assert read_checkpoint(last)["picogpt"]["config"]["data"]["tokenizer_from"] is None
    # A tokenizer given deliberately that is not the checkpoint's is refused the same way.
    other = tmp_path / "other"
    prepare(str(text), str(other), mode="token", vocab_size=300)
    assert main(["validate", "--ckpt_path", str(last), "--data.tokenizer_from", str(other)]) == 1
    assert "the data's tokenizer is not the one" in capsys.readouterr().err


def test_non_finite_loss_stops_with_advice_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    text = make_text(tmp_path / "t.txt")
    config = make_config(tmp_path, text, name="nan", trainer={"max_steps": 30, "val_check_interval": 10})
    original = GPTLightningModule.training_step

    def breaks_at_step_17(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= 16 else loss

    monkeypatch.setattr(GPTLightningModule, "training_step", breaks_at_step_17)
    assert main(["fit", "--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert "NaN or inf at step 17" in error and "gradient_clip_val" in error and "learning_rate" in error
    last = read_checkpoint(tmp_path / "checkpoints" / "nan" / "last.ckpt")
    assert last["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
