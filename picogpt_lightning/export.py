"""A checkpoint as a Hugging Face GPT-2 folder, or as plain safetensors weights (`picogpt export`).

Our GPT is GPT-2's architecture with two switches GPT-2 lacks (no biases, untied output layer) and the exact
erf GELU where GPT-2 uses the tanh approximation. So the Hugging Face export writes a `GPT2LMHeadModel` with
`activation_function: "gelu"` (transformers' exact GELU; "gelu_new", GPT-2's default, would change every
logit), zeros for the biases a bias-free model lacks (adding zero is exact), and `tie_word_embeddings` as the
checkpoint has it. GPT-2's `Conv1D` layers store weights as (in, out), the transpose of `nn.Linear`.

The tokenizer goes along as a standard `tokenizer.json`: byte-level BPE is already one; char and word
tokenizers are rebuilt as a `tokenizers` WordLevel model whose pre-tokenizer cuts the text exactly as ours
does, with a decoder that concatenates (the library's default decoder would put spaces between tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import tokenizers as tk
import torch

from .checkpoint import EXPORT_CONFIG, EXPORT_WEIGHTS, LoadedCheckpoint, load_checkpoint
from .errors import PicoGPTError
from .files import write_atomically, write_json_atomically
from .tokenizer import ENDOFTEXT, UNKNOWN, CharTokenizer, WordTokenizer

EXPORT_FORMAT = 1
FORMATS = ("hf", "safetensors")

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
        ("mlp.fc", "mlp.c_fc", True, 4 * width),
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
        "n_inner": 4 * config.n_embd,
        "activation_function": "gelu",  # exact erf GELU, as F.gelu; never GPT-2's tanh "gelu_new"
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which our model uses
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
    separators \\x1c-\\x1f) are classed differently, and text holding them may get other ids.
    """
    if tokenizer.kind == "bpe":
        special = ENDOFTEXT if ENDOFTEXT in tokenizer.tokenizer.get_vocab(with_added_tokens=True) else None
        return tokenizer.tokenizer, special
    if isinstance(tokenizer, CharTokenizer):
        # WordLevel insists on an unknown token name; it is left out of the vocabulary on purpose, so the
        # vocabulary stays exactly the model's.
        return _concatenating_tokenizer(dict(tokenizer.stoi), r"[\s\S]", UNKNOWN), None
    if isinstance(tokenizer, WordTokenizer):
        return _concatenating_tokenizer(dict(tokenizer.stoi), WordTokenizer.pattern.pattern, UNKNOWN), None
    raise PicoGPTError(f"cannot export a {tokenizer.kind} tokenizer: export supports char, word and bpe")


def compatible_tokenizer_json(description: dict) -> dict:
    """tokenizer.json as every `tokenizers` since 0.19 reads it (so transformers 4.40 loads the export, as the
    test extra allows): since 0.20 the BPE merges are written as pairs, which 0.19 cannot parse, while the
    older "a b" strings are read by all. Byte-level tokens never hold a space (it is Ġ), so the join is exact."""
    model = description.get("model") or {}
    merges = model.get("merges")
    if merges and all(isinstance(m, list) and len(m) == 2 and " " not in "".join(m) for m in merges):
        model["merges"] = [" ".join(merge) for merge in merges]
    return description


def hf_tokenizer_config(tokenizer_kind: str, special: str | None, block_size: int) -> dict:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        # The default would rewrite " ." as "." and similar on decode; our decoders return the text as it was.
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        # GPT-2 takes no token_type_ids: without this, PreTrainedTokenizerFast returns them and transformers 4.x
        # models reject them (or, given positional arguments, misread them).
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if special:
        config.update(bos_token=special, eos_token=special)
    if tokenizer_kind == "word":
        config["unk_token"] = UNKNOWN
    return config


# ---------------------------------------------------------------------------------------------------- formats


def _state(loaded: LoadedCheckpoint) -> dict:
    return {name: tensor.detach() for name, tensor in loaded.model.state_dict().items()}


def export_hf(ckpt: str, out_dir: str) -> list[Path]:
    """Write a folder that `transformers` loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained."""
    loaded = load_checkpoint(ckpt)
    config, state, tokenizer = loaded.config, _state(loaded), loaded.tokenizer
    fast_tokenizer, special = hf_tokenizer(tokenizer)
    endoftext_id = fast_tokenizer.token_to_id(special) if special else None
    folder = _output_folder(out_dir)
    written = [folder / name for name in ("config.json", "generation_config.json", EXPORT_WEIGHTS, "tokenizer.json",
                                          "tokenizer_config.json", "special_tokens_map.json")]
    write_json_atomically(written[0], hf_gpt2_config(config, _dtype_name(state), endoftext_id))
    write_json_atomically(written[1], {"bos_token_id": endoftext_id, "eos_token_id": endoftext_id})
    _write_safetensors(written[2], hf_gpt2_state_dict(state, config), {"format": "pt"})
    tokenizer_json = json.dumps(compatible_tokenizer_json(json.loads(fast_tokenizer.to_str())), ensure_ascii=False)
    write_atomically(written[3], lambda temporary: temporary.write_text(tokenizer_json, encoding="utf-8"))
    write_json_atomically(written[4], hf_tokenizer_config(tokenizer.kind, special, config.block_size))
    specials = {"bos_token": special, "eos_token": special} if special else {}
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
        **{key: loaded.meta.get(key) for key in ("data", "best_val_loss", "versions")},
    })
    return [weights, description]


def export(ckpt: str, out_dir: str, format: str = "hf") -> list[Path]:
    """Export in one of FORMATS; returns the files written."""
    if format not in FORMATS:
        raise PicoGPTError(f"unknown --format {format!r}; use hf or safetensors")
    return export_hf(ckpt, out_dir) if format == "hf" else export_safetensors(ckpt, out_dir)
