"""Muon steps on a tiny GPT with fixed gradients, in one process or on two gloo ranks, with replicated weights
(as DDP holds them) or sharded ones (FSDP2, as `--trainer.strategy fsdp` holds them):
`python muon_ranks.py OUT PORT [ddp|fsdp]` writes the whole weights after the steps, and how many matrices
each rank orthogonalised (test use only)."""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from picogpt_lightning import optim
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.optim import MuonAdamW, OptimizerSettings, param_groups

STEPS = 3


def muon_steps(sharded: bool = False) -> dict:
    """The weights after STEPS steps of Muon (and AdamW) with gradients drawn from a fixed seed; the same on
    every rank, as DDP's averaged gradients are (under FSDP each rank keeps its rows of them)."""
    from picogpt_lightning.sharding import shard_model, whole_tensors
    from torch.distributed.tensor import DTensor, distribute_tensor

    torch.manual_seed(0)
    # Three layers of four shapes: 3 matrices per shape, shared out unevenly over 2 ranks (2 + 1).
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=3, n_head=2, n_embd=16, mlp="relu2"))
    if sharded:
        shard_model(model, torch.device("cpu"))
    optimizer = MuonAdamW(param_groups(model.named_parameters(), OptimizerSettings(optimizer="muon")))
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for param in model.parameters():
            grad = torch.randn(param.shape, generator=generator)
            param.grad = (distribute_tensor(grad, param.device_mesh, param.placements, src_data_rank=None)
                          if isinstance(param, DTensor) else grad)
        optimizer.step()
    return {name: value.clone() for name, value in whole_tensors(model.state_dict()).items()}


def counting_orthogonalize() -> list[int]:
    """Count the matrices this process orthogonalises (a list holding the count)."""
    counted, orthogonalize = [0], optim.orthogonalize

    def counting(matrices, *args, **kwargs):
        counted[0] += matrices.size(0)
        return orthogonalize(matrices, *args, **kwargs)

    optim.orthogonalize = counting
    return counted


def _rank(rank: int, world_size: int, out: str, strategy: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    counted = counting_orthogonalize()
    weights = muon_steps(sharded=strategy == "fsdp")
    counts = [None] * world_size
    dist.all_gather_object(counts, counted[0])
    if rank == 0:
        torch.save({"weights": weights, "orthogonalised": counts}, out)
    dist.destroy_process_group()
    # About one exit in five aborted after Python had finished ("terminate called without an active exception",
    # no Python frame: a C++ destructor at interpreter exit), failing the run after its results were written.
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if len(sys.argv) > 2:  # the caller's free port wins over one a parent process left in the environment
        os.environ["MASTER_PORT"] = sys.argv[2]
    os.environ.setdefault("MASTER_PORT", "29531")
    mp.spawn(_rank, args=(2, sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else "ddp"), nprocs=2)
