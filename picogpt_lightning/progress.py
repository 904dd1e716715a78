"""Progress of long work (preparing data, evaluating a text), so that nothing runs for a minute in silence.

On a terminal it is a tqdm bar on stderr that disappears when the work is done. Elsewhere (a log file, a
pipe, a batch job) a bar would be garbage, so one plain line is written every `every` seconds instead, and
none for work that ends sooner: short runs stay quiet. Both say the rate and, when the total is known, the
time left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

Item = TypeVar("Item")
LOG_EVERY_S = 10.0


def _amount(value: float, unit: str) -> str:
    if unit == "B":
        for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= scale:
                return f"{value / scale:.1f} {name}"
        return f"{value:.0f} B"
    return f"{value:,.0f} {unit}"


def _duration(seconds: float) -> str:
    """About how long: "45 s", "12 min", "3.5 h"."""
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """`update(n)` as work is done, `close()` at the end; usable as a context manager."""

    def __init__(self, description: str, total: float | None, unit: str = "B", stream: TextIO | None = None,
                 quiet: bool = False, every: float | None = None):
        self.description, self.total, self.unit = description, total, unit
        self.every = LOG_EVERY_S if every is None else every
        self.stream = stream or sys.stderr
        self.done = 0.0
        self.start = self.last_line = time.monotonic()
        self.bar = None
        self.quiet = quiet
        if not quiet and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, unit_scale=True, desc=description, file=self.stream,
                            leave=False, dynamic_ncols=True)

    def update(self, amount: float) -> None:
        self.done += amount
        if self.bar is not None:
            self.bar.update(amount)
            return
        now = time.monotonic()
        if not self.quiet and now - self.last_line >= self.every:
            self.last_line = now
            share = f" of {_amount(self.total, self.unit)} ({100 * self.done / self.total:.0f}%)" if self.total else ""
            rate = self.done / max(now - self.start, 1e-9)
            left = f", {_duration((self.total - self.done) / rate)} left" if self.total and rate > 0 else ""
            print(f"{self.description}: {_amount(self.done, self.unit)}{share}, {_amount(rate, self.unit)}/s{left}",
                  file=self.stream, flush=True)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def track(self, items: Iterable[Item], size) -> Iterator[Item]:
        """`items`, updating by `size(item)` as each one is taken."""
        for item in items:
            yield item
            self.update(size(item))



class TimedRedraw:
    """Redraws a tqdm bar from a background thread when `every` seconds passed without a redraw, while `active`:
    a bar whose steps take longer than that still moves its elapsed time and rate (tqdm redraws only when
    told to). `stop()` ends the thread."""

    def __init__(self, bar, every: float = 1.0):
        import threading

        self.bar, self.every, self.active = bar, every, True
        self.stopped = threading.Event()
        threading.Thread(target=self._run, name="picogpt-progress", daemon=True).start()

    def due(self) -> bool:
        return not self.bar.disable and time.time() - self.bar.last_print_t >= self.every  # tqdm's clock

    def _run(self) -> None:
        while not self.stopped.wait(self.every):
            if self.active and self.due():
                self.bar.refresh()

    def stop(self) -> None:
        self.stopped.set()
