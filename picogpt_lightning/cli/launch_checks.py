"""The settings of a run on several processes or machines that must agree with whoever started them, checked
with the other settings before any data is prepared or any folder made (SettingsError: one line, exit 2).

Without these checks a mismatch shows late or never: Lightning refuses a node count that is not torchrun's or
SLURM's only once the data is prepared, two nodes without NODE_RANK both act as node 0, nodes without the same
MASTER_PORT each pick a random one, and an unreachable MASTER_ADDR makes torch wait 30 minutes in silence.
- the node count and devices per node against the launcher's (torchrun's WORLD_SIZE and LOCAL_WORLD_SIZE,
  SLURM's --nodes, --ntasks-per-node and --ntasks); NODE_RANK against the node count;
- under Lightning's own launcher with several nodes: NODE_RANK, MASTER_ADDR and MASTER_PORT on every node,
  and MASTER_ADDR answering within MASTER_WAIT_S;
- a strategy name Lightning does not know, and sharding settings FSDP cannot run (sharding.check_sharding).
"""

from __future__ import annotations

import difflib
import os
import socket
import time
from typing import Mapping

from jsonargparse import Namespace

from ..errors import SettingsError
from ..launch import launcher
from ..sharding import check_sharding

MASTER_WAIT_S = 30.0  # how long a node keeps trying a MASTER_ADDR that does not answer at all
CONNECT_TRY_S = 5.0  # one connection attempt


def check_launch(trainer: Namespace, env: Mapping[str, str] = os.environ, wait_s: float = MASTER_WAIT_S) -> None:
    """Refuse settings that disagree with the launcher of this process (see the module's docstring)."""
    check_strategy_name(trainer.get("strategy"))
    num_nodes = trainer.get("num_nodes", 1)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise SettingsError(f"trainer.num_nodes must be a whole number >= 1 (the machines of the run), got {num_nodes}")
    devices = devices_per_node(trainer.get("devices"), trainer.get("accelerator"))
    check_sharding(trainer.get("strategy"), trainer.get("precision"), trainer.get("accelerator"), devices, num_nodes)
    started_by = launcher(env)
    if started_by == "torchrun":
        check_torchrun(num_nodes, devices, env)
    elif started_by == "slurm":
        check_slurm(num_nodes, devices, env)
    else:
        check_own_launcher(num_nodes, env, wait_s)


def check_strategy_name(strategy) -> None:
    """A strategy given by name must be one Lightning has registered (a class_path is checked by the parser)."""
    if not isinstance(strategy, str):
        return
    from lightning.pytorch.strategies import StrategyRegistry

    known = ["auto", *StrategyRegistry.available_strategies()]
    if strategy in known:
        return
    if "." in strategy or strategy.endswith("Strategy"):
        raise SettingsError(f"trainer.strategy {strategy!r} is not a strategy name Lightning knows: a strategy class "
                            f"goes in with its path, e.g. --trainer.strategy '{{\"class_path\": "
                            f"\"lightning.pytorch.strategies.DDPStrategy\"}}' (or class_path: under strategy: in "
                            f"the YAML)")
    close = difflib.get_close_matches(strategy, known, n=1)
    guess = f"did you mean {close[0]}? " if close else ""
    raise SettingsError(f"trainer.strategy {strategy!r} is not a strategy Lightning knows: {guess}the usual ones are "
                        f"auto, ddp and fsdp (all of them: {', '.join(known)})")


def devices_per_node(devices, accelerator) -> int | None:
    """The processes Lightning runs on each node for `trainer.devices`, or None where it cannot be told here
    (-1, or `auto` with an accelerator that is not this machine's)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        if devices == "auto":
            return _auto_devices(accelerator)
        devices = devices.strip().rstrip(",")
        if "," in devices:
            return len(devices.split(","))
        devices = int(devices) if devices.lstrip("-").isdigit() else None
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    return None


def _auto_devices(accelerator) -> int | None:
    """What `devices: auto` is (Lightning: every CUDA device; one CPU or MPS device)."""
    import torch

    if accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1 if accelerator in ("auto", "cpu", "mps") else None


def check_torchrun(num_nodes: int, devices: int | None, env: Mapping[str, str]) -> None:
    world = int(env.get("WORLD_SIZE", "1"))
    per_node = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    nodes = max(1, world // max(1, per_node))
    if num_nodes != nodes or devices not in (None, per_node):
        shown = devices if devices is not None else "auto"
        raise SettingsError(
            f"torchrun started {nodes} node(s) x {per_node} process(es) (--nnodes {nodes} --nproc-per-node "
            f"{per_node}) but trainer.num_nodes is {num_nodes} and trainer.devices {shown}: pass "
            f"--trainer.num_nodes {nodes} --trainer.devices {per_node} (one process per device)"
        )


def check_slurm(num_nodes: int, devices: int | None, env: Mapping[str, str]) -> None:
    nodes = _whole(env.get("SLURM_NNODES"))
    if nodes is not None and nodes != num_nodes:
        raise SettingsError(f"SLURM gave this job {nodes} node(s) (--nodes) but trainer.num_nodes is {num_nodes}: "
                            f"pass --trainer.num_nodes {nodes} (scripts/slurm_fit.sbatch passes $SLURM_NNODES)")
    per_node = _whole(env.get("SLURM_NTASKS_PER_NODE"))
    if per_node is not None and devices is not None and per_node != devices:
        raise SettingsError(f"SLURM starts {per_node} task(s) per node (--ntasks-per-node) but trainer.devices is "
                            f"{devices}: pass --trainer.devices {per_node} (one task per device)")
    tasks = _whole(env.get("SLURM_NTASKS"))
    if tasks is not None and devices is not None and tasks != num_nodes * devices:
        raise SettingsError(f"this SLURM job has {tasks} task(s) (--ntasks) but trainer.num_nodes {num_nodes} x "
                            f"trainer.devices {devices} = {num_nodes * devices}: start the command with srun, one "
                            f"task per device (--ntasks-per-node {devices} on each of the {num_nodes} node(s))")


def check_own_launcher(num_nodes: int, env: Mapping[str, str], wait_s: float) -> None:
    """Lightning's own launcher: each node's `picogpt fit` starts that node's processes; the environment alone
    says which node it is and where node 0 listens."""
    node_rank = env.get("NODE_RANK", env.get("GROUP_RANK"))
    if num_nodes == 1:
        if node_rank not in (None, "0"):
            raise SettingsError(f"NODE_RANK is {node_rank} but trainer.num_nodes is 1: pass --trainer.num_nodes N "
                                f"(the same on every node), or unset NODE_RANK to train on this machine alone")
        return
    missing = [name for name, value in (("NODE_RANK", node_rank), ("MASTER_ADDR", env.get("MASTER_ADDR")),
                                        ("MASTER_PORT", env.get("MASTER_PORT"))) if value is None]
    if missing:
        names = f"{', '.join(missing[:-1])} and {missing[-1]} are" if len(missing) > 1 else f"{missing[0]} is"
        others = "1 on the other" if num_nodes == 2 else f"1 to {num_nodes - 1} on the others"
        raise SettingsError(
            f"trainer.num_nodes is {num_nodes} but {names} not set: on every node set NODE_RANK (0 on the node of "
            f"MASTER_ADDR, {others}), MASTER_ADDR (node 0's address) and the same free MASTER_PORT, or launch with "
            f"torchrun or SLURM (docs/training.md#several-machines)"
        )
    rank = _whole(node_rank)
    if rank is None or rank >= num_nodes:
        raise SettingsError(f"NODE_RANK is {node_rank} but trainer.num_nodes is {num_nodes}: give each node its own "
                            f"NODE_RANK from 0 (the node of MASTER_ADDR) to {num_nodes - 1}")
    port = _whole(env["MASTER_PORT"])
    if port is None or not 0 < port < 65536:
        raise SettingsError(f"MASTER_PORT is {env['MASTER_PORT']}: set it to a free port number (1-65535), the same "
                            f"on every node")
    if "LOCAL_RANK" not in env:  # the node's first process; the ones it starts find node 0 already listening
        if not master_answers(env["MASTER_ADDR"], port, wait_s) and rank > 0:
            print(f"node {rank}: waiting for node 0 at {env['MASTER_ADDR']}:{port}", flush=True)


def master_answers(address: str, port: int, wait_s: float) -> bool:
    """Whether node 0 already listens at address:port (True) or its machine answered but nothing listens yet
    (False: torch waits for it); SettingsError when the name does not resolve or nothing answers for wait_s."""
    try:
        socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise SettingsError(f"MASTER_ADDR {address} is not a host name or address this machine can resolve "
                            f"({error.strerror}): set it to node 0's address, the same on every node") from None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            left = max(0.1, deadline - time.monotonic())
            socket.create_connection((address, port), timeout=min(CONNECT_TRY_S, left)).close()
            return True
        except ConnectionRefusedError:
            return False  # the machine answered: node 0's process is not listening yet
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            raise SettingsError(f"MASTER_ADDR {address} port {port} did not answer for {wait_s:g} s ({reason}): "
                                f"check that it is node 0's address and that this machine can reach it (network, "
                                f"firewall)")
        time.sleep(min(1.0, left))


def _whole(text: str | None) -> int | None:
    return int(text) if isinstance(text, str) and text.strip().isdigit() else None
