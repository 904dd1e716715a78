"""A Hugging Face model folder as a picogpt checkpoint (`picogpt import`, and `--model.init_from HF_FOLDER`).

Reads config.json, the weights (model.safetensors, or the shards model.safetensors.index.json lists, or a
pytorch_model.bin that loads with weights_only), tokenizer.json with the files naming its special tokens, and
the chat template (chat_template.jinja, else tokenizer_config.json's). Three families map onto our GPT exactly:

- GPT2LMHeadModel: learned positions, LayerNorm, GELU (`gelu_new` is our gelu_tanh), biases everywhere, Conv1D
  weights stored (in, out) and transposed here, a tied output layer;
- LlamaForCausalLM: rotary, RMSNorm, SwiGLU, grouped-query attention, head_dim, attention_bias/mlp_bias, tied or
  untied; q, k and v are concatenated into our fused qkv;
- Qwen3ForCausalLM: the same plus q_norm/k_norm (our qk_norm).

Whatever the GPT cannot compute (rope_scaling, sliding windows, experts, another activation, a tensor name we do
not know, shapes config.json does not give) is refused in one line naming it, before anything is written. The
weights are read one tensor at a time from memory-mapped safetensors and copied into their final place, so the
peak is about the converted model plus the shard being read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from .checkpoint_format import checkpoint_payload, write_payload
from .errors import PicoGPTError, SettingsError
from .model import GPT, GPTConfig, LAYER_NORM_EPS, RMS_NORM_EPS
from .pretrained_tokenizer import load_pretrained_tokenizer, read_json

FAMILIES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_MAX_CONTEXT = 4096  # rotary models: longer contexts cost a KV cache of that length per sequence
INDEX_FILE, SINGLE_FILE, PICKLE_FILE = "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin"
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # stored (in, out)
GPT2_NAMES = {"ln_1": "ln_1", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "ln_2": "ln_2",
              "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
LLAMA_NAMES = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.proj",
               "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm", "mlp.gate_proj": "mlp.gate",
               "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.proj"}
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # buffers old files saved

# ----------------------------------------------------------------------------------------------- config


def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def read_hf_config(folder: Path) -> tuple[dict, str]:
    if not (folder / "config.json").is_file():
        raise PicoGPTError(f"{folder} has no config.json: pass a Hugging Face model folder (as save_pretrained "
                           f"writes it, or as downloaded from the hub)")
    config = read_json(folder / "config.json")
    architectures = config.get("architectures") or [config.get("model_type", "?")]
    family = FAMILIES.get(architectures[0])
    if family is None:
        raise PicoGPTError(f"{folder / 'config.json'}: architecture {architectures[0]} cannot be imported; picogpt "
                           f"reads {', '.join(FAMILIES)}")
    return config, family


def _refuse(folder: Path, key: str, value, why: str) -> None:
    raise PicoGPTError(f"{folder / 'config.json'}: {key} {json.dumps(value)} cannot be imported ({why}); picogpt's "
                       f"GPT would compute something else")


def _check_unsupported(folder: Path, hf: dict, family: str) -> None:
    rope = hf.get("rope_scaling") or {}
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", rope.get("rope_type", rope.get("type", "default")))
    if rope or rope_type != "default":
        _refuse(folder, "rope_scaling", hf.get("rope_scaling") or hf.get("rope_parameters"), "only plain RoPE")
    sliding = [kind for kind in hf.get("layer_types") or [] if kind != "full_attention"]
    if hf.get("use_sliding_window") or (family != "qwen3" and hf.get("sliding_window")) or sliding:
        _refuse(folder, "sliding_window", hf.get("sliding_window"), "every layer attends to the whole context")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hf.get(key):
            _refuse(folder, key, hf[key], "mixture-of-experts layers")
    if family != "gpt2" and hf.get("hidden_act", "silu") != "silu":
        _refuse(folder, "hidden_act", hf["hidden_act"], "the gated MLP uses silu")
    if family == "gpt2":
        activation = hf.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
            _refuse(folder, "activation_function", activation, "GPT-2 models use gelu_new or gelu")
        for key, expected in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                              ("add_cross_attention", False)):
            if hf.get(key, expected) != expected:
                _refuse(folder, key, hf[key], f"only {json.dumps(expected)}")


def gpt_config(folder: Path, hf: dict, family: str, block_size: int | None) -> GPTConfig:
    """Our GPTConfig for a config.json; options equal to our defaults stay None so the config reads plainly."""
    _check_unsupported(folder, hf, family)
    try:
        if family == "gpt2":
            return _gpt2_config(hf, block_size)
        return _llama_config(folder, hf, family, block_size)
    except (KeyError, TypeError, ValueError) as error:
        raise PicoGPTError(f"{folder / 'config.json'} does not describe a model picogpt can build ({error})") from None


def _gpt2_config(hf: dict, block_size: int | None) -> GPTConfig:
    positions = hf.get("n_positions", hf.get("n_ctx", 1024))
    if block_size is not None and block_size != positions:
        raise SettingsError(f"--block_size {block_size}: GPT-2 has a learned table of {positions} positions, "
                            f"so its context is {positions}; drop --block_size")
    width = hf["n_embd"]
    inner = hf.get("n_inner") or 4 * width
    eps = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=positions, n_layer=hf["n_layer"], n_head=hf["n_head"],
                     n_embd=width, dropout=0.0, bias=True, tie_weights=hf.get("tie_word_embeddings", True),
                     mlp="gelu" if hf.get("activation_function", "gelu_new") == "gelu" else "gelu_tanh",
                     mlp_width=None if inner == 4 * width else inner, norm_eps=None if eps == LAYER_NORM_EPS else eps)


def _llama_config(folder: Path, hf: dict, family: str, block_size: int | None) -> GPTConfig:
    width, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or width // heads
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    eps = hf.get("rms_norm_eps", RMS_NORM_EPS)
    context = hf.get("max_position_embeddings", 2048)
    if block_size is None and context > DEFAULT_MAX_CONTEXT:
        print(f"note: {folder.name} reads up to {context:,} tokens; the checkpoint's context is {DEFAULT_MAX_CONTEXT:,} "
              f"(each token of context costs KV cache memory); pass --block_size {context} for all of it",
              file=sys.stderr)
        block_size = DEFAULT_MAX_CONTEXT
    if block_size is not None and not 1 <= block_size <= context:
        raise SettingsError(f"--block_size {block_size} is out of range: {folder.name} reads 1 to {context:,} tokens")
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=block_size or context, n_layer=hf["num_hidden_layers"],
        n_head=heads, n_embd=width, dropout=0.0, bias=False, tie_weights=hf.get("tie_word_embeddings", False),
        position="rotary", rope_theta=float(theta), norm="rms", qk_norm=family == "qwen3", mlp="swiglu",
        mlp_width=hf["intermediate_size"], n_kv_head=None if kv_heads == heads else kv_heads,
        head_dim=None if head_dim * heads == width else head_dim, norm_eps=None if eps == RMS_NORM_EPS else eps,
        attention_bias=True if hf.get("attention_bias") else None,
        mlp_bias=True if family == "llama" and hf.get("mlp_bias") else None,
    )


# ----------------------------------------------------------------------------------------------- weights


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights: the index's shards, or the one file."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PicoGPTError(f"{index} has no weight_map: the file is damaged; download it again")
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise PicoGPTError(f"{folder}: the shard {missing[0]} listed in {INDEX_FILE} is missing"
                               f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; download it")
        return shards
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if (folder / PICKLE_FILE).is_file():
        return [folder / PICKLE_FILE]
    raise PicoGPTError(f"{folder} holds no weights ({SINGLE_FILE}, {INDEX_FILE} or {PICKLE_FILE}); download them")


def _read_tensors(path: Path):
    """(name, tensor) pairs of one weights file, one tensor at a time from safetensors (memory-mapped)."""
    if path.suffix == ".bin":
        yield from _read_pickle(path).items()
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            for name in file.keys():
                yield name, file.get_tensor(name)
    except PicoGPTError:
        raise
    except Exception as error:  # safetensors raises its own Exception subclass for damaged files
        raise PicoGPTError(f"{path} is not a readable safetensors file ({str(error).splitlines()[0]}); download it "
                           f"again") from None


def _read_pickle(path: Path) -> dict:
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise PicoGPTError(f"refused to load {path}: it is a pickle that does not load with weights_only "
                           f"({str(error).splitlines()[0][:120]}); convert it to model.safetensors with transformers "
                           f"(save_pretrained) where you trust it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PicoGPTError(f"{path} is not a dict of tensors; convert it to model.safetensors")
    return state


def _our_place(family: str, name: str, config: GPTConfig) -> tuple[str, slice | None, bool] | None:
    """Where a Hugging Face tensor goes: our name, the rows of it (q, k, v of our fused qkv), whether it is
    transposed (GPT-2's Conv1D); None for a buffer to skip. Unknown names raise KeyError."""
    if name.endswith(IGNORED_SUFFIXES):
        return None
    if family == "gpt2":
        name = name.removeprefix("transformer.")
        top = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "ln_f.weight": "ln_f.weight",
               "ln_f.bias": "ln_f.bias", "lm_head.weight": "lm_head.weight"}
        if name in top:
            return top[name], None, False
        _, index, rest = name.split(".", 2) if name.startswith("h.") else ("", "", name)
        module, kind = rest.rsplit(".", 1)
        return f"blocks.{int(index)}.{GPT2_NAMES[module]}.{kind}", None, module in GPT2_CONV1D and kind == "weight"
    top = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "ln_f.weight",
           "lm_head.weight": "lm_head.weight"}
    if name in top:
        return top[name], None, False
    prefix, index, rest = name.split(".", 3)[1:] if name.startswith("model.layers.") else ("", "", name)
    module, kind = rest.rsplit(".", 1)
    q_size, kv_size = config.n_head * config.head_size, config.kv_heads * config.head_size
    rows = {"self_attn.q_proj": slice(0, q_size), "self_attn.k_proj": slice(q_size, q_size + kv_size),
            "self_attn.v_proj": slice(q_size + kv_size, q_size + 2 * kv_size)}
    if module in rows:
        return f"blocks.{int(index)}.attn.qkv.{kind}", rows[module], False
    return f"blocks.{int(index)}.{LLAMA_NAMES[module]}.{kind}", None, False


class _WithoutRandomInit(TorchFunctionMode):
    """Builds modules without drawing their initial weights: the GPT's shapes cost no time and, as its memory is
    never touched, no resident memory. (On the meta device the same model costs about a second here: its
    `normal_` and `arange` go through torch's Python decompositions, which import torch._dynamo.)"""

    SKIPPED = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.nn.init.normal_, torch.nn.init.uniform_,
               torch.nn.init.kaiming_uniform_, torch.nn.init.zeros_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def convert_weights(folder: Path, family: str, config: GPTConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our state dict, filled tensor by tensor from the folder's weight files; every tensor checked."""
    with _WithoutRandomInit():
        expected = {name: tensor.shape for name, tensor in GPT(config).state_dict().items()}
    if config.tie_weights:
        expected.pop("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    for path in weight_files(folder):
        for name, tensor in _read_tensors(path):
            try:
                place = _our_place(family, name, config)
            except (KeyError, ValueError):
                raise PicoGPTError(f"{path.name}: tensor {name} is not part of a {family} model picogpt knows; the "
                                   f"model has layers the GPT cannot hold") from None
            if place is None or (place[0] == "lm_head.weight" and config.tie_weights):
                continue  # a buffer, or the tied output layer saved a second time
            ours, rows, transposed = place
            _place_tensor(state, filled, expected, ours, rows, tensor.t() if transposed else tensor, dtype, path, name)
    incomplete = [name for name in expected if filled.get(name, 0) != expected[name][0]]
    if incomplete:
        raise PicoGPTError(f"{folder}: the weights lack {incomplete[0]} (in picogpt's names) that config.json "
                           f"implies; the files are incomplete, or config.json describes another model")
    if config.tie_weights:
        state["lm_head.weight"] = state["wte.weight"]
    return state


def _place_tensor(state, filled, expected, ours, rows, tensor, dtype, path, name) -> None:
    if ours not in expected:
        raise PicoGPTError(f"{path.name}: tensor {name} has no place in the model config.json describes (no {ours})")
    shape = expected[ours]
    target_shape = (rows.stop - rows.start, *shape[1:]) if rows else tuple(shape)
    if tuple(tensor.shape) != tuple(target_shape):
        raise PicoGPTError(f"{path.name}: tensor {name} has shape {tuple(tensor.shape)} but config.json implies "
                           f"{tuple(target_shape)}; config.json and the weights disagree")
    if rows is None:  # the tensor itself, converted (one copy at most): no second buffer to fill
        state[ours] = tensor.to(dtype).contiguous()
    else:  # q, k or v: their rows of our fused qkv
        state.setdefault(ours, torch.empty(shape, dtype=dtype))[rows] = tensor
    filled[ours] = filled.get(ours, 0) + target_shape[0]


# ----------------------------------------------------------------------------------------------- the rest


def chat_template_of_folder(folder: Path, tokenizer) -> dict | None:
    """The folder's Jinja chat template (chat_template.jinja first, as transformers reads it, else
    tokenizer_config.json's; of a list of named templates, "default") as a checkpoint stores it."""
    from .jinja_template import JinjaChatTemplate

    source = None
    if (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    else:
        source = read_json(folder / "tokenizer_config.json").get("chat_template")
        if isinstance(source, list):
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(source, str) or not source.strip():
        return None
    specials = tokenizer.special_tokens
    return JinjaChatTemplate(source, specials["bos"], specials["eos"], specials["pad"], tokenizer.stop_tokens).to_dict()


def import_folder(folder: str | Path, dtype: str = "float32", block_size: int | None = None,
                  checksum: bool = False) -> dict:
    """The checkpoint of a Hugging Face folder, in memory, as `checkpoint.read_checkpoint` returns one; with
    `checksum`, with the weights' checksum a written file carries (not needed in memory)."""
    folder = Path(folder)
    if dtype not in DTYPES:
        raise SettingsError(f"--dtype {dtype} is unknown; use float32 (the default), bfloat16 or float16")
    if not folder.is_dir():
        raise PicoGPTError(f"{folder} is not a folder: pass a Hugging Face model folder (config.json, weights, "
                           f"tokenizer.json)")
    hf, family = read_hf_config(folder)
    config = gpt_config(folder, hf, family, block_size)
    tokenizer = load_pretrained_tokenizer(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise PicoGPTError(f"{folder / 'tokenizer.json'} has {tokenizer.vocab_size:,} tokens but the model's "
                           f"embedding only {config.vocab_size:,} rows (vocab_size in config.json): the tokenizer is "
                           f"not this model's")
    template = chat_template_of_folder(folder, tokenizer)
    state = convert_weights(folder, family, config, DTYPES[dtype])
    architecture = hf["architectures"][0]
    source = {"kind": "huggingface", "architecture": architecture,
              "source": {"name": f"{folder.name} (a Hugging Face {architecture} folder)"}}
    # The settings `picogpt validate --ckpt_path` and a resume rebuild the model with (vocab_size follows the
    # tokenizer there).
    settings = {"model": {k: v for k, v in config.to_dict().items() if k != "vocab_size"},
                "data": {"block_size": config.block_size}}
    meta = {"data": source, "config": settings, **({"chat_template": template} if template else {})}
    payload = checkpoint_payload(config, state, tokenizer, checksum=checksum, **meta)
    payload["pytorch-lightning_version"] = _lightning_version()  # `picogpt validate --ckpt_path` reads it
    return payload


def _lightning_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning")
    except PackageNotFoundError:
        return "2.0.0"


def import_checkpoint(folder: str | Path, out: str | Path, dtype: str = "float32",
                      block_size: int | None = None) -> Path:
    """`picogpt import`: write the folder's model as an ordinary checkpoint at `out` (atomically)."""
    out = Path(out)
    if out.is_dir():
        raise SettingsError(f"--out {out} is a folder: pass the checkpoint file to write (e.g. {out / 'model.ckpt'})")
    payload = import_folder(folder, dtype, block_size, checksum=True)
    write_payload(out, payload)
    return out
