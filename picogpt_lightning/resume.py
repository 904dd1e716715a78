"""Resume and identity, in one place: what a checkpoint must share with the run that continues, validates,
warm-starts or fine-tunes from it, what may change, and how older checkpoints are read.

- The run's own settings: every checkpoint `fit` writes holds the run's resolved config (`picogpt.config`: data,
  model, trainer and our options). Resuming starts from it (`stored_settings`, brought up to date by
  `migrate`), so `picogpt fit --ckpt_path checkpoints/notes/last.ckpt` continues the run exactly as it was
  started; whatever is passed on the command line applies on top, and every change is listed (`changes`).
  `validate` takes the data and model settings from the checkpoint the same way.
- The model: `ARCHITECTURE_KEYS` (every GPTConfig field but those in `MAY_CHANGE`) must match, or the weights
  would not fit or would mean something else (`model_mismatch_message`); the optimizer rule must match on
  resume (`optimizer_mismatch_message`).
- The data: a change of what the token ids or the training text mean (`DATA_KEYS`, the tokenizer) is refused
  unless `--allow_data_change true` says it is deliberate. `tokenizer_identity` is the one test of "the same
  tokenizer", used by resume, validate, warm start and fine-tuning; a damaged stored tokenizer is never the same.

Nothing here imports Lightning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dataclasses import fields

from .corpus import find_text_files, source_sha256
from .errors import PicoGPTError, warn
from .model import GPTConfig
from .tokenizer import Tokenizer, fingerprint
from .tokenizer_files import tokenizer_from_json

# Options that describe this invocation rather than the run: never taken from the checkpoint.
INVOCATION_KEYS = ("config", "ckpt_path", "ckpt_dir", "additional_steps", "overwrite", "allow_data_change",
                   "print_config", "verbose", "weights_only")
# Settings that change which tokens the ids stand for, or which text is trained and validated on.
DATA_KEYS = ("data.text_path", "data.prepared_dir", "data.mode", "data.backend", "data.vocab_size",
             "data.val_fraction", "data.random_split", "data.split_seed", "data.glob", "data.text_field")
ALLOW_FLAG = "--allow_data_change true"


def stored_settings(checkpoint: dict, sections: tuple[str, ...] | None) -> dict | None:
    """The run's settings as stored in the checkpoint, brought up to date (migrate), limited to `sections`
    (None: all but INVOCATION_KEYS). None for checkpoints that predate stored configs."""
    config = (checkpoint.get("picogpt") or {}).get("config")
    if not isinstance(config, dict):
        return None
    config = migrate(config, checkpoint["picogpt"].get("model_config") or {})
    keep = sections if sections is not None else tuple(k for k in config if k not in INVOCATION_KEYS)
    return {key: config[key] for key in keep if key in config}


def migrate(config: dict, model_config: dict) -> dict:
    """Options renamed since older checkpoints were written, mapped to today's."""
    config = {key: dict(value) if isinstance(value, dict) else value for key, value in config.items()}
    model = config.get("model")
    if isinstance(model, dict) and "auto_tie_weights" in model:
        # Before tie_weights took auto: tie_weights (bool) + auto_tie_weights. The checkpoint's model_config
        # says what they resolved to, which is what the resumed run must build.
        del model["auto_tie_weights"]
        model["tie_weights"] = bool(model_config.get("tie_weights", model.get("tie_weights", False)))
    return config


def known_only(settings: dict, known_leaves: set[str], known_branches: set[str], source: str) -> dict:
    """`settings` without the keys today's parser does not know (an option removed since), with a warning each."""
    def keep(tree: dict, prefix: str) -> dict:
        kept = {}
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if path in known_leaves:
                kept[key] = value
            elif path in known_branches and isinstance(value, dict):
                kept[key] = keep(value, f"{path}.")
            else:
                warn(f"{source} sets {path}, an option this version no longer has; it is ignored")
        return kept

    return keep(settings, "")


def as_config_text(settings: dict) -> str:
    """The settings as YAML, to be given to the parser as the first `--config` (lowest precedence)."""
    return yaml.safe_dump(settings, sort_keys=False)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"data.text_path": ..., ...}: nested dicts flattened, other values (lists included) as leaves."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    leaves = {}
    for key, value in tree.items():
        leaves.update(flatten(value, f"{prefix}{key}."))
    return leaves


def changes(stored: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """{key: (the run's value, the value now)} for every stored setting that differs now."""
    before, after = flatten(stored), flatten(current)
    found = {key: (value, after.get(key)) for key, value in before.items() if key in after and after[key] != value}
    # A list the run had none of (its dump leaves out an unset trainer.callbacks): callbacks added on resume.
    found.update({key: (None, value) for key, value in after.items()
                  if key not in before and isinstance(value, list) and value})
    return found


def describe_changes(found: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in found.items())


def check_data_changes(found: dict[str, tuple[Any, Any]], checkpoint: dict, path: Path, allowed: bool) -> None:
    """Refuse changes of DATA_KEYS unless `allowed`. A changed text_path that holds the very text the run
    trained on (moved, or named another way) is no change: `same_text` compares the content."""
    data_changes = {key: values for key, values in found.items() if key in DATA_KEYS}
    if "data.text_path" in data_changes and not data_changes.get("data.prepared_dir"):
        source = ((checkpoint["picogpt"].get("data") or {}).get("source") or {}).get("sha256")
        if source and same_text(data_changes["data.text_path"][1], source):
            del data_changes["data.text_path"]
    if data_changes and not allowed:
        raise PicoGPTError(
            f"{path} was trained on other data than these settings give ({describe_changes(data_changes)}). "
            f"Leave those options out to use the run's own, start a new run "
            f"from these weights with --model.init_from {path} --model.init_strict false, or pass {ALLOW_FLAG} "
            f"if this is deliberate"
        )


def tokenizer_identity(meta: dict) -> str | None:
    """The fingerprint of the tokenizer a checkpoint's `picogpt` entry stores: its `tokenizer_sha256`, or for
    older checkpoints (the JSON only) computed from it; None when it stores no tokenizer. A damaged stored
    tokenizer raises PicoGPTError: it is never the same as any other."""
    if meta.get("tokenizer_sha256"):
        return meta["tokenizer_sha256"]
    if not meta.get("tokenizer"):
        return None
    return fingerprint(tokenizer_from_json(meta["tokenizer"]))


def same_tokenizer(meta: dict, tokenizer: Tokenizer | str) -> bool:
    """Whether the checkpoint's tokenizer is `tokenizer` (or has its fingerprint): the one identity test of
    resume, validate, warm start and fine-tuning. True when the checkpoint stores none (nothing to compare);
    False when the stored one is damaged."""
    theirs = tokenizer if isinstance(tokenizer, str) else fingerprint(tokenizer)
    try:
        ours = tokenizer_identity(meta)
    except PicoGPTError:
        return False
    return ours is None or ours == theirs


def tokenizer_mismatch(checkpoint: dict, path: Path, tokenizer_sha256: str) -> str | None:
    """The refusal when the data's tokenizer is not the checkpoint's; None when they are the same."""
    meta = checkpoint["picogpt"]
    if same_tokenizer(meta, tokenizer_sha256):
        return None
    try:
        tokenizer_identity(meta)
    except PicoGPTError as error:
        return (f"the tokenizer stored in {path} is damaged ({error}), so the data's token ids cannot be "
                f"checked against it; use another checkpoint of the run, or pass {ALLOW_FLAG} if this is "
                f"deliberate")
    return (f"the data's tokenizer is not the one {path} was trained with (another --data.tokenizer_from, or an "
            f"edited tokenizer): its token ids would mean other things. Use the run's own, start a new run "
            f"from these weights with --model.init_from {path} --model.init_strict false (which maps the "
            f"embeddings by token), or pass {ALLOW_FLAG} if this is deliberate")


def check_shape_changes(found: dict[str, tuple[Any, Any]], checkpoint: dict) -> None:
    """A model shape the changed settings (`changes`) would give, refused before the data is prepared and the
    model built; the vocabulary and tie_weights auto, known only then, are checked once the data is
    (SETTLED_BY_DATA)."""
    saved = checkpoint["picogpt"].get("model_config") or {}
    current = dict(saved)
    for key, (_, value) in found.items():
        section, _, name = key.partition(".")
        if name == "block_size" or (section == "model" and name in SETTLED_BY_SETTINGS):
            current[name] = value
    message = model_mismatch_message(saved, current, SETTLED_BY_SETTINGS)
    if message:
        raise PicoGPTError(message)


def check_text_unchanged(checkpoint: dict, path: Path, data_now: dict | None, allowed: bool) -> None:
    """The same text_path may hold another text than the run trained on: refused unless allowed (it is encoded
    with the checkpoint's tokenizer either way, so the ids keep their meaning). `data_now` is the data module's
    describe()."""
    saved = ((checkpoint["picogpt"].get("data") or {}).get("source") or {}).get("sha256")
    now = ((data_now or {}).get("source") or {}).get("sha256")
    if not (saved and now and saved != now):
        return
    if not allowed:
        raise PicoGPTError(f"the text differs from the one {path} was trained on: pass {ALLOW_FLAG} to go on with "
                           f"this text (encoded with the checkpoint's tokenizer), or use the run's own text")
    warn(f"the text differs from the one {path} was trained on: going on with it, encoded with the checkpoint's "
         f"tokenizer ({ALLOW_FLAG})")


def same_text(text_path: str, sha256: str) -> bool:
    """Whether the files of text_path hold the text whose source sha256 is given."""
    try:
        return source_sha256(find_text_files(text_path)) == sha256
    except PicoGPTError:
        return False


# GPTConfig fields that may differ between a checkpoint and the model that takes its weights: dropout acts in
# training only, zero_init decides how fresh weights start. Every other field is architecture.
MAY_CHANGE = ("dropout", "zero_init")
ARCHITECTURE_KEYS = tuple(field.name for field in fields(GPTConfig) if field.name not in MAY_CHANGE)
# Known only once the data is prepared: the vocabulary, and tie_weights auto (which follows the data's size).
# The others are checked from the settings alone, before any data is prepared.
SETTLED_BY_DATA = ("vocab_size", "tie_weights")
SETTLED_BY_SETTINGS = tuple(key for key in ARCHITECTURE_KEYS if key not in SETTLED_BY_DATA)


def model_mismatch_message(saved: dict, current: dict, keys: tuple[str, ...] = ARCHITECTURE_KEYS) -> str | None:
    """None when a checkpoint's model config has the same architecture as the current one in `keys` (dropout
    and the initialisation may differ), else a message that names each difference. Keys an old checkpoint lacks
    take the classic values it was trained with."""
    saved = GPTConfig.from_dict(saved).to_dict()
    current = GPTConfig.from_dict(current).to_dict()
    if saved["position"] == current["position"] == "learned":
        keys = tuple(k for k in keys if k != "rope_theta")  # only rotary positions use it
    differences = ", ".join(f"{k} {saved.get(k)} in checkpoint vs {current.get(k)} now"
                            for k in keys if saved.get(k) != current.get(k))
    if not differences:
        return None
    return (f"the checkpoint's model does not match this config ({differences}); resume with the config the run "
            f"was started with, or start a new run with --model.init_from CHECKPOINT --model.init_strict false")


def optimizer_mismatch_message(saved_hparams: dict, optimizer: str) -> str | None:
    """None when a checkpoint was trained with `optimizer` (checkpoints from before the choice used adamw)."""
    saved = saved_hparams.get("optimizer", "adamw")
    if saved == optimizer:
        return None
    return (f"the checkpoint was trained with optimizer {saved}, not {optimizer}: its optimizer state cannot "
            f"continue with another rule; resume with --model.optimizer {saved}, or start a new run from its "
            f"weights with --model.init_from CHECKPOINT --model.optimizer {optimizer}")
