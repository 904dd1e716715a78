"""`picogpt plot`: every version of a run's CSV log merged by step (later wins), drawn into a PNG."""

import sys

import pytest

from picogpt_lightning.cli import main
from picogpt_lightning.cli.plot import plot_command
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.plot import find_metric_files, read_metrics

from helpers import make_config, make_text

HEADER = "epoch,lr,step,tokens_per_s,train_loss,val_loss,val_ppl\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_version(run, number: int, rows: str):
    folder = run / "lightning_logs" / f"version_{number}"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(HEADER + rows)


def test_versions_merge_by_step_with_the_later_version_winning(tmp_path):
    write_version(tmp_path, 0, "0,0.1,9,,3.0,,\n0,,9,,,2.9,18.2\n0,0.2,19,,2.5,,\n0,,19,,,2.6,13.5\n")
    write_version(tmp_path, 1, "0,0.3,19,,2.4,,\n0,0.3,29,,2.2,,\n")
    write_version(tmp_path, 10, "0,,29,,,2.1,8.2\n")
    files = find_metric_files(tmp_path)
    assert [f.parent.name for f in files] == ["version_0", "version_1", "version_10"]  # numeric order
    metrics = read_metrics(files)
    assert metrics["train_loss"] == {10: 3.0, 20: 2.4, 30: 2.2}  # steps are optimizer steps (0-based + 1)
    assert metrics["val_loss"] == {10: 2.9, 20: 2.6, 30: 2.1}
    assert metrics["lr"] == {10: 0.1, 20: 0.3, 30: 0.3}


def test_a_real_resumed_run_plots_into_training_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    config = make_config(tmp_path, make_text(tmp_path / "corpus.txt", sentences=200), name="plot",
                         trainer={"max_steps": 4, "val_check_interval": 2, "log_every_n_steps": 1})
    assert main(["fit", "--config", str(config)]) == 0
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "6"]) == 0
    run = tmp_path / "checkpoints" / "plot"
    capsys.readouterr()
    plot_command(str(run))
    out = capsys.readouterr().out
    assert (run / "training.png").read_bytes().startswith(PNG_MAGIC)
    assert "from 2 log file(s)" in out and str(run / "training.png") in out
    metrics = read_metrics(find_metric_files(run))
    assert set(metrics["val_loss"]) == {2, 4, 6} and max(metrics["train_loss"]) == 6


def test_out_names_the_image(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_version(tmp_path, 0, "0,0.1,9,,3.0,,\n")
    plot_command(str(tmp_path), out=str(tmp_path / "figures" / "loss.png"))
    assert (tmp_path / "figures" / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert "loss.png" in capsys.readouterr().out


def test_missing_matplotlib_says_which_extra_to_install(tmp_path, monkeypatch):
    write_version(tmp_path, 0, "0,0.1,9,,3.0,,\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(PicoGPTError, match=r"pip install 'picogpt_lightning\[plot\]'"):
        plot_command(str(tmp_path))


def test_a_folder_without_logs_is_a_clear_error(tmp_path):
    with pytest.raises(PicoGPTError, match="no lightning_logs/version_"):
        plot_command(str(tmp_path))
    with pytest.raises(PicoGPTError, match="does not exist"):
        plot_command(str(tmp_path / "missing"))
    write_version(tmp_path, 0, "")
    with pytest.raises(PicoGPTError, match="no train_loss or val_loss"):
        plot_command(str(tmp_path))


def test_picogpt_plot_command_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_version(tmp_path, 0, "0,0.1,9,,3.0,,\n0,,9,,,2.9,18.2\n")
    assert main(["plot", "--run", str(tmp_path)]) == 0
    assert str(tmp_path / "training.png") in capsys.readouterr().out
    assert main(["plot", "--run", str(tmp_path / "missing")]) == 1


def test_out_without_a_suffix_names_the_png_it_really_writes(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_version(tmp_path, 0, "0,0.1,9,,3.0,,\n")
    plot_command(str(tmp_path), out=str(tmp_path / "notes"))
    assert (tmp_path / "notes.png").read_bytes().startswith(PNG_MAGIC)
    assert f"wrote {tmp_path / 'notes.png'}" in capsys.readouterr().out
