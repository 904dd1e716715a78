"""The traps of a first hour (issue 25, items 4-5 and 12-18): each test shows one of them closed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import lightning.pytorch as L
import pytest

from picogpt_lightning.cli import main
from picogpt_lightning.cli.early import checkpoint_step, use_ckpt_alias

from helpers import make_config, make_text, typed_input

EARLY_SCRIPT = """
import json, sys
from picogpt_lightning.cli import main
statuses = [main(args) for args in json.loads(sys.argv[1])]
print(json.dumps({"statuses": statuses, "lightning": "lightning" in sys.modules, "torch": "torch" in sys.modules}))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step char run: its folder holds best.ckpt and last.ckpt at step 2."""
    root = tmp_path_factory.mktemp("first_hour")
    text = make_text(root / "t.txt", sentences=200)
    config = make_config(root, text, name="run", trainer={"max_steps": 2, "val_check_interval": 2})
    assert main(["fit", "--config", str(config)]) == 0
    return root, config


def run_without_lightning(cases: list[list[str]], cwd) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", EARLY_SCRIPT, json.dumps(cases)], capture_output=True,
                            text=True, cwd=cwd)
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


def test_first_hour_mistakes_are_refused_before_lightning_or_torch_is_imported(trained):
    root, config = trained
    (root / "configs").mkdir(exist_ok=True)
    (root / "configs" / "tiny.yaml").write_text(config.read_text())
    cases = [
        ["fit", "configs/tiny.yaml"],
        ["fit", "--config", str(config), "--data.text_path", "missing.txt", "--ckpt_dir", "elsewhere"],
        ["validate", "--config", str(config)],
        ["fit", "--config", str(config)],  # its ckpt_dir holds the trained run
    ]
    found, err = run_without_lightning(cases, root)
    assert found == {"statuses": [2, 1, 2, 1], "lightning": False, "torch": False}, err
    lines = err.splitlines()
    assert lines[0] == ("picogpt fit: error: unknown option configs/tiny.yaml; did you mean --config "
                        "configs/tiny.yaml? (see `picogpt fit --help`)")
    assert lines[1].startswith("picogpt fit: error: missing.txt does not exist")
    assert lines[2].startswith("picogpt validate: error: validate needs --ckpt_path (or --ckpt)")
    assert lines[3].startswith(f"picogpt fit: error: {root / 'checkpoints' / 'run'} already holds a run "
                               f"(last.ckpt at step 2): continue it with --ckpt ")
    assert len(lines) == 4
    assert not (root / "elsewhere").exists()


def test_a_checkpoints_step_is_read_without_torch_and_unknown_for_other_files(trained):
    root, _ = trained
    assert checkpoint_step(root / "checkpoints" / "run" / "last.ckpt") == 2
    assert checkpoint_step(root / "t.txt") == "?"


def test_ckpt_is_accepted_by_every_command_and_ckpt_path_keeps_working():
    assert use_ckpt_alias("fit", ["--ckpt", "a.ckpt", "--ckpt=b"], lightning=True) == ["--ckpt_path", "a.ckpt",
                                                                                      "--ckpt_path=b"]
    assert use_ckpt_alias("sample", ["--ckpt_path", "a.ckpt"], lightning=False) == ["--ckpt", "a.ckpt"]
    assert use_ckpt_alias("plot", ["--ckpt_path", "a"], lightning=False) == ["--ckpt_path", "a"]


def test_validate_takes_ckpt_and_sample_takes_ckpt_path(trained, capsys):
    root, _ = trained
    best = str(root / "checkpoints" / "run" / "best.ckpt")
    capsys.readouterr()
    assert main(["validate", "--ckpt", best, "--trainer.enable_progress_bar", "false"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("picogpt validate: 1 torch thread (OMP_NUM_THREADS); loading Lightning\nvalidating ")
    assert out.strip().splitlines()[-1].startswith("val_loss ")
    assert [line for line in out.splitlines() if "val_loss" in line] == [out.strip().splitlines()[-1]]  # no table
    assert main(["sample", "--ckpt_path", best, "--max_new_tokens", "3", "--prompt", "The"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_bytes_that_are_not_utf8_in_a_prompt_are_replaced_with_one_warning(trained, capsys):
    root, _ = trained
    best = str(root / "checkpoints" / "run" / "best.ckpt")
    capsys.readouterr()
    # Python hands a command line's undecodable byte over as a lone surrogate: "caf\xe9" arrives so.
    assert main(["sample", "--ckpt", best, "--prompt", "The caf\udce9", "--max_new_tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The caf")
    assert [line for line in captured.err.splitlines() if "not UTF-8" in line] == [
        "warning: the input holds 1 byte(s) that are not UTF-8; each was replaced by U+FFFD (save or type the "
        "text as UTF-8)"]


def test_a_chat_fed_bytes_that_are_not_utf8_answers_every_line(trained):
    root, _ = trained
    best = str(root / "checkpoints" / "run" / "best.ckpt")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}  # the strictest locale's handler
    result = subprocess.run([sys.executable, "-m", "picogpt_lightning.cli", "chat", "--ckpt", best,
                             "--max_new_tokens", "3", "--temperature", "0"], input=b"caf\xe9?\nThe truth?\n",
                            capture_output=True, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert len(result.stdout.decode().splitlines()) == 2  # one answer per message: the session went on
    assert result.stderr.decode().count("not UTF-8") == 1


def test_a_missing_best_checkpoint_beside_a_last_one_names_the_last_one(trained, tmp_path, capsys):
    root, _ = trained
    stopped = tmp_path / "stopped"  # a run stopped with Ctrl-C before its first validation
    stopped.mkdir()
    (stopped / "last.ckpt").write_bytes((root / "checkpoints" / "run" / "last.ckpt").read_bytes())
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(stopped / "best.ckpt")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"picogpt sample: error: {stopped} has no best.ckpt (no validation ran in that run, e.g. it was stopped "
        f"before its first one); use {stopped / 'last.ckpt'}")


def test_prepare_in_char_mode_reports_the_texts_own_characters(tmp_path, capsys):
    text = "Q: What is it?\nA: A test.\n\nQ: And then?\nA: Another.\n\nMore text to read.\n"
    (tmp_path / "qa.txt").write_text(text, encoding="utf-8")
    assert main(["prepare", "--text_path", str(tmp_path / "qa.txt"), "--mode", "char", "--out_dir",
                 str(tmp_path / "out"), "--random_split", "false"]) == 0
    out = capsys.readouterr().out
    assert f"(1 file(s), {len(text)} characters; 3 end-of-text markers)" in out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == len(text) + 3  # one token per character and per marker


def test_chat_notes_come_on_their_own_line_before_the_answer(trained, monkeypatch):
    import io

    from picogpt_lightning.chat import ChatSession
    from picogpt_lightning.checkpoint import load_checkpoint
    from picogpt_lightning.cli.chat import run_repl
    from picogpt_lightning.settings import SamplingSettings

    root, _ = trained
    loaded = load_checkpoint(str(root / "checkpoints" / "run" / "best.ckpt"))
    screen = io.StringIO()  # the terminal: answers and notes interleaved as a user sees them
    session = ChatSession(loaded.model, loaded.tokenizer, settings=SamplingSettings(temperature=0),
                          max_new_tokens=2, output=screen, notes=screen)
    # The second turn drops the first (context 16).
    typed_input(monkeypatch, ["Why is the mind?", "Why is the mind?"], screen)
    run_repl(session, None)
    lines = screen.getvalue().splitlines()
    note = next(index for index, line in enumerate(lines) if "no longer fit" in line)
    assert lines[note].startswith("(the 1 oldest turn(s)") and lines[note + 1].startswith("A:")


def test_the_export_folders_of_the_docs_examples_are_ignored_by_git(repo_root):
    import re
    from pathlib import Path

    if not (Path(repo_root) / ".git").exists():
        pytest.skip("not a git checkout")
    docs = [Path(repo_root) / "README.md", *sorted((Path(repo_root) / "docs").glob("*.md"))]
    folders = {found for doc in docs for found in re.findall(r"picogpt export [^\n`]*--out_dir ([^\s`]+)",
                                                               doc.read_text(encoding="utf-8"))}
    assert folders
    result = subprocess.run(["git", "check-ignore", *[f"{folder}/config.json" for folder in sorted(folders)]],
                            cwd=repo_root, capture_output=True, text=True)
    assert len(result.stdout.splitlines()) == len(folders), (folders, result.stdout)


def test_an_answer_stops_where_the_model_starts_a_new_turn_of_its_own_in_chat_api_and_serve():
    from test_chat import TEXT, ScriptedModel

    from picogpt_lightning.api import PicoGPT
    from picogpt_lightning.chat import ChatSession
    from picogpt_lightning.chat_template import get_template, turn_stop_strings
    from picogpt_lightning.checkpoint import LoadedCheckpoint
    from picogpt_lightning.settings import SamplingSettings
    from picogpt_lightning.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.train([TEXT])
    # After the prompt's "A:" the script writes " hi?\nA: hi?\nA: ..." for ever: a new answer turn, no end.
    model = ScriptedModel(tokenizer, {":": " ", " ": "h", "h": "i", "i": "?", "?": "\n", "\n": "A", "A": ":"})
    greedy = SamplingSettings(temperature=0)
    session = ChatSession(model, tokenizer, settings=greedy, output=io.StringIO(), notes=io.StringIO())
    assert session.reply("What is virtue?") == "hi?"
    messages = [{"role": "user", "content": "What is virtue?"}]
    picogpt = PicoGPT(LoadedCheckpoint(model, tokenizer, {}, 0))
    assert picogpt.chat(messages, temperature=0) == "hi?"
    assert turn_stop_strings(get_template("qa"), has_eot=True) == ["<|endoftext|>", "\nQ:", "\nA:"]
    assert turn_stop_strings(get_template("im"), has_eot=True) == [
        "<|endoftext|>", "\n<|im_start|>user", "\n<|im_start|>assistant", "<|im_end|>"]
    pytest.importorskip("fastapi", reason="serving is an optional extra: pip install 'picogpt_lightning[serve]'")
    from picogpt_lightning.serve import ChatService

    # The server's batched generator stops every answer at these (tests/test_serve.py runs it for real).
    service = ChatService(model, tokenizer, get_template("qa"), scheduler=None, limits=None)
    assert service.stop == turn_stop_strings(get_template("qa"), tokenizer.eot_id is not None)


def test_the_thread_count_is_the_usable_cores_less_the_load():
    from picogpt_lightning.threads import choose_threads, thread_choice, usable_cores

    assert [choose_threads(2, load) for load in (0.1, 0.4, 0.6, 1.2, 7.5)] == [2, 2, 1, 1, 1]
    assert choose_threads(16, 3.0) == 13 and choose_threads(4, None) == 4
    assert usable_cores() == len(os.sched_getaffinity(0))
    assert thread_choice(3, environ={}).threads == 3
    assert thread_choice(None, environ={"OMP_NUM_THREADS": "1"}).threads == 1
    assert 1 <= thread_choice(None, environ={}).threads <= usable_cores()


def test_threads_overrides_the_choice_in_fit_and_sample_and_is_said_in_the_start_up_line(trained, capsys):
    import torch

    root, _ = trained
    best = str(root / "checkpoints" / "run" / "best.ckpt")
    try:
        capsys.readouterr()
        assert main(["validate", "--ckpt", best, "--threads", "2", "--trainer.enable_progress_bar", "false",
                     "--trainer.limit_val_batches", "1"]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0] == "picogpt validate: 2 torch threads (--threads); loading Lightning"
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert main(["sample", "--ckpt", best, "--max_new_tokens", "2", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        assert main(["sample", "--ckpt", best, "--threads", "0"]) == 2
        assert "--threads must be a whole number >= 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(1)


class SlowFirstStep(L.Callback):
    """Makes the first step take 2.5 s, as a step of a big model on a slow CPU does."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            time.sleep(2.5)


def test_the_progress_bar_moves_during_a_slow_step(tmp_path, capsys):
    text = make_text(tmp_path / "t.txt", sentences=200)
    config = make_config(tmp_path, text, name="slow", trainer={"max_steps": 2, "val_check_interval": 2,
                                                               "enable_progress_bar": True})
    assert main(["fit", "--config", str(config), "--sample_tokens", "0",
                 "--trainer.callbacks+=test_first_hour.SlowFirstStep"]) == 0
    out = capsys.readouterr().out
    # Redrawn by the clock while step 1 runs: elapsed time goes on although no step ended (refresh rate 5).
    assert "0/2 [00:01" in out or "0/2 [00:02" in out, out


def test_empty_answers_in_conversation_data_are_counted_and_named(trained, tmp_path, capsys):
    from picogpt_lightning.chat_data import ConversationDataModule

    root, _ = trained
    lines = [{"messages": [{"role": "user", "content": f"Why {n}?"}, {"role": "assistant", "content": "Because."}]}
             for n in range(6)]
    lines[2]["messages"][1]["content"] = ""
    lines[4]["messages"][1]["content"] = "  "
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    data = ConversationDataModule(path=str(tmp_path / "chat.jsonl"),
                                  tokenizer_from=str(root / "checkpoints" / "run" / "best.ckpt"), val_fraction=0.2,
                                  block_size=64)
    capsys.readouterr()
    assert data.data.train.conversations + data.data.val.conversations == 6  # counted and said, not dropped
    warnings = [line for line in capsys.readouterr().err.splitlines() if "empty assistant answer" in line]
    assert warnings == [f"warning: 2 conversation(s) have an empty assistant answer ({tmp_path / 'chat.jsonl'}:3, "
                        f"{tmp_path / 'chat.jsonl'}:5): each is trained to end its answer at once; fill them in or "
                        f"remove those lines if that is not meant"]
