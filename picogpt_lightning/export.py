"""A checkpoint as a Hugging Face folder, or as plain safetensors weights (`picogpt export`).

The Hugging Face layout follows the model's architecture, and only where transformers computes exactly what
our model computes (tests/test_export.py checks logits and greedy tokens for every exportable combination):

- classic (learned positions, LayerNorm, GELU): `GPT2LMHeadModel`, with `activation_function: "gelu"`
  (transformers' exact erf GELU, as F.gelu; "gelu_new", GPT-2's default, would change every logit), zeros for
  the biases a bias-free model lacks (adding zero is exact), and GPT-2's `Conv1D` weights stored (in, out),
  the transpose of `nn.Linear`;
- rotary + RMSNorm + SwiGLU: `LlamaForCausalLM` (our fused qkv split into q_proj, k_proj, v_proj; our rotary
  uses Llama's rotate-half layout and inverse frequencies, so the weights map as they are);
- the same plus QK-norm: `Qwen3ForCausalLM` (its q_norm / k_norm are ours, applied before rotary).

Any other combination (relu2, say, or rotary with LayerNorm) has no transformers equivalent: it is refused in
one line naming the option, never exported as a different model. zero_init only changes the initialisation and
dropout only training, so neither matters here; tied or untied output layers map to `tie_word_embeddings`.

The tokenizer goes along as a standard `tokenizer.json`: byte-level BPE is already one; char and word
tokenizers are rebuilt as a `tokenizers` WordLevel model whose pre-tokenizer cuts the text exactly as ours
does, with a decoder that concatenates (the library's default decoder would put spaces between tokens).

The chat template goes along too, as the Jinja `chat_template` of tokenizer_config.json, with end-of-text as
the eos (and pad) token: `apply_chat_template(messages, add_generation_prompt=True)` then gives our prompt and
`generate` stops where `picogpt chat` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import tokenizers as tk
import torch

from .checkpoint import EXPORT_CONFIG, EXPORT_WEIGHTS, LoadedCheckpoint, load_checkpoint
from .chat_template import template_from_meta
from .errors import PicoGPTError
from .export_folder import staged_export
from .files import write_atomically, write_json_atomically
from .model import GPTConfig
from .tokenizer import ENDOFTEXT, UNKNOWN, CharTokenizer, WordTokenizer

EXPORT_FORMAT = 1
FORMATS = ("hf", "safetensors")
GPT2_MLPS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}  # our mlp -> transformers' activation_function

# ---------------------------------------------------------------------------------------------------- writing


def _write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    # Serialised to bytes and written by us: safetensors' own save_file creates files readable by their owner
    # only (mode 600), whatever the umask, which breaks sharing an export folder.
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    data = safetensors.torch.save(contiguous, metadata=metadata)
    write_atomically(path, lambda temporary: temporary.write_bytes(data))


def _output_folder(out_dir: str) -> Path:
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise PicoGPTError(f"--out_dir {out_dir} is a file; pass a folder to write the exported model into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PicoGPTError(f"cannot create {out_dir} ({error.strerror}): pick a writable --out_dir") from None
    return folder


# ---------------------------------------------------------------------------------------------------- weights


def hf_layout(config: GPTConfig) -> str:
    """gpt2, llama or qwen3: the transformers architecture that computes what this model computes, or a
    PicoGPTError naming the option that has none."""
    if (config.position, config.norm, config.qk_norm) == ("learned", "layer", False) and config.mlp in GPT2_MLPS:
        if config.kv_heads != config.n_head or config.head_size * config.n_head != config.n_embd:
            raise PicoGPTError("cannot export n_kv_head or head_dim other than n_embd / n_head in the GPT-2 layout: "
                               "GPT-2 has neither; use it through picogpt instead")
        return "gpt2"
    if (config.position, config.norm, config.mlp) == ("rotary", "rms", "swiglu"):
        if not config.qk_norm:
            return "llama"
        if not (config.bias if config.mlp_bias is None else config.mlp_bias):
            return "qwen3"
        raise PicoGPTError("cannot export bias: true with qk_norm (MLP biases): Qwen3 (the transformers model with QK-norm) has "
                           "none; train with --model.bias false (or --model.mlp_bias false) to export it")
    if config.position == "learned":
        refused = next(f"{name} {value}" for name, value, classic in (
            ("norm", config.norm, "layer"), ("mlp", config.mlp, config.mlp if config.mlp in GPT2_MLPS else "gelu"),
            ("qk_norm", config.qk_norm, False)) if value != classic)
        hint = "the GPT-2 layout needs norm layer, mlp gelu or gelu_tanh and no qk_norm"
    else:
        refused = next(f"{name} {value}" for name, value, modern in (
            ("norm", config.norm, "rms"), ("mlp", config.mlp, "swiglu")) if value != modern)
        hint = "rotary models export as Llama or Qwen3, which need norm rms and mlp swiglu"
    raise PicoGPTError(f"cannot export a model with {refused}: transformers has no model that computes the same "
                       f"thing ({hint}); use it through picogpt (sample, chat, serve, the Python API) instead")


def hf_gpt2_state_dict(state: dict, config) -> dict:
    """Our GPT's weights under GPT-2's names and layouts (`state` as from `checkpoint.model_state_dict`)."""
    width = config.n_embd

    def bias(name: str, size: int):
        return state[name] if name in state else torch.zeros(size, dtype=state["wte.weight"].dtype)

    hf = {"transformer.wte.weight": state["wte.weight"], "transformer.wpe.weight": state["wpe.weight"]}
    # (our name, GPT-2's name, transposed because Conv1D stores (in, out), output size)
    layers = [
        ("ln_1", "ln_1", False, width),
        ("attn.qkv", "attn.c_attn", True, 3 * width),
        ("attn.proj", "attn.c_proj", True, width),
        ("ln_2", "ln_2", False, width),
        ("mlp.fc", "mlp.c_fc", True, config.mlp_hidden),
        ("mlp.proj", "mlp.c_proj", True, width),
    ]
    for index in range(config.n_layer):
        for ours, theirs, transposed, size in layers:
            weight = state[f"blocks.{index}.{ours}.weight"]
            hf[f"transformer.h.{index}.{theirs}.weight"] = weight.t() if transposed else weight
            hf[f"transformer.h.{index}.{theirs}.bias"] = bias(f"blocks.{index}.{ours}.bias", size)
    hf["transformer.ln_f.weight"] = state["ln_f.weight"]
    hf["transformer.ln_f.bias"] = bias("ln_f.bias", width)
    if not config.tie_weights:
        hf["lm_head.weight"] = state["lm_head.weight"]
    return hf


def _dtype_name(state: dict) -> str:
    return str(state["wte.weight"].dtype).removeprefix("torch.")


def hf_gpt2_config(config, dtype: str, endoftext_id: int | None) -> dict:
    """config.json of a GPT2LMHeadModel with our model's shape."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.mlp_hidden,
        # exact erf GELU as F.gelu, or GPT-2's tanh one ("gelu_new") for mlp gelu_tanh
        "activation_function": GPT2_MLPS[config.mlp],
        "layer_norm_epsilon": config.eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": config.tie_weights,
        "bos_token_id": endoftext_id,
        "eos_token_id": endoftext_id,
        "use_cache": True,
        "dtype": dtype,
    }


def hf_llama_state_dict(state: dict, config: GPTConfig) -> dict:
    """Our weights under Llama's (and Qwen3's) names: qkv split into q, k and v; MLP gate/up/proj as
    gate_proj/up_proj/down_proj; norms as input_layernorm/post_attention_layernorm/norm."""
    q_size, kv_size = config.n_head * config.head_size, config.kv_heads * config.head_size
    hf = {"model.embed_tokens.weight": state["wte.weight"], "model.norm.weight": state["ln_f.weight"]}
    for index in range(config.n_layer):
        ours, theirs = f"blocks.{index}.", f"model.layers.{index}."
        names = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.proj": "self_attn.o_proj",
                 "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm", "mlp.gate": "mlp.gate_proj",
                 "mlp.up": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}
        for our_name, their_name in names.items():
            for kind in ("weight", "bias"):
                if f"{ours}{our_name}.{kind}" in state:
                    hf[f"{theirs}{their_name}.{kind}"] = state[f"{ours}{our_name}.{kind}"]
        for kind in ("weight", "bias"):
            if f"{ours}attn.qkv.{kind}" in state:
                q, k, v = state[f"{ours}attn.qkv.{kind}"].split((q_size, kv_size, kv_size), dim=0)
                hf.update({f"{theirs}self_attn.{name}_proj.{kind}": tensor
                           for name, tensor in (("q", q), ("k", k), ("v", v))})
    if not config.tie_weights:
        hf["lm_head.weight"] = state["lm_head.weight"]
    return hf


def hf_llama_config(config: GPTConfig, layout: str, dtype: str, endoftext_id: int | None) -> dict:
    """config.json of a LlamaForCausalLM or Qwen3ForCausalLM with our model's shape (rope_theta as both
    transformers 4 and 5 read it)."""
    shared = {
        "architectures": ["LlamaForCausalLM" if layout == "llama" else "Qwen3ForCausalLM"],
        "model_type": layout,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.eps,
        "rope_theta": config.rope_theta,
        "attention_bias": config.bias if config.attention_bias is None else config.attention_bias,
        "attention_dropout": config.dropout,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_weights,
        "bos_token_id": endoftext_id,
        "eos_token_id": endoftext_id,
        "use_cache": True,
        "dtype": dtype,
    }
    if layout == "llama":
        return {**shared, "mlp_bias": config.bias if config.mlp_bias is None else config.mlp_bias, "pretraining_tp": 1}
    return {**shared, "use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer}


def hf_weights_and_config(config: GPTConfig, state: dict, endoftext_id: int | None) -> tuple[dict, dict]:
    """The Hugging Face state dict and config.json of the layout this architecture maps to."""
    layout = hf_layout(config)
    dtype = _dtype_name(state)
    if layout == "gpt2":
        return hf_gpt2_state_dict(state, config), hf_gpt2_config(config, dtype, endoftext_id)
    return hf_llama_state_dict(state, config), hf_llama_config(config, layout, dtype, endoftext_id)


# ---------------------------------------------------------------------------------------------------- tokenizer


def _concatenating_tokenizer(vocab: dict[str, int], pattern: str, unknown: str):
    """A `tokenizers` WordLevel tokenizer that cuts text by `pattern` and decodes by plain concatenation."""
    tokenizer = tk.Tokenizer(tk.models.WordLevel(vocab=vocab, unk_token=unknown))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(pattern), behavior="isolated")
    tokenizer.decoder = tk.decoders.Fuse()  # the default decoder joins tokens with spaces
    return tokenizer


def hf_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` giving the same ids as ours, and the special token it has (or None).

    char: one WordLevel entry per character; the pre-tokenizer isolates every character ([\\s\\S] matches any
    one, newlines included). A character the model never saw cannot be encoded: Hugging Face raises, as our
    CharTokenizer does. word: our regex (words, whitespace runs, single marks) with `<unk>` for the rest;
    Oniguruma's \\w and \\s follow Unicode like Python's, but a few rare characters (such as the ASCII
    separators \\x1c-\\x1f) are classed differently, and text holding them may get other ids. Both carry
    end-of-text, where the tokenizer has it, as a special added token of the same id.
    """
    if tokenizer.kind == "bpe":
        special = ENDOFTEXT if ENDOFTEXT in tokenizer.tokenizer.get_vocab(with_added_tokens=True) else None
        return tokenizer.tokenizer, special
    if isinstance(tokenizer, CharTokenizer):
        # WordLevel insists on an unknown token name; it is left out of the vocabulary on purpose, so the
        # vocabulary stays exactly the model's.
        exported = _concatenating_tokenizer(dict(tokenizer.stoi), r"[\s\S]", UNKNOWN)
    elif isinstance(tokenizer, WordTokenizer):
        exported = _concatenating_tokenizer(dict(tokenizer.stoi), WordTokenizer.pattern.pattern, UNKNOWN)
    else:
        raise PicoGPTError(f"cannot export a {tokenizer.kind} tokenizer: export supports char, word and bpe")
    if tokenizer.eot_id is None:
        return exported, None
    # A special added token is cut out of the text before pre-tokenization, as ours is. It takes the next free
    # id, which is the char tokenizer's end-of-text id, or keeps the entry a word vocabulary already has for it.
    exported.add_special_tokens([tk.AddedToken(ENDOFTEXT, special=True)])
    return exported, ENDOFTEXT


def compatible_tokenizer_json(description: dict) -> dict:
    """tokenizer.json as every `tokenizers` since 0.19 reads it (so transformers 4.40 loads the export, as the
    test extra allows): since 0.20 the BPE merges are written as pairs, which 0.19 cannot parse, while the
    older "a b" strings are read by all. Byte-level tokens never hold a space (it is Ġ), so the join is exact."""
    model = description.get("model") or {}
    merges = model.get("merges")
    if merges and all(isinstance(m, list) and len(m) == 2 and " " not in "".join(m) for m in merges):
        model["merges"] = [" ".join(merge) for merge in merges]
    return description


def hf_tokenizer_config(tokenizer_kind: str, special: str | None, block_size: int, chat_template: str) -> dict:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        # The default would rewrite " ." as "." and similar on decode; our decoders return the text as it was.
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "chat_template": chat_template,
        # GPT-2 takes no token_type_ids: without this, PreTrainedTokenizerFast returns them and transformers 4.x
        # models reject them (or, given positional arguments, misread them).
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if special:  # padding only ever follows the text, so end-of-text can pad too (as in GPT-2)
        config.update(bos_token=special, eos_token=special, pad_token=special)
    if tokenizer_kind == "word":
        config["unk_token"] = UNKNOWN
    return config


# ---------------------------------------------------------------------------------------------------- formats


def _state(loaded: LoadedCheckpoint) -> dict:
    return {name: tensor.detach() for name, tensor in loaded.model.state_dict().items()}


def _special_tokens(tokenizer, fast_tokenizer, special: str | None) -> tuple[dict, dict]:
    """bos/eos/pad token texts and ids: a pretrained model's own (picogpt import), else end-of-text for all."""
    names = getattr(tokenizer, "special_tokens", None) or dict.fromkeys(("bos", "eos", "pad"), special)
    return names, {role: fast_tokenizer.token_to_id(name) if name else None for role, name in names.items()}


def export_hf(ckpt: str, out_dir: str) -> list[Path]:
    """Write a folder that `transformers` loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained."""
    loaded = load_checkpoint(ckpt)
    config, state, tokenizer = loaded.config, _state(loaded), loaded.tokenizer
    hf_layout(config)  # refuses an architecture transformers cannot reproduce before anything is written
    fast_tokenizer, special = hf_tokenizer(tokenizer)
    endoftext_id = fast_tokenizer.token_to_id(special) if special else None
    names, ids = _special_tokens(tokenizer, fast_tokenizer, special)
    chat_template = template_from_meta(loaded.meta).jinja(has_eot=special is not None)
    folder = _output_folder(out_dir)
    written = [folder / name for name in ("config.json", "generation_config.json", EXPORT_WEIGHTS, "tokenizer.json",
                                          "tokenizer_config.json", "special_tokens_map.json")]
    hf_state, hf_config = hf_weights_and_config(config, state, endoftext_id)
    hf_config.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    write_json_atomically(written[0], hf_config)
    stops = [ids["eos"], *(fast_tokenizer.token_to_id(t) for t in getattr(tokenizer, "stop_tokens", ()))]
    write_json_atomically(written[1], {"bos_token_id": ids["bos"], "eos_token_id": stops if len(stops) > 1 else ids["eos"],
                                       "pad_token_id": ids["pad"]})
    _write_safetensors(written[2], hf_state, {"format": "pt", "picogpt_format": str(EXPORT_FORMAT)})
    tokenizer_json = json.dumps(compatible_tokenizer_json(json.loads(fast_tokenizer.to_str())), ensure_ascii=False)
    write_atomically(written[3], lambda temporary: temporary.write_text(tokenizer_json, encoding="utf-8"))
    tokenizer_config = hf_tokenizer_config(tokenizer.kind, special, config.block_size, chat_template)
    for role, name in names.items():
        tokenizer_config.pop(f"{role}_token", None)
        tokenizer_config.update({f"{role}_token": name} if name else {})
    write_json_atomically(written[4], tokenizer_config)
    specials = {f"{role}_token": name for role, name in names.items() if name}
    if tokenizer.kind == "word":
        specials["unk_token"] = UNKNOWN
    write_json_atomically(written[5], specials)
    return written


def export_safetensors(ckpt: str, out_dir: str) -> list[Path]:
    """Write our weights (our names; a tied output layer once, as wte.weight) and picogpt.json beside them;
    `checkpoint.load_checkpoint` reads the folder back."""
    loaded = load_checkpoint(ckpt)
    config, state = loaded.config, _state(loaded)
    if config.tie_weights:
        state = {name: tensor for name, tensor in state.items() if name != "lm_head.weight"}
    folder = _output_folder(out_dir)
    weights, description = folder / EXPORT_WEIGHTS, folder / EXPORT_CONFIG
    _write_safetensors(weights, state, {"format": "pt", "picogpt_format": str(EXPORT_FORMAT)})
    write_json_atomically(description, {
        "format": EXPORT_FORMAT,
        "model_config": config.to_dict(),
        "tokenizer": json.loads(loaded.tokenizer.to_json()),
        **{key: loaded.meta.get(key) for key in ("data", "best_val_loss", "versions", "chat_template")},
    })
    return [weights, description]


def export(ckpt: str, out_dir: str, format: str = "hf", overwrite: bool = False) -> list[Path]:
    """Export in one of FORMATS; returns the files written. The folder is replaced whole or not at all
    (export_folder.py); one that holds anything but an earlier export is refused unless `overwrite`."""
    if format not in FORMATS:
        raise PicoGPTError(f"unknown --format {format!r}; use hf or safetensors")
    with staged_export(out_dir, overwrite) as stage:
        written = export_hf(ckpt, str(stage)) if format == "hf" else export_safetensors(ckpt, str(stage))
    return [Path(out_dir) / path.name for path in written]
