"""Safe loading of the checkpoints `picogpt fit` writes: weights, model shape and tokenizer, no Lightning.

Every load here uses `torch.load(..., weights_only=True)`, which refuses pickles that would build arbitrary
Python objects (and so could run code). Our checkpoints hold only tensors and plain types, so nothing is lost.
Only a full resume of training goes through Lightning's own loader.

Layout of a checkpoint (a Lightning checkpoint with one extra entry):
    state_dict        the LightningModule's weights; the GPT's are under the "model." prefix
    hyper_parameters  the LightningModule's init arguments (plain types)
    global_step       optimizer steps taken
    picogpt           {"format": 1, "model_config": GPTConfig as a dict, "tokenizer": tokenizer JSON,
                       "tokenizer_sha256": its fingerprint, "data": facts about the training data,
                       "best_val_loss", "versions", "config": the run's resolved settings,
                       "weights_sha256": checksum of state_dict, written last (see weights_sha256)}

torch does not check the CRC of the zip entries it reads, so a flipped byte in the weights would load
silently: `read_checkpoint` recomputes `weights_sha256` and refuses a file whose weights changed since they were
written, or that holds NaN or infinite weights.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from .checkpoint_format import (CHECKSUM_KEY, MODEL_PREFIX, check_format, checkpoint_payload, load_weights,
                                stored_model_config, weights_sha256, write_payload)
from .errors import PicoGPTError
from .files import not_found
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer
from .tokenizer_files import tokenizer_from_json

RUN_FOLDER_CHECKPOINTS = ("best.ckpt", "last.ckpt")  # what a run folder passed as a checkpoint stands for

EXPORT_WEIGHTS = "model.safetensors"  # `picogpt export` writes the weights under this name in both formats
EXPORT_CONFIG = "picogpt.json"  # --format safetensors: our own config beside the weights


def non_finite_weights(state_dict: dict) -> list[str]:
    """Names of floating-point tensors holding NaN or inf. A tensor's sum is finite when all its values are
    (30 ms for 124M parameters), so the exact check runs only on tensors whose sum is not."""
    bad = []
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
            if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
                bad.append(name)
    return bad


def verify_weights(checkpoint: dict, path: Path) -> None:
    """Refuse weights that changed since they were saved (when the file holds a checksum) or are not finite."""
    stored = checkpoint.get("picogpt", {}).get(CHECKSUM_KEY)
    if stored is not None and weights_sha256(checkpoint["state_dict"]) not in (stored, None):
        raise PicoGPTError(f"{path} is damaged: its weights differ from the checksum written with them (bytes "
                           f"changed on disk or in a copy); use another checkpoint of the run or a backup")
    bad = non_finite_weights(checkpoint["state_dict"])
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise PicoGPTError(f"{path} holds NaN or infinite weights ({shown}): the model diverged before it was "
                           f"saved, or the file was edited; use an earlier checkpoint")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given; for a run folder, its best.ckpt (else last.ckpt), with a note saying which.
    An export folder of `--format safetensors` is returned as is (load_checkpoint reads it)."""
    path = Path(path)
    if not path.is_dir() or (path / EXPORT_CONFIG).is_file():
        return path
    for name in RUN_FOLDER_CHECKPOINTS:
        if (path / name).is_file():
            print(f"(using {path / name}, the run's {name.split('.')[0]} checkpoint)", file=sys.stderr)
            return path / name
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file()):
        return path  # a Hugging Face model folder: read_checkpoint imports it (hf_import.py)
    if (path / "config.json").is_file():
        raise PicoGPTError(f"{path} is a Hugging Face export: load it with transformers "
                           f"(AutoModelForCausalLM.from_pretrained), or pass the .ckpt it was exported from")
    raise PicoGPTError(f"{path} is a folder without best.ckpt, last.ckpt or {EXPORT_CONFIG}: pass a checkpoint "
                       f"file, a run folder of `picogpt fit` or a folder written by `picogpt export --format "
                       f"safetensors`")


def missing_checkpoint(path: Path) -> PicoGPTError:
    """A checkpoint that is not there; a run stopped before its first validation has a last.ckpt but no
    best.ckpt, and the message names the file to use instead."""
    last = path.with_name("last.ckpt")
    if path.name == "best.ckpt" and last.is_file() and not path.exists():
        return PicoGPTError(f"{path.parent} has no best.ckpt (no validation ran in that run, e.g. it was stopped "
                            f"before its first one); use {last}")
    return PicoGPTError(f"checkpoint {path} {not_found(path)}; pass the .ckpt file written by `picogpt fit`")


def read_checkpoint(path: str | Path, verify: bool = True) -> dict:
    """The checkpoint's contents as plain types and CPU tensors, or a PicoGPTError saying what is wrong.
    `verify` checks the weights against their checksum and for NaN/inf (verify_weights)."""
    path = Path(path)
    if path.is_dir():
        path = find_checkpoint(path)
    if path.is_dir() and (path / "config.json").is_file():
        from .hf_import import import_folder  # a Hugging Face model folder, converted in memory

        return import_folder(path)
    if not path.is_file():
        raise missing_checkpoint(path)
    if not zipfile.is_zipfile(path):
        raise PicoGPTError(f"{path} is not a readable checkpoint (truncated, or not a PyTorch file); "
                           f"use a .ckpt written by `picogpt fit`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        reason = f"it asks for {found.group(1)}" if found else "it holds more than tensors and plain values"
        raise PicoGPTError(
            f"refused to load {path}: {reason}, which could run code when unpickled; only load checkpoints "
            f"you made or trust"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise PicoGPTError(
            f"{path} is not a readable checkpoint (truncated or not a PyTorch file: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}); use a .ckpt written by `picogpt fit`"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise PicoGPTError(f"{path} is a PyTorch file but not a picogpt checkpoint (no state_dict); "
                           f"pass a best.ckpt or last.ckpt written by `picogpt fit`")
    if "picogpt" not in checkpoint:
        raise PicoGPTError(f"{path} is a Lightning checkpoint but not one written by `picogpt fit` (no picogpt entry); "
                           f"pass a best.ckpt or last.ckpt written by `picogpt fit`")
    check_format(checkpoint["picogpt"], path)
    stored_model_config(checkpoint["picogpt"].get("model_config"), path)
    if verify:
        verify_weights(checkpoint, path)
    return checkpoint


def stored_vocab_size(path: str | Path) -> int | None:
    """The vocabulary size of the model a checkpoint or Hugging Face folder holds, read without its weights (a
    checkpoint memory-mapped, a folder's config.json), for sizing a model before the weights are loaded."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        from .hf_import import gpt_config, read_hf_config

        hf, family = read_hf_config(path)
        return gpt_config(path, hf, family, None).vocab_size
    if path.is_dir():
        path = find_checkpoint(path)
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a readable checkpoint: read_checkpoint says why, in one line
        stored = read_checkpoint(path, verify=False)
    vocab = ((stored.get("picogpt") or {}).get("model_config") or {}).get("vocab_size")
    return vocab if isinstance(vocab, int) else None


def model_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The GPT's own weights, without the LightningModule's prefix."""
    return {key.removeprefix(MODEL_PREFIX): value for key, value in checkpoint["state_dict"].items()
            if key.startswith(MODEL_PREFIX)}


def model_config(checkpoint: dict) -> GPTConfig:
    return stored_model_config(checkpoint["picogpt"].get("model_config"), "the checkpoint")


@dataclass
class LoadedCheckpoint:
    """A model ready to use (eval mode, on its device), its tokenizer, and the facts stored beside them."""

    model: GPT
    tokenizer: Tokenizer
    meta: dict
    global_step: int

    @property
    def config(self) -> GPTConfig:
        return self.model.config


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """The one way to load a model for use: a `picogpt fit` checkpoint file, a run folder (its best.ckpt, else
    last.ckpt), a folder written by `picogpt export --format safetensors`, or a Hugging Face model folder
    (imported in memory, hf_import.py)."""
    path = find_checkpoint(path)
    if path.is_dir() and (path / EXPORT_CONFIG).is_file():
        return _load_safetensors_export(path, device)
    checkpoint = read_checkpoint(path)
    meta = checkpoint["picogpt"]
    if not meta.get("tokenizer"):
        raise PicoGPTError(f"{path} holds no tokenizer; use a checkpoint written by `picogpt fit`")
    model = GPT(model_config(checkpoint))
    load_weights(model, model_state_dict(checkpoint), path)
    model.to(device).eval()
    tokenizer = tokenizer_from_json(meta["tokenizer"])
    never_sample_padding(model, tokenizer.vocab_size)
    return LoadedCheckpoint(model, tokenizer, meta, int(checkpoint.get("global_step", 0)))


def never_sample_padding(model: GPT, tokenizer_size: int) -> None:
    """An embedding larger than the tokenizer (padded vocabularies, as Qwen's) has rows no text encodes to:
    their logits become -inf, so generation never picks one and probabilities are over real tokens only."""
    if tokenizer_size >= model.config.vocab_size:
        return

    def mask(module, inputs, logits):
        return logits.index_fill(-1, torch.arange(tokenizer_size, logits.size(-1), device=logits.device),
                                 float("-inf"))

    model.lm_head.register_forward_hook(mask)


def _load_safetensors_export(folder: Path, device: str | torch.device) -> LoadedCheckpoint:
    """Model and tokenizer from a `--format safetensors` folder: our parameter names, a tied output layer
    stored once (as wte.weight), and picogpt.json with the model config and tokenizer."""
    try:
        description = json.loads((folder / EXPORT_CONFIG).read_text(encoding="utf-8"))
        check_format(description, folder)
        state = safetensors.torch.load_file(str(folder / EXPORT_WEIGHTS))
        model = GPT(stored_model_config(description["model_config"], folder))
        if model.config.tie_weights:
            state["lm_head.weight"] = state["wte.weight"]
        bad = non_finite_weights(state)
        if bad:
            raise PicoGPTError(f"NaN or infinite weights ({', '.join(bad[:3])})")
        load_weights(model, state, folder)
        tokenizer = tokenizer_from_json(json.dumps(description["tokenizer"]))
    except PicoGPTError:
        raise
    except Exception as error:  # unreadable or damaged files: safetensors raises its own Exception subclass
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PicoGPTError(f"{folder} is not a complete `picogpt export --format safetensors` folder ({reason}); "
                           f"export the checkpoint again") from None
    model.to(device).eval()
    return LoadedCheckpoint(model, tokenizer, description, 0)


def save_checkpoint(path: str | Path, model: GPT, tokenizer: Tokenizer, **meta) -> None:
    """Write a weights-only checkpoint in the layout above (for sampling, chat and warm start; not for resume).

    `picogpt fit` writes full Lightning checkpoints; this is for models built outside it, such as the smoke
    test scripts. The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    write_payload(path, checkpoint_payload(model.config, model.state_dict(), tokenizer, **meta))
