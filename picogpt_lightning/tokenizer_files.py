"""Tokenizers read back: from the description a checkpoint or prepared folder stores (`tokenizer_from_json`),
from a saved file or folder, ours or a Hugging Face model's (`load_tokenizer`), and GPT-2's two original files
(`load_gpt2_files`). The tokenizer kinds themselves are in tokenizer.py, a pretrained model's in
pretrained_tokenizer.py; this module sits above both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import PicoGPTError
from .pretrained_tokenizer import from_description, is_pretrained_folder, load_pretrained_tokenizer
from .tokenizer import (BPE_FILE, ENDOFTEXT, VOCAB_FILE, BPETokenizer, CharTokenizer, Tokenizer, WordTokenizer,
                        _import_tokenizers)


def _bpe_from_str(text: str, source: str) -> BPETokenizer:
    tk = _import_tokenizers()
    try:
        return BPETokenizer(tk.Tokenizer.from_str(text))
    except Exception as error:  # the library raises plain Exception for malformed input
        raise PicoGPTError(f"{source} is not a valid BPE tokenizer ({error}): prepare the data again") from None


def _tokenizer_from_dict(description: dict, source: str) -> Tokenizer:
    kind = description.get("kind")
    if kind == "char" and isinstance(description.get("chars"), list):
        return CharTokenizer(description["chars"], endoftext=description.get("endoftext") is True)
    if kind == "word" and isinstance(description.get("tokens"), list):
        return WordTokenizer(description["tokens"])
    if kind == "bpe" and isinstance(description.get("tokenizer"), dict) and "special_tokens" in description:
        return from_description(description, source)  # a pretrained model's, with its bos/eos/pad
    if kind == "bpe" and isinstance(description.get("tokenizer"), dict):
        return _bpe_from_str(json.dumps(description["tokenizer"]), source)
    raise PicoGPTError(f"{source} does not describe a char, bpe or word tokenizer: it is damaged or not ours")


def tokenizer_from_json(text: str) -> Tokenizer:
    """Rebuild a tokenizer from `to_json()` output, for example from a checkpoint's hyperparameters."""
    try:
        description = json.loads(text)
    except json.JSONDecodeError as error:
        raise PicoGPTError(f"the tokenizer description is not valid JSON ({error}): it is damaged") from None
    if not isinstance(description, dict):
        raise PicoGPTError("the tokenizer description is not a JSON object: it is damaged")
    return _tokenizer_from_dict(description, "the tokenizer description")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a saved `vocab.json` or `tokenizer.json`; given a folder, load the one it holds. A Hugging Face
    model folder (or its tokenizer.json) gives the model's tokenizer with its special tokens."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if (path.is_dir() or path.name == BPE_FILE) and is_pretrained_folder(folder):
        return load_pretrained_tokenizer(folder)
    if path.is_dir():
        path = path / BPE_FILE if (path / BPE_FILE).exists() else path / VOCAB_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8"
        raise PicoGPTError(f"cannot read the tokenizer file {path} ({reason}): prepare the data again") from None
    try:
        description = json.loads(text)
    except json.JSONDecodeError:
        raise PicoGPTError(f"{path} is not valid JSON: the file is damaged; prepare the data again") from None
    if isinstance(description, dict) and "kind" in description:
        return _tokenizer_from_dict(description, str(path))
    if isinstance(description, dict) and isinstance(description.get("model"), dict):
        return _bpe_from_str(text, str(path))  # a standard Hugging Face tokenizer.json
    raise PicoGPTError(f"{path} is not a tokenizer file: prepare the data again")


GPT2_ENCODER_FILE = "encoder.json"  # GPT-2's own release: token -> id ...
GPT2_MERGES_FILE = "vocab.bpe"  # ... and its merges, one "left right" pair a line, after a #version line


def load_gpt2_files(encoder: str | os.PathLike, merges: str | os.PathLike) -> BPETokenizer:
    """GPT-2's byte-level BPE from its two original files, as a BPETokenizer (GPT-2's pre-tokenizer regex,
    no prefix space, <|endoftext|> as its special end-of-text token when the vocabulary has it)."""
    tk = _import_tokenizers()
    for path in (encoder, merges):
        if not Path(path).is_file():
            raise PicoGPTError(f"{path} does not exist: GPT-2's tokenizer needs both {GPT2_ENCODER_FILE} and "
                               f"{GPT2_MERGES_FILE} in one folder")
    try:
        model = tk.models.BPE.from_file(str(encoder), str(merges))
    except Exception as error:  # the library raises plain Exception for malformed files
        raise PicoGPTError(f"{encoder} and {merges} are not GPT-2 tokenizer files ({error}): give GPT-2's "
                           f"{GPT2_ENCODER_FILE} and {GPT2_MERGES_FILE}") from None
    tokenizer = tk.Tokenizer(model)
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    if tokenizer.token_to_id(ENDOFTEXT) is not None:
        tokenizer.add_special_tokens([ENDOFTEXT])  # keeps its id; the literal text then encodes to it
    return BPETokenizer(tokenizer)
