"""`picogpt export`: Hugging Face transformers loads the folder and computes what our GPT computes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picogpt_lightning.checkpoint import load_checkpoint, save_checkpoint
from picogpt_lightning.cli import main
from picogpt_lightning.cli.export import export_command
from picogpt_lightning.chat_template import get_template, template_from_meta
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.export import hf_tokenizer
from picogpt_lightning.generate import generate
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.settings import SamplingSettings
from picogpt_lightning.tokenizer import BPETokenizer, CharTokenizer, WordTokenizer

TEXT = "Q: What is truth?\nA: That which  remains,\twhen doubt is done.\n\nQ: Où est-il? — ¡Ünïcode!\n"
TRICKY = "\n\n  A:  truth?\t\t. ,\n"


def make_tokenizer(kind: str):
    if kind == "char":
        return CharTokenizer.train([TEXT])
    if kind == "word":
        return WordTokenizer.train([TEXT], vocab_size=40)
    return BPETokenizer.train([TEXT * 10], vocab_size=300)


def make_checkpoint(path, kind: str, bias: bool = True, tie_weights: bool = True, **architecture):
    """A tiny model whose weights are random and large, so that logits are far apart and greedy choices
    cannot flip on rounding differences between two implementations."""
    tokenizer = make_tokenizer(kind)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16,
                       bias=bias, tie_weights=tie_weights, **architecture)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    save_checkpoint(path, model, tokenizer, global_step=7)
    return path


@pytest.fixture(scope="module")
def transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"  # the test must never reach the network
    return pytest.importorskip("transformers")


LLAMA = dict(position="rotary", norm="rms", mlp="swiglu")
QWEN3 = dict(LLAMA, qk_norm=True)
CASES = [("char", True, True, {}), ("bpe", True, True, {}), ("char", False, False, {}), ("bpe", False, False, {}),
         ("word", True, False, {}), ("bpe", False, True, LLAMA), ("char", True, False, dict(LLAMA, zero_init=True)),
         ("bpe", False, False, QWEN3), ("char", False, True, QWEN3)]
ARCHITECTURES = {"": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def layout_name(architecture: dict) -> str:
    return "qwen3" if architecture.get("qk_norm") else "llama" if architecture else ""


@pytest.mark.parametrize("kind,bias,tied,architecture", CASES,
                         ids=[f"{k}-{b}-{t}-{layout_name(a) or 'gpt2'}" for k, b, t, a in CASES])
def test_transformers_gives_our_logits_greedy_tokens_and_token_ids(tmp_path, transformers, kind, bias, tied,
                                                                    architecture):
    ckpt = make_checkpoint(tmp_path / "model.ckpt", kind, bias, tied, **architecture)
    folder = tmp_path / "hf"
    export_command(str(ckpt), str(folder))
    assert json.loads((folder / "config.json").read_text())["architectures"] == [
        ARCHITECTURES[layout_name(architecture)]]
    ours = load_checkpoint(ckpt)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)

    text = TEXT if kind != "word" else "Q: What is truth?\nA:"
    ids = ours.tokenizer.encode(text)
    assert tokenizer(text)["input_ids"] == ids
    # What the README does, model(**tokenizer(text)): GPT-2 takes no token_type_ids (transformers 4.x rejects
    # them), so the tokenizer must not return them.
    assert set(tokenizer(text, return_tensors="pt")) == {"input_ids", "attention_mask"}
    assert tokenizer.decode(ids) == ours.tokenizer.decode(ids)

    window = torch.tensor([ids[:32]])
    with torch.no_grad():
        expected = ours.model(window)[0]
        actual = theirs(window).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)

    prompt = ids[:8]
    greedy = list(generate(ours.model, prompt, 20, SamplingSettings(temperature=0)))
    with torch.no_grad():
        output = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert output[0, len(prompt):].tolist() == greedy


def test_exported_char_tokenizer_keeps_whitespace_and_newlines(tmp_path, transformers):
    ckpt = make_checkpoint(tmp_path / "char.ckpt", "char")
    export_command(str(ckpt), str(tmp_path / "hf"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ours = load_checkpoint(ckpt).tokenizer
    ids = tokenizer(TRICKY)["input_ids"]
    assert ids == ours.encode(TRICKY)
    assert tokenizer.decode(ids) == TRICKY


def test_hf_config_uses_the_exact_gelu_and_the_checkpoint_shape(tmp_path):
    ckpt = make_checkpoint(tmp_path / "bpe.ckpt", "bpe", bias=False, tie_weights=False)
    export_command(str(ckpt), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["activation_function"] == "gelu"  # never GPT-2's tanh approximation "gelu_new"
    assert (config["n_positions"], config["n_layer"], config["n_embd"]) == (32, 2, 16)
    assert config["tie_word_embeddings"] is False
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|endoftext|>" and tokenizer_config["model_max_length"] == 32
    assert config["eos_token_id"] == load_checkpoint(ckpt).tokenizer.tokenizer.token_to_id("<|endoftext|>")


def test_word_tokenizer_export_matches_our_ids_without_transformers(tmp_path):
    tokenizer = make_tokenizer("word")
    fast, special = hf_tokenizer(tokenizer)
    text = "Q: What is doubt, friend?\n\n  A: zebra!<|endoftext|>"  # 'zebra' is not in the vocabulary: <unk>
    assert fast.encode(text).ids == tokenizer.encode(text) and special == "<|endoftext|>"


@pytest.mark.parametrize("kind", ["char", "word"])
def test_char_and_word_exports_carry_end_of_text_as_the_eos_token(tmp_path, transformers, kind):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", kind)
    export_command(str(ckpt), str(tmp_path / "hf"))
    ours = load_checkpoint(ckpt).tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = "Q: What is truth?<|endoftext|>\n"
    assert tokenizer(text)["input_ids"] == ours.encode(text) and tokenizer.eos_token_id == ours.eot_id
    assert tokenizer.decode(ours.encode(text)) == text
    assert tokenizer.pad_token_id == ours.eot_id and tokenizer.chat_template == get_template("qa").jinja(True)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == ours.eot_id


def test_the_safetensors_export_keeps_the_chat_template(tmp_path):
    tokenizer = make_tokenizer("char")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "m.ckpt", model, tokenizer, chat_template=get_template("im").to_dict())
    export_command(str(tmp_path / "m.ckpt"), str(tmp_path / "st"), format="safetensors")
    assert template_from_meta(load_checkpoint(tmp_path / "st").meta) == get_template("im")


def test_a_char_tokenizer_saved_without_end_of_text_exports_without_eos():
    tokenizer = CharTokenizer(list("<|>abdefnotx"))
    fast, special = hf_tokenizer(tokenizer)
    assert special is None and fast.encode("a<|endoftext|>b").ids == tokenizer.encode("a<|endoftext|>b")


@pytest.mark.parametrize("tied", [True, False])
def test_safetensors_format_loads_back_to_the_same_model(tmp_path, tied):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", "char", tie_weights=tied)
    export_command(str(ckpt), str(tmp_path / "st"), format="safetensors")
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["model.safetensors", "picogpt.json"]
    original, loaded = load_checkpoint(ckpt), load_checkpoint(tmp_path / "st")
    ids = torch.tensor([original.tokenizer.encode("What is truth?")])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids)[0], original.model(ids)[0], rtol=0, atol=0)
    assert loaded.tokenizer.to_json() == original.tokenizer.to_json()
    assert (loaded.model.lm_head.weight is loaded.model.wte.weight) == tied


def test_a_damaged_safetensors_export_is_a_clear_error(tmp_path):
    export_command(str(make_checkpoint(tmp_path / "m.ckpt", "char")), str(tmp_path / "st"), format="safetensors")
    weights = tmp_path / "st" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PicoGPTError, match="export the checkpoint again"):
        load_checkpoint(tmp_path / "st")


def test_export_errors_say_what_to_fix(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", "char")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PicoGPTError, match="is a file"):
        export_command(str(ckpt), str(tmp_path / "file"))
    with pytest.raises(PicoGPTError, match="does not exist"):
        export_command(str(tmp_path / "missing.ckpt"), str(tmp_path / "out"))


def test_picogpt_export_command_line(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.ckpt", "bpe")
    assert main(["export", "--ckpt", str(ckpt), "--out_dir", str(tmp_path / "hf")]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    assert main(["export", "--ckpt", str(ckpt), "--out_dir", str(tmp_path / "st"), "--format", "safetensors"]) == 0
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file() and (tmp_path / "st" / "picogpt.json").is_file()
    assert main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out_dir", str(tmp_path / "x")]) == 1
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "does not exist" in error


@pytest.mark.parametrize("architecture,named", [
    (dict(mlp="relu2"), "mlp relu2"),
    (dict(norm="rms"), "norm rms"),
    (dict(qk_norm=True), "qk_norm True"),
    (dict(position="rotary", norm="rms", mlp="relu2", qk_norm=True, zero_init=True), "mlp relu2"),
    (dict(position="rotary"), "norm layer"),
    (dict(QWEN3, bias=True), "bias: true with qk_norm"),
])
def test_an_architecture_transformers_cannot_compute_is_refused_naming_the_option(tmp_path, architecture, named,
                                                                                  capsys):
    ckpt = make_checkpoint(tmp_path / "model.ckpt", "char", bias=architecture.pop("bias", False), **architecture)
    assert main(["export", "--ckpt", str(ckpt), "--out_dir", str(tmp_path / "hf")]) == 1
    error = capsys.readouterr().err.strip()
    assert named in error and len(error.splitlines()) == 1
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())  # nothing written


OLDEST_TRANSFORMERS = Path(os.environ.get("PICOGPT_OLDEST_TRANSFORMERS", Path(sys.prefix) / "transformers-oldest"))
OLDEST_CHECK = """
import json, sys, torch, transformers
folder, text = sys.argv[1], sys.argv[2]
model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
inputs = tokenizer(text, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
    output = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0)
torch.save(logits, folder + "/logits.pt")
print(json.dumps({"version": transformers.__version__, "keys": sorted(inputs), "ids": inputs["input_ids"][0].tolist(),
                  "generated": output[0].tolist()}))
"""


@pytest.mark.skipif(not OLDEST_TRANSFORMERS.is_dir(), reason=f"no {OLDEST_TRANSFORMERS}: `make test` installs the "
                    f"oldest transformers the test extra allows there (constraints-oldest-transformers.txt)")
@pytest.mark.parametrize("kind,bias,architecture", [("bpe", True, {}), ("char", True, LLAMA), ("bpe", False, QWEN3)],
                         ids=["gpt2", "llama", "qwen3"])
def test_the_oldest_transformers_the_extra_allows_runs_the_export(tmp_path, kind, bias, architecture):
    """pyproject allows transformers >= 4.51 (the first with Qwen3, and with Llama's mlp_bias): the export must
    work there too (in a subprocess, with its own tokenizers and huggingface_hub in front of ours)."""
    ckpt = make_checkpoint(tmp_path / "model.ckpt", kind, bias=bias, **architecture)
    folder = tmp_path / "hf"
    export_command(str(ckpt), str(folder))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(OLDEST_TRANSFORMERS)}
    result = subprocess.run([sys.executable, "-c", OLDEST_CHECK, str(folder), TEXT[:20]], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["version"] == "4.51.3" and facts["keys"] == ["attention_mask", "input_ids"]
    ours = load_checkpoint(ckpt)
    ids = ours.tokenizer.encode(TEXT[:20])
    assert facts["ids"] == ids
    with torch.no_grad():
        expected = ours.model(torch.tensor([ids]))[0]
    torch.testing.assert_close(torch.load(folder / "logits.pt"), expected, atol=1e-4, rtol=1e-4)
    assert facts["generated"][len(ids):] == list(generate(ours.model, ids, 10, SamplingSettings(temperature=0)))
