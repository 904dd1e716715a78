"""The LightningDataModule of `picogpt finetune`: conversations in, packed blocks with answer-only targets out.

The conversations (JSONL, conversation.py) are split into train and val by a seeded choice of whole
conversations, rendered with the chat template, encoded with the base model's own tokenizer (never a new one)
and packed into blocks of block_size + 1 tokens. Targets are -1 outside the answers and their end-of-text, and
the loss never crosses from one conversation into the next (`conversation.pack_conversations`).

Training batch k is a pure function of (seed, rank, world size, k): the train blocks are read in a fresh seeded
order every epoch, and batch k takes the next batch_size of them for its rank. Resuming at step s therefore
continues with exactly the batches an uninterrupted run would have seen, with nothing to save but the step, as
for pretraining (data.py). Validation is every val block, in order: the loss on held-out conversations'
answers, comparable between steps.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .chat_template import ChatTemplate, get_template
from .conversation import (
    PackedBlocks,
    conversation_files,
    describe_empty_answers,
    empty_answers,
    encode_conversations,
    pack_conversations,
    read_conversations,
    split_conversations,
)
from .corpus import source_sha256
from .data import ignored_targets, rank_share
from .errors import PicoGPTError, warn
from .prepare import tokenizer_from_path
from .tokenizer_source import model_vocab_size
from .tokenizer import Tokenizer, fingerprint
from .tokenizer_files import tokenizer_from_json

Batch = tuple[torch.Tensor, torch.Tensor]
DEFAULT_CONVERSATIONS = "data/philosophy-chat.jsonl"


class ShuffledBlocks(IterableDataset):
    """An endless stream of batches of packed blocks; batch k depends only on (seed, rank, world_size, k).

    The blocks are read epoch after epoch, each epoch in its own seeded order; the ranks take turns, so within
    an epoch no two ranks train on the same block. With several loader workers, worker w makes batches
    k = w, w + n, ..., which the loader interleaves back into the same stream.
    """

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, first_batch: int = 0):
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.first_batch = rank, world_size, first_batch
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` reads the blocks."""
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.inputs))
        return self._orders[epoch]

    def indices(self, index: int) -> np.ndarray:
        """The blocks of batch `index` of this rank: positions of the stream of every epoch's order."""
        count = len(self.inputs)
        first = (index * self.world_size + self.rank) * self.batch_size
        positions = np.arange(first, first + self.batch_size)
        return np.array([self.order(int(p // count))[p % count] for p in positions], dtype=np.int64)

    def batch(self, index: int) -> Batch:
        rows = self.indices(index)
        return torch.from_numpy(self.inputs[rows]), torch.from_numpy(self.targets[rows])

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        index, stride = self.first_batch, 1
        if worker is not None:
            index, stride = index + worker.id, worker.num_workers
        while True:
            yield self.batch(index)
            index += stride


class HeldOutBlocks(IterableDataset):
    """The validation batches: this rank's share (every world_size-th batch) of the val blocks, in order, padded
    to the busiest rank's count (data.rank_share)."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, batch_size: int, max_batches: int | None = None,
                 rank: int = 0, world_size: int = 1):
        starts = list(range(0, len(inputs), batch_size))[:max_batches]
        share, padding = rank_share(starts, rank, world_size)
        self.batches = [(torch.from_numpy(inputs[s : s + batch_size]), torch.from_numpy(targets[s : s + batch_size]))
                        for s in share + starts[:1] * padding]
        if padding:
            self.batches[-padding:] = [ignored_targets(batch) for batch in self.batches[-padding:]]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        yield from self.batches


class ConversationData:
    """What the data module builds once: tokenizer, template, and the packed train and val blocks."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, train: PackedBlocks, val: PackedBlocks,
                 facts: dict, model_vocab_size: int | None = None):
        self.tokenizer, self.template = tokenizer, template
        self.train, self.val = train, val
        self.facts = facts
        self.model_vocab_size = model_vocab_size or tokenizer.vocab_size


def source_meta(path: str) -> dict | None:
    """The picogpt entry of a checkpoint at `path` (a Hugging Face model folder included: its import's), or
    None for a tokenizer file or folder."""
    if (Path(path).is_dir() and not (Path(path) / "config.json").is_file()) or Path(path).suffix == ".json":
        return None
    from .checkpoint import read_checkpoint

    return read_checkpoint(path)["picogpt"]


class ConversationDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str = DEFAULT_CONVERSATIONS,
        tokenizer_from: str | None = None,
        chat_template: str | dict | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 1337,
        block_size: int | None = None,
        batch_size: int = 16,
        eval_iters: int | None = None,
        seed: int = 1337,
        num_workers: int = 0,
    ):
        """
        Args:
            path: a .jsonl file of conversations ({"messages": [{"role": ..., "content": ...}, ...]} per line),
                or a folder of them (not recursive).
            tokenizer_from: the checkpoint (or tokenizer.json / vocab.json) whose tokenizer encodes the
                conversations; `picogpt finetune` sets it to the base checkpoint (on resume, the run's own).
            chat_template: how turns become text: qa ("Q: ..." / "A: ..."), im (ChatML-like), or a dict of
                system, user and assistant formats, each holding {content} once. Default: the template of the
                tokenizer_from checkpoint (the one it was fine-tuned with), else qa. Stored in the checkpoints.
            val_fraction: share of the conversations held out for validation (whole conversations).
            split_seed: seed of the choice of the held-out conversations.
            block_size: context length in tokens; default: the tokenizer_from checkpoint's. Conversations longer
                than block_size + 1 tokens are skipped (and counted), never cut.
            batch_size: blocks per batch on each device.
            eval_iters: validation batches per evaluation; null: every held-out conversation.
            seed: seed of the order in which the training blocks are read, epoch after epoch.
            num_workers: DataLoader workers; 0 (batches made in the training process) is fastest here.
        """
        super().__init__()
        self.save_hyperparameters(logger=False)
        for name in ("block_size", "batch_size", "eval_iters"):
            value = self.hparams[name]
            if value is not None and value < 1:
                raise PicoGPTError(f"data.{name} must be a positive integer, got {value}")

    # -------------------------------------------------------------------------------------- building

    @cached_property
    def data(self) -> ConversationData:
        """Read, split, encode and pack the conversations, once; every problem is one PicoGPTError."""
        hp = self.hparams
        if hp.tokenizer_from is None:
            raise PicoGPTError("data.tokenizer_from is not set: pass the checkpoint whose tokenizer the model uses "
                               "(`picogpt finetune` sets it from --model.init_from)")
        meta = source_meta(hp.tokenizer_from)
        if meta is not None and not meta.get("tokenizer"):
            raise PicoGPTError(f"{hp.tokenizer_from} holds no tokenizer; fine-tune from a checkpoint written by "
                               f"`picogpt fit`")
        tokenizer = tokenizer_from_json(meta["tokenizer"]) if meta else tokenizer_from_path(hp.tokenizer_from)
        template = get_template(hp.chat_template if hp.chat_template is not None
                                else (meta or {}).get("chat_template"))
        block_size = hp.block_size or (meta or {}).get("model_config", {}).get("block_size")
        self._base_vocab_size = (meta or {}).get("model_config", {}).get("vocab_size", 0)
        if not block_size:
            raise PicoGPTError(f"data.block_size is not set and {hp.tokenizer_from} is not a checkpoint that "
                               f"gives one; set --data.block_size to the model's context")
        conversations = read_conversations(hp.path)
        empty = empty_answers(conversations)
        if empty:
            self._warn(describe_empty_answers(empty))
        train, val = split_conversations(conversations, hp.val_fraction, hp.split_seed)
        # Trained in a seeded order rather than the file's, so a block mixes topics; then the order of the
        # blocks is shuffled again every epoch (ShuffledBlocks).
        order = np.random.default_rng([hp.split_seed, 1]).permutation(len(train))
        encoded_train, unseen = encode_conversations([train[i] for i in order], template, tokenizer)
        encoded_val, unseen_val = encode_conversations(val, template, tokenizer)
        unseen.add(unseen_val)
        pad = tokenizer.eot_id if tokenizer.eot_id is not None else 0  # never a target, so any id would do
        packed_train = self._pack(encoded_train, block_size, pad, "training")
        packed_val = self._pack(encoded_val, block_size, pad, "held-out")
        if unseen.counts:
            self._warn(f"{unseen.describe()}; mapped as generation maps them")
        skipped = packed_train.skipped + packed_val.skipped
        if skipped:
            self._warn(f"skipped {skipped:,} of {len(conversations):,} conversation(s) longer than the "
                       f"context ({block_size + 1} tokens with the next-token target); use a base model with a "
                       f"longer context to train on them")
        self._note(f"fine-tuning data: train {packed_train.describe()}; val {packed_val.conversations:,} held-out "
                   f"conversation(s) in {len(packed_val.inputs):,} block(s)")
        files = conversation_files(hp.path)
        facts = {
            "kind": "conversations",
            "source": {"name": Path(hp.path).name, "files": [file.name for file in files],
                       "bytes": sum(file.stat().st_size for file in files), "sha256": source_sha256(files)},
            "tokenizer_from": str(hp.tokenizer_from),
            "chat_template": template.name,
            "conversations": {"train": packed_train.conversations, "val": packed_val.conversations,
                              "skipped": skipped, "with_unseen_characters": unseen.conversations},
            "train_tokens": packed_train.tokens,
            "val_tokens": packed_val.tokens,
            "train_answer_tokens": int((packed_train.targets >= 0).sum()),
            "val_answer_tokens": int((packed_val.targets >= 0).sum()),
            "blocks": {"train": len(packed_train.inputs), "val": len(packed_val.inputs)},
        }
        # The base model's own vocabulary: it may be padded beyond its tokenizer's (tokenizer_source.py).
        vocab = (meta or {}).get("model_config", {}).get("vocab_size") or model_vocab_size(tokenizer.vocab_size,
                                                                                             hp.tokenizer_from)
        return ConversationData(tokenizer, template, packed_train, packed_val, facts, vocab)

    @staticmethod
    def _pack(encoded, block_size: int, pad: int, which: str) -> PackedBlocks:
        if not encoded:
            raise PicoGPTError(f"no {which} conversations; bring more conversations or change data.val_fraction")
        try:
            return pack_conversations(encoded, block_size, pad)
        except PicoGPTError as error:
            raise PicoGPTError(f"{which} data: {error}") from None

    @staticmethod
    @rank_zero_only
    def _note(message: str) -> None:
        print(message, flush=True)

    @staticmethod
    @rank_zero_only
    def _warn(message: str) -> None:
        warn(message)

    # -------------------------------------------------------------------------------------- read by the CLI

    @property
    def tokenizer(self) -> Tokenizer:
        return self.data.tokenizer

    @property
    def chat_template(self) -> ChatTemplate:
        """The template the conversations were rendered with; the module stores it in every checkpoint."""
        return self.data.template

    @cached_property
    def tokenizer_sha256(self) -> str:
        return fingerprint(self.tokenizer)

    @property
    def tokenizer_vocab_size(self) -> int:
        """Rows of the model's embedding: the tokenizer's size, or the base model's when larger (a padded
        vocabulary, as Qwen's: the rows past the tokenizer are kept, and never targets)."""
        return max(self.tokenizer.vocab_size, getattr(self, "_base_vocab_size", 0))

    @property
    def model_vocab_size(self) -> int:
        return self.data.model_vocab_size

    @property
    def train_tokens(self) -> int:
        return self.data.train.tokens

    def describe(self) -> dict:
        """Plain facts about the fine-tuning data, stored in every checkpoint."""
        return dict(self.data.facts)

    # -------------------------------------------------------------------------------------- loaders

    def train_dataloader(self) -> DataLoader:
        hp, packed = self.hparams, self.data.train
        trainer = self.trainer
        # Batches already consumed: Lightning restores global_step before it asks for the loader.
        first_batch = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        dataset = ShuffledBlocks(packed.inputs, packed.targets, hp.batch_size, hp.seed, rank, world, first_batch)
        return self._loader(dataset)

    def val_dataloader(self) -> DataLoader:
        hp, packed = self.hparams, self.data.val
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return self._loader(HeldOutBlocks(packed.inputs, packed.targets, hp.batch_size, hp.eval_iters, rank, world))

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        workers = self.hparams.num_workers
        pin = bool(self.trainer is not None and self.trainer.strategy.root_device.type == "cuda")
        return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin,
                          persistent_workers=workers > 0)
