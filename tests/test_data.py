import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from picogpt_lightning.data import FixedBlocks, GPTDataModule, RandomBlocks, validation_starts
from picogpt_lightning.errors import PicoGPTError

from helpers import make_text


@pytest.fixture
def bin_file(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    return str(path)


def first_batches(dataset, count):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(count)]


def test_blocks_are_shifted_targets_of_the_same_text(bin_file):
    x, y = first_batches(RandomBlocks(bin_file, "uint16", 8, 4, seed=1, rank=0), 1)[0]
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))


def test_batch_k_depends_only_on_seed_rank_and_k(bin_file):
    straight = first_batches(RandomBlocks(bin_file, "uint16", 8, 4, seed=1, rank=0), 5)
    resumed = first_batches(RandomBlocks(bin_file, "uint16", 8, 4, seed=1, rank=0, first_batch=3), 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(straight[3:], resumed))
    other_seed = first_batches(RandomBlocks(bin_file, "uint16", 8, 4, seed=2, rank=0), 1)
    assert not torch.equal(straight[0][0], other_seed[0][0])


def test_distributed_ranks_draw_different_blocks(bin_file):
    rank0 = first_batches(RandomBlocks(bin_file, "uint16", 8, 4, seed=1, rank=0), 3)
    rank1 = first_batches(RandomBlocks(bin_file, "uint16", 8, 4, seed=1, rank=1), 3)
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(rank0, rank1))


def test_the_stream_is_the_same_with_loader_workers(bin_file):
    dataset = RandomBlocks(bin_file, "uint16", 8, 4, seed=1, rank=0)
    plain = first_batches(dataset, 4)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    with_workers = first_batches(loader, 4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, with_workers))


def test_small_val_split_is_evaluated_whole_and_large_one_by_fixed_sample():
    whole = validation_starts(val_tokens=100, block_size=8, batch_size=4, eval_iters=10, seed=0)
    assert np.array_equal(np.concatenate(whole), np.arange(0, 92, 8))
    sampled = validation_starts(val_tokens=100_000, block_size=8, batch_size=4, eval_iters=10, seed=0)
    again = validation_starts(val_tokens=100_000, block_size=8, batch_size=4, eval_iters=10, seed=0)
    assert len(sampled) == 10 and all(np.array_equal(a, b) for a, b in zip(sampled, again))


def test_val_batches_are_split_between_ranks_without_overlap(bin_file):
    starts = validation_starts(val_tokens=1000, block_size=8, batch_size=4, eval_iters=100, seed=0)
    shares = [FixedBlocks(bin_file, "uint16", 8, starts, rank, 2) for rank in (0, 1)]
    assert len(shares[0].starts) + len(shares[1].starts) == len(starts)  # the real ones; padding aside
    seen = sorted(int(s) for share in shares for batch in share.starts for s in batch)
    assert seen == sorted(int(s) for batch in starts for s in batch)


def test_datamodule_prepares_and_exposes_vocab_and_sizes(tmp_path):
    text = make_text(tmp_path / "t.txt")
    data = GPTDataModule(str(text), mode="char", block_size=16, batch_size=2, cache_dir=str(tmp_path / "c"))
    assert data.tokenizer_vocab_size == len(set(text.read_text())) + 1  # the characters and <|endoftext|>
    assert data.train_tokens > 0.85 * len(text.read_text())
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (2, 16)


def test_block_size_larger_than_the_val_split_is_a_clear_error(tmp_path):
    text = make_text(tmp_path / "t.txt", sentences=40)
    data = GPTDataModule(str(text), mode="char", block_size=512, cache_dir=str(tmp_path / "c"))
    with pytest.raises(PicoGPTError, match="val split has .* tokens, fewer than block_size"):
        data.tokenizer_vocab_size


def test_ranks_get_as_many_val_batches_each_and_the_padding_carries_no_loss(bin_file):
    """Under fsdp every forward is a collective: a rank with one batch fewer would leave the other waiting."""
    starts = validation_starts(val_tokens=1000, block_size=8, batch_size=4, eval_iters=5, seed=0)
    shares = [list(FixedBlocks(bin_file, "uint16", 8, starts, rank, 2)) for rank in (0, 1)]
    assert [len(share) for share in shares] == [3, 3]
    assert [bool((targets >= 0).any()) for _, targets in shares[1]] == [True, True, False]
    assert sum(int((targets >= 0).sum()) for share in shares for _, targets in share) == 5 * 4 * 8
