"""`picogpt evaluate`: every token scored once, the streamed loss equals a direct computation, bits per byte."""

import io
import itertools
import json
import re
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from jsonargparse import auto_cli

from picogpt_lightning.checkpoint import load_checkpoint, save_checkpoint
from picogpt_lightning.cli import main
from picogpt_lightning.cli.evaluate import evaluate_command
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.evaluate import (
    auto_batch_size,
    evaluate_pieces,
    evaluate_text,
    scored_windows,
)
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.tokenizer import BPETokenizer, CharTokenizer

TEXT = "What is truth? The mind asks, and the mind doubts.\nWhy? Because reason is a small light.\n" * 3


@pytest.mark.parametrize("block_size,stride", [(8, 8), (8, 3), (8, 1), (5, 5)])
@pytest.mark.parametrize("length", [1, 2, 9, 23, 40])
def test_windows_score_every_token_but_the_first_exactly_once(block_size, stride, length):
    tokens = list(range(length))
    pieces = [tokens[i : i + 4] for i in range(0, length, 4)]
    scored = []
    for window, count in scored_windows(pieces, block_size, stride):
        assert 2 <= len(window) <= block_size + 1 and 1 <= count <= len(window) - 1
        assert window == list(range(window[0], window[0] + len(window)))  # consecutive text
        scored += window[-count:]
        if stride < block_size and window[0] > 0:
            assert len(window) - count >= block_size - stride  # the promised minimum context
    assert scored == tokens[1:]


def test_windows_stream_without_reading_the_whole_text():
    endless = itertools.repeat([1, 2, 3])
    first = list(itertools.islice(scored_windows(endless, 16, 16), 50))
    assert len(first) == 50 and all(len(window) == 17 for window, _ in first)


def tiny_model(tokenizer, block_size=16):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16)
    return GPT(config).eval()


def reference_nll(model, ids, block_size):
    """Each token scored with all the context the model can take: one forward per token."""
    total = 0.0
    with torch.no_grad():
        for position in range(1, len(ids)):
            context = torch.tensor([ids[max(0, position - block_size) : position]])
            logits = model(context)[0][0, -1]
            total += float(F.cross_entropy(logits[None], torch.tensor([ids[position]])))
    return total


def test_stride_one_equals_scoring_each_token_with_its_full_context():
    tokenizer = CharTokenizer.train([TEXT])
    model = tiny_model(tokenizer, block_size=16)
    ids = tokenizer.encode(TEXT[:90])
    result = evaluate_text(model, tokenizer, TEXT[:90], stride=1, batch_size=3)
    assert result.tokens == len(ids) - 1
    assert result.nll == pytest.approx(reference_nll(model, ids, 16), rel=1e-5)


def test_pieces_and_batch_size_do_not_change_the_result():
    tokenizer = BPETokenizer.train([TEXT * 5], vocab_size=300)
    model = tiny_model(tokenizer)
    whole = evaluate_text(model, tokenizer, TEXT, batch_size=1)
    lines = TEXT.splitlines(keepends=True)
    pieces, _, _ = evaluate_pieces(model, tokenizer, lines, batch_size=5)
    assert (pieces.tokens, pieces.bytes) == (whole.tokens, whole.bytes)
    assert pieces.nll == pytest.approx(whole.nll, rel=1e-6)


def test_bits_per_byte_of_an_ascii_char_model_is_its_loss_in_bits():
    tokenizer = CharTokenizer.train([TEXT])
    result = evaluate_text(tiny_model(tokenizer), tokenizer, TEXT)
    assert result.bytes == len(TEXT) - 1  # the first character is context only
    assert result.bits_per_byte == pytest.approx(result.loss / math.log(2))
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.loss == pytest.approx(math.log(tokenizer.vocab_size), rel=0.05)  # untrained: near uniform


def test_bpe_bits_per_byte_counts_bytes_not_tokens():
    tokenizer = BPETokenizer.train([TEXT * 5], vocab_size=300)
    result = evaluate_text(tiny_model(tokenizer), tokenizer, TEXT)
    first = len(tokenizer.decode(tokenizer.encode(TEXT)[:1]).encode())
    assert result.bytes == len(TEXT.encode()) - first and result.tokens < result.bytes
    assert result.bits_per_byte == pytest.approx(result.nll / math.log(2) / result.bytes)


@pytest.fixture
def checkpoint(tmp_path):
    tokenizer = CharTokenizer.train([TEXT])
    path = tmp_path / "char.ckpt"
    save_checkpoint(path, tiny_model(tokenizer), tokenizer)
    return path


def test_command_prints_one_json_object(checkpoint, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    auto_cli(evaluate_command, args=["--ckpt", str(checkpoint), "--text_path", str(text), "--json", "true",
                                     "--device", "cpu"], as_positional=False)
    report = json.loads(capsys.readouterr().out)
    expected = evaluate_text(load_checkpoint(checkpoint).model, load_checkpoint(checkpoint).tokenizer, TEXT)
    assert report["tokens"] == expected.tokens == len(TEXT) - 1
    assert report["bits_per_byte"] == pytest.approx(expected.bits_per_byte)
    assert {"loss", "perplexity", "bits_per_byte", "bytes", "stride", "block_size"} <= report.keys()


def test_command_reads_a_folder_maps_unknown_characters_and_prints_a_table(checkpoint, tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("What is truth?\n")
    (folder / "b.txt").write_text("Zoë asks: “why?”\n")  # Z, ë, curly quotes: unseen by the char model
    evaluate_command(str(checkpoint), str(folder), stride=4, quiet=True, device="cpu")
    captured = capsys.readouterr()
    assert "characters the model never saw" in captured.err and "'ë' -> 'e'" in captured.err
    for label in ("loss:", "perplexity:", "bits per byte:", "stride 4"):
        assert label in captured.out


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal,quiet,shown", [(True, False, True), (True, True, False), (False, False, False)])
def test_progress_bar_only_on_a_terminal_and_never_with_quiet(checkpoint, tmp_path, monkeypatch, capsys,
                                                              terminal, quiet, shown):
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    evaluate_command(str(checkpoint), str(text), quiet=quiet, json=True)
    assert ("evaluating" in err.getvalue()) == shown
    assert json.loads(capsys.readouterr().out)["tokens"] == len(TEXT) - 1  # stdout holds only the JSON


def test_automatic_batch_size_bounds_the_logits():
    assert auto_batch_size(64, 2000) == 64
    assert auto_batch_size(1024, 50304) == 1
    assert auto_batch_size(256, 8000) == 8


def test_bad_settings_are_errors_that_say_what_to_use(checkpoint, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    with pytest.raises(PicoGPTError, match="stride must be from 1 to the model's block_size 16"):
        evaluate_command(str(checkpoint), str(text), stride=17)
    with pytest.raises(PicoGPTError, match="does not exist"):
        evaluate_command(str(checkpoint), str(tmp_path / "missing.txt"))
    text.write_text("W")
    with pytest.raises(PicoGPTError, match="fewer than 2 tokens"):
        evaluate_command(str(checkpoint), str(text))


def test_picogpt_evaluate_command_line(checkpoint, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    assert main(["evaluate", "--ckpt", str(checkpoint), "--text_path", str(text), "--json", "true"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == len(TEXT) - 1
    assert main(["evaluate", "--ckpt", str(checkpoint), "--text_path", str(text), "--stride", "0"]) == 2  # a bad setting
    assert "stride must be from 1" in capsys.readouterr().err


def test_a_bare_json_flag_means_true(checkpoint, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    assert main(["evaluate", "--ckpt", str(checkpoint), "--text_path", str(text), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == len(TEXT) - 1


def test_evaluate_reports_its_speed_and_shows_progress_in_a_log(checkpoint, tmp_path, monkeypatch, capsys):
    """Not only on a terminal: in a log, a line every 10 s (here at every update) says how far it is (item 19)."""
    from picogpt_lightning import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    evaluate_command(str(checkpoint), str(text), device="cpu")
    captured = capsys.readouterr()
    assert re.search(r"^speed: +[\d,]+ tokens/s \([\d.]+ s on cpu\)$", captured.out, flags=re.MULTILINE)
    assert f"evaluating {text}: " in captured.err and "(100%)" in captured.err
    evaluate_command(str(checkpoint), str(text), device="cpu", json=True, quiet=True)
    captured = capsys.readouterr()
    assert json.loads(captured.out)["tokens_per_s"] > 0 and captured.err == ""
