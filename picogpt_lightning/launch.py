"""Which launcher started this process and where the process stands in its job, read from the environment
before the Trainer exists (afterwards, ask the Trainer). The one place the package reads these variables.

Lightning picks its cluster environment in this order (accelerator_connector.py): torchrun (it sets
TORCHELASTIC_RUN_ID), then SLURM's `srun` (SLURM_NTASKS, unless the job is named "bash" or "interactive"),
then its own launcher, which reads NODE_RANK, MASTER_ADDR and MASTER_PORT and starts the other processes of
its node itself (they get LOCAL_RANK). Nothing here imports torch or Lightning.
"""

from __future__ import annotations

import os
from typing import Literal, Mapping

Launcher = Literal["torchrun", "slurm", "lightning"]


def launcher(env: Mapping[str, str] = os.environ) -> Launcher:
    """The launcher Lightning will take this process to come from."""
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return "slurm"
    return "lightning"


def is_global_rank_zero(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is rank 0 of the whole job: the one that claims the run folder and writes."""
    if launcher(env) == "slurm":
        return env.get("SLURM_PROCID", "0") == "0"
    return all(env.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


def local_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's rank on its own machine: local rank 0 prepares the data on that machine's disk."""
    if launcher(env) == "slurm":
        return int(env.get("SLURM_LOCALID", "0"))
    return int(env.get("LOCAL_RANK", "0"))
