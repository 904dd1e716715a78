"""A pretrained model's own tokenizer: a Hugging Face tokenizer.json with the special tokens the model uses.

A tokenizer.json alone says which tokens are special but not what they mean. The folder around it does:
tokenizer_config.json and special_tokens_map.json name the bos, eos and pad tokens (as text), and
generation_config.json and config.json give their ids (eos possibly a list: every token the model ends an answer
with). `PretrainedTokenizer` is a BPETokenizer whose end of text (`eot_id`) is the model's eos, so documents,
chat answers and generation end where the model learned to end them, and whose `to_json` holds those tokens, so
a checkpoint rebuilds it without the folder. Tokenizers of our own never carry the key, so their JSON, and so
their fingerprint, is what it always was.

This file imports neither torch nor Lightning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import PicoGPTError
from .files import write_text_atomically
from .tokenizer import BPE_FILE, ENDOFTEXT, VOCAB_FILE, BPETokenizer, _import_tokenizers

SPECIAL_ROLES = ("bos", "eos", "pad")
FOLDER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json")


class PretrainedTokenizer(BPETokenizer):
    """A tokenizer.json with its bos/eos/pad tokens (text, or None) and the extra tokens that also end an
    answer (`stop_tokens`, such as Qwen's <|endoftext|> beside its eos <|im_end|>)."""

    def __init__(self, tokenizer, special_tokens: dict[str, str | None], stop_tokens: list[str] | tuple = ()):
        super().__init__(tokenizer)
        self.special_tokens = {role: special_tokens.get(role) for role in SPECIAL_ROLES}
        for role, token in self.special_tokens.items():
            if token is not None and tokenizer.token_to_id(token) is None:
                raise PicoGPTError(f"the {role} token {token!r} is not in the tokenizer's vocabulary: the tokenizer "
                                   f"files disagree; fix tokenizer_config.json or special_tokens_map.json")
        self.stop_tokens = [token for token in stop_tokens if tokenizer.token_to_id(token) is not None]
        eos = self.special_tokens["eos"]
        self.eot_id = tokenizer.token_to_id(eos) if eos is not None else tokenizer.token_to_id(ENDOFTEXT)

    def token_id(self, role: str) -> int | None:
        token = self.special_tokens[role]
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` read as plain text: a special token's literal in it is text, never the special token
        (what a user wrote in a message must not end an answer or open a turn); no bos or eos is added."""
        self.tokenizer.encode_special_tokens = True
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self.tokenizer.encode_special_tokens = False

    def encode_markup(self, text: str) -> list[int]:
        """Ids of a chat template's own text, special tokens included, nothing added (as transformers'
        apply_chat_template tokenizes)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def save(self, folder: str | os.PathLike) -> Path:
        """Our own JSON (`to_json`, special tokens included) as vocab.json, so `load_tokenizer` gives this
        tokenizer back with the same fingerprint (a bare tokenizer.json would lose the special tokens)."""
        return write_text_atomically(Path(folder) / VOCAB_FILE, self.to_json())

    def to_json(self) -> str:
        description = json.loads(super().to_json())
        description["special_tokens"] = dict(self.special_tokens)
        if self.stop_tokens:
            description["stop_tokens"] = list(self.stop_tokens)
        return json.dumps(description)


def from_description(description: dict, source: str) -> PretrainedTokenizer:
    """Rebuild from `to_json` output (a checkpoint's tokenizer entry)."""
    tk = _import_tokenizers()
    specials = description.get("special_tokens")
    if not isinstance(specials, dict) or not all(v is None or isinstance(v, str) for v in specials.values()):
        raise PicoGPTError(f"{source}: special_tokens is not a dict of token texts: it is damaged")
    try:
        tokenizer = tk.Tokenizer.from_str(json.dumps(description["tokenizer"]))
    except Exception as error:  # the library raises plain Exception for malformed input
        raise PicoGPTError(f"{source} is not a valid tokenizer ({error}): it is damaged") from None
    return PretrainedTokenizer(tokenizer, specials, description.get("stop_tokens") or [])


# ----------------------------------------------------------------------------------------------- a folder


def read_json(path: Path) -> dict:
    """A JSON object from `path`, {} when the file is absent, a PicoGPTError naming it when unreadable."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PicoGPTError(f"cannot read {path} ({error}): the file is damaged; download it again") from None
    if not isinstance(content, dict):
        raise PicoGPTError(f"{path} is not a JSON object: the file is damaged; download it again")
    return content


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: text, or an AddedToken dict with its content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    return [value] if isinstance(value, int) else [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def special_tokens_of_folder(folder: Path, tokenizer) -> tuple[dict[str, str | None], list[str]]:
    """bos/eos/pad as text, from the first of FOLDER_FILES naming each, and the other end-of-answer tokens
    (generation_config's eos ids beyond the first)."""
    files = {name: read_json(folder / name) for name in FOLDER_FILES}
    specials: dict[str, str | None] = {}
    for role in SPECIAL_ROLES:
        for name in FOLDER_FILES[:2]:
            specials[role] = specials.get(role) or _token_text(files[name].get(f"{role}_token"))
        for name in FOLDER_FILES[2:]:
            if specials.get(role) is None and _ids(files[name].get(f"{role}_token_id")):
                specials[role] = tokenizer.id_to_token(_ids(files[name][f"{role}_token_id"])[0])
    if specials["eos"] is None and tokenizer.token_to_id(ENDOFTEXT) is not None:
        specials["eos"] = ENDOFTEXT  # GPT-2's folders name it only in the vocabulary
    stops = [tokenizer.id_to_token(i) for name in FOLDER_FILES[2:] for i in _ids(files[name].get("eos_token_id"))]
    stops = [token for token in dict.fromkeys(stops) if token is not None and token != specials["eos"]]
    return specials, stops


def is_pretrained_folder(path: Path) -> bool:
    """A Hugging Face folder: a tokenizer.json with at least one of the files that describe it."""
    return (path / BPE_FILE).is_file() and any((path / name).is_file() for name in FOLDER_FILES)


def load_pretrained_tokenizer(folder: str | Path) -> PretrainedTokenizer:
    """The tokenizer of a Hugging Face model folder (tokenizer.json and the files naming its special tokens)."""
    folder = Path(folder)
    tk = _import_tokenizers()
    path = folder / BPE_FILE
    if not path.is_file():
        raise PicoGPTError(f"{folder} has no {BPE_FILE}: only tokenizers saved as tokenizer.json (fast tokenizers) "
                           f"can be read; save it with transformers' tokenizer.save_pretrained")
    try:
        tokenizer = tk.Tokenizer.from_file(str(path))
    except Exception as error:  # the library raises plain Exception for malformed input
        raise PicoGPTError(f"{path} is not a valid tokenizer.json ({error}): download it again") from None
    specials, stops = special_tokens_of_folder(folder, tokenizer)
    return PretrainedTokenizer(tokenizer, specials, stops)
