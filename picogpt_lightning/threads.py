"""How many threads torch uses on the CPU: chosen from the cores this process may use and the machine's load.

torch's default is one thread per core. On a machine where other work already keeps cores busy that is the
worst choice: its threads wait for each other at every operation, and a step can take many times longer than
with one thread (measured on a 2-core machine with one competing process: docs/benchmarks.md, "Issue 25:
threads against load"). So each command takes the cores it may run on (`os.sched_getaffinity`: a container's
or `taskset`'s limit, not the machine's count) less the ones the load average says are busy, at least one.
`--threads N` on every command overrides the choice, and so does OMP_NUM_THREADS set by the user.
Plain Python and torch: used by the command line and usable from any script.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import SettingsError


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # why this many, for the start-up line

    def describe(self) -> str:
        return f"{self.threads} torch thread{'s' if self.threads != 1 else ''} ({self.reason})"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on every platform (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def current_load() -> float | None:
    """The 1-minute load average (runnable processes), None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose_threads(cores: int, load: float | None) -> int:
    """The cores not kept busy by others: `cores - load`, rounded, from 1 to `cores`. A process that is about
    to start is not in the load yet, so on an idle machine this is every core."""
    if load is None:
        return cores
    return max(1, min(cores, round(cores - load)))


def thread_choice(requested: int | None = None, environ: dict | None = None) -> ThreadChoice:
    """What `apply_threads` would set: --threads, else OMP_NUM_THREADS, else the cores free of load."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise SettingsError(f"--threads must be a whole number >= 1, got {requested!r}")
        return ThreadChoice(requested, "--threads")
    given = environ.get("OMP_NUM_THREADS", "")
    if given.strip().isdigit() and int(given) >= 1:
        return ThreadChoice(int(given), "OMP_NUM_THREADS")
    cores, load = usable_cores(), current_load()
    threads = choose_threads(cores, load)
    load_text = "unknown" if load is None else f"{load:.2f}"
    return ThreadChoice(threads, f"{cores} usable core{'s' if cores != 1 else ''}, load {load_text}; "
                                 f"--threads N to choose")


def apply_threads(requested: int | None = None) -> ThreadChoice:
    """Choose the thread count (see `thread_choice`) and set it in torch; returns the choice."""
    import torch

    choice = thread_choice(requested)
    torch.set_num_threads(choice.threads)
    return choice
