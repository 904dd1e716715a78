"""`picogpt finetune`: train a base checkpoint further on conversations, with the loss on the answers only.

The same LightningCLI as `picogpt fit` (cli/fit.py: YAML configs, `--print_config`, the run folder with best.ckpt
and last.ckpt, `--ckpt_path last` for an exact resume, Ctrl-C, the NaN guard, the progress bar, one-line
errors), over `ConversationDataModule` (chat_data.py) instead of the text data module. What differs:

- `--model.init_from` (the base checkpoint) is required for a new run; its weights are the starting point.
- The model's architecture, its context (`data.block_size`) and its tokenizer are the base checkpoint's (on
  resume, the run's own checkpoint's). A config or flag that would change the architecture is refused in one
  line; dropout and the training recipe (learning rate, steps, ...) are the config's.
- The chat template (`--data.chat_template`, default the base checkpoint's, else qa) is stored in every
  checkpoint as meta["chat_template"], where `picogpt chat`, `serve`, the Python API and the export find it.
- Every input is checked before anything is written: no run folder is made for a bad file, checkpoint or
  template.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from ..checkpoint import read_checkpoint
from ..chat_template import get_template, template_from_meta
from ..errors import PicoGPTError
from ..model import GPTConfig
from ..module import GPTLightningModule
from ..resume import ARCHITECTURE_KEYS, MAY_CHANGE, same_tokenizer
from .fit import PicoGPTCLI, run_lightning_cli

# Model settings that belong to the base model: its weights only make sense with them. (vocab_size follows the
# tokenizer and block_size data.block_size, both the base's; dropout may differ.) zero_init is taken too, so the
# stored settings say how the base began.
BASE_MODEL_KEYS = tuple(key for key in ARCHITECTURE_KEYS + MAY_CHANGE
                        if key not in ("vocab_size", "block_size", "dropout"))


def module_defaults() -> dict:
    """The model settings' defaults in the module's signature: a config value other than these was chosen."""
    parameters = inspect.signature(GPTLightningModule.__init__).parameters
    return {name: parameter.default for name, parameter in parameters.items()
            if parameter.default is not inspect.Parameter.empty}


class FinetuneCLI(PicoGPTCLI):
    def after_subcommands_added(self) -> None:
        fit = self.subcommand_parser("fit")  # LightningCLI runs finetune as the Trainer's fit
        fit.prog = "picogpt finetune"
        fit.description = ("Fine-tune a base checkpoint (--model.init_from) on conversations (--data.path), with "
                           "the loss on the answers only; --ckpt_path last resumes.")

    def after_parse(self) -> None:
        config = self.config["fit"]
        resuming = self.checkpoint is not None
        source = str(self.checkpoint_path) if resuming else config.model.init_from
        if not source:
            raise PicoGPTError("picogpt finetune starts from a base model: pass --model.init_from CHECKPOINT "
                               "(e.g. checkpoints/tiny/best.ckpt, from `picogpt fit --config configs/tiny.yaml`), "
                               "or --ckpt_path last to resume a fine-tuning run")
        meta = (self.checkpoint if resuming else read_checkpoint(source))["picogpt"]
        if not meta.get("tokenizer"):
            raise PicoGPTError(f"{source} holds no tokenizer, so its token ids cannot be known; fine-tune from a "
                               f"checkpoint written by `picogpt fit`")
        self._take_base_model(config, GPTConfig.from_dict(meta["model_config"]).to_dict(), source)
        self._take_base_tokenizer(config, meta, source)
        if resuming and config.data.chat_template is not None:
            stored, given = template_from_meta(meta), get_template(config.data.chat_template)
            if given.to_dict() != stored.to_dict():
                raise PicoGPTError(f"{source} was fine-tuned with the chat template {stored.name!r}, not "
                                   f"{given.name!r}: resume with --data.chat_template {stored.name} (or drop it), "
                                   f"or start a new run from this checkpoint with --model.init_from")
        super().after_parse()  # the run folder is claimed only once the base model and tokenizer are known

    @staticmethod
    def _take_base_model(config, base: dict, source: str) -> None:
        """Set the model settings (and the context) to the base checkpoint's; refuse ones chosen otherwise."""
        defaults = module_defaults()
        model = config.model
        keys = [key for key in BASE_MODEL_KEYS if key in model]  # a GPTConfig field the module does not take
        differences = [f"{key} {model[key]} here vs {base[key]} in the base" for key in keys
                       if model[key] != defaults[key] and model[key] != base[key]]
        if config.data.block_size is not None and config.data.block_size != base["block_size"]:
            differences.append(f"block_size {config.data.block_size} here vs {base['block_size']} in the base")
        if differences:
            raise PicoGPTError(f"fine-tuning keeps the architecture of {source} ({', '.join(differences)}); drop "
                               f"these model settings, or train a new base with `picogpt fit`")
        for key in keys:
            model[key] = base[key]
        if model.dropout == defaults["dropout"]:
            model.dropout = base["dropout"]
        config.data.block_size = model.block_size = base["block_size"]

    @staticmethod
    def _take_base_tokenizer(config, meta: dict, source: str) -> None:
        """The base checkpoint's tokenizer encodes the conversations; another one given must be the same."""
        given = config.data.tokenizer_from
        if given is None or Path(given) == Path(source):
            config.data.tokenizer_from = str(source)
            return
        from ..prepare import tokenizer_from_path

        if not same_tokenizer(meta, tokenizer_from_path(given)):
            raise PicoGPTError(f"--data.tokenizer_from {given} is not the tokenizer of {source}: the model's ids "
                               f"mean that one's tokens; drop --data.tokenizer_from")

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        # The base checkpoint's tokenizer is taken again from --model.init_from or --ckpt_path each time.
        self.model.run_config["data"]["tokenizer_from"] = None


def run_finetune(args: list[str]) -> int:
    """Runs `picogpt finetune ARGS`; returns the process exit code."""
    from ..chat_data import ConversationDataModule

    return run_lightning_cli("finetune", args, FinetuneCLI, ConversationDataModule)
