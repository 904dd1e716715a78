"""`picogpt fit` and `picogpt validate`: a LightningCLI over the GPT module and data module (and, with
cli/finetune.py's subclass and the conversation data module, `picogpt finetune`).

Beyond what LightningCLI gives (YAML configs, `--print_config`, every Trainer flag), this adds:
- the run folder (`--ckpt_dir`, default `checkpoints/<config stem>`) holding `best.ckpt`, `last.ckpt` and the
  logs, locked while a run writes into it (cli/run_folder.py); a new run refuses a folder that holds one unless
  `--overwrite true`;
- `--ckpt_path last|best|FILE`: a resume starts from the run's own settings, stored in the checkpoint
  (resume.py), with the command line on top; `--additional_steps N`; checks that the data, tokenizer and
  model shape are the checkpoint's; validate takes the checkpoint's data and model settings;
- every setting checked before any data is prepared or any folder is made (cli/checks.py; exit status 2);
- our callbacks (callbacks.py) next to any the user brings, our CSV metrics next to any logger the user adds.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import warnings
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ..callbacks import (AtomicCheckpointIO, BestCheckpoint, FinalValidation, GracefulInterrupt, LastCheckpoint,
                         NonFiniteLossGuard, QuietFlopsSummary)
from ..checkpoint import find_checkpoint, read_checkpoint
from ..data import GPTDataModule
from ..errors import PicoGPTError, SettingsError
from ..lightning_adapter import LightningCLIHooks
from ..module import GPTLightningModule
from ..prompt import read_escapes
from ..run_display import StepProgressBar, ValidationSample
from ..sharding import strategy_for
from .. import resume
from .budget import BudgetSetup, joined_budget
from .checks import check_model_settings, check_settings
from .common import class_refusal, settings_error
from .run_folder import (LOGS, RunFolder, clear_run, default_ckpt_dir, holds_run, is_rank_zero, next_version, peek,
                         summary_line)

TRAINER_DEFAULTS = {
    "max_steps": 2000,
    "val_check_interval": 200,
    # The training set is an endless stream of random blocks: validate by steps, never by epochs.
    "check_val_every_n_epoch": None,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
}
PROGRESS_REFRESH_STEPS = 5
# Lightning warnings that do not apply to how this tool uses it.
QUIET_WARNINGS = (
    "LightningCLI's args parameter",  # we pass the subcommand's arguments on purpose
    "Starting from v1.9.0, `tensorboardX`",  # CSV logging without tensorboard is intended
    "Checkpoint directory",  # reported by our own message, which says how to resume instead
    "Your `IterableDataset` has `__len__`",  # the val dataset shards itself per rank and worker
    "`isinstance(treespec, LeafSpec)`",  # inside Lightning, not actionable
    "It is recommended to use `self.log('val_",  # val_loss comes from torchmetrics, already reduced over ranks
    "callbacks used to create the checkpoint need to be provided",  # validate saves nothing: no checkpoint callbacks
)


class PicoGPTCLI(LightningCLIHooks, LightningCLI):
    def __init__(self, *args, command: str, run_folder: RunFolder, **kwargs):
        self.command = command  # the picogpt command: fit, finetune (the Trainer's fit) or validate
        self.run_folder = run_folder
        self.checkpoint: dict | None = None  # the checkpoint of --ckpt_path, read (and verified) once
        self.checkpoint_path: Path | None = None
        self.stored: dict | None = None  # the run's own settings that the command line was applied over
        self.tokenizer_from_checkpoint = False  # data.tokenizer_from was set to --ckpt_path here, not by the user
        self.budget = BudgetSetup()  # --budget: the plan (and without --config, the sized recipe); cli/budget.py
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        """Only the subcommand that runs: LightningCLI would build a parser for each of fit, validate, test and
        predict (the Trainer's, the module's and the data module's signatures, four times), 0.6 s of start-up."""
        subcommand = lightning_subcommand(self.command)
        return {subcommand: LightningCLI.subcommands()[subcommand]}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_dir", type=str | None, default=None,
                            help="run folder for best.ckpt, last.ckpt and logs (default: checkpoints/<config stem>; "
                                 "on resume: the checkpoint's folder)")
        parser.add_argument("--additional_steps", type=int | None, default=None,
                            help="with --ckpt_path: train this many steps beyond the checkpoint's step "
                                 "(sets trainer.max_steps to checkpoint step + N)")
        parser.add_argument("--sample_prompt", type=str, default="\n",
                            help="after each validation, print and log a continuation of this prompt "
                                 "(escapes like \\n are read)")
        parser.add_argument("--sample_tokens", type=int, default=80,
                            help="length of that sample in tokens; 0 turns it off")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="start a new run in a --ckpt_dir that holds one, deleting its best.ckpt, last.ckpt, "
                                 "lightning_logs and training.png once the new run has started")
        parser.add_argument("--allow_data_change", type=bool, default=False,
                            help="with --ckpt_path: resume or validate on other data or with another tokenizer than "
                                 "the checkpoint's (the token ids may then mean other things)")
        parser.add_argument("--budget", type=str | None, default=None,
                            help="train for this long (90s, 3m, 1h): a probe measures the step time and the steps, "
                                 "warmup and validations are planned so the LR schedule ends at the budget; "
                                 "without --config, the model and data settings are sized to the corpus too")
        parser.link_arguments("data.block_size", "model.block_size")
        parser.link_arguments(("data.tokenizer_vocab_size", "data.model_vocab_size"), "model.vocab_size",
                              compute_fn=self._model_vocab_size, apply_on="instantiate")
        parser.link_arguments("data.train_tokens", "model.train_tokens", apply_on="instantiate")

    # ------------------------------------------------------------------------------------------ settings

    def parse_arguments(self, parser, args) -> None:
        """Parse; with --ckpt_path, parse again over the run's own settings from the checkpoint."""
        printing = [arg for arg in args if arg.split("=")[0] == "--print_config"]
        plain = [arg for arg in args if arg not in printing]
        super().parse_arguments(parser, plain)
        subcommand = self.config.subcommand
        config = self.config[subcommand]
        if subcommand == "validate" and not config.ckpt_path:
            raise SettingsError("validate needs --ckpt_path: a checkpoint file, a run folder, or last/best of "
                                "--ckpt_dir (without one it would report the loss of random weights)")
        if config.ckpt_path:
            self.checkpoint_path = self._find_checkpoint(config)
            self.checkpoint = read_checkpoint(self.checkpoint_path)
            self.checkpoint.pop("optimizer_states", None)  # Lightning reads the file again to resume
            sections = None if subcommand == "fit" else ("data", "model")
            stored = resume.stored_settings(self.checkpoint, sections)
            if stored:
                defaults = self.subcommand_defaults(subcommand)
                self.stored = resume.known_only(stored, set(defaults.keys()), set(defaults.keys(branches=True)),
                                                str(self.checkpoint_path))
                plain = [subcommand, "--config", resume.as_config_text(self.stored), *plain[1:]]
        if printing or self.stored:
            super().parse_arguments(parser, [*plain, *printing])
        config = self.config[subcommand]
        if self.checkpoint_path is not None:
            config.ckpt_path = str(self.checkpoint_path)
        budgeted = subcommand == "fit" and self.command == "fit" and not config.trainer.get("fast_dev_run")
        sized = budgeted and not config.get("config")
        check_settings(subcommand, config, sized=sized and config.get("budget") is not None and not self.checkpoint)
        if budgeted:
            self.budget.apply(config, plain, resuming=self.checkpoint is not None, sized=sized,
                              stored_budget=(self.stored or {}).get("budget"))
            if self.budget.recipe is not None:
                check_model_settings(config.model.as_dict())  # with the recipe's dropout

    def _find_checkpoint(self, config) -> Path:
        """--ckpt_path as a file: `last`/`best` in the run folder, a run folder's best.ckpt, or the file itself."""
        if config.ckpt_path not in ("last", "best"):
            path = Path(config.ckpt_path)
            if path.is_dir() and (path / "last.ckpt").is_file() and self.config.subcommand == "fit":
                return path / "last.ckpt"  # resuming a run folder continues from its newest step
            return find_checkpoint(path)
        folder = Path(config.ckpt_dir) if config.ckpt_dir else default_ckpt_dir(config.get("config"))
        path = folder / f"{config.ckpt_path}.ckpt"
        if not path.is_file():
            raise PicoGPTError(
                f"no {path.name} in {folder}: nothing to resume; drop --ckpt_path to start a new run, "
                f"or pass --ckpt_dir (or --config) of the run to resume"
            )
        return path

    def after_parse(self) -> None:
        """Replaces LightningCLI's own step here, which silently swaps the config's model settings for the checkpoint's
        hyperparameters: here parse_arguments starts from the run's whole stored config instead, and the run
        folder is settled before any data is prepared."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand]
        if self.checkpoint is not None:
            self._check_resume(subcommand, config)
        if subcommand == "fit":
            config.ckpt_dir = str(self._run_folder_path(config))
            if not config.trainer.get("fast_dev_run") and is_rank_zero():
                self._claim_run_folder(config)

    def _run_folder_path(self, config) -> Path:
        if config.ckpt_dir:
            return Path(config.ckpt_dir)
        if self.checkpoint_path is not None and self.checkpoint_path.name in ("last.ckpt", "best.ckpt"):
            return self.checkpoint_path.parent  # a resume continues in the run's own folder
        return default_ckpt_dir(config.get("config"))

    def _check_resume(self, subcommand: str, config) -> None:
        """List what the command line changes in the run's settings; refuse what changes its data; turn
        --additional_steps into max_steps; refuse a resume with nothing to train."""
        step = int(self.checkpoint.get("global_step", 0))
        if self.stored:
            current = yaml.safe_load(self.parser.dump(self.config))[subcommand]
            found = resume.changes(self.stored, current)
            resume.check_shape_changes(found, self.checkpoint)
            resume.check_data_changes(found, self.checkpoint, self.checkpoint_path, config.allow_data_change)
            verb = "resuming" if subcommand == "fit" else "validating"
            changed = f", with {resume.describe_changes(found)}" if found else " with the run's own settings"
            rank_zero_only(print)(f"{verb} {self.checkpoint_path} (step {step}){changed}")
        if config.data.get("tokenizer_from", "unset") is None and self.checkpoint["picogpt"].get("tokenizer"):
            # Resume and validate with the checkpoint's own tokenizer, never one trained again on the text: the
            # ids must keep the meaning the weights learnt (an old checkpoint's has no end-of-text, say).
            config.data.tokenizer_from = str(self.checkpoint_path)
            self.tokenizer_from_checkpoint = True
        if subcommand != "fit" or config.trainer.get("fast_dev_run"):
            return
        if config.get("additional_steps") is not None:
            config.trainer.max_steps = step + config.additional_steps
        if config.trainer.max_steps <= step:
            raise SettingsError(
                f"{self.checkpoint_path} is at step {step} and trainer.max_steps is {config.trainer.max_steps}: "
                f"nothing to train; pass a larger --trainer.max_steps, or --additional_steps N"
            )

    def _model_vocab_size(self, tokenizer_vocab_size: int, padded_vocab_size: int) -> int:
        """The data's model vocabulary: the tokenizer's, padded when read from a file. A model that goes on from
        another's weights with its tokenizer (a resumed or validated run, a warm start with --data.tokenizer_from
        the same checkpoint) keeps that model's size when its embedding holds every token: runs from before the
        padding, and padded vocabularies such as Qwen3's, go on unchanged."""
        config = self.config[self.subcommand]
        saved = ((self.checkpoint or {}).get("picogpt", {}).get("model_config") or {}).get("vocab_size")
        init_from = config.model.get("init_from") if self.checkpoint is None else None
        if init_from and config.data.get("tokenizer_from") == init_from:
            from ..checkpoint import stored_vocab_size

            saved = stored_vocab_size(init_from)  # its settings only: the warm start reads the weights once
        return saved if isinstance(saved, int) and saved >= tokenizer_vocab_size else padded_vocab_size

    def _claim_run_folder(self, config) -> None:
        """Refuse a new run in a folder that holds one (unless --overwrite), then create and lock the folder."""
        folder = Path(config.ckpt_dir)
        resuming_here = self.checkpoint_path is not None and self.checkpoint_path.parent.resolve() == folder.resolve()
        if config.overwrite and resuming_here:
            raise SettingsError(f"--overwrite deletes the run in {folder}, which --ckpt_path resumes from: "
                                f"leave out one of them")
        existing = holds_run(folder)
        if existing and not resuming_here and not config.overwrite:
            step = peek(folder / existing).get("global_step", "?")
            raise PicoGPTError(
                f"{folder} already holds a run ({existing} at step {step}): continue it with --ckpt_path "
                f"{folder / 'last.ckpt'}, start over with --overwrite true (deletes its checkpoints and logs), "
                f"or choose another --ckpt_dir"
            )
        self.run_folder.open(folder)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if config.data.seed is None:
            # One seed is enough for another run: the block order follows seed_everything unless data.seed is set.
            seed = config.seed_everything
            config.data.seed = seed if not isinstance(seed, bool) else torch.initial_seed() % (2**32)

    def after_instantiate_classes(self) -> None:
        if self.checkpoint is not None:
            saved = self.checkpoint["picogpt"]["model_config"]
            # What the settings fix was checked before the data was prepared (resume.check_shape_changes), when the checkpoint
            # stores them; the rest is known now.
            keys = resume.SETTLED_BY_DATA if self.stored else resume.ARCHITECTURE_KEYS
            message = resume.model_mismatch_message(saved, self.model.model.config.to_dict(), keys) or (
                self.subcommand == "fit"
                and resume.optimizer_mismatch_message(self.checkpoint["hyper_parameters"], self.model.hparams.optimizer)
            )
            if message:
                raise PicoGPTError(message)
            config = self.config[self.subcommand]
            mismatch = resume.tokenizer_mismatch(self.checkpoint, self.checkpoint_path, self.datamodule.tokenizer_sha256)
            if mismatch and not config.allow_data_change:
                raise PicoGPTError(mismatch)
            resume.check_text_unchanged(self.checkpoint, self.checkpoint_path, self.datamodule.describe(),
                                        config.allow_data_change)
            self.checkpoint = None  # Lightning loads the weights again; free this copy
        elif self.subcommand == "fit" and self.model.hparams.init_from:
            # A new run: the warm start happens here, once; a resume continues from its own weights.
            self.model.warm_start(self.model.hparams.init_from, self.model.hparams.init_strict,
                                  self.datamodule.tokenizer)
        # The run's resolved settings, as plain types, go into every checkpoint: `picogpt info` shows them and a
        # resume starts from them (the options of this one invocation are left out).
        stored = yaml.safe_load(self.parser.dump(self.config))[self.subcommand]
        stored.update(ckpt_path=None, additional_steps=None, overwrite=False, allow_data_change=False)
        if self.tokenizer_from_checkpoint:
            stored["data"]["tokenizer_from"] = None  # a later resume takes its own checkpoint's again
        self.model.run_config = stored
        self.budget.report(self.datamodule.train_tokens if self.subcommand == "fit" else 0)

    # ------------------------------------------------------------------------------------------ trainer

    def instantiate_classes(self) -> None:
        """Build the classes of the settings; a class that refuses its arguments (a callback given a value out of
        range, say) is one line naming it, not jsonargparse's traceback."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            reason = class_refusal(str(error))
            if reason is None:
                raise
            raise SettingsError(reason) from None

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer_config = self.config_init.get(self.subcommand, self.config_init).get("trainer", {})
        ckpt_dir = config.ckpt_dir or str(default_ckpt_dir(config.get("config")))
        dry_run = bool(trainer_config.get("fast_dev_run"))
        checkpointing = trainer_config.get("enable_checkpointing") is not False and not dry_run
        given = list(trainer_config.get("callbacks") or [])
        callbacks = []
        if self.subcommand == "fit":
            if checkpointing:
                callbacks.append(BestCheckpoint(ckpt_dir))
            callbacks += [LastCheckpoint(ckpt_dir, f"picogpt {self.command} --ckpt_path {Path(ckpt_dir) / 'last.ckpt'}",
                                         save=checkpointing),
                          GracefulInterrupt(), NonFiniteLossGuard(ckpt_dir), FinalValidation()]
            callbacks += self.budget.callbacks()
        if trainer_config.get("enable_progress_bar", True) is not False and not _has(given, ProgressBar):
            callbacks.append(StepProgressBar(refresh_rate=PROGRESS_REFRESH_STEPS))
        if trainer_config.get("enable_model_summary", True) is not False and not _has(given, ModelSummary):
            callbacks.append(QuietFlopsSummary())
        # After the progress bar, which closes the validation bar before the sample is printed under it.
        if self.subcommand == "fit" and config.sample_tokens > 0:
            callbacks.append(ValidationSample(read_escapes(config.sample_prompt), config.sample_tokens))
        kwargs["logger"] = self._loggers(trainer_config.get("logger"), ckpt_dir)
        if kwargs["logger"] is not False and self.subcommand == "fit":
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        kwargs["callbacks"] = given + callbacks
        if trainer_config.get("default_root_dir") is None:
            kwargs["default_root_dir"] = ckpt_dir
        plugins = trainer_config.get("plugins")
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [] if plugins is None else [plugins]
        if not any(hasattr(plugin, "save_checkpoint") for plugin in plugins):  # the user's CheckpointIO wins
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO(f"picogpt {self.command} --ckpt_path "
                                                              f"{Path(ckpt_dir) / 'last.ckpt'}")]
        if "strategy" not in kwargs and trainer_config.get("strategy") is not None:
            kwargs["strategy"] = strategy_for(trainer_config["strategy"])  # fsdp: ours, on CPU too (sharding.py)
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as error:
            reason = str(error).strip().splitlines()[0]
            hint = ("--trainer.accelerator takes cpu, cuda, mps or auto (auto picks what this machine has)"
                    if "ccelerator" in reason else "check the --trainer.* values in the config and command line")
            raise PicoGPTError(f"trainer settings rejected: {reason} ({hint})") from None

    def _loggers(self, given, ckpt_dir: str):
        """Our CSV metrics (metrics.csv, read by `picogpt plot`) next to whatever loggers the user gives, and
        TensorBoard's as well when it is installed (Lightning's default would replace the CSV one with it).
        `validate` logs nothing unless asked: the run's logs hold training only."""
        if given is False or (self.subcommand != "fit" and given in (None, True)):
            return False
        loggers = [] if given in (None, True) else list(given) if isinstance(given, (list, tuple)) else [given]
        if self.subcommand != "fit":
            return loggers  # validate logs where the user asked, never into a run's logs
        root = Path(ckpt_dir).resolve()
        if any(isinstance(logger, CSVLogger) and Path(logger.root_dir).resolve() == root / LOGS for logger in loggers):
            return loggers
        overwriting = self.subcommand == "fit" and self.config["fit"].overwrite  # before_fit deletes the old logs
        version = 0 if overwriting else next_version(Path(ckpt_dir) / LOGS)
        ours = [CSVLogger(save_dir=ckpt_dir, name=LOGS, version=version)]
        if given in (None, True) and tensorboard_installed():
            ours.append(TensorBoardLogger(save_dir=ckpt_dir, name=LOGS, version=version))
        return ours + loggers

    def before_fit(self) -> None:
        config = self.config["fit"]
        if config.overwrite and is_rank_zero() and not config.trainer.get("fast_dev_run"):
            # Only now, with the data prepared and the model built: a failed start leaves the old run alone.
            clear_run(Path(config.ckpt_dir))


def tensorboard_installed() -> bool:
    """Whether Lightning's TensorBoardLogger can write (it needs tensorboard or tensorboardX); found without
    importing either."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def _has(callbacks: list, kind: type) -> bool:
    return any(isinstance(callback, kind) for callback in callbacks)


def lightning_subcommand(command: str) -> str:
    """The Trainer entry point a picogpt command runs: finetune trains, as fit does."""
    return "validate" if command == "validate" else "fit"


def run_lightning_cli(command: str, args: list[str], cli_class: type[PicoGPTCLI] = PicoGPTCLI,
                      datamodule_class: type = GPTDataModule) -> int:
    """Runs `picogpt fit|finetune|validate ARGS` (finetune from cli/finetune.py, with its own CLI class and
    data module); returns the process exit code."""
    run_folder = RunFolder()
    try:
        return _run_lightning_cli(command, args, run_folder, cli_class, datamodule_class)
    except PicoGPTError:
        # Every rank meets the same error (same settings and data; the NaN check is reduced over ranks), so
        # under a multi-process strategy rank 0 alone reports it, in one line.
        if rank_zero_only.rank != 0:
            return 1
        raise
    finally:
        run_folder.close()


def _run_lightning_cli(command: str, args: list[str], run_folder: RunFolder, cli_class: type[PicoGPTCLI],
                       datamodule_class: type) -> int:
    # Lightning's start-up banners (GPU/TPU availability, tips) say nothing a user of this tool needs.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    # It reports Ctrl-C as "Received SIGTERM"; our interrupt callbacks say what happened instead.
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{re.escape(message)}")
    try:
        cli = cli_class(
            GPTLightningModule,
            datamodule_class,
            args=[lightning_subcommand(command), *joined_budget(args)],
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=1337,
            save_config_kwargs={"overwrite": True},
            # The resolved config goes into the run's log folder; validate writes nothing anywhere.
            save_config_callback=SaveConfigCallback if command != "validate" else None,
            parser_kwargs={"exit_on_error": False, "allow_abbrev": False, "prog": "picogpt"},
            command=command,
            run_folder=run_folder,
        )
    except ArgumentError as error:
        raise settings_error(command, error, _known_options(command)) from None
    except SIGTERMException:
        return 130
    if cli.trainer.is_global_zero:
        config = cli.config[lightning_subcommand(command)]
        print(summary_line(command, cli.trainer, config, cli.model.model.config.vocab_size))
    return 0


def _known_options(command: str) -> set[str]:
    from .flags import lightning_options

    return lightning_options(command)[0]
