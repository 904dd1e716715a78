"""Sharded training: `--trainer.strategy fsdp` as PyTorch's FSDP2 (`fully_shard`), on CPU (gloo) and GPU (nccl).

Each rank keeps a slice of every weight (and of its optimizer state); a block's weights are gathered for its
forward and backward only, and the gradients are reduce-scattered back to the slices.

Why not Lightning's FSDPStrategy (FSDP1): it refuses a CPU accelerator when named by its string, it flattens
parameters into 1-D shards of concatenated matrices (so Muon cannot tell one matrix from another), and in 2.6.6
its full-checkpoint save is reported to crash on CPU. Lightning's ModelParallelStrategy with `fully_shard`
applied here keeps each parameter a DTensor with its real shape, split by rows: Muon gathers a matrix,
orthogonalises it and keeps its rows (muon_distributed.py), and the EMA's average is sharded the same way.
Checkpoints are consolidated on rank 0 when saved: one file, like DDP's, that sample, export and info read
and that resumes under this strategy.

PyTorch issue #162338 reports FSDP2's AVG reduction summing on gloo, which would make CPU gradients world-size
times too large (AdamW hardly notices; gradient clipping does). With torch 2.13 the gradients equal DDP's either
way (tests/test_sharding.py compares them); on gloo we still ask FSDP2 for SUM reductions, after which it
divides by the world size itself, so no version's AVG is relied on.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, OptimStateKeyType, fully_shard
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import AveragedModel

from .errors import SettingsError

# What `--trainer.strategy` says to mean this strategy (Lightning's name for its FSDPStrategy, which it replaces).
NAMES = ("fsdp",)


class ShardedDataParallel(ModelParallelStrategy):
    """ModelParallelStrategy as plain FSDP (no tensor parallelism), saving one consolidated checkpoint file.

    The module shards its model in `configure_model` (`shard_model`), over every rank."""

    def __init__(self, **kwargs):
        kwargs.setdefault("save_distributed_checkpoint", False)
        self.consolidated = not kwargs["save_distributed_checkpoint"]
        super().__init__(**kwargs)

    def optimizer_state(self, optimizer) -> dict:
        """The whole optimizer state (on rank 0), keyed as a plain optimizer keys it: by position in its param
        groups, so this strategy's checkpoints and DDP's (or one device's) are laid out alike and each resumes
        under the other. Lightning's own keys follow model.parameters(), which is not our optimizer's order."""
        if not self.consolidated:
            return super().optimizer_state(optimizer)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, optimizer, options=options)
        if self.global_rank != 0:
            return state  # empty: only rank 0 writes
        return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model, optim=optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """A consolidated checkpoint file (ours, DDP's or one device's): every rank reads it and keeps its slices
        of the weights and of the optimizer state. A folder of distributed shards is Lightning's to read."""
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            return super().load_checkpoint(path, weights_only)
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        strict = self.lightning_module.strict_loading
        set_model_state_dict(self.model, checkpoint.pop("state_dict"),
                             options=StateDictOptions(full_state_dict=True, strict=strict))
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            by_name = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model, optim=optimizer)
            set_optimizer_state_dict(self.model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
        return checkpoint


def strategy_for(name):
    """Our strategy for the names in NAMES (any accelerator); any other value is Lightning's to read."""
    if isinstance(name, str) and name.lower() in NAMES:
        return ShardedDataParallel()
    return name


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """Shard each transformer block, then the rest (embeddings, final norm, output layer), over every rank.

    A block is one unit, gathered whole for its forward and freed after; the root unit holds the (possibly tied)
    embedding and output layer. Idempotent: a model already sharded is left as it is."""
    if is_sharded(model):
        return
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = [*model.blocks, model]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    if dist.get_backend() == "gloo":
        for unit in units:
            unit.set_force_sum_reduction_for_comms(True)  # PyTorch issue #162338, see the module's docstring


def whole_tensors(state: dict) -> dict:
    """`state` with each DTensor gathered whole (a collective: every rank calls it, every rank gets them)."""
    return {name: value.full_tensor().cpu() if isinstance(value, DTensor) else value for name, value in state.items()}


def load_whole_tensors(module: torch.nn.Module, state: dict) -> None:
    """Load whole tensors (a consolidated checkpoint's, read by every rank) into a sharded module: each rank
    keeps its own slice, with no communication."""
    set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True))


def reshard(model: torch.nn.Module) -> None:
    """Put every sharded unit back to its slices. FSDP2 leaves the root unit's weights whole after a forward
    without a backward (validation), where code that pairs them with other slices would meet whole tensors."""
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def sharded_average(module: torch.nn.Module, device: torch.device, **average_args) -> AveragedModel:
    """An AveragedModel of our LightningModule whose copy is sharded as the model is about to be (in
    configure_model), so each rank keeps its slice of the average beside its slice of the weights.

    Lightning's WeightAveraging shards the model first and then copies it, which FSDP2 modules refuse; here the
    model is copied before it is sharded."""
    average = AveragedModel(module, **average_args)
    shard_model(average.module.model, device)
    return average


def restore_sharded_average(average: AveragedModel, module: torch.nn.Module, checkpoint: dict) -> None:
    """Resume an average under fsdp. The strategy has already loaded the checkpoint's state_dict, the average,
    into the sharded model (and dropped it): the average takes its slices from the model, then the model is
    given its trained weights back (`current_model_state`)."""
    with torch.no_grad():
        for kept, loaded in zip(average.module.parameters(), module.parameters()):
            kept.copy_(loaded)
        for name, value in checkpoint["averaging_state"].items():
            getattr(average, name).copy_(value)
    load_whole_tensors(module, checkpoint["current_model_state"])


# The precisions ModelParallelStrategy takes (Lightning's accelerator connector refuses the others), all tried
# under fsdp on 2 CPU ranks: 32-true, bf16-mixed and bf16-true train; 16-true trains to NaN on CPU, as it does
# under every strategy there (float16 matmuls without loss scaling), so it is offered for GPUs only.
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")
PRECISION_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}


def check_sharding(strategy, precision, accelerator: str | None, devices: int | None, num_nodes: int) -> None:
    """SettingsError (one line, before anything is prepared or written) for sharding settings that Lightning
    would refuse only once the data is prepared, with its own wording or a traceback: a precision FSDP2 does not
    take, a data/tensor-parallel split that is not the run's ranks, tensor parallelism (our model is sharded
    FSDP-style over every rank), and Lightning's FSDPStrategy on a CPU. `strategy` is the setting: a name or a
    class_path (with init_args)."""
    strategy_class, init_args = _strategy_class(strategy)
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if strategy_class is not None and issubclass(strategy_class, FSDPStrategy) and on_cpu:
        raise SettingsError(f"Lightning's {strategy_class.__name__} needs a GPU (accelerator cuda): pass "
                            f"--trainer.strategy fsdp, which shards on CPU as well (FSDP2, sharding.py)")
    if not (isinstance(strategy, str) and strategy.lower() in NAMES) and not (
            strategy_class is not None and issubclass(strategy_class, ModelParallelStrategy)):
        return
    name = str(PRECISION_ALIASES.get(str(precision), precision or "32-true"))
    works = [p for p in PRECISIONS if not (on_cpu and p == "16-true")]
    if name not in works:
        where = "on CPU " if on_cpu and name == "16-true" else ""
        raise SettingsError(f"trainer.precision {name} does not work with the fsdp strategy {where}(FSDP2): pass "
                            f"--trainer.precision with one of {', '.join(works)} (bf16-mixed for mixed precision)")
    tensor_parallel = init_args.get("tensor_parallel_size", "auto")
    if tensor_parallel not in ("auto", 1):
        raise SettingsError(f"tensor_parallel_size {tensor_parallel}: picogpt shards the model FSDP-style over every "
                            f"rank and has no tensor parallelism; leave tensor_parallel_size and data_parallel_size "
                            f"out (or --trainer.strategy fsdp)")
    # Lightning's split: data_parallel_size (auto: the nodes) x tensor_parallel_size (auto: devices per node).
    data_parallel = init_args.get("data_parallel_size", "auto")
    if devices is None:
        return  # -1 or auto on another machine's accelerator: the ranks are not known here
    split = (num_nodes if data_parallel == "auto" else data_parallel) * (devices if tensor_parallel == "auto" else 1)
    ranks = devices * num_nodes
    if split != ranks:
        raise SettingsError(f"data_parallel_size {data_parallel} x tensor_parallel_size {tensor_parallel} is not the "
                            f"run's {ranks} rank(s) (trainer.devices {devices} x trainer.num_nodes {num_nodes}): "
                            f"leave both out (fsdp shards over every rank)")


def _strategy_class(strategy) -> tuple[type | None, dict]:
    """The class and init_args of a strategy given by class_path (a Namespace or dict); None, {} for a name."""
    class_path = strategy.get("class_path") if hasattr(strategy, "get") else None
    if not isinstance(class_path, str) or "." not in class_path:
        return None, {}
    module, name = class_path.rsplit(".", 1)
    found = getattr(importlib.import_module(module), name, None)
    init_args = strategy.get("init_args") or {}
    init_args = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args)
    return (found if isinstance(found, type) else None), init_args
