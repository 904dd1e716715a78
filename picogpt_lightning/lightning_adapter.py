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


def attached_trainer(module):
    """The Trainer a LightningModule is attached to, or None (`module.trainer` raises when there is none)."""
    return module._trainer


def set_max_steps(trainer, max_steps: int) -> None:
    """Move the last step of a run in progress (`trainer.max_steps` is read-only; the fit loop's epoch loop
    holds the value it stops at)."""
    loop = trainer.fit_loop.epoch_loop
    if not hasattr(loop, "max_steps"):
        raise LightningChanged("this Lightning's fit loop keeps no epoch_loop.max_steps")
    loop.max_steps = max_steps


def stop_at_next_step(trainer) -> None:
    """Set the flag Lightning's SIGTERM handler sets and its loops read: training stops at the end of the
    current step, with last.ckpt saved (callbacks.LastCheckpoint). Called on every rank at the same step when
    several processes train (callbacks.GracefulInterrupt), instead of Lightning's handler, which broadcasts
    from inside the signal handler and can meet another rank's gradient all-reduce there and hang."""
    connector = trainer._signal_connector
    if not isinstance(getattr(connector, "received_sigterm", None), bool):
        raise LightningChanged("this Lightning's signal connector keeps no received_sigterm flag")
    connector.received_sigterm = True


def replace_sigterm_notifier(trainer, handler) -> None:
    """Have the SIGTERM handler that Lightning installs when a run starts (after the setup hooks, before the
    first step) call `handler(signum, frame)` in place of its notifier, which passes the signal on to the
    processes Lightning started and then broadcasts from inside the signal handler: a broadcast that can meet
    another rank's collective and hang. Call it before Lightning installs the handler (a callback's `setup`),
    so that no moment of the run has the broadcasting one."""
    connector = trainer._signal_connector
    if not callable(getattr(connector, "_sigterm_notifier_fn", None)):
        raise LightningChanged("this Lightning's signal connector has no _sigterm_notifier_fn")
    connector._sigterm_notifier_fn = handler


def average_model(callback):
    """The averaged copy of the model a WeightAveraging callback keeps (None before its setup)."""
    return callback._average_model


def set_average_model(callback, average) -> None:
    """Give a WeightAveraging callback the averaged copy it keeps (its setup makes one, unless we do)."""
    if not hasattr(callback, "_average_model"):
        raise LightningChanged("this Lightning's WeightAveraging keeps no _average_model")
    callback._average_model = average


def summary_table(*args, **kwargs) -> str:
    """Lightning's model summary table (ModelSummary.summarize prints it; we print it without empty columns)."""
    from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

    return _format_summary_table(*args, **kwargs)


class LightningCLIHooks:
    """Mixed into a LightningCLI subclass (before LightningCLI): its private steps under public names.

    - `after_parse()` replaces LightningCLI's `_parse_ckpt_path`, the step between parsing the arguments and
      instantiating the classes (Lightning's would swap the config's model settings for a checkpoint's
      hyperparameters);
    - `subcommand_defaults(name)` is the defaults of one subcommand's parser (`_parser(name)`);
    - `subcommand_parser(name)` is that parser itself (`_subcommand_parsers`), available in
      `after_subcommands_added()`, which runs once LightningCLI has built them (`_add_subcommands`).
    """

    def after_parse(self) -> None:
        """Between parsing the arguments and building the classes; the default does nothing."""

    def after_subcommands_added(self) -> None:
        """Once the subcommand parsers exist; the default does nothing."""

    def subcommand_defaults(self, subcommand: str):
        return self._parser(subcommand).get_defaults()

    def subcommand_parser(self, subcommand: str):
        return self._subcommand_parsers[subcommand]

    def _parse_ckpt_path(self) -> None:
        self.after_parse()

    def _add_subcommands(self, parser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        self.after_subcommands_added()
