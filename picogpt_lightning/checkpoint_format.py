"""What a checkpoint's stored facts must be for this code to read it: a format it knows, model settings it knows
and that are valid, and weights that fit those settings. Each failure is one line naming what is wrong, instead
of a checkpoint from a newer version read as if it were old (and re-saved as old on resume), a setting dropped
silently, or a ValueError or load_state_dict traceback.
"""

from __future__ import annotations

import re
from dataclasses import fields

from .errors import PicoGPTError
from .model import GPTConfig

# The newest `picogpt.format` this code reads and writes. Raise it when the layout of the picogpt entry changes
# in a way older code would misread.
CHECKPOINT_FORMAT = 1


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
