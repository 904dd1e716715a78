"""`picogpt fit` and `picogpt validate`: a LightningCLI over the GPT module and data module.

Beyond what LightningCLI gives (YAML configs, `--print_config`, every Trainer flag), this adds the run folder
(`--ckpt_dir`, default `checkpoints/<config stem>`, holding `best.ckpt` and `last.ckpt`), `--ckpt_path last`
and `best` resolved in that folder, `--additional_steps N` (train N steps beyond the checkpoint), a clear error
when a checkpoint's model shape differs from the config, and the callbacks of `callbacks.py`.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import warnings
from pathlib import Path

import yaml
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ..callbacks import GracefulInterrupt, LastCheckpoint, NonFiniteLossGuard, StepProgressBar, ValidationSample
from ..checkpoint import read_checkpoint
from ..data import GPTDataModule
from ..errors import PicoGPTError
from ..module import GPTLightningModule, model_mismatch_message, optimizer_mismatch_message
from ..prompt import read_escapes

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
)


def default_ckpt_dir(config_files) -> Path:
    """checkpoints/<stem of the last --config file>, or checkpoints/default without one."""
    if config_files:
        return Path("checkpoints") / Path(str(config_files[-1])).stem
    return Path("checkpoints") / "default"


def ensure_writable(folder: Path) -> None:
    """Fail before training, not at the first checkpoint, when the run folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise PicoGPTError(
            f"cannot write checkpoints to {folder} ({error.strerror or error}); pass --ckpt_dir with a writable folder"
        ) from None


class PicoGPTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_dir", type=str | None, default=None,
                            help="run folder for best.ckpt, last.ckpt and logs (default: checkpoints/<config stem>)")
        parser.add_argument("--additional_steps", type=int | None, default=None,
                            help="with --ckpt_path: train this many steps beyond the checkpoint's step "
                                 "(sets trainer.max_steps to checkpoint step + N)")
        parser.add_argument("--sample_prompt", type=str, default="\n",
                            help="after each validation, print and log a continuation of this prompt "
                                 "(escapes like \\n are read)")
        parser.add_argument("--sample_tokens", type=int, default=80,
                            help="length of that sample in tokens; 0 turns it off")
        parser.link_arguments("data.block_size", "model.block_size")
        parser.link_arguments("data.tokenizer_vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.train_tokens", "model.train_tokens", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's version, which silently swaps the config's model settings for the
        checkpoint's: here the checkpoint is found (`last`/`best` in the run folder), opened safely, and later
        compared with the config (see after_instantiate_classes)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        config.ckpt_dir = str(config.ckpt_dir or default_ckpt_dir(config.get("config")))
        if subcommand == "fit":
            ensure_writable(Path(config.ckpt_dir))
        self.resume_from = None
        if config.ckpt_path in ("last", "best"):
            path = Path(config.ckpt_dir) / f"{config.ckpt_path}.ckpt"
            if not path.is_file():
                raise PicoGPTError(
                    f"no {path.name} in {config.ckpt_dir}: nothing to resume; drop --ckpt_path to start a new run, "
                    f"or pass --ckpt_dir (or --config) of the run to resume"
                )
            config.ckpt_path = str(path)
        if config.ckpt_path:
            self.resume_from = read_checkpoint(config.ckpt_path)
            self.resume_from.pop("optimizer_states", None)
        if config.get("additional_steps") is not None:
            if self.resume_from is None:
                raise PicoGPTError("--additional_steps needs --ckpt_path (a checkpoint or `last`) to count from")
            config.trainer.max_steps = int(self.resume_from["global_step"]) + config.additional_steps

    def after_instantiate_classes(self) -> None:
        if self.resume_from is not None:
            saved = self.resume_from["picogpt"]["model_config"]
            message = model_mismatch_message(saved, self.model.model.config.to_dict()) or (
                self.subcommand == "fit"
                and optimizer_mismatch_message(self.resume_from["hyper_parameters"], self.model.hparams.optimizer)
            )
            if message:
                raise PicoGPTError(message)
            self.resume_from = None  # the weights are loaded again by Lightning; free this copy
        elif self.subcommand == "fit" and self.model.hparams.init_from:
            # A new run: the warm start happens here, once; a resume continues from its own weights.
            self.model.warm_start(self.model.hparams.init_from, self.model.hparams.init_strict)
        # The whole resolved config, as plain types, goes into every checkpoint (`picogpt info` shows it).
        self.model.run_config = yaml.safe_load(self.parser.dump(self.config))[self.subcommand]

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer_config = self._get(self.config_init, "trainer", default={})
        ckpt_dir = config.ckpt_dir
        callbacks = list(trainer_config.get("callbacks") or [])
        resume = f"picogpt fit {self._config_args(config)}--ckpt_path last"
        callbacks += [
            ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1,
                            save_last=True, auto_insert_metric_name=False, enable_version_counter=False),
            LastCheckpoint(ckpt_dir, resume),
            GracefulInterrupt(),
            NonFiniteLossGuard(ckpt_dir),
        ]
        if trainer_config.get("logger", True) is not False:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if config.sample_tokens > 0:
            callbacks.append(ValidationSample(read_escapes(config.sample_prompt), config.sample_tokens))
        if trainer_config.get("enable_progress_bar", True) is not False:
            callbacks.append(StepProgressBar(refresh_rate=PROGRESS_REFRESH_STEPS))
        kwargs["callbacks"] = callbacks
        if trainer_config.get("default_root_dir") is None:
            kwargs["default_root_dir"] = ckpt_dir
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as error:
            reason = str(error).strip().splitlines()[0]
            hint = ("--trainer.accelerator takes cpu, cuda, mps or auto (auto picks what this machine has)"
                    if "ccelerator" in reason else "check the --trainer.* values in the config and command line")
            raise PicoGPTError(f"trainer settings rejected: {reason} ({hint})") from None

    @staticmethod
    def _config_args(config) -> str:
        files = config.get("config") or []
        args = "".join(f"--config {f} " for f in files)
        if not files or str(default_ckpt_dir(files)) != config.ckpt_dir:
            args += f"--ckpt_dir {config.ckpt_dir} "
        return args


def run_lightning_cli(command: str, args: list[str]) -> int:
    """Runs `picogpt fit|validate ARGS`; returns the process exit code."""
    try:
        return _run_lightning_cli(command, args)
    except PicoGPTError:
        # Every rank meets the same error (same settings and data; the NaN check is reduced over ranks), so
        # under a multi-process strategy rank 0 alone reports it, in one line.
        if rank_zero_only.rank != 0:
            return 1
        raise


def _run_lightning_cli(command: str, args: list[str]) -> int:
    # Lightning's start-up banners (GPU/TPU availability, tips) say nothing a user of this tool needs.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    # It reports Ctrl-C as "Received SIGTERM"; our interrupt callbacks say what happened instead.
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{re.escape(message)}")
    try:
        cli = PicoGPTCLI(
            GPTLightningModule,
            GPTDataModule,
            args=[command, *args],
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=1337,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
        )
    except ArgumentError as error:
        raise PicoGPTError(f"{error} (see `picogpt {command} --help`)") from None
    except SIGTERMException:
        return 130
    trainer = cli.trainer
    if command == "fit" and trainer.is_global_zero and trainer.checkpoint_callback.best_model_score is not None:
        best = float(trainer.checkpoint_callback.best_model_score)
        vocab = cli.model.model.config.vocab_size
        print(f"best val_loss {best:.4f} (perplexity {math.exp(best):.1f}; untrained ~ ln({vocab}) = "
              f"{math.log(vocab):.2f}) in {trainer.checkpoint_callback.best_model_path}")
    if command == "validate" and trainer.is_global_zero:
        metrics = cli.trainer.callback_metrics
        if "val_loss" in metrics:
            print(f"val_loss {float(metrics['val_loss']):.4f}  val_ppl {float(metrics['val_ppl']):.2f}")
    return 0
