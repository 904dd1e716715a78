"""Every use of Lightning's private API, in one place.

Lightning has no public way to do these few things, so each one here names the private attribute, key or
function it relies on, and tests/test_lightning_adapter.py checks each of them against the installed
Lightning: an upgrade that renames one fails those tests loudly instead of quietly changing what a run does.
The rest of the package uses only Lightning's public API and calls these functions instead.
"""

from __future__ import annotations


class LightningChanged(RuntimeError):
    """Lightning no longer has a private name this package relies on (after an upgrade): a bug to report, not a
    user's mistake."""


# Where a checkpoint keeps how many optimizer steps the logger has seen (Lightning 2.x's fit loop state).
LOGGED_STEPS_KEYS = ("loops", "fit_loop", "epoch_loop.state_dict", "_batches_that_stepped")


def count_one_more_logged_step(checkpoint: dict) -> None:
    """Add one to the logging step counter a checkpoint stores, or raise LightningChanged when it has none.

    A checkpoint written during an unscheduled validation holds that counter one behind, and a run resumed from
    it would log every step one too low (callbacks.FinalValidation)."""
    *path, last = LOGGED_STEPS_KEYS
    state = checkpoint
    for key in path:
        state = state.get(key) if isinstance(state, dict) else None
    if not isinstance(state, dict) or isinstance(state.get(last), bool) or not isinstance(state.get(last), int):
        raise LightningChanged(f"this Lightning's checkpoints keep no {'/'.join(LOGGED_STEPS_KEYS)}")
    state[last] += 1

