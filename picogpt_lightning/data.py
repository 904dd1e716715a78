"""The LightningDataModule: finds or builds the prepared data, memory-maps it, serves random blocks.

Training batches are random blocks, and batch k is a pure function of (seed, rank, k). Resuming at step s
therefore continues with exactly the batches an uninterrupted run would have seen, and every distributed rank
draws different blocks, with no sampler state to save beyond the step count. Validation uses a fixed, seeded set
of blocks (or the whole val split when it is small), so val losses at different steps are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import PicoGPTError, SettingsError
from .launch import local_rank
from .prepare import DEFAULT_CACHE_DIR, PrepareSettings, cached_prepare, load_prepared
from .same_data import check_same_data
from .settings import check_seed
from .tokenizer import Tokenizer, fingerprint
from .tokenizer_source import model_vocab_size

Batch = tuple[torch.Tensor, torch.Tensor]
PREPARE = PrepareSettings()  # the preparation defaults, defined once in prepare.py
DEFAULT_SEED = 1337


def _blocks(data: np.ndarray, starts: np.ndarray, block_size: int, vocab_size: int) -> Batch:
    rows = np.stack([data[s : s + block_size + 1] for s in starts]).astype(np.int64)
    if rows.max(initial=0) >= vocab_size:  # microseconds per batch; the embedding would fail with an IndexError
        raise PicoGPTError(
            f"{data.filename} holds token id {rows.max()}, beyond the tokenizer's {vocab_size} tokens: the "
            f"prepared data is damaged; delete its folder and prepare again"
        )
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


@dataclass(frozen=True)
class BlockSettings:
    """How the prepared tokens are served: the data module's own settings and their defaults, defined once
    (PrepareSettings has the preparation's). A SettingsError names the flag.

    block_size: context length in tokens (also the model's; linked by the CLI).
    batch_size: blocks per batch on each device.
    eval_iters: validation batches per evaluation (the whole val split when it is smaller).
    seed: seed of the block sampling; None: the run's seed_everything, or DEFAULT_SEED outside the command line.
    num_workers: DataLoader workers; 0 (load in the training process) is fastest for memory-mapped blocks.
    """

    block_size: int = 256
    batch_size: int = 16
    eval_iters: int = 50
    seed: int | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "batch_size", "eval_iters"):
            if getattr(self, name) < 1:
                raise SettingsError(f"data.{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise SettingsError(f"data.num_workers must be 0 (load in the training process) or more, got "
                                f"{self.num_workers}")
        check_seed(self.seed, "data.seed")


class RandomBlocks(IterableDataset):
    """An endless stream of batches of random blocks; batch k depends only on (seed, rank, k).

    With several loader workers, worker w makes batches k = w, w + n, ... and the loader interleaves them in
    that order, so the stream is the same for any number of workers.
    """

    def __init__(self, path: str, dtype: str, block_size: int, batch_size: int, seed: int, rank: int,
                 first_batch: int = 0, vocab_size: int = 1 << 32):
        self.path, self.dtype, self.vocab_size = path, dtype, vocab_size
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank, self.first_batch = seed, rank, first_batch

    def batch(self, data: np.ndarray, index: int) -> Batch:
        rng = np.random.default_rng([self.seed, self.rank, index])
        starts = rng.integers(0, len(data) - self.block_size, size=self.batch_size)
        return _blocks(data, starts, self.block_size, self.vocab_size)

    def __iter__(self) -> Iterator[Batch]:
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        worker = get_worker_info()
        index, stride = self.first_batch, 1
        if worker is not None:
            index, stride = index + worker.id, worker.num_workers
        while True:
            yield self.batch(data, index)
            index += stride


def rank_share(items: list, rank: int, world_size: int) -> tuple[list, int]:
    """This rank's share of the validation batches `items` (every world_size-th one), and how many batches it
    must add so that every rank runs as many as the busiest one.

    Under fsdp each forward is a collective (a block's weights are gathered from every rank): a rank with one
    batch fewer would leave the others waiting in their last forward forever. The added batches are copies of
    a real one with every target ignored (`ignored_targets`), which count for nothing in the val loss."""
    share = items[rank::world_size]
    return share, -(-len(items) // world_size) - len(share)


def ignored_targets(batch: Batch) -> Batch:
    inputs, targets = batch
    return inputs, torch.full_like(targets, -1)


class FixedBlocks(IterableDataset):
    """The validation batches: this rank's share (every world_size-th batch) of a fixed list of block starts,
    padded to the busiest rank's count (`rank_share`)."""

    def __init__(self, path: str, dtype: str, block_size: int, starts: list[np.ndarray], rank: int, world_size: int,
                 vocab_size: int = 1 << 32):
        self.path, self.dtype, self.block_size, self.vocab_size = path, dtype, block_size, vocab_size
        self.starts, self.padding = rank_share(starts, rank, world_size)
        self.padding_starts = starts[0] if starts else None

    def __len__(self) -> int:
        return len(self.starts) + self.padding

    def __iter__(self) -> Iterator[Batch]:
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        for starts in self.starts:
            yield _blocks(data, starts, self.block_size, self.vocab_size)
        for _ in range(self.padding):
            yield ignored_targets(_blocks(data, self.padding_starts, self.block_size, self.vocab_size))


def validation_starts(val_tokens: int, block_size: int, batch_size: int, eval_iters: int, seed: int) -> list[np.ndarray]:
    """Block starts of the val batches: every non-overlapping block when the split has at most
    eval_iters * batch_size of them (the whole split, exactly), else eval_iters seeded random batches."""
    whole = np.arange(0, val_tokens - block_size, block_size)
    if len(whole) <= eval_iters * batch_size:
        return [whole[i : i + batch_size] for i in range(0, len(whole), batch_size)]
    rng = np.random.default_rng([seed, 0x7A1])
    return [rng.integers(0, val_tokens - block_size, size=batch_size) for _ in range(eval_iters)]


class GPTDataModule(L.LightningDataModule):
    """Text prepared once (prepare.py, cached) and served as random blocks for training, fixed ones for validation.

    Args:
        text_path: a text, JSON lines or Parquet file (plain or .gz), or a folder of them searched at any
            depth; each file (text) or record (JSON lines, Parquet) is one document.
        mode: "char" (one token per character) or "token" (subword or word tokens).
        backend: tokenizer for mode "token": byte-level "bpe" (Hugging Face tokenizers) or "word".
        vocab_size: vocabulary size to train for mode "token" (ignored for "char").
        val_fraction: share of the text held out for validation.
        random_split: split in random chunks (seeded by split_seed) instead of taking the end of the text.
        split_seed: seed of the random split.
        end_of_text: end each document (each file, each Q/A pair that ends a paragraph) with the
            end-of-text token when the tokenizer has one, so a model learns to stop.
        tokenizer_from: encode with the tokenizer of this checkpoint, tokenizer.json, vocab.json, prepared
            or Hugging Face folder, or GPT-2's encoder.json + vocab.bpe, instead of training one (read from a
            file, the model's vocabulary is its size rounded up to a multiple of 64); `--ckpt_path` (resume,
            validate) sets it to the checkpoint when not given, so ids keep their meaning.
        glob: for a folder text_path, the files to read, matched at any depth (e.g. '*.jsonl.gz');
            default: every .txt, .md, .jsonl and .parquet file, plain or gzipped.
        text_field: the JSON lines field or Parquet column that holds each document's text.
        num_proc: processes that encode the text when it is prepared (same ids whatever the number); default
            (null): the cores this process may use.
        block_size: context length in tokens (also the model's; linked by the CLI).
        batch_size: blocks per batch on each device.
        eval_iters: validation batches per evaluation (the whole val split when it is smaller).
        seed: seed of the training and validation block sampling; default (null): the run's seed_everything
            (so one seed changes the whole run), or 1337 outside the command line.
        cache_dir: where prepared data is cached, keyed by the text and the settings above (with
            tokenizer_from, by the tokenizer's sha256 instead of mode, backend and vocab_size).
        prepared_dir: use this prepared folder (from `picogpt prepare --out_dir`) instead of text_path.
        num_workers: DataLoader workers; 0 (load in the training process) is fastest for memory-mapped blocks.
    """

    def __init__(
        self,
        text_path: str = "data/philosophy.txt",
        mode: Literal["char", "token"] = PREPARE.mode,
        backend: Literal["bpe", "word"] = PREPARE.backend,
        vocab_size: int = PREPARE.vocab_size,
        val_fraction: float = PREPARE.val_fraction,
        random_split: bool = PREPARE.random_split,
        split_seed: int = PREPARE.split_seed,
        end_of_text: bool = PREPARE.end_of_text,
        tokenizer_from: str | None = PREPARE.tokenizer_from,
        glob: str | None = PREPARE.glob,
        text_field: str = PREPARE.text_field,
        num_proc: int | None = PREPARE.num_proc,
        block_size: int = BlockSettings.block_size,
        batch_size: int = BlockSettings.batch_size,
        eval_iters: int = BlockSettings.eval_iters,
        seed: int | None = BlockSettings.seed,
        cache_dir: str = DEFAULT_CACHE_DIR,
        prepared_dir: str | None = None,
        num_workers: int = BlockSettings.num_workers,
    ):
        super().__init__()
        # Not merged into the logger's hparams: data.vocab_size (requested) would clash with the model's (actual).
        self.save_hyperparameters(logger=False)
        BlockSettings(block_size, batch_size, eval_iters, seed, num_workers)
        self.seed = DEFAULT_SEED if seed is None else seed

    @cached_property
    def prepared(self) -> tuple[Path, dict, Tokenizer]:
        """The prepared folder, its meta.json and tokenizer, preparing it on first use (local rank 0 writes,
        other ranks wait for it)."""
        hp = self.hparams
        if hp.prepared_dir is not None:
            folder = Path(hp.prepared_dir)
        else:
            settings = {name: hp[name] for name in PrepareSettings.__dataclass_fields__}
            folder = cached_prepare(hp.text_path, hp.cache_dir, is_writer=local_rank() == 0, **settings)
        meta, tokenizer = load_prepared(folder)
        for split in ("train", "val"):
            tokens = meta[f"{split}_tokens"]
            if tokens < hp.block_size + 1:
                raise PicoGPTError(
                    f"the {split} split has {tokens} tokens, fewer than block_size + 1 = {hp.block_size + 1}; "
                    f"use a longer text, a smaller --data.block_size"
                    + (" or a larger --data.val_fraction" if split == "val" else "")
                )
        return folder, meta, tokenizer

    # Read by the CLI when it builds the model: the vocabulary and the data size are known only once prepared.
    @property
    def tokenizer(self) -> Tokenizer:
        return self.prepared[2]

    @property
    def tokenizer_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def model_vocab_size(self) -> int:
        """The model's vocabulary: the tokenizer's, rounded up to a multiple of 64 when tokenizer_from is a
        tokenizer file or folder (tokenizer_source.py); the extra ids are never in the data nor sampled."""
        return model_vocab_size(self.tokenizer_vocab_size, self.hparams.tokenizer_from)

    @cached_property
    def tokenizer_sha256(self) -> str:
        return self.prepared[1].get("tokenizer_sha256") or fingerprint(self.tokenizer)

    @property
    def train_tokens(self) -> int:
        return int(self.prepared[1]["train_tokens"])

    def describe(self) -> dict:
        """Plain facts about the training data, stored in every checkpoint."""
        folder, meta, _ = self.prepared
        return {"prepared_dir": str(folder), **{k: meta[k] for k in meta if k != "format"}}

    def _bin(self, split: str) -> str:
        return str(self.prepared[0] / f"{split}.bin")

    def setup(self, stage: str) -> None:
        # Every rank is connected now: each machine prepared its own copy, and they must be the same data.
        folder, meta, _ = self.prepared
        check_same_data(meta, str(folder))

    def train_dataloader(self) -> DataLoader:
        hp, meta = self.hparams, self.prepared[1]
        trainer = self.trainer
        # Batches already consumed: Lightning restores global_step before it asks for the loader.
        first_batch = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        rank = trainer.global_rank if trainer else 0
        dataset = RandomBlocks(self._bin("train"), meta["dtype"], hp.block_size, hp.batch_size, self.seed, rank,
                               first_batch, self.tokenizer_vocab_size)
        return self._loader(dataset)

    def val_dataloader(self) -> DataLoader:
        hp, meta = self.hparams, self.prepared[1]
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        starts = validation_starts(meta["val_tokens"], hp.block_size, hp.batch_size, hp.eval_iters, self.seed)
        return self._loader(FixedBlocks(self._bin("val"), meta["dtype"], hp.block_size, starts, rank, world,
                                        self.tokenizer_vocab_size))

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        workers = self.hparams.num_workers
        pin = bool(self.trainer is not None and self.trainer.strategy.root_device.type == "cuda")
        return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin,
                          persistent_workers=workers > 0)
