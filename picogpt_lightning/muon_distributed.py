"""Muon's orthogonalisation over several ranks: shared out, under DDP and under FSDP alike.

Muon's Newton-Schulz iteration needs each matrix whole, and it is the costly part of its step. Two cases:

- Replicated weights (DDP): every rank holds the same averaged gradients and momentum, so every rank would
  orthogonalise every matrix, the same work W times over. Instead the matrices of one shape are dealt out in
  contiguous shares, each rank orthogonalises its share, and an all-gather gives every rank all the results:
  each rank does about 1/W of the work, for one all-gather of the updates. This is the idea of the distributed
  Muon in modded-nanogpt and nanochat (there the gradients are also reduce-scattered to the owner first; here
  DDP has already averaged them). The results equal one process's, up to the rounding of a smaller batch.
- Sharded weights (FSDP2 DTensors, sharding.py): each rank holds some rows of each matrix and of its momentum.
  Each update is gathered whole (an all-gather of its rows), after which every rank holds the same stack, as
  under DDP: the same shares are orthogonalised and all-gathered (`shared_out`), and each rank keeps its rows
  of each result. Two all-gathers instead of one, for 1/W of the Newton-Schulz work (figures in
  docs/benchmarks.md); an all-to-all sending each matrix only to its owner and back would move less, at the
  cost of uneven row counts to pad on every backend.

Without a process group of more than one rank, everything is orthogonalised here.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

Orthogonalize = Callable[[torch.Tensor], torch.Tensor]


def orthogonalized(updates: list[torch.Tensor], orthogonalize: Orthogonalize) -> list[torch.Tensor]:
    """`orthogonalize` (a stack of same-shaped matrices to a stack) applied to `updates`, one result per update,
    each held as its update is (a DTensor's rows for a DTensor)."""
    from torch.distributed.tensor import DTensor  # here: importing it costs 0.4 s, and optim.py imports this

    if isinstance(updates[0], DTensor):
        return _sharded(updates, orthogonalize)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return list(shared_out(torch.stack(updates), orthogonalize, dist.get_rank(), dist.get_world_size()))
    return list(orthogonalize(torch.stack(updates)).unbind(0))


def share(count: int, rank: int, world_size: int) -> range:
    """The indices of the `count` matrices that `rank` orthogonalises: a contiguous share, ceil(count / W) long
    (the last ranks' shares may be shorter or empty)."""
    per_rank = -(-count // world_size)
    return range(min(count, rank * per_rank), min(count, (rank + 1) * per_rank))


def shared_out(stack: torch.Tensor, orthogonalize: Orthogonalize, rank: int, world_size: int,
               group=None) -> torch.Tensor:
    """Every rank orthogonalises its share of `stack` (count, rows, cols), then all of them are all-gathered.

    Every rank passes the same `stack` (replicated weights). The shares are padded to one length with zeros,
    which the all-gather needs and which are dropped after it; a rank with no share still runs `orthogonalize`
    on an empty stack, which costs nothing and gives the dtype the others compute in. `rank` is this process's
    rank in `group` (None: the default group), of `world_size` ranks."""
    count = stack.size(0)
    per_rank = -(-count // world_size)
    mine = share(count, rank, world_size)
    local = orthogonalize(stack[mine.start:mine.stop])
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: len(mine)] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat(gathered)[:count]


def _sharded(updates: list, orthogonalize: Orthogonalize) -> list:
    """Each DTensor update gathered whole (an all-gather each), the stack orthogonalised shared out over the
    ranks (`shared_out`, as under DDP), and this rank's rows of each result kept, placed as the update was."""
    from torch.distributed.tensor import distribute_tensor

    whole = torch.stack([update.full_tensor() for update in updates])
    mesh = updates[0].device_mesh
    if mesh.size() > 1:
        results = shared_out(whole, orthogonalize, mesh.get_local_rank(), mesh.size(), mesh.get_group()).unbind(0)
    else:
        results = orthogonalize(whole).unbind(0)
    return [distribute_tensor(result, update.device_mesh, update.placements, src_data_rank=None)
            for result, update in zip(results, updates)]
