"""What a checkpoint is, from the plain facts `picogpt fit` stores in it (`picogpt info`).

Model shape and parameter count, tokenizer, training data (name, size, sha256), steps, best val loss, the
resolved config and library versions. Nothing is built: the counts come from the weights' shapes. A fact a
checkpoint lacks (older files, or files written by `save_checkpoint`) is shown as unknown, or null in --json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import safetensors
import yaml

from .checkpoint import EXPORT_CONFIG, EXPORT_WEIGHTS, find_checkpoint, model_state_dict, read_checkpoint
from .errors import PicoGPTError
from .tokenizer_files import tokenizer_from_json

UNKNOWN = "unknown"
LIGHTNING_INTERNALS = ("_instantiator", "_class_path")


def _count_parameters(state: dict, model_config: dict | None) -> tuple[int, int]:
    """(all parameters, those outside the position embedding); a tied output layer counts once."""
    tied = bool(model_config and model_config.get("tie_weights"))
    total = sum(t.numel() for name, t in state.items() if not (tied and name == "lm_head.weight"))
    position = state["wpe.weight"].numel() if "wpe.weight" in state else 0
    return total, total - position


def _tokenizer_facts(tokenizer_json: str | None) -> dict | None:
    if not tokenizer_json:
        return None
    try:
        tokenizer = tokenizer_from_json(tokenizer_json)
    except PicoGPTError:
        return {"kind": "damaged", "vocab_size": None}
    return {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}


def _plain(values: dict | None) -> dict | None:
    if values is None:
        return None
    return {k: v for k, v in dict(values).items() if k not in LIGHTNING_INTERNALS}


def _resolved_config(checkpoint: dict) -> tuple[dict | None, str | None]:
    """The config `fit` stored, else what Lightning kept of the model and data settings, else nothing."""
    stored = checkpoint["picogpt"].get("config")
    if stored:
        return stored, "stored"
    model, data = checkpoint.get("hyper_parameters"), checkpoint.get("datamodule_hyper_parameters")
    settings = {name: _plain(values) for name, values in (("model", model), ("data", data)) if values}
    if settings:
        return settings, "hyperparameters"
    return None, None


def describe_checkpoint(path: str | Path) -> dict:
    """Everything `info` reports, as plain JSON-ready values (None for what the checkpoint does not say).
    A run folder stands for its best.ckpt (else last.ckpt); a `--format safetensors` export folder is read too."""
    path = find_checkpoint(path)
    if path.is_dir() and (path / EXPORT_CONFIG).is_file():
        return _describe_export(path)
    checkpoint = read_checkpoint(path)
    meta = checkpoint["picogpt"]
    model_config = meta.get("model_config")
    total, without_positions = _count_parameters(model_state_dict(checkpoint), model_config)
    config, config_source = _resolved_config(checkpoint)
    versions = meta.get("versions") or (
        {"lightning": checkpoint["pytorch-lightning_version"]} if "pytorch-lightning_version" in checkpoint else None
    )
    return {
        "path": str(path),
        "file_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else path.stat().st_size,
        "format": meta.get("format"),
        "model_config": model_config,
        "parameters": total,
        "parameters_without_position_embeddings": without_positions,
        "tokenizer": _tokenizer_facts(meta.get("tokenizer")),
        "data": meta.get("data"),
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
        "best_val_loss": meta.get("best_val_loss"),
        "versions": versions,
        "config": config,
        "config_source": config_source,
    }


def _describe_export(folder: Path) -> dict:
    """The facts of a `picogpt export --format safetensors` folder: picogpt.json and the weights' shapes."""
    try:
        description = json.loads((folder / EXPORT_CONFIG).read_text(encoding="utf-8"))
        with safetensors.safe_open(str(folder / EXPORT_WEIGHTS), framework="pt") as weights:
            shapes = {name: weights.get_slice(name).get_shape() for name in weights.keys()}
    except Exception as error:  # unreadable or damaged files: safetensors raises its own Exception subclass
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PicoGPTError(f"{folder} is not a complete `picogpt export --format safetensors` folder ({reason}); "
                           f"export the checkpoint again") from None
    total = sum(math.prod(shape) for shape in shapes.values())  # a tied output layer is stored once
    position = math.prod(shapes["wpe.weight"]) if "wpe.weight" in shapes else 0
    tokenizer = description.get("tokenizer")
    return {
        "path": str(folder),
        "file_bytes": sum(p.stat().st_size for p in (folder / EXPORT_WEIGHTS, folder / EXPORT_CONFIG)),
        "format": description.get("format"),
        "model_config": description.get("model_config"),
        "parameters": total,
        "parameters_without_position_embeddings": total - position,
        "tokenizer": _tokenizer_facts(json.dumps(tokenizer) if tokenizer else None),
        "data": description.get("data"),
        "global_step": None,
        "epoch": None,
        "best_val_loss": description.get("best_val_loss"),
        "versions": description.get("versions"),
        "config": None,
        "config_source": None,
    }


# ----------------------------------------------------------------------------------------------- text


def _model_line(config: dict | None) -> str:
    if not config:
        return UNKNOWN
    block = [f"{config.get('position', 'learned')} positions", f"{config.get('norm', 'layer')} norm",
             *(["QK-norm"] if config.get("qk_norm") else []), f"{config.get('mlp', 'gelu')} MLP",
             *(["zero-init projections"] if config.get("zero_init") else []),
             *([f"{config['n_kv_head']} key/value heads"] if config.get("n_kv_head") else []),
             *([f"heads {config['head_dim']} wide"] if config.get("head_dim") else []),
             *([f"MLP {config['mlp_width']} wide"] if config.get("mlp_width") else []),
             *([f"{part} biases {'on' if config[key] else 'off'}" for part, key in (("attention", "attention_bias"),
               ("MLP", "mlp_bias")) if config.get(key) is not None])]
    return (f"GPT, {config['n_layer']} layers, {config['n_head']} heads, {config['n_embd']} wide, "
            f"context {config['block_size']} tokens, vocab {config['vocab_size']:,}; {', '.join(block)}, "
            f"{'biases' if config.get('bias', True) else 'no biases'}, "
            f"{'tied' if config.get('tie_weights') else 'untied'} embeddings, dropout {config.get('dropout', 0)}")


def _data_line(data: dict | None) -> str:
    if not data:
        return UNKNOWN
    source = data.get("source") or {}
    files = source.get("files") or []
    parts = [str(source.get("name", UNKNOWN))]
    if source.get("bytes") is not None:
        parts.append(f"{len(files)} file(s), {source['bytes']:,} bytes")
    if data.get("train_tokens") is not None:
        parts.append(f"{data['train_tokens']:,} train / {data.get('val_tokens', 0):,} val tokens")
    return ", ".join(parts) + (f"\n{'':14}sha256 {source['sha256']}" if source.get("sha256") else "")


def _training_line(facts: dict) -> str:
    step = facts["global_step"]
    line = f"step {step:,}" if step is not None else f"step {UNKNOWN}"
    best = facts["best_val_loss"]
    if best is None:
        return line + f", best val loss {UNKNOWN}"
    return line + f", best val loss {best:.4f} (perplexity {math.exp(best):.2f})"


def format_description(facts: dict) -> str:
    """The human-readable report of `describe_checkpoint`'s facts."""
    tokenizer = facts["tokenizer"]
    versions = facts["versions"]
    total, without = facts["parameters"], facts["parameters_without_position_embeddings"]
    lines = {
        "checkpoint": f"{facts['path']} ({facts['file_bytes'] / 1e6:.1f} MB, picogpt "
                      f"{'export ' if Path(facts['path']).is_dir() else ''}format "
                      f"{facts['format'] if facts['format'] is not None else UNKNOWN})",
        "model": _model_line(facts["model_config"]),
        "parameters": f"{total / 1e6:.2f}M ({total:,}; {without:,} without position embeddings)",
        "tokenizer": f"{tokenizer['kind']}, {tokenizer['vocab_size']:,} tokens" if tokenizer else UNKNOWN,
        "data": _data_line(facts["data"]),
        "training": _training_line(facts),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()) if versions else UNKNOWN,
    }
    text = "\n".join(f"{label:<14}{value}" for label, value in lines.items())
    if facts["config"] is None:
        return text + f"\n{'config':<14}{UNKNOWN}"
    note = ""
    if facts["config_source"] != "stored":
        note = " (not stored; model and data settings from the hyperparameters)"
    class Dumper(yaml.SafeDumper):
        pass

    def quoted_if_multiline(dumper, text: str):
        # "Q: ...\nA:" on one line, rather than YAML's folded quoting spread over several lines
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"' if "\n" in text else None)

    Dumper.add_representer(str, quoted_if_multiline)
    dumped = yaml.dump(facts["config"], Dumper=Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return text + f"\nconfig{note}:\n" + "".join(f"  {line}\n" for line in dumped.splitlines()).rstrip("\n")
