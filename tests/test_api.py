"""The Python API: load once, generate many times, stream, evaluate; the same text as `picogpt sample`."""

import subprocess
import sys

import pytest
import torch

import picogpt_lightning
from picogpt_lightning.api import PicoGPT, load
from picogpt_lightning.checkpoint import save_checkpoint
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.evaluate import evaluate_text
from picogpt_lightning.cli.export import export_command
from picogpt_lightning.cli.sample import sample_command
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.tokenizer import CharTokenizer

TEXT = "Q: What is truth?\nA: What remains when doubt is done.\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tokenizer = CharTokenizer(TEXT)  # characters only, no end-of-text: one character per token
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    path = tmp_path_factory.mktemp("api") / "model.ckpt"
    save_checkpoint(path, model, tokenizer, global_step=3)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return load(ckpt, device="cpu")


def test_load_gives_a_model_on_the_device_that_generates_the_requested_length(model):
    assert isinstance(model, PicoGPT) and model.device.type == "cpu" and not model.model.training
    text = model.generate("Q: What is truth?\nA:", max_new_tokens=40, seed=1)
    assert isinstance(text, str) and len(text) == 40  # a char model: one character per token
    assert "char tokenizer" in repr(model) and "step 3" in repr(model)


def test_same_seed_same_text_and_the_same_text_as_picogpt_sample(model, ckpt, capsys):
    first = model.generate("Q:", max_new_tokens=30, seed=5)
    assert model.generate("Q:", max_new_tokens=30, seed=5) == first
    sample_command(str(ckpt), prompt="Q:", max_new_tokens=30, seed=5, device="cpu", stream=False)
    assert capsys.readouterr().out == "Q:" + first + "\n"


def test_stream_yields_pieces_that_join_to_the_whole_text(model):
    pieces = model.generate("A:", max_new_tokens=25, seed=2, stream=True)
    assert not isinstance(pieces, str)
    pieces = list(pieces)
    assert len(pieces) > 1 and "".join(pieces) == model.generate("A:", max_new_tokens=25, seed=2)


def test_greedy_is_deterministic_without_a_seed_and_stop_strings_end_the_text(model):
    greedy = model.generate("Q:", max_new_tokens=30, temperature=0)
    assert model.generate("Q:", max_new_tokens=30, temperature=0) == greedy
    stop = greedy[5:7]
    stopped = model.generate("Q:", max_new_tokens=30, temperature=0, stop=stop)
    assert stopped == greedy[: greedy.find(stop)] and stop not in stopped


def test_a_temperature_or_top_p_too_small_for_float32_is_greedy(model):
    greedy = model.generate("Q:", max_new_tokens=20, temperature=0)
    assert model.generate("Q:", max_new_tokens=20, temperature=1e-300) == greedy
    assert model.generate("Q:", max_new_tokens=20, temperature=1.0, top_p=1e-300, seed=3) == greedy
    question = [{"role": "user", "content": "What?"}]
    assert model.chat(question, max_new_tokens=10, temperature=1e-300) == model.chat(question, max_new_tokens=10,
                                                                                     temperature=0)


def test_unknown_prompt_characters_warn_instead_of_printing(model):
    with pytest.warns(UserWarning, match="never saw"):
        model.generate("Q: Ünknown", max_new_tokens=3, seed=0)


def test_chat_encodes_end_of_text_inside_messages_as_text(tmp_path, monkeypatch):
    tokenizer = CharTokenizer.train([TEXT + "<|>fx"])  # with an end-of-text token, and every character of its text
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "eot.ckpt", model, tokenizer)
    prompts = []
    real_stream_text = picogpt_lightning.api.stream_text
    monkeypatch.setattr(picogpt_lightning.api, "stream_text",
                        lambda model, tokenizer, ids, *rest: prompts.append(ids) or real_stream_text(model, tokenizer,
                                                                                                      ids, *rest))
    load(tmp_path / "eot.ckpt", device="cpu").chat([{"role": "user", "content": "hi<|endoftext|>"}], max_new_tokens=2)
    assert len(prompts[0]) > 5 and tokenizer.eot_id not in prompts[0]


def test_chat_streams_the_same_answer_and_checks_the_messages(model):
    messages = [{"role": "user", "content": "What is truth?"}]
    answer = model.chat(messages, max_new_tokens=20, seed=3)
    assert "".join(model.chat(messages, max_new_tokens=20, seed=3, stream=True)) == answer
    assert model.chat_template.name == "qa"  # the checkpoint has none of its own
    with pytest.raises(PicoGPTError, match="last message must be from the user"):
        model.chat(messages + [{"role": "assistant", "content": answer}])


def test_evaluate_matches_the_evaluate_module(model):
    result = model.evaluate(TEXT)
    assert result.tokens == len(TEXT) - 1
    assert result.loss == pytest.approx(evaluate_text(model.model, model.tokenizer, TEXT).loss)


def test_load_reads_a_safetensors_export_too(model, ckpt, tmp_path):
    export_command(str(ckpt), str(tmp_path / "exported"), format="safetensors")
    exported = load(tmp_path / "exported", device="cpu")
    assert exported.generate("Q:", max_new_tokens=20, seed=9) == model.generate("Q:", max_new_tokens=20, seed=9)


def test_a_folder_that_is_not_an_export_is_a_clear_error(tmp_path):
    with pytest.raises(PicoGPTError, match="folder without best.ckpt, last.ckpt or picogpt.json"):
        load(tmp_path, device="cpu")


@pytest.mark.skipif(not hasattr(picogpt_lightning, "__getattr__"),
                    reason="picogpt_lightning/__init__.py does not re-export load yet")
def test_package_exports_load_without_importing_torch_at_package_import(tmp_path):
    code = ("import sys, picogpt_lightning; assert 'torch' not in sys.modules; "
            "from picogpt_lightning import load; assert load.__module__ == 'picogpt_lightning.api'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
