"""Warm start: a new model takes the weights (only) of a checkpoint, before its first step.

`warm_start_weights` loads what fits into a GPT: every weight of the same name and shape; with another
tokenizer than the checkpoint's, the token-indexed tensors (embedding, output layer) are mapped token by token
(`token_mapping`), since row i of the checkpoint's would otherwise land on another token. `strict` refuses
anything short of a complete, same-tokenizer load. Nothing here imports Lightning; the LightningModule calls it
once, when a new run starts (module.GPTLightningModule.warm_start).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import model_state_dict, read_checkpoint
from .errors import PicoGPTError
from .model import GPT
from .resume import same_tokenizer
from .tokenizer import Tokenizer, vocabulary
from .tokenizer_files import tokenizer_from_json

TOKEN_INDEXED = ("wte.weight", "lm_head.weight", "lm_head.bias")  # one row per token id


@dataclass
class TokenMapping:
    """How a checkpoint's token rows map onto ours, when its tokenizer is another one.

    rows: (its row, our row) pairs, shape (n, 2), for the tokens both vocabularies have; None between
        tokenizers of different kinds, whose rows cannot be matched.
    note: the overlap in words, for the message.
    """

    rows: torch.Tensor | None
    note: str


def token_mapping(checkpoint: dict, tokenizer: Tokenizer | None) -> TokenMapping | None:
    """None when the checkpoint's tokenizer is `tokenizer` (or either is unknown): its ids mean the same tokens."""
    meta = checkpoint["picogpt"]
    if tokenizer is None or not meta.get("tokenizer") or same_tokenizer(meta, tokenizer):
        return None
    theirs = tokenizer_from_json(meta["tokenizer"])  # a damaged one is an error here, not a guess
    if theirs.kind != tokenizer.kind:
        return TokenMapping(None, f"a {theirs.kind} tokenizer, this data's is {tokenizer.kind}")
    index = {token: row for row, token in enumerate(vocabulary(theirs))}
    pairs = [(index[token], row) for row, token in enumerate(vocabulary(tokenizer)) if token in index]
    same_ids = sum(1 for their_row, our_row in pairs if their_row == our_row)
    note = (f"{len(pairs):,} of this data's {tokenizer.vocab_size:,} tokens are in its vocabulary, "
            f"{same_ids:,} of them under the same id")
    return TokenMapping(torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), note)


def warm_start_weights(model: GPT, path: str, strict: bool, tokenizer: Tokenizer | None = None) -> str:
    """Load the weights of the checkpoint at `path` into `model` (see the module docstring); returns the line
    that says what was loaded, mapped and left fresh."""
    checkpoint = read_checkpoint(path)
    source = model_state_dict(checkpoint)
    target = model.state_dict()
    mapping = token_mapping(checkpoint, tokenizer)
    if strict and mapping is not None:
        raise PicoGPTError(
            f"warm start from {path}: its tokenizer is not this data's ({mapping.note}); pass "
            f"--model.init_strict false to map the embeddings and output layer token by token"
        )
    token_tensors = [k for k in TOKEN_INDEXED if k in source and k in target] if mapping is not None else []
    mismatched = [k for k in source if k in target and source[k].shape != target[k].shape
                  and k not in token_tensors]
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    if strict and (mismatched or missing or unexpected):
        detail = "; ".join(
            [f"{k}: {tuple(source[k].shape)} in checkpoint vs {tuple(target[k].shape)} here" for k in mismatched[:3]]
            + [f"{what} {', '.join(keys[:3])}" for what, keys in (("missing", missing), ("unexpected", unexpected))
               if keys])
        raise PicoGPTError(f"warm start from {path} does not fit this model ({detail}); use the same model settings "
                           f"and data, or pass --model.init_strict false to load only the weights that match")
    loadable = {k: v for k, v in source.items()
                if k in target and v.shape == target[k].shape and k not in token_tensors}
    mapped = []
    for key in token_tensors:
        if mapping.rows is not None and source[key].shape[1:] == target[key].shape[1:]:
            tensor = target[key].clone()
            tensor[mapping.rows[:, 1]] = source[key][mapping.rows[:, 0]].to(tensor.dtype)
            loadable[key] = tensor
            mapped.append(key)
    model.load_state_dict(loadable, strict=False)
    skipped = sorted(set(mismatched) | set(missing) | (set(token_tensors) - set(mapped)))
    message = f"warm start: loaded {len(loadable)} tensors from {path}"
    if mapped:
        message += f"; mapped {', '.join(mapped)} token by token ({mapping.note})"
    if skipped:
        message += f"; kept fresh initialisation for {len(skipped)}: {', '.join(skipped)}"
    return message
