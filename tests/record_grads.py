"""A callback for the sharded-training tests: the first step's whole gradients, and how many weights rank 0
holds itself, saved by rank 0 (test use only)."""

from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor


class RecordGradients(L.Callback):
    def __init__(self, path: str):
        self.path = Path(path)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step != 0:
            return
        grads = {name: param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
                 for name, param in pl_module.model.named_parameters()}  # full_tensor: a collective, every rank
        if trainer.global_rank == 0:
            held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in pl_module.parameters())
            torch.save({"grads": {name: grad.detach().clone() for name, grad in grads.items()},
                        "held": held, "total": sum(p.numel() for p in pl_module.parameters())}, self.path)
