"""A distributed run whose other process died (killed, out of memory, a crash): the survivor's collective call
fails with gloo's "Connection reset by peer" (or NCCL's abort) deep in the backward pass. This turns that
traceback into one line naming the rank that is gone and how to resume; last.ckpt holds the last saved step."""

from __future__ import annotations

import re

from ..errors import PicoGPTError

# What torch's gloo and NCCL backends say when the process at the other end of a collective is gone.
LOST_PEER = re.compile(r"Connection reset by peer|Connection closed by peer|Broken pipe|remote process exited|"
                       r"NCCL communicator was aborted|Connection refused|Socket closed", re.IGNORECASE)


def _ranks() -> tuple[int, int] | None:
    """This process's rank and the world size, while the process group still exists."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except (RuntimeError, ValueError):
        pass
    return None


def resume_hint(command: str, args: list[str]) -> str:
    config = next((args[index + 1] for index, arg in enumerate(args[:-1]) if arg == "--config"), None)
    if config is None:
        config = next((arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")), None)
    return (f"picogpt {command} --config {config} --ckpt_path last" if config
            else "the same command with --ckpt_path last")


def lost_rank_error(error: BaseException, command: str, args: list[str]) -> PicoGPTError | None:
    """The one-line error for a collective that failed because another rank died, else None."""
    if not isinstance(error, RuntimeError) or not LOST_PEER.search(str(error)):
        return None
    ranks = _ranks()
    if ranks is None:
        who, me = "another rank", ""
    else:
        rank, world = ranks
        who = f"rank {1 - rank}" if world == 2 else f"another of the {world} ranks"
        me = f" (seen by rank {rank})"
    return PicoGPTError(f"{who} of this distributed run stopped (killed or crashed; its own output says why){me}: "
                        f"training cannot go on; last.ckpt holds the last saved step, resume with: "
                        f"{resume_hint(command, args)}")
