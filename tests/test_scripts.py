"""The smoke-test scripts users run from the repository root, both as files and as modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from picogpt_lightning.checkpoint import load_checkpoint
from picogpt_lightning.errors import PicoGPTError

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `scripts` is a folder of the repository, not of the installed package
    sys.path.insert(0, str(REPO_ROOT))

from scripts import cpu_smoke_test, train_smoke_test  # noqa: E402

TEXT = "".join(
    f"Q: What is {topic}?\nA: {topic.capitalize()} is a matter of practice and of thought.\n\n"
    for topic in ("virtue", "knowledge", "justice", "courage", "beauty", "truth", "wisdom", "friendship")
) * 6


@pytest.fixture
def text_path(tmp_path) -> Path:
    path = tmp_path / "philosophy.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def run_from_repo_root(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, *arguments]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def test_cpu_smoke_test_runs_as_a_file_and_normalises_the_prompt(text_path):
    result = run_from_repo_root(
        "scripts/cpu_smoke_test.py", "--text_path", str(text_path), "--prompt", r"What is vîrtue—?\n",
        "--max_new_tokens", "30",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("What is virtue?\n")  # accent mapped, dash dropped (the text has none)
    assert "never saw" in result.stderr and "ok:" in result.stderr


def test_cpu_smoke_test_runs_as_a_module(text_path):
    result = run_from_repo_root("-m", "scripts.cpu_smoke_test", "--text_path", str(text_path), "--max_new_tokens", "10")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) > 10


def test_cpu_smoke_test_in_process_is_reproducible(text_path, capsys):
    first = cpu_smoke_test.main(str(text_path), prompt="What is virtue?", max_new_tokens=40)
    assert len(first.replace("<|endoftext|>", "_")) == 40  # one character per token, end-of-text one token too
    assert cpu_smoke_test.main(str(text_path), prompt="What is virtue?", max_new_tokens=40) == first


def test_train_smoke_test_loss_falls_then_resume_and_init_from_continue(text_path, tmp_path, capsys):
    out_dir = tmp_path / "run"
    common = dict(text_path=str(text_path), out_dir=str(out_dir), block_size=32, eval_interval=10, device="cpu")
    history = train_smoke_test.main(**common, max_steps=30)
    assert history[-1][1] < history[0][1] - 0.5  # from ~ln(vocab) towards the text's statistics
    assert load_checkpoint(out_dir / "last.ckpt").global_step == 30

    resumed = train_smoke_test.main(**common, max_steps=40, resume=True)
    assert resumed[0][0] == 30 and resumed[-1][0] == 40
    assert resumed[0][1] == pytest.approx(history[-1][1], abs=1e-4)  # the resumed run starts where it stopped
    assert load_checkpoint(out_dir / "last.ckpt").global_step == 40

    started = train_smoke_test.main(**{**common, "out_dir": str(tmp_path / "new")}, max_steps=5,
                                    init_from=str(out_dir / "last.ckpt"))  # fmt: skip
    assert started[0] == (0, pytest.approx(resumed[-1][1], abs=1e-4)) and started[-1][0] == 5

    with pytest.raises(PicoGPTError, match="exclude each other"):
        train_smoke_test.main(**common, resume=True, init_from=str(out_dir / "last.ckpt"))


def test_train_smoke_test_runs_as_a_module_then_resumes_as_a_file(text_path, tmp_path):
    out_dir = tmp_path / "run"
    common = ["--text_path", str(text_path), "--out_dir", str(out_dir), "--block_size", "16", "--device", "auto"]
    result = run_from_repo_root("-m", "scripts.train_smoke_test", *common, "--max_steps", "5")
    assert result.returncode == 0, result.stderr
    assert "saved" in result.stdout and load_checkpoint(out_dir / "last.ckpt").global_step == 5
    result = run_from_repo_root("scripts/train_smoke_test.py", *common, "--max_steps", "8", "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout and load_checkpoint(out_dir / "last.ckpt").global_step == 8


def test_train_smoke_test_reports_user_errors_in_one_line(tmp_path, capsys):
    assert train_smoke_test.run(["--text_path", str(tmp_path / "nope.txt")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "does not exist" in error
    assert train_smoke_test.run(["--text_path", str(tmp_path / "nope.txt"), "--resume", "--out_dir", "x"]) == 1


def test_cpu_smoke_test_without_the_venv_active_reruns_under_it_or_says_how(text_path):
    """`python scripts/cpu_smoke_test.py` with a Python that lacks torch (here: site-packages turned off with
    -S) starts again under .venv/bin/python when `make install` made it, and otherwise says so in one line."""
    command = [sys.executable, "-S", "scripts/cpu_smoke_test.py", "--text_path", str(text_path),
               "--max_new_tokens", "5"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    if (REPO_ROOT / ".venv" / "bin" / "python").is_file():
        assert result.returncode == 0, result.stderr
        assert "ok:" in result.stderr
    else:
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "make install" in result.stderr
        assert "Traceback" not in result.stderr
