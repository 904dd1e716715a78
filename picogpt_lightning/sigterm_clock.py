"""SIGTERM always ends a run. Lightning's SIGTERM handler only sets a flag that is read at the next step
boundary, so a step that never ends (a batch too big to build, a hung collective) ignored SIGTERM for minutes.
`start` is called on SIGTERM: GRACE_S later, unless `cancel`ed when the run stops, the process exits with status
143 and one line. last.ckpt is then the last one saved, whole (files.write_atomically)."""

from __future__ import annotations

import os
import threading

GRACE_S = 60.0  # after SIGTERM, a step that has not ended in this time is not waited for


def start() -> threading.Timer:
    clock = threading.Timer(GRACE_S, _exit)
    clock.daemon = True
    clock.start()
    return clock


def _exit() -> None:
    # os.write, not print: the main thread, stuck mid-step, may hold stderr's or the progress bar's lock.
    os.write(2, f"\nterminated: the current step did not end within {GRACE_S:g} s of SIGTERM; last.ckpt holds the "
                f"last saved step\n".encode())
    os._exit(143)
