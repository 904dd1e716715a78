"""Every process of a distributed run must train on the same prepared data.

Each machine's local rank 0 prepares the text on that machine's disk (data.py), so machines with their own
disks prepare it separately; a copy of the corpus that differs between them, or other data settings on one
of them, would train the shared model on token ids that mean different things on different ranks, silently.
Once the processes are connected, their preparations' identities (the text's and the tokenizer's sha256, the
token counts and the bins' checksums, all from meta.json) are compared: a difference stops every rank with
one line naming the rank and what differs.
"""

from __future__ import annotations

import socket

from .errors import PicoGPTError

IDENTITY_KEYS = ("text_sha256", "tokenizer_sha256", "vocab_size", "train_tokens", "val_tokens", "checksums")
SAID = {"text_sha256": "text sha256", "tokenizer_sha256": "tokenizer sha256", "checksums": "bin checksums"}


def identity(meta: dict) -> dict:
    """What makes two preparations the same data, from their meta.json."""
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    return {"text_sha256": source.get("sha256"), **{key: meta.get(key) for key in IDENTITY_KEYS[1:]}}


def check_same_data(meta: dict, folder: str) -> None:
    """Compare this rank's prepared data with every other rank's; the same PicoGPTError on every rank when one
    differs. Nothing to do outside a distributed run."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = {"identity": identity(meta), "folder": folder, "host": socket.gethostname()}
    everyone: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    message = difference(everyone)
    if message:
        raise PicoGPTError(message)


def difference(everyone: list[dict]) -> str | None:
    """The one-line report of the first rank whose data differs from rank 0's, or None."""
    first = everyone[0]
    for rank, other in enumerate(everyone[1:], start=1):
        if other["identity"] == first["identity"]:
            continue
        key = next(key for key in IDENTITY_KEYS if other["identity"][key] != first["identity"][key])
        return (f"rank {rank} ({other['host']}: {other['folder']}) prepared other data than rank 0 "
                f"({first['host']}: {first['folder']}): its {SAID.get(key, key.replace('_', ' '))} is "
                f"{_short(other['identity'][key])}, rank 0's {_short(first['identity'][key])}; every machine must "
                f"read the same text with the same data settings (a copy of the corpus that differs between disks?)")
    return None


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:16]}..."
