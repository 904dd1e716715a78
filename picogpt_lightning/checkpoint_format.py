"""What a checkpoint's stored facts must be for this code to read it: a format it knows, model settings it knows
and that are valid, and weights that fit those settings. Each failure is one line naming what is wrong, instead
of a checkpoint from a newer version read as if it were old (and re-saved as old on resume), a setting dropped
silently, or a ValueError or load_state_dict traceback. And the layout written: `checkpoint_payload` (the
weights-only checkpoint every file written outside Lightning has) and its checksum, `weights_sha256`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import fields
from pathlib import Path

import torch

from .disk import save_torch
from .errors import PicoGPTError
from .files import write_atomically
from .model import GPTConfig
from .tokenizer import Tokenizer, fingerprint

# The newest `picogpt.format` this code reads and writes. Raise it when the layout of the picogpt entry changes
# in a way older code would misread.
CHECKPOINT_FORMAT = 1
CHECKSUM_KEY = "weights_sha256"
MODEL_PREFIX = "model."  # Lightning's state_dict keys: the LightningModule holds the GPT as `model`


def check_format(meta: dict, source: object) -> None:
    """Refuse a checkpoint (or export) whose format is newer than CHECKPOINT_FORMAT, or is no format at all."""
    stored = meta.get("format", 1)
    if isinstance(stored, bool) or not isinstance(stored, int) or stored < 1:
        raise PicoGPTError(f"{source} holds an invalid format ({stored!r}): the file was edited or damaged; use "
                           f"another checkpoint of the run")
    if stored > CHECKPOINT_FORMAT:
        raise PicoGPTError(f"{source} was written by a newer picogpt_lightning (format {stored}; this one reads "
                           f"up to {CHECKPOINT_FORMAT}): upgrade (pip install -U picogpt_lightning)")


def stored_model_config(values: object, source: object) -> GPTConfig:
    """The stored model settings as a GPTConfig; an unknown key or an invalid value is one line naming it.
    Keys an old checkpoint lacks take GPTConfig.from_dict's values for it."""
    if not isinstance(values, dict):
        raise PicoGPTError(f"{source} holds no model settings (model_config): use a checkpoint written by "
                           f"`picogpt fit`")
    known = {field.name for field in fields(GPTConfig)}
    unknown = sorted(key for key in values if key not in known)
    if unknown:
        shown = ", ".join(f"{key}: {values[key]!r}" for key in unknown[:3])
        raise PicoGPTError(f"{source} has model settings this picogpt_lightning does not know ({shown}): it was "
                           f"written by a newer version (upgrade) or edited (remove the key)")
    try:
        return GPTConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise PicoGPTError(f"{source} has invalid stored model settings: {error}; the file was edited or "
                           f"damaged, use another checkpoint of the run") from None


def settings_mismatch(error: RuntimeError, config: GPTConfig) -> str:
    """load_state_dict's many-line complaint in a few words: the first tensor missing, unexpected or of another
    shape, and the settings that shaped the model."""
    message = str(error)
    parts = []
    for label, pattern in (("no weights for", r'Missing key\(s\) in state_dict: "([^"]+)"'),
                           ("weights the settings have no place for", r'Unexpected key\(s\) in state_dict: "([^"]+)"')):
        found = re.search(pattern, message)
        if found:
            parts.append(f"{label} {found.group(1)}")
    found = re.search(r"size mismatch for ([^:]+): copying a param with shape (.+?) from checkpoint, the shape in "
                      r"current model is (.+?)\.", message)
    if found:
        parts.append(f"{found.group(1)} is {found.group(2)} in the weights but {found.group(3)} in the settings")
    shape = f"n_layer {config.n_layer}, n_head {config.n_head}, n_embd {config.n_embd}, vocab_size {config.vocab_size}"
    return f"{'; '.join(parts) or message.splitlines()[0]} (settings: {shape})"


def load_weights(model, state_dict: dict, source: object) -> None:
    """model.load_state_dict, with weights that do not fit the stored settings as one line."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        mismatch = settings_mismatch(error, model.config)
        raise PicoGPTError(f"{source}: its settings do not match its weights: {mismatch}; the file was edited or "
                           f"damaged, use another checkpoint of the run") from None


def weights_sha256(state_dict: dict) -> str | None:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors (1.7 GB/s: 0.3 s for GPT-2's
    124M parameters, docs/benchmarks.md); None when it holds sharded tensors (FSDP), which have no plain bytes."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            return None
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(state_dict[name].shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def checkpoint_payload(model_config: GPTConfig, state: dict, tokenizer: Tokenizer, checksum: bool = True,
                       **meta) -> dict:
    """The contents of a weights-only checkpoint (the layout above) for a model's config and state dict;
    `checksum` adds the weights' checksum, which every written file carries."""
    payload = {
        "state_dict": {MODEL_PREFIX + k: v.detach().cpu() for k, v in state.items()},
        "hyper_parameters": model_config.to_dict(),
        "global_step": int(meta.pop("global_step", 0)),
        "picogpt": {"format": CHECKPOINT_FORMAT, "model_config": model_config.to_dict(), "tokenizer": tokenizer.to_json(),
                    "tokenizer_sha256": fingerprint(tokenizer), **meta},
    }
    if checksum:
        payload["picogpt"][CHECKSUM_KEY] = weights_sha256(payload["state_dict"])
    return payload


def write_payload(path: str | Path, payload: dict) -> None:
    """Write a checkpoint's contents to a temporary name and rename it, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: save_torch(payload, temporary))
