"""A full disk while `fit` or `finetune` saves a checkpoint is one line that says the earlier checkpoints are
intact and how to resume, a non-zero exit, the earlier checkpoints unchanged, and the resume works once space is
freed. On a real 4 MB tmpfs (tests/small_disk.py)."""

from __future__ import annotations

import torch

from picogpt_lightning.cli import main

from helpers import make_config, make_text
from small_disk import fill, small_disk  # noqa: F401 (a fixture)
from test_finetune import base, finetune_config  # noqa: F401 (a fixture)


def assert_refused_then_resumed(command, config, run, disk, capsys):
    last = run / "last.ckpt"
    before = last.read_bytes()
    filler = fill(disk, leave=8 << 10)
    capsys.readouterr()
    resume = [command, "--config", str(config), "--ckpt_path", "last", "--additional_steps", "4"]
    assert main(resume) == 1
    err = capsys.readouterr().err
    line = [line for line in err.splitlines() if "error" in line]
    assert len(line) == 1 and "Traceback" not in err, err
    assert f"no space left on device while writing {run}" in line[0]
    assert "earlier checkpoints are intact; free space and resume with: " in line[0]
    assert f"--ckpt_path {last}" in line[0]
    assert last.read_bytes() == before
    assert not [path.name for path in run.iterdir() if path.name.endswith(".tmp")]
    filler.unlink()
    step = torch.load(last, weights_only=True)["global_step"]
    assert main(resume) == 0
    assert torch.load(last, weights_only=True)["global_step"] == step + 4


def test_fit_on_a_full_disk_says_so_in_one_line_and_resumes(small_disk, tmp_path, capsys):
    text = make_text(tmp_path / "text.txt", sentences=200)
    config = make_config(tmp_path, text, trainer={"max_steps": 4, "val_check_interval": 2,
                                                  "logger": False})
    config.write_text(config.read_text().replace(f"ckpt_dir: {tmp_path / 'checkpoints' / 'run'}",
                                                 f"ckpt_dir: {small_disk / 'run'}"))
    assert main(["fit", "--config", str(config), "--sample_tokens", "0"]) == 0
    assert_refused_then_resumed("fit", config, small_disk / "run", small_disk, capsys)


def test_finetune_on_a_full_disk_says_so_in_one_line_and_resumes(base, small_disk, tmp_path, capsys):  # noqa: F811
    config = finetune_config(tmp_path, base, trainer={"max_steps": 4, "val_check_interval": 2, "logger": False})
    config.write_text(config.read_text().replace(str(tmp_path / "checkpoints" / "chat"), str(small_disk / "chat")))
    assert main(["finetune", "--config", str(config)]) == 0
    assert_refused_then_resumed("finetune", config, small_disk / "chat", small_disk, capsys)
