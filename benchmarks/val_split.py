"""Val loss of checkpoints over the whole val split of a prepared folder, each alone and their probabilities
averaged, so that runs that validated on different blocks compare on the same characters.

    python -m benchmarks.val_split --prepared data/prepared/small-ac7d93d481ef --ckpts '[a/best.ckpt, b/best.ckpt]'

A run validates on every non-overlapping block of its val split when `eval_iters` batches hold them all, else
on `eval_iters` batches of seeded random blocks (`data.validation_starts`). This scores every block, in blocks of
each checkpoint's own context, in float32 on the CPU: what a run whose validations read the whole split reports
(docs/benchmarks.md, issue 26 eighth round, where the sized recipe had validated on a sample). The average of
several checkpoints (an ensemble) needs the same context and tokenizer in each.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import machine_line, run_cli, set_threads
from picogpt_lightning.checkpoint import load_checkpoint
from picogpt_lightning.data import validation_starts

BATCH = 32


def val_blocks(prepared: Path, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of every non-overlapping block of the val split, as a run that reads it whole."""
    meta = json.loads((prepared / "meta.json").read_text())
    data = np.memmap(prepared / "val.bin", dtype=meta["dtype"], mode="r")
    starts = np.concatenate(validation_starts(len(data), block_size, BATCH, math.inf, seed=0))
    blocks = np.stack([data[start : start + block_size + 1] for start in starts]).astype(np.int64)
    return torch.from_numpy(blocks[:, :-1]), torch.from_numpy(blocks[:, 1:])


def log_probs(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(inputs[i : i + BATCH])[0].float().log_softmax(-1)
                          for i in range(0, len(inputs), BATCH)])


def main(prepared: str, ckpts: list[str], threads: int | None = None) -> None:
    """Val loss of each checkpoint over the whole val split, and of their average.

    Args:
        prepared: the prepared folder the runs trained on (it holds meta.json and val.bin).
        ckpts: checkpoints written by `picogpt fit` on that folder, or their run folders.
        threads: torch threads (default: torch's, one per core).
    """
    set_threads(threads)
    print(machine_line(torch.device("cpu")))
    folder, scored, context = Path(prepared), [], None
    for path in ckpts:
        model = load_checkpoint(path, "cpu").model.eval()
        if context not in (None, model.config.block_size):
            raise SystemExit(f"{path} has context {model.config.block_size}, the others {context}: the average "
                             f"needs the same blocks")
        context = model.config.block_size
        inputs, targets = val_blocks(folder, context)
        scored.append(log_probs(model, inputs))
        loss = F.nll_loss(scored[-1].flatten(0, 1), targets.flatten()).item()
        print(f"{path}: {loss:.4f} over {targets.numel():,} tokens ({len(targets)} blocks of {context})")
    if len(scored) > 1:
        average = torch.logsumexp(torch.stack(scored), 0) - math.log(len(scored))
        loss = F.nll_loss(average.flatten(0, 1), targets.flatten()).item()
        print(f"average of the {len(scored)}: {loss:.4f}")


if __name__ == "__main__":
    run_cli(main)
