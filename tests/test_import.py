"""`picogpt import`: tiny random GPT-2, Llama and Qwen3 models built with transformers give the same logits,
greedy tokens and chat prompts through picogpt; round trips are exact; every file picogpt cannot read exactly is
refused in one line, with nothing written."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers", reason="the tiny reference models are built with transformers")
tk = pytest.importorskip("tokenizers", reason="the reference tokenizer is a tokenizers BPE")

from picogpt_lightning.chat import ChatSession  # noqa: E402
from picogpt_lightning.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint  # noqa: E402
from picogpt_lightning.cli import main  # noqa: E402
from picogpt_lightning.conversation import encode_conversation  # noqa: E402
from picogpt_lightning.model import GPT, GPTConfig  # noqa: E402
from picogpt_lightning.tokenizer import fingerprint
from picogpt_lightning.tokenizer_files import load_tokenizer, tokenizer_from_json  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. hello world, how are you? fine, thank you! " * 4
# Qwen-like: a system turn, role markers as special tokens, a generation prompt, a loop variable.
TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "fine, thank you!"},
            {"role": "user", "content": "how are you?"}]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer():
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT], trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                                 bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build(family: str, vocab: int):
    """(model, padded): tiny random models covering GQA (2 kv heads of 4), head_dim != hidden/heads, tied and
    untied output layers, with and without biases, a padded embedding."""
    torch.manual_seed({"gpt2": 0, "llama": 1, "qwen3": 2}[family])
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                         bos_token_id=0, eos_token_id=2)
        return transformers.GPT2LMHeadModel(config).eval(), False
    if family == "llama":  # untied, biases, padded vocabulary, head_dim 12 with hidden 32 / 4 heads = 8
        config = transformers.LlamaConfig(vocab_size=vocab + 30, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=12, max_position_embeddings=256, tie_word_embeddings=False,
                                          attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5, rope_theta=500.0)
        return transformers.LlamaForCausalLM(config).eval(), True
    config = transformers.Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, tie_word_embeddings=True)
    return transformers.Qwen3ForCausalLM(config).eval(), False


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each family built once, saved as a Hugging Face folder with tokenizer and chat template, and imported."""
    root = tmp_path_factory.mktemp("hf")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = TEMPLATE
    built = {}
    for family in ("gpt2", "llama", "qwen3"):
        model, padded = build(family, len(tokenizer))
        for name in ("generation_config",):  # no sampling defaults or stop ids that would differ from ours
            getattr(model, name).eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        assert main(["import", str(root / family), "--out", str(root / f"{family}.ckpt")]) == 0
        built[family] = (model, root / family, root / f"{family}.ckpt", padded)
    return tokenizer, built


FAMILIES = ("gpt2", "llama", "qwen3")


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_equal_transformers_logits(models, family):
    tokenizer, built = models
    model, _, ckpt, padded = built[family]
    loaded = load_checkpoint(ckpt)
    idx = torch.randint(0, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = model(idx).logits, loaded.model(idx)[0]
    vocab = len(tokenizer)
    assert torch.allclose(ours[..., :vocab], theirs[..., :vocab], atol=1e-4, rtol=0)
    if padded:  # rows no token encodes to are never sampled
        assert ours.shape[-1] == vocab + 30 and torch.isneginf(ours[..., vocab:]).all()


def test_the_imported_checkpoint_holds_the_models_options_and_special_tokens(models):
    _, built = models
    llama = read_checkpoint(built["llama"][2])["picogpt"]
    config = GPTConfig.from_dict(llama["model_config"])
    assert (config.n_kv_head, config.head_dim, config.mlp_width, config.norm_eps, config.tie_weights) == (2, 12, 48, 1e-5,
                                                                                                          False)
    assert (config.attention_bias, config.mlp_bias, config.rope_theta) == (True, True, 500.0)
    gpt2 = GPTConfig.from_dict(read_checkpoint(built["gpt2"][2])["picogpt"]["model_config"])
    assert gpt2.mlp == "gelu_tanh" and gpt2.tie_weights
    tokenizer = tokenizer_from_json(llama["tokenizer"])
    assert tokenizer.special_tokens == {"bos": "<|endoftext|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"}
    assert tokenizer.eot_id == tokenizer.tokenizer.token_to_id("<|im_end|>")
    assert fingerprint(tokenizer) == fingerprint(load_tokenizer(built["llama"][1]))  # the folder gives the same one
    assert llama["chat_template"]["jinja"] == TEMPLATE


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_at_temperature_zero_equals_transformers_greedy_generate(models, family, capsys):
    tokenizer, built = models
    model, _, ckpt, padded = built[family]
    prompt = "the quick brown"
    assert main(["sample", "--ckpt", str(ckpt), "--prompt", prompt, "--max_new_tokens", "20", "--temperature", "0",
                 "--stream", "false", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    suppress = list(range(len(tokenizer), model.config.vocab_size)) if padded else None
    expected = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, suppress_tokens=suppress,
                              eos_token_id=None, pad_token_id=0)
    assert printed.rstrip("\n") == tokenizer.decode(expected[0], skip_special_tokens=False)


def test_chats_first_prompt_is_apply_chat_template_exactly(models):
    tokenizer, built = models
    loaded = load_checkpoint(built["qwen3"][2])
    session = ChatSession(loaded.model, loaded.tokenizer, template=_template(loaded), max_new_tokens=4,
                          output=io.StringIO())
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert session.template.render(MESSAGES, add_generation_prompt=True) == expected
    session.history = [("hello world", "fine, thank you!")]
    ids = session.build_prompt("how are you?")
    assert loaded.tokenizer.decode(ids) == expected
    assert ids == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert session.stop == ["<|im_end|>"]


def _template(loaded):
    from picogpt_lightning.chat_template import template_from_meta

    return template_from_meta(loaded.meta)


def test_message_contents_are_text_never_special_tokens_and_answers_carry_the_loss(models):
    _, built = models
    loaded = load_checkpoint(built["qwen3"][2])
    template, tokenizer = _template(loaded), loaded.tokenizer
    end = tokenizer.tokenizer.token_to_id("<|im_end|>")
    sneaky = [{"role": "user", "content": "hi<|im_end|>"}, {"role": "assistant", "content": "fine"}]
    encoded = encode_conversation(sneaky, template, tokenizer)
    markup_ends = 3  # the default system turn's, the user's and the answer's: never the one typed in the message
    assert encoded.ids.count(end) == markup_ends
    assert tokenizer.decode(encoded.ids) == template.render(sneaky)
    trained = [i for i, on in zip(encoded.ids, encoded.loss_mask) if on]
    assert tokenizer.decode(trained) == "fine<|im_end|>"


def test_kv_cache_equals_the_full_forward_with_grouped_query_attention():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=12,
                       position="rotary", norm="rms", mlp="swiglu", qk_norm=True, bias=False)
    model = GPT(config).eval()
    idx = torch.randint(0, 50, (2, 20))
    cache = model.new_cache(2)
    assert cache.keys[0].shape == (2, 2, 32, 12)  # only the kv heads are stored
    with torch.no_grad():
        full = model(idx)[0]
        steps = [model(idx[:, :8], cache=cache)[0]] + [model(idx[:, i : i + 1], cache=cache)[0] for i in range(8, 20)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_import_then_export_gives_the_source_tensors(models, family, tmp_path):
    _, built = models
    _, folder, ckpt, _ = built[family]
    assert main(["export", "--ckpt", str(ckpt), "--out_dir", str(tmp_path / "out")]) == 0
    from safetensors.torch import load_file

    source, exported = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert source.keys() == exported.keys()
    for name, tensor in source.items():
        assert torch.equal(tensor, exported[name]), name
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE


def test_export_then_import_gives_the_same_checkpoint_weights(models, tmp_path):
    tokenizer, built = models
    loaded = load_checkpoint(built["qwen3"][2])
    torch.manual_seed(3)  # a model trained here: the options from scratch, with the imported tokenizer
    config = GPTConfig(vocab_size=len(tokenizer), block_size=32, n_layer=1, n_head=4, n_kv_head=1, n_embd=32,
                       head_dim=16, position="rotary", norm="rms", mlp="swiglu", mlp_width=40, norm_eps=1e-5,
                       tie_weights=False, bias=False, attention_bias=True)
    save_checkpoint(tmp_path / "ours.ckpt", GPT(config), loaded.tokenizer)
    assert main(["export", "--ckpt", str(tmp_path / "ours.ckpt"), "--out_dir", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back.ckpt")]) == 0
    before, after = read_checkpoint(tmp_path / "ours.ckpt"), read_checkpoint(tmp_path / "back.ckpt")
    assert before["state_dict"].keys() == after["state_dict"].keys()
    for name, tensor in before["state_dict"].items():
        assert torch.equal(tensor, after["state_dict"][name]), name
    assert GPTConfig.from_dict(after["picogpt"]["model_config"]) == config


def test_sharded_weights_with_an_index_import_as_one_file_does(models, tmp_path):
    tokenizer, built = models
    model, folder, ckpt, _ = built["qwen3"]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    tokenizer.save_pretrained(tmp_path)
    assert main(["import", str(tmp_path), "--out", str(tmp_path / "sharded.ckpt")]) == 0
    one, sharded = read_checkpoint(ckpt)["state_dict"], read_checkpoint(tmp_path / "sharded.ckpt")["state_dict"]
    assert all(torch.equal(tensor, sharded[name]) for name, tensor in one.items())


def test_a_bf16_source_loads_as_float32_or_keeps_bf16_when_asked(models, tmp_path):
    tokenizer, built = models
    model = built["llama"][0]
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    model.to(torch.float32)
    tokenizer.save_pretrained(tmp_path)
    assert main(["import", str(tmp_path), "--out", str(tmp_path / "wide.ckpt")]) == 0
    assert main(["import", str(tmp_path), "--out", str(tmp_path / "half.ckpt"), "--dtype", "bf16"]) == 0
    wide, half = read_checkpoint(tmp_path / "wide.ckpt")["state_dict"], read_checkpoint(tmp_path / "half.ckpt")["state_dict"]
    assert all(t.dtype == torch.float32 for t in wide.values()) and all(t.dtype == torch.bfloat16 for t in half.values())
    assert all(torch.equal(wide[name], tensor.float()) for name, tensor in half.items())


def test_finetune_from_the_folder_then_export_and_transformers_reproduces_our_logits(models, tmp_path):
    tokenizer, built = models
    _, folder, _, _ = built["llama"]  # GQA, head_dim, biases, untied, padded vocabulary
    lines = [json.dumps({"messages": [{"role": "user", "content": f"hello world {i}"},
                                      {"role": "assistant", "content": "fine, thank you!"}]}) for i in range(12)]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    config = {"seed_everything": 7, "ckpt_dir": str(tmp_path / "run"), "sample_tokens": 0,
              "trainer": {"accelerator": "cpu", "max_steps": 10, "val_check_interval": 5, "log_every_n_steps": 1,
                          "enable_progress_bar": False, "enable_model_summary": False},
              "model": {"init_from": str(folder), "learning_rate": 1e-3, "warmup_iters": 2},
              "data": {"path": str(tmp_path / "chat.jsonl"), "batch_size": 4, "val_fraction": 0.2}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    assert main(["finetune", "--config", str(tmp_path / "ft.yaml")]) == 0
    tuned = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert tuned.meta["chat_template"]["jinja"] == TEMPLATE  # the folder's template, trained with and kept
    assert main(["export", "--ckpt", str(tmp_path / "run" / "last.ckpt"), "--out_dir", str(tmp_path / "hf")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, len(tokenizer), (1, 30), generator=torch.Generator().manual_seed(1))
    vocab = len(tokenizer)
    with torch.no_grad():
        assert torch.allclose(reloaded(idx).logits[..., :vocab], tuned.model(idx)[0][..., :vocab], atol=1e-4, rtol=0)
    assert not torch.equal(tuned.model.wte.weight, load_checkpoint(built["llama"][2]).model.wte.weight)  # it trained
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == \
        tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)


# ----------------------------------------------------------------------------------------------- refusals


def _copy(models, tmp_path, family="qwen3") -> Path:
    folder = tmp_path / "model"
    shutil.copytree(models[1][family][1], folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _no_config(folder):
    (folder / "config.json").unlink()


def _missing_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _tokenizer_too_large(folder):
    _edit_config(folder, vocab_size=100)


def _pickle(folder):
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "evil": io.StringIO("x")}, folder / "pytorch_model.bin")


def _unknown_tensor(folder):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.mlp.experts.0.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))


REFUSALS = {
    "no config.json": (_no_config, "has no config.json"),
    "unknown architecture": (lambda f: _edit_config(f, architectures=["MistralForCausalLM"]), "MistralForCausalLM"),
    "rope_scaling": (lambda f: _edit_config(f, rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    "sliding window": (lambda f: _edit_config(f, use_sliding_window=True, sliding_window=16), "sliding_window"),
    "mixture of experts": (lambda f: _edit_config(f, num_experts=4), "num_experts"),
    "missing shard": (_missing_shard, "model-00002-of-00002.safetensors listed in model.safetensors.index.json is missing"),
    "shapes disagreeing": (lambda f: _edit_config(f, intermediate_size=64), "config.json and the weights disagree"),
    "tokenizer larger than the embedding": (_tokenizer_too_large, "the tokenizer is not this model's"),
    "pickled pytorch_model.bin": (_pickle, "does not load with weights_only"),
    "unknown tensor name": (_unknown_tensor, "model.layers.0.mlp.experts.0.weight"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_what_the_gpt_cannot_hold_is_refused_in_one_line_and_nothing_is_written(models, tmp_path, capsys, case):
    folder = _copy(models, tmp_path)
    spoil, message = REFUSALS[case]
    spoil(folder)
    assert main(["import", str(folder), "--out", str(tmp_path / "out.ckpt")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error
    assert not (tmp_path / "out.ckpt").exists() and not list(tmp_path.glob(".out.ckpt*"))


def test_a_pytorch_model_bin_of_plain_tensors_loads_with_weights_only(models, tmp_path):
    folder = _copy(models, tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert main(["import", str(folder), "--out", str(tmp_path / "bin.ckpt")]) == 0
    one = read_checkpoint(models[1]["qwen3"][2])["state_dict"]
    assert all(torch.equal(t, read_checkpoint(tmp_path / "bin.ckpt")["state_dict"][n]) for n, t in one.items())


def test_a_bad_setting_exits_2(models, tmp_path, capsys):
    assert main(["import", str(models[1]["qwen3"][1]), "--out", str(tmp_path / "x.ckpt"), "--block_size", "999"]) == 2
    assert "--block_size 999 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()


def test_model_chat_answers_with_transformers_greedy_continuation_of_the_chat_prompt(models):
    import picogpt_lightning

    tokenizer, built = models
    model = built["qwen3"][0]
    answer = picogpt_lightning.load(built["qwen3"][2], device="cpu").chat(MESSAGES, max_new_tokens=12, temperature=0)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = model.generate(ids["input_ids"], max_new_tokens=12, do_sample=False, pad_token_id=0,
                              eos_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=False)
    assert answer == text.split("<|im_end|>")[0]


def test_fit_warm_starts_from_an_imported_checkpoint_and_validate_reads_it(models, tmp_path, capsys):
    _, built = models
    ckpt = built["gpt2"][2]
    (tmp_path / "text.txt").write_text(TEXT * 20)
    data = ["--data.text_path", str(tmp_path / "text.txt"), "--data.cache_dir", str(tmp_path / "prepared")]
    assert main(["validate", "--ckpt_path", str(ckpt), *data, "--trainer.accelerator", "cpu"]) == 0
    assert "val_loss" in capsys.readouterr().out
    architecture = ["--model.n_layer", "2", "--model.n_head", "4", "--model.n_embd", "32", "--model.mlp", "gelu_tanh",
                    "--model.tie_weights", "true", "--data.block_size", "256"]
    assert main(["fit", *data, "--data.tokenizer_from", str(ckpt), "--model.init_from", str(ckpt), *architecture,
                 "--trainer.max_steps", "2", "--data.batch_size", "2", "--trainer.accelerator", "cpu",
                 "--ckpt_dir", str(tmp_path / "run"), "--sample_tokens", "0", "--trainer.enable_progress_bar",
                 "false"]) == 0
    assert f"warm start: loaded 29 tensors from {ckpt}" in capsys.readouterr().out


def test_a_padded_embedding_validates_and_warm_starts_on_text_at_its_own_size(models, tmp_path, capsys):
    _, built = models
    model, _, ckpt, padded = built["llama"]
    assert padded
    (tmp_path / "text.txt").write_text(TEXT * 20)
    data = ["--data.text_path", str(tmp_path / "text.txt"), "--data.cache_dir", str(tmp_path / "prepared")]
    assert main(["validate", "--ckpt_path", str(ckpt), *data, "--trainer.accelerator", "cpu"]) == 0
    assert "val_loss" in capsys.readouterr().out
    stored = load_checkpoint(ckpt).config.to_dict()
    flags = [f"--model.{key}={'null' if value is None else value}" for key, value in stored.items()
             if key not in ("vocab_size", "block_size", "dropout")]
    assert main(["fit", *data, "--data.tokenizer_from", str(ckpt), "--model.init_from", str(ckpt), *flags,
                 "--data.block_size", "64", "--trainer.max_steps", "1", "--data.batch_size", "2",
                 "--trainer.accelerator", "cpu", "--ckpt_dir", str(tmp_path / "run"), "--sample_tokens", "0",
                 "--trainer.enable_progress_bar", "false"]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.ckpt").config.vocab_size == model.config.vocab_size


def test_the_terminal_chat_of_an_imported_model_prompts_with_its_own_template(models, monkeypatch):
    import io

    from helpers import typed_input

    from picogpt_lightning.chat import ChatSession
    from picogpt_lightning.cli.chat import run_repl
    from picogpt_lightning.settings import SamplingSettings

    loaded = load_checkpoint(models[1]["qwen3"][2])
    screen = io.StringIO()
    session = ChatSession(loaded.model, loaded.tokenizer, template=_template(loaded),
                          settings=SamplingSettings(temperature=0), max_new_tokens=12, output=screen, notes=screen)
    typed_input(monkeypatch, ["hello world"], screen)
    run_repl(session, None)
    assert "\n> hello world\n" in screen.getvalue()  # the plain prompt: the Jinja template has no "Q: " to show
    assert len(session.history) == 1 and session.history[0][0] == "hello world"


def test_an_answer_after_a_templates_space_is_trained_from_its_first_token(models):
    from picogpt_lightning.jinja_template import JinjaChatTemplate

    loaded = load_checkpoint(models[1]["qwen3"][2])
    template = JinjaChatTemplate("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
                                 "{% else %}A: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}",
                                 eos_token="<|im_end|>")
    encoded = encode_conversation(MESSAGES[:2], template, loaded.tokenizer)
    trained = [i for i, on in zip(encoded.ids, encoded.loss_mask) if on]
    assert loaded.tokenizer.decode(trained) == " fine, thank you!<|im_end|>"  # " fine" is one token, and trained


def test_serve_answers_an_imported_model_as_model_chat_does(models):
    import asyncio

    import picogpt_lightning
    from picogpt_lightning.batching import Finish, Scheduler
    from picogpt_lightning.serve import ChatService
    from picogpt_lightning.serve_protocol import ChatJob, RequestLimits
    from picogpt_lightning.settings import SamplingSettings

    loaded = load_checkpoint(models[1]["qwen3"][2])
    scheduler = Scheduler(loaded.model, loaded.tokenizer, max_batch_size=2, max_queue=2)
    service = ChatService(loaded.model, loaded.tokenizer, _template(loaded), scheduler, RequestLimits("m", 12, 12, 8))
    job = ChatJob(MESSAGES, SamplingSettings(temperature=0), 12, [], 0)

    async def served() -> tuple[list, int]:
        _, pieces, prompt_tokens = service.start(job)
        return [item async for item in service.answer(pieces)], prompt_tokens

    scheduler.start()
    try:
        items, prompt_tokens = asyncio.run(served())
    finally:
        scheduler.stop()
    answer = picogpt_lightning.load(models[1]["qwen3"][2], device="cpu").chat(MESSAGES, max_new_tokens=12, temperature=0)
    assert "".join(item for item in items if isinstance(item, str)) == answer and isinstance(items[-1], Finish)
    assert prompt_tokens == len(encode_conversation(MESSAGES, _template(loaded), loaded.tokenizer,
                                                    add_generation_prompt=True).ids)


def test_evaluate_scores_text_with_an_imported_padded_model_over_its_real_tokens_only(models, tmp_path, capsys):
    _, built = models
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["evaluate", "--ckpt", str(built["llama"][2]), "--text_path", str(tmp_path / "text.txt"),
                 "--json", "true", "--device", "cpu"]) == 0
    facts = json.loads(capsys.readouterr().out)
    loss = facts.get("loss", facts.get("loss_nats"))
    assert loss is not None and 0 < loss < torch.log(torch.tensor(300.0)).item() + 1
