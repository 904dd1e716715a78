"""Paths that are no regular file (a named pipe, /dev/zero, a symbolic link loop) are refused at once, in one line
that says what they are, wherever a user names a path: texts, checkpoints, configs, output folders, run logs."""

import os
import time
from pathlib import Path

import pytest

from picogpt_lightning import plot
from picogpt_lightning.checkpoint import read_checkpoint
from picogpt_lightning.cli import main
from picogpt_lightning.conversation import conversation_files
from picogpt_lightning.corpus import find_text_files
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.files import make_folders, what_path_is

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/zero") or not hasattr(os, "mkfifo"),
                                reason="needs /dev/zero and named pipes (a Unix system)")


@pytest.fixture
def hostile(tmp_path):
    """{what the message must say: path} for a FIFO, /dev/zero, a symbolic link loop and a broken link."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    return {"named pipe": fifo, "character device": "/dev/zero", "symbolic link loop": tmp_path / "loop_a",
            "broken symbolic link": tmp_path / "dangling"}


def test_what_a_path_is_is_said_in_words(hostile, tmp_path):
    for words, path in hostile.items():
        assert words in what_path_is(path)
    assert what_path_is(tmp_path / "nothing") == "missing"
    assert what_path_is(tmp_path) == "a folder"


def test_texts_checkpoints_and_conversations_say_what_the_path_is_not_that_it_is_missing(hostile):
    for words, path in hostile.items():
        for read in (find_text_files, read_checkpoint, conversation_files):
            with pytest.raises(PicoGPTError, match=words) as error:
                read(str(path))
            assert "does not exist" not in str(error.value)


def test_an_output_folder_that_is_a_pipe_or_device_is_refused_saying_what_it_is(hostile):
    for words, path in hostile.items():
        with pytest.raises(NotADirectoryError, match=words):
            make_folders(Path(path))


def test_prepare_into_a_named_pipe_is_one_line_naming_it(hostile, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("hello world\n" * 50)
    assert main(["prepare", "--text_path", str(text), "--out_dir", str(hostile["named pipe"])]) == 1
    assert "named pipe (FIFO), not a folder" in capsys.readouterr().err


def test_a_config_that_is_a_pipe_or_dev_zero_is_refused_at_once(hostile, capsys):
    for words, path in hostile.items():
        started = time.monotonic()
        for command in ("fit", "sample"):
            assert main([command, "--config", str(path)]) == 2
            err = capsys.readouterr().err
            assert words in err and "not a YAML file" in err
        assert time.monotonic() - started < 5  # a FIFO read would block forever


def test_plot_reads_no_log_that_is_a_device_or_a_pipe(hostile, tmp_path, capsys):
    for number, (words, target) in enumerate(list(hostile.items())[:2]):
        run = tmp_path / f"run{number}"
        (run / "lightning_logs" / "version_0").mkdir(parents=True)
        (run / "lightning_logs" / "version_0" / "metrics.csv").symlink_to(target)
        assert main(["plot", "--run", str(run)]) == 1  # /dev/zero was read without end, a FIFO blocked
        err = capsys.readouterr().err
        assert words in err and "not a regular file" in err and len(err.strip().splitlines()) == 1


def test_plot_refuses_a_log_over_its_size_limit(tmp_path, monkeypatch):
    log = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("step,train_loss\n" + "9,3.0\n" * 100)
    monkeypatch.setattr(plot, "MAX_LOG_BYTES", 200)
    with pytest.raises(PicoGPTError, match="more than the 200 allowed"):
        plot.read_metrics(plot.find_metric_files(tmp_path))
