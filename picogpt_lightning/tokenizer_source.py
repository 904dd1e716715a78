"""Which tokenizer `tokenizer_from` names, and the model vocabulary that goes with it.

`tokenizer_from` may name a checkpoint (the tokenizer it was trained with), a tokenizer.json or vocab.json, a
prepared folder or a Hugging Face model folder (its tokenizer.json), or GPT-2's two original files,
encoder.json and vocab.bpe (either file, or the folder that holds them). A model trained from scratch on a
tokenizer read from a file gets a vocabulary rounded up to a multiple of VOCAB_MULTIPLE: the embedding and output
layer then have shapes that matrix kernels run faster on (nanoGPT pads GPT-2's 50,257 to 50,304 for that). The
extra ids never occur in the data, so training pushes their logits down, and sampling never picks them
(generate.py keeps only the tokenizer's ids).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PicoGPTError, warn
from .tokenizer import BPE_FILE, VOCAB_FILE, Tokenizer
from .tokenizer_files import GPT2_ENCODER_FILE, GPT2_MERGES_FILE, load_gpt2_files, load_tokenizer, tokenizer_from_json

VOCAB_MULTIPLE = 64
# A text cut where corpus.py cuts chunks (after a newline): tokenizers that encode the two pieces as the whole
# (GPT-2's byte-level BPE and ours) give the same ids chunk by chunk as for the whole text.
CUT_PROBE = ("The first line ends here.\n", "Second line, and more words")


def is_checkpoint_path(path: str | os.PathLike) -> bool:
    """Whether tokenizer_from names a checkpoint (any file but a .json or GPT-2's vocab.bpe) rather than a
    tokenizer file or folder."""
    path = Path(path)
    return not (path.is_dir() or path.suffix == ".json" or path.name == GPT2_MERGES_FILE)


def tokenizer_from_path(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint (.ckpt, the one it was trained with), a tokenizer.json or vocab.json, a
    prepared or Hugging Face folder (its tokenizer.json), or GPT-2's encoder.json and vocab.bpe (either file, or
    the folder that holds them)."""
    path = Path(path)
    if path.name in (GPT2_ENCODER_FILE, GPT2_MERGES_FILE):
        return load_gpt2_files(path.with_name(GPT2_ENCODER_FILE), path.with_name(GPT2_MERGES_FILE))
    if path.is_dir() and not any((path / name).exists() for name in (BPE_FILE, VOCAB_FILE)):
        if not (path / GPT2_ENCODER_FILE).exists():
            raise PicoGPTError(f"{path} holds no tokenizer ({BPE_FILE}, {VOCAB_FILE}, or GPT-2's "
                               f"{GPT2_ENCODER_FILE} and {GPT2_MERGES_FILE}): give a folder or file that has one")
        return load_gpt2_files(path / GPT2_ENCODER_FILE, path / GPT2_MERGES_FILE)
    if not is_checkpoint_path(path):
        return load_tokenizer(path)
    from .checkpoint import read_checkpoint  # torch only when a checkpoint is given

    meta = read_checkpoint(path)["picogpt"]
    if not meta.get("tokenizer"):
        raise PicoGPTError(f"{path} holds no tokenizer; use a checkpoint written by `picogpt fit`, or a "
                           f"tokenizer.json or vocab.json")
    return tokenizer_from_json(meta["tokenizer"])


def model_vocab_size(tokenizer_vocab_size: int, tokenizer_from: str | os.PathLike | None) -> int:
    """The vocabulary of a new model trained on ids of this tokenizer: rounded up to a multiple of
    VOCAB_MULTIPLE when the tokenizer is read from a tokenizer file or folder. One trained here, or a checkpoint's
    (which a resumed run uses), keeps its exact size, so that runs trained before this rule resume as they were."""
    if tokenizer_from is None or is_checkpoint_path(tokenizer_from):
        return tokenizer_vocab_size
    return -(-tokenizer_vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def note_given_tokenizer(tokenizer: Tokenizer, source: str, end_of_text: bool) -> None:
    """Say, in one line each, what a BPE tokenizer read from elsewhere changes in the prepared ids: no
    end-of-text token, or a text cut into chunks encoded differently from the whole (a prefix space or a
    word marker added at the start of every text, as SentencePiece-style tokenizers do)."""
    if tokenizer.kind != "bpe":
        return
    if end_of_text and tokenizer.eot_id is None:
        warn(f"the tokenizer of {source} has no end-of-text token: documents are joined without one (a blank "
             f"line between them), so a model trained on them does not learn where a text ends")
    library = tokenizer.tokenizer
    whole = library.encode("".join(CUT_PROBE), add_special_tokens=False).ids
    pieces = [id for piece in CUT_PROBE for id in library.encode(piece, add_special_tokens=False).ids]
    if whole != pieces:
        warn(f"the tokenizer of {source} encodes a text cut in two differently from the whole text (it marks the "
             f"start of every text it encodes): the text is encoded in 4 KB chunks, so a token at each chunk's "
             f"start may differ from encoding each document at once")
