"""Sampling options, stop strings, prompt handling and the KV cache of generate.py, on tiny random models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picogpt_lightning.checkpoint import save_checkpoint
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.cli.sample import check_tokenizer_options, sample_command
from picogpt_lightning.generate import (
    draw_tokens,
    generate,
    generate_batch,
    keep_top_k,
    keep_top_p,
    make_generator,
    penalize_repetition,
    resolve_device,
    sample_next_token,
    stream_text,
)
from picogpt_lightning.prompt import StreamingDecoder, encode_prompt, read_escapes, read_stop_strings
from picogpt_lightning.settings import SamplingSettings
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.tokenizer import BPETokenizer, CharTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXT = (
    "Q: What is knowledge?\nA: Justified true belief, a well-known 'view'.\n\n"
    "Q: What is virtue?\nA: A habit of the good.\n"
)
CPU = torch.device("cpu")
GREEDY = SamplingSettings(temperature=0.0)


def tiny_model(vocab_size: int, block_size: int = 32, seed: int = 0) -> GPT:
    """Random weights, scaled up from the init's 0.02 so that logits are far apart: near-ties at init could
    let a last-bit float difference between two computation orders flip an argmax."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer.train([TEXT])


@pytest.fixture
def model(char_tokenizer) -> GPT:
    return tiny_model(char_tokenizer.vocab_size)


@pytest.fixture
def checkpoint(tmp_path, model, char_tokenizer) -> Path:
    path = tmp_path / "tiny.ckpt"
    save_checkpoint(path, model, char_tokenizer)
    return path


def tokens(model, prompt, count, settings=GREEDY, seed=None, use_cache=True) -> list[int]:
    generator = make_generator(seed, CPU) if seed is not None else None
    return list(generate(model, prompt, count, settings, generator, use_cache))


# ----------------------------------------------------------------------------------------------- sampling


def test_greedy_is_deterministic_whatever_the_seed(model):
    assert tokens(model, [1, 2, 3], 40, seed=1) == tokens(model, [1, 2, 3], 40, seed=2)


def test_top_k_one_equals_greedy(model):
    settings = SamplingSettings(temperature=1.5, top_k=1)
    assert tokens(model, [1, 2, 3], 40, settings, seed=7) == tokens(model, [1, 2, 3], 40)


def test_tiny_top_p_equals_greedy(model):
    settings = SamplingSettings(temperature=1.5, top_k=None, top_p=1e-6)
    assert tokens(model, [1, 2, 3], 40, settings, seed=7) == tokens(model, [1, 2, 3], 40)


@pytest.mark.parametrize("setting", [{"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}])
def test_a_temperature_or_top_p_that_is_zero_in_float32_is_greedy_not_a_crash(model, setting):
    settings = SamplingSettings(**{"top_k": None, **setting})
    assert tokens(model, [1, 2, 3], 40, settings, seed=7) == tokens(model, [1, 2, 3], 40)


def test_same_seed_gives_same_tokens_and_another_seed_differs(model):
    settings = SamplingSettings(temperature=2.0, top_k=None)
    first = tokens(model, [1, 2, 3], 60, settings, seed=11)
    assert first == tokens(model, [1, 2, 3], 60, settings, seed=11)
    assert first != tokens(model, [1, 2, 3], 60, settings, seed=12)
    assert first != tokens(model, [1, 2, 3], 60)  # high temperature leaves the greedy path


def test_top_p_keeps_the_fewest_tokens_reaching_p_and_always_the_best():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isfinite(keep_top_p(logits, 0.6)).tolist() == [[True, True, False]]
    assert torch.isfinite(keep_top_p(logits, 1e-9)).tolist() == [[True, False, False]]


def test_repetition_penalty_makes_seen_tokens_less_likely():
    logits = torch.tensor([[2.0, -2.0, 1.5]])
    penalized = penalize_repetition(logits, torch.tensor([[0, 1]]), 2.0)
    assert penalized.tolist() == [[1.0, -4.0, 1.5]]
    greedy = SamplingSettings(temperature=0.0, repetition_penalty=2.0)
    assert sample_next_token(logits, torch.tensor([[0]]), greedy).item() == 2


def test_repetition_penalty_changes_generated_tokens(model):
    penalized = SamplingSettings(temperature=0.0, repetition_penalty=3.0)
    assert tokens(model, [1, 2, 3], 40, penalized) != tokens(model, [1, 2, 3], 40)


@pytest.mark.parametrize(
    "values",
    [{"temperature": -1.0}, {"top_k": -3}, {"top_p": 0.0}, {"top_p": 1.5}, {"repetition_penalty": 0.0}],
)
def test_invalid_sampling_settings_are_user_errors(values):
    with pytest.raises(PicoGPTError):
        SamplingSettings(**values)


# ----------------------------------------------------------------------------------------------- KV cache


def test_cached_and_uncached_greedy_tokens_are_identical_past_several_slides(model):
    block_size = model.config.block_size
    cached = tokens(model, [1, 2, 3], 5 * block_size, use_cache=True)
    assert len(cached) == 5 * block_size
    assert cached == tokens(model, [1, 2, 3], 5 * block_size, use_cache=False)


def test_cached_and_uncached_sampling_agree_for_a_batch(model):
    prompt = torch.randint(model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    runs = [
        torch.stack(list(generate_batch(model, prompt, 70, GREEDY, use_cache=use_cache)), dim=1)
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][0], torch.tensor(tokens(model, prompt[0].tolist(), 70)))


def test_within_the_context_generation_equals_the_crop_to_block_size_reference(model):
    sequence = [1, 2, 3]
    with torch.no_grad():
        for _ in range(model.config.block_size - 3):
            logits = model(torch.tensor([sequence[-model.config.block_size :]]))[0]
            sequence.append(int(logits[0, -1].argmax()))
    assert tokens(model, [1, 2, 3], model.config.block_size - 3) == sequence[3:]


def test_long_prompt_is_cropped_from_the_left(model):
    long_prompt = [i % model.config.vocab_size for i in range(100)]
    kept = long_prompt[-model.config.block_size :]
    assert tokens(model, long_prompt, 50) == tokens(model, kept, 50)


# ----------------------------------------------------------------------------------------------- text


def test_escapes_in_prompts_become_newlines_and_tabs():
    assert read_escapes(r"Q: hi\nA:\tyes \\n") == "Q: hi\nA:\tyes \\n"


def test_unknown_characters_are_mapped_or_dropped_with_one_warning(char_tokenizer, capsys):
    text, ids = encode_prompt("«what» is VIRTUE — é☃?", char_tokenizer)
    assert char_tokenizer.decode(ids) == text
    assert text == "'what' is virtue - e?"  # quote marks, case, dash and accent mapped; the snowman dropped
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "'☃' dropped" in warning[0] and "'—' -> '-'" in warning[0]


def test_an_empty_prompt_still_gives_a_start_token(char_tokenizer, capsys):
    text, ids = encode_prompt("☃", char_tokenizer)
    assert text == "" and ids == char_tokenizer.encode("\n")


def test_stop_string_ends_the_text_and_is_never_released(char_tokenizer):
    decoder = StreamingDecoder(char_tokenizer, stop=["\nQ:"])
    released = []
    for char in "hi\nthere\nQ: more":
        released.append(decoder.push(char_tokenizer.encode(char)[0]))
        if decoder.stopped:
            break
    assert decoder.stopped and "".join(released) == "hi\nthere" == decoder.output
    assert released[2] == "" and released[3] == "\nt"  # the newline waits until it cannot start "\nQ:"


def test_stop_string_cuts_a_generated_text(model, char_tokenizer):
    settings = SamplingSettings(temperature=1.0, top_k=None)
    full = "".join(stream_text(model, char_tokenizer, [0], 60, settings, make_generator(3, CPU)))
    stop = full[20:22]
    cut = "".join(stream_text(model, char_tokenizer, [0], 60, settings, make_generator(3, CPU), stop=[stop]))
    assert cut == full[: full.index(stop)]


def test_streaming_bpe_never_prints_a_broken_character():
    tokenizer = BPETokenizer.train([TEXT * 3], vocab_size=300)
    text = "é☃ naïve ✓"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several byte tokens
    decoder = StreamingDecoder(tokenizer)
    pieces = [decoder.push(token_id) for token_id in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_streamed_text_equals_decoding_everything_at_once():
    tokenizer = BPETokenizer.train([TEXT * 3, "é☃ naïve ✓"], vocab_size=300)
    ids = torch.randint(tokenizer.vocab_size, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    decoder = StreamingDecoder(tokenizer)
    streamed = "".join(decoder.push(token_id) for token_id in ids) + decoder.flush()
    assert streamed == tokenizer.decode(ids)


# ----------------------------------------------------------------------------------------------- the command


def test_resolve_device_checks_names_and_availability():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(PicoGPTError, match="unknown device"):
        resolve_device("tpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(PicoGPTError, match="not available on this machine"):
            resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(PicoGPTError, match="not available on this machine"):
            resolve_device("cuda")


def test_sample_prints_prompt_and_continuation_reproducibly(checkpoint, capsys):
    arguments = dict(ckpt=str(checkpoint), prompt=r"Q: What is knowledge?\nA:", max_new_tokens=30, device="cpu")
    sample_command(**arguments, stream=False)
    first = capsys.readouterr().out
    sample_command(**arguments, stream=True)
    assert first.startswith("Q: What is knowledge?\nA:")
    assert len(first) > len("Q: What is knowledge?\nA:") + 1
    assert capsys.readouterr().out == first


def test_sample_crops_a_long_prompt_with_a_note(checkpoint, capsys):
    sample_command(str(checkpoint), prompt="What is virtue? " * 10, max_new_tokens=5, device="cpu", stream=False)
    captured = capsys.readouterr()
    assert "longer than the model's context of 32" in captured.err
    assert captured.out.startswith("What is virtue? " * 10)


def test_sample_checks_the_original_mode_and_tokenizer_flags(tmp_path, char_tokenizer):
    check_tokenizer_options(char_tokenizer, mode="char", vocab_path=str(char_tokenizer.save(tmp_path)))
    with pytest.raises(PicoGPTError, match="--mode token does not match"):
        check_tokenizer_options(char_tokenizer, mode="token")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(PicoGPTError, match="differs from the tokenizer stored"):
        check_tokenizer_options(char_tokenizer, vocab_path=str(CharTokenizer.train(["abc"]).save(other)))
    bpe_path = BPETokenizer.train([TEXT], vocab_size=270).save(other)
    with pytest.raises(PicoGPTError, match="is a bpe tokenizer but the checkpoint was trained with a char"):
        check_tokenizer_options(char_tokenizer, tokenizer_path=str(bpe_path))


def test_sample_stops_before_a_stop_string(checkpoint, capsys):
    arguments = dict(ckpt=str(checkpoint), prompt="Q:", max_new_tokens=40, temperature=0.0, device="cpu")
    sample_command(**arguments, stream=False)
    continuation = capsys.readouterr().out[len("Q:") : -1]
    stop = continuation[10:12]
    sample_command(**arguments, stream=True, stop=[stop])
    assert capsys.readouterr().out == "Q:" + continuation[: continuation.index(stop)] + "\n"


def test_sample_cli_reads_escapes_in_the_prompt(checkpoint):
    command = [sys.executable, "-m", "picogpt_lightning.cli", "sample", "--ckpt", str(checkpoint)]
    command += ["--prompt", r"Q: hi\nA:", "--max_new_tokens", "20", "--device", "cpu", "--top_p", "0.9"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Q: hi\nA:") and len(result.stdout) > len("Q: hi\nA:") + 1


def test_stop_strings_may_be_one_or_a_list_with_escapes():
    assert read_stop_strings(r"\nQ:") == ["\nQ:"]
    assert read_stop_strings(["a", r"\n\n"]) == ["a", "\n\n"]
    assert read_stop_strings(None) == []


def test_top_k_keeps_exactly_k_tokens_when_logits_tie():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    kept = torch.isfinite(keep_top_k(logits, 2))
    assert kept.sum(dim=-1).tolist() == [2, 2]
    assert not kept[0, [0, 4]].any()  # only the tied best ones, never a worse one


def test_drawn_tokens_follow_the_probabilities_and_never_take_a_zero_one():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    draws = torch.rand(40_000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tokens = draw_tokens(probs.expand(len(draws), -1), draws)
    counts = torch.bincount(tokens, minlength=6) / len(draws)
    assert counts[[0, 2, 5]].tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(counts, probs[0], atol=0.01)
    edges = torch.tensor([0.0, 0.5, 0.8, 1 - 1e-17], dtype=torch.float64)  # the last rounds to 1.0 in the sum
    assert draw_tokens(probs.expand(4, -1), edges).tolist() == [1, 3, 4, 4]
