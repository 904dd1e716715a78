"""Muon steps on a tiny GPT with fixed gradients, in one process or on two gloo ranks with replicated weights
(as DDP holds them): `python muon_ranks.py OUT` writes rank 0's weights after the steps (test use only)."""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.optim import MuonAdamW, OptimizerSettings, param_groups

STEPS = 3


def muon_steps() -> dict:
    """The weights after STEPS steps of Muon (and AdamW) with gradients drawn from a fixed seed; the same on
    every rank, as DDP's averaged gradients are."""
    torch.manual_seed(0)
    # Three layers of four shapes: 3 matrices per shape, shared out unevenly over 2 ranks (2 + 1).
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=3, n_head=2, n_embd=16, mlp="relu2"))
    optimizer = MuonAdamW(param_groups(model.named_parameters(), OptimizerSettings(optimizer="muon")))
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
    return {name: value.clone() for name, value in model.state_dict().items()}


def _rank(rank: int, world_size: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    weights = muon_steps()
    if rank == 0:
        torch.save(weights, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if len(sys.argv) > 2:  # the caller's free port wins over one a parent process left in the environment
        os.environ["MASTER_PORT"] = sys.argv[2]
    os.environ.setdefault("MASTER_PORT", "29531")
    mp.spawn(_rank, args=(2, sys.argv[1]), nprocs=2)
