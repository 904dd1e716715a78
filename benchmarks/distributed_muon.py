"""Muon's Newton-Schulz with the work shared out over ranks (muon_distributed.shared_out) against every rank doing
all of it, at 2 gloo ranks on this machine, and projected to 8 ranks from the per-matrix times; then the same
under FSDP (sharded updates: gathered whole, orthogonalised, each rank keeping its rows), shared out against
every rank orthogonalising every matrix (the way before the work was shared, kept here as the reference).

    python -m benchmarks.distributed_muon                          # a 6 x 384 GPT (SwiGLU)
    python -m benchmarks.distributed_muon --n_layer 12 --n_embd 768 --rounds 3   # GPT-2 small (slow on CPU)

The momentum updates are random and fixed (the same on both ranks, as DDP's averaged gradients make them); only
the orthogonalisation of the blocks' matrices and, when shared, the all-gather are timed. The two ways are
alternated round by round and medians reported. The projection to W ranks takes the measured time of
orthogonalising k matrices of each shape at once and sums, over the shapes, the time of ceil(count / W) of
them: the compute on the busiest rank. The all-gather's cost is measured at 2 ranks on loopback only; across
machines it depends on the network, so it is reported, not projected.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import machine_line, median, run_cli
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.muon_distributed import orthogonalized, shared_out
from picogpt_lightning.optim import is_hidden_matrix, orthogonalize

WORLD_SIZE = 2


def stacks(n_layer: int, n_embd: int) -> dict[torch.Size, torch.Tensor]:
    """Random updates for the blocks' matrices of a GPT of this shape (SwiGLU, no biases), stacked by shape."""
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd,
                       mlp="swiglu", bias=False)
    by_shape: dict[torch.Size, list] = {}
    generator = torch.Generator().manual_seed(0)
    for name, param in GPT(config).named_parameters():
        if is_hidden_matrix(name, param):
            by_shape.setdefault(param.shape, []).append(torch.randn(param.shape, generator=generator))
    return {shape: torch.stack(matrices) for shape, matrices in by_shape.items()}


def timed(function) -> float:
    dist.barrier()
    start = time.perf_counter()
    function()
    dist.barrier()
    return time.perf_counter() - start


def _rank(rank: int, n_layer: int, n_embd: int, rounds: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    by_shape = stacks(n_layer, n_embd)
    shared = lambda: [shared_out(stack, orthogonalize, rank, WORLD_SIZE) for stack in by_shape.values()]
    shared()  # warm-up
    alone, shared_times, per_matrix = [], [], {shape: [] for shape in by_shape}
    for _ in range(rounds):
        # Every rank all of it, one shape at a time (per-matrix times: a shape's time over its count).
        dist.barrier()
        for shape, stack in by_shape.items():
            start = time.perf_counter()
            orthogonalize(stack)
            per_matrix[shape].append((time.perf_counter() - start) / len(stack))
        alone.append(sum(times[-1] * len(by_shape[shape]) for shape, times in per_matrix.items()))
        dist.barrier()
        shared_times.append(timed(shared))
    fsdp_alone, fsdp_shared = fsdp_times(by_shape, rounds)
    if rank == 0:
        seconds = {shape: median(times) for shape, times in per_matrix.items()}
        report(by_shape, median(alone), median(shared_times), seconds, n_layer, n_embd)
        print("under FSDP (each rank holds half the rows of every update; the gathers are timed too):")
        print(f"  every rank orthogonalises all: {fsdp_alone * 1e3:8.1f} ms  (one all-gather per matrix)")
        print(f"  shared out:                    {fsdp_shared * 1e3:8.1f} ms  ({fsdp_alone / fsdp_shared:.2f}x faster; "
              f"plus one all-gather of the results per shape)")
    dist.destroy_process_group()


def fsdp_times(by_shape: dict, rounds: int) -> tuple[float, float]:
    """Medians of Muon's orthogonalisation of row-sharded updates (FSDP2's DTensors): every rank doing all of
    it against muon_distributed.orthogonalized (shared out), alternated round by round."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    sharded = [[distribute_tensor(matrix, mesh, [Shard(0)], src_data_rank=None) for matrix in stack]
               for stack in by_shape.values()]
    alone = lambda: [every_rank_all(updates) for updates in sharded]
    shared = lambda: [orthogonalized(updates, orthogonalize) for updates in sharded]
    shared()  # warm-up
    times = [(timed(alone), timed(shared)) for _ in range(rounds)]
    return median([a for a, _ in times]), median([s for _, s in times])


def every_rank_all(updates: list) -> list:
    """The FSDP way before the work was shared out: every update gathered, every one orthogonalised on every
    rank, each rank keeping its rows."""
    from torch.distributed.tensor import distribute_tensor

    results = orthogonalize(torch.stack([update.full_tensor() for update in updates])).unbind(0)
    return [distribute_tensor(result, update.device_mesh, update.placements, src_data_rank=None)
            for result, update in zip(results, updates)]


def report(by_shape: dict, alone: float, shared: float, per_matrix: dict, n_layer: int, n_embd: int) -> None:
    print(machine_line(torch.device("cpu")))
    shapes = ", ".join(f"{len(stack)} x {tuple(shape)}" for shape, stack in by_shape.items())
    print(f"model {n_layer} x {n_embd}: Muon's matrices {shapes}; {WORLD_SIZE} gloo ranks, 1 thread each")
    print(f"  every rank orthogonalises all: {alone * 1e3:8.1f} ms")
    print(f"  shared out + all-gather:       {shared * 1e3:8.1f} ms  ({alone / shared:.2f}x faster)")
    print("projected from the per-matrix times (" + ", ".join(f"{tuple(shape)} {t * 1e3:.1f} ms" for shape, t
                                                            in per_matrix.items()) + "):")
    everything = sum(per_matrix[shape] * len(stack) for shape, stack in by_shape.items())
    for world in (1, 2, 4, 8):
        busiest = sum(per_matrix[shape] * math.ceil(len(stack) / world) for shape, stack in by_shape.items())
        print(f"  {world} ranks: compute on the busiest rank {busiest * 1e3:8.1f} ms ({everything / busiest:.2f}x "
              f"less than every rank doing all), plus the all-gather")


def main(n_layer: int = 6, n_embd: int = 384, rounds: int = 5, port: int = 29541) -> None:
    """Time Muon's orthogonalisation shared out over 2 ranks against every rank doing all of it.

    Args:
        n_layer: transformer blocks of the GPT whose matrices are orthogonalised.
        n_embd: its width.
        rounds: alternated timing rounds (medians are reported).
        port: MASTER_PORT of the two local gloo ranks.
    """
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    mp.spawn(_rank, args=(n_layer, n_embd, rounds), nprocs=WORLD_SIZE)


if __name__ == "__main__":
    run_cli(main)
