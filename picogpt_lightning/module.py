"""The LightningModule: the GPT's training loss, the optimizer (AdamW, or Muon for the blocks' matrices) under the
LR schedule, metrics, and the facts every checkpoint stores.

Its init arguments are the `--model.*` flags, flat, as configs and checkpoints have always spelt them; their
defaults and rules live in the settings dataclasses (`settings_from_flags`): the model's shape in
model.GPTConfig, the optimizer's in optim.OptimizerSettings, the schedule's in optim.ScheduleSettings.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import fields
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torchmetrics import MeanMetric

from . import __version__
from .checkpoint_format import CHECKPOINT_FORMAT
from .errors import PicoGPTError
from .lightning_adapter import attached_trainer
from .model import GPT, GPTConfig, dropout_disagreement, next_token_loss
from .optim import MuonAdamW, OptimizerSettings, ScheduleSettings, param_groups
from .sharding import is_sharded, load_whole_tensors, shard_model
from .warm_start import warm_start_weights

AUTO_TIE_MAX_TOKENS = 1_000_000
# Strategies that shard parameters over ranks, so no rank holds a whole matrix.
SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def refuse_under_sharding(strategy, feature: str, why: str, instead: str) -> None:
    """The one check for features that need whole weight matrices on a rank, under a strategy that shards them."""
    if isinstance(strategy, SHARDED_STRATEGIES):
        raise PicoGPTError(f"{feature} cannot run under {type(strategy).__name__}: {why}; use {instead}")


def settings_from_flags(flags: Mapping) -> tuple[GPTConfig, OptimizerSettings, ScheduleSettings]:
    """The module's init arguments (the --model.* flags, or a checkpoint's hyper_parameters) as the settings
    dataclasses, each checked by its own __post_init__ (a ValueError names the flag). Every field a dataclass
    has and the flags set is taken, so a field added to one is a flag as soon as the module takes it."""
    model = {**_taken(GPTConfig, flags), "tie_weights": resolve_tie_weights(flags.get("tie_weights", "auto"),
                                                                             flags.get("train_tokens", 0))}
    config, (optimizer, schedule) = GPTConfig(**model), recipe_from_flags(flags)
    if optimizer.consistency and not config.dropout:
        raise ValueError(f"consistency {optimizer.consistency:g} compares two dropout passes of each batch, and "
                         f"without dropout they are the same; set --model.dropout above 0 (0.1-0.2), or "
                         f"--model.consistency 0")
    return config, optimizer, schedule


def recipe_from_flags(flags: Mapping) -> tuple[OptimizerSettings, ScheduleSettings]:
    """The training recipe's part of the flags (settings_from_flags without the model's shape)."""
    schedule = _taken(ScheduleSettings, flags)
    if flags.get("cosine_lr") is False:  # the older switch, still read from old configs and checkpoints
        schedule["lr_schedule"] = "constant"
    return OptimizerSettings(**_taken(OptimizerSettings, flags)), ScheduleSettings(**schedule)


def _taken(settings_class, flags: Mapping) -> dict:
    return {field.name: flags[field.name] for field in fields(settings_class) if field.name in flags}


def optimizer_groups(model: GPT, settings: OptimizerSettings) -> list[dict]:
    """The optimizer's param groups by parameter name, without the parameters (configure_optimizers adds them).

    Decided on the unwrapped model, by name: strategies that shard parameters (FSDP keeps the original
    parameters as flattened 1-D shards) hand configure_optimizers shapes that no longer tell a matrix from a
    bias."""
    return [{**{k: v for k, v in group.items() if k != "params"}, "name": group_name(group)}
            for group in param_groups(model.named_parameters(), settings)]


def group_name(group: dict) -> str:
    """What LearningRateMonitor calls a parameter group: muon, decay (AdamW, decayed) or no_decay."""
    if group["rule"] == "muon":
        return "muon"
    return "decay" if group["params"][0].dim() >= 2 else "no_decay"


def resolve_tie_weights(tie_weights: bool | str, train_tokens: int) -> bool:
    """`auto` ties the embeddings when the training split is known and below AUTO_TIE_MAX_TOKENS."""
    if tie_weights == "auto":
        return 0 < train_tokens < AUTO_TIE_MAX_TOKENS
    if isinstance(tie_weights, bool):
        return tie_weights
    raise PicoGPTError(f"tie_weights {tie_weights!r} is unknown; choose true, false or auto")


@contextmanager
def model_settings_checked():
    """The ValueError a settings dataclass raises for a value it refuses, as one line that keeps its cause."""
    try:
        yield
    except ValueError as error:
        raise PicoGPTError(f"invalid model settings: {' '.join(str(error).split())}") from error


class GPTLightningModule(L.LightningModule):
    """A GPT (model.py) trained on next-token prediction.

    Args:
        vocab_size: vocabulary size (set from the prepared data by the CLI).
        block_size: context length in tokens (linked to data.block_size by the CLI).
        n_layer: transformer blocks.
        n_head: attention heads per block; must divide n_embd.
        n_embd: width of the residual stream.
        dropout: dropout on attention, residual branches and embeddings (0 for large data, 0.1-0.2 small).
        bias: biases in linear layers and layer norms.
        tie_weights: share the token embedding with the output layer: true, false, or auto (tie when the
            training split has fewer than 1M tokens, where the embeddings are most of the model).
        position: learned (GPT-2's position table) or rotary (RoPE on queries and keys).
        norm: layer (LayerNorm) or rms (RMSNorm).
        qk_norm: RMSNorm on each head's queries and keys (bounds attention logits; allows higher rates).
        mlp: gelu (GPT-2 as exported), gelu_tanh (GPT-2's own tanh GELU), relu2 (squared ReLU) or swiglu
            (Llama's gated MLP).
        zero_init: start each block's output projections at zero, so every block starts as the identity.
        rope_theta: base wavelength of rotary positions.
        mlp_width: the MLP's hidden width (default 4 * n_embd, or about 8/3 * n_embd with swiglu).
        n_kv_head: key/value heads, dividing n_head (grouped-query attention; default one per head).
        head_dim: width of one attention head (default n_embd / n_head).
        norm_eps: epsilon of the norms (default 1e-5 with LayerNorm, 1e-6 with RMSNorm).
        attention_bias: biases in the attention's linear layers (default: as bias).
        mlp_bias: biases in the MLP's linear layers (default: as bias).
        train_tokens: training split size in tokens (set from the prepared data by the CLI).
        label_smoothing: label smoothing of the training loss (validation reports plain cross-entropy).
        consistency: R-Drop: each training batch twice, under two dropout masks, adding their predictions'
            disagreement times this to the loss (0: off). About twice a step's cost; needs dropout.
        optimizer: adamw (AdamW for every weight) or muon (Muon for the blocks' hidden matrices, AdamW for
            embeddings, output layer, biases and gains).
        learning_rate: peak learning rate of AdamW's weights.
        min_lr: learning rate at the end of the decay (Muon's falls in the same proportion).
        weight_decay: AdamW weight decay on matrices and embeddings (not on biases or norm gains).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        muon_lr: peak learning rate of the matrices Muon trains (with optimizer muon).
        muon_momentum: Muon's (Nesterov) momentum.
        muon_weight_decay: Muon's decoupled weight decay.
        lr_schedule: after warmup, decay to min_lr along a half cosine (cosine) or a straight line
            (linear), or keep the peak rate (constant).
        cosine_lr: kept for older configs and checkpoints: false means lr_schedule constant (use lr_schedule).
        warmup_iters: optimizer steps of linear warmup.
        lr_decay_iters: step at which the decay reaches min_lr (default: trainer.max_steps).
        init_from: warm start: load weights (only) from this checkpoint when a new run starts (not on resume).
        init_strict: with init_from, require every weight to match; false loads what matches and lists the rest.
        compile: torch.compile the GPT (in place, so checkpoints keep plain parameter names).
    """

    def __init__(
        self, vocab_size: int = 0, block_size: int = GPTConfig.block_size, n_layer: int = GPTConfig.n_layer,
        n_head: int = GPTConfig.n_head, n_embd: int = GPTConfig.n_embd, dropout: float = GPTConfig.dropout, bias: bool = GPTConfig.bias,
        tie_weights: bool | Literal["auto"] = "auto", position: Literal["learned", "rotary"] = GPTConfig.position,
        norm: Literal["layer", "rms"] = GPTConfig.norm, qk_norm: bool = GPTConfig.qk_norm,
        mlp: Literal["gelu", "gelu_tanh", "relu2", "swiglu"] = GPTConfig.mlp, zero_init: bool = GPTConfig.zero_init,
        rope_theta: float = GPTConfig.rope_theta, mlp_width: int | None = GPTConfig.mlp_width,
        n_kv_head: int | None = GPTConfig.n_kv_head, head_dim: int | None = GPTConfig.head_dim,
        norm_eps: float | None = GPTConfig.norm_eps, attention_bias: bool | None = GPTConfig.attention_bias,
        mlp_bias: bool | None = GPTConfig.mlp_bias, train_tokens: int = 0,
        label_smoothing: float = OptimizerSettings.label_smoothing, consistency: float = OptimizerSettings.consistency,
        optimizer: Literal["adamw", "muon"] = OptimizerSettings.optimizer,
        learning_rate: float = OptimizerSettings.learning_rate, min_lr: float = ScheduleSettings.min_lr,
        weight_decay: float = OptimizerSettings.weight_decay, beta1: float = OptimizerSettings.beta1, beta2: float = OptimizerSettings.beta2,
        muon_lr: float = OptimizerSettings.muon_lr, muon_momentum: float = OptimizerSettings.muon_momentum,
        muon_weight_decay: float = OptimizerSettings.muon_weight_decay,
        lr_schedule: Literal["cosine", "linear", "constant"] = ScheduleSettings.lr_schedule, cosine_lr: bool = True,
        warmup_iters: int = ScheduleSettings.warmup_iters, lr_decay_iters: int | None = ScheduleSettings.lr_decay_iters,
        init_from: str | None = None, init_strict: bool = True, compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        # Only the settings' own checks become one line: a ValueError from building the model is a bug.
        with model_settings_checked():
            config, self.optimizer_settings, self.schedule = settings_from_flags(self.hparams)
        self.model = GPT(config)
        with model_settings_checked():
            self.optimizer_groups = optimizer_groups(self.model, self.optimizer_settings)
        self.val_loss = MeanMetric()
        self._tokens_at_last_log = 0
        self._time_at_last_log = None

    def warm_start(self, path: str, strict: bool, tokenizer=None) -> None:
        """Load weights only (no optimizer, no step) from a checkpoint (warm_start.py: weights_only, with the
        embeddings mapped token by token when its tokenizer is not the data's). The CLI calls it once, when a
        new run starts; resuming a run (or rebuilding the module from one of its checkpoints) never loads them
        again."""
        message = warm_start_weights(self.model, path, strict, tokenizer)
        rank_zero_only(print)(message)  # every rank loads; one says so

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        # Under ModelParallelStrategy (fsdp here) each matrix stays one DTensor that Muon gathers whole.
        if (stage == "fit" and self.optimizer_settings.optimizer == "muon"
                and not isinstance(strategy, ModelParallelStrategy)):
            refuse_under_sharding(strategy, "--model.optimizer muon", "Muon orthogonalises whole matrices, and "
                                  "this strategy hands the optimizer flattened shards of them",
                                  "--trainer.strategy ddp, or fsdp (FSDP2), or --model.optimizer adamw")
        if strategy.root_device.type == "cuda":
            # TF32 tensor cores for the matmuls that stay in float32 (all of them with 32-true precision).
            torch.set_float32_matmul_precision("high")
        if self.hparams.compile and stage == "fit" and not isinstance(strategy, ModelParallelStrategy):
            self.model.compile()  # under sharding, after the model is sharded (configure_model)

    def configure_model(self) -> None:
        """Under ModelParallelStrategy (`--trainer.strategy fsdp`, sharding.py) shard the GPT over the ranks."""
        trainer = attached_trainer(self)  # none when Lightning loads a checkpoint outside a run
        if trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy) and not is_sharded(self.model):
            shard_model(self.model, trainer.strategy.root_device)
            if self.hparams.compile and trainer.state.fn == "fit":
                self.model.compile()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        smoothing, consistency = self.optimizer_settings.label_smoothing, self.optimizer_settings.consistency
        if consistency:  # R-Drop: the batch twice, in one forward, under two dropout masks
            logits, _ = self.model(torch.cat([inputs, inputs]))
            first, second = logits.chunk(2)
            return (next_token_loss(logits, torch.cat([targets, targets]), smoothing)
                    + consistency * dropout_disagreement(first, second, targets))
        logits, _ = self.model(inputs)
        return next_token_loss(logits, targets, smoothing)  # logged in on_train_batch_end, at the logger's interval

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        _, loss = self.model(inputs, targets)
        # Weighted by the tokens that carry loss (all of them in text; the answers in conversations) and
        # synchronised across ranks by torchmetrics, so the val loss of a distributed run equals a
        # single-process evaluation of the same batches.
        # A rank's padding batch (every target ignored: data.rank_share) weighs nothing, and its loss (0/0) is
        # not NaN; a real batch's NaN stays NaN.
        weight = (targets >= 0).sum()
        self.val_loss.update(torch.where(weight > 0, loss, 0.0), weight=weight)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_ppl", torch.exp(loss))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Train loss and tokens/s, at the logger's interval only: a `self.log` call costs about 0.3 ms of
        Python (docs/benchmarks.md), so logging every step made training measurably slower. The learning rate
        is logged by Lightning's LearningRateMonitor, at the same interval."""
        trainer = self.trainer
        # With gradient accumulation this hook runs for every micro-batch; log once, after the optimizer step.
        if (batch_idx + 1) % trainer.accumulate_grad_batches or trainer.global_step % trainer.log_every_n_steps:
            return
        # Lightning's outputs["loss"] is the last micro-batch's loss divided by the accumulation count.
        self.log("train_loss", outputs["loss"] * trainer.accumulate_grad_batches, prog_bar=True)
        now = time.perf_counter()
        tokens = trainer.global_step * trainer.accumulate_grad_batches * batch[0].numel() * trainer.world_size
        if self._time_at_last_log is not None and now > self._time_at_last_log:
            rate = (tokens - self._tokens_at_last_log) / (now - self._time_at_last_log)
            self.log("tokens_per_s", float(rate), prog_bar=True)
        self._tokens_at_last_log, self._time_at_last_log = tokens, now

    def configure_optimizers(self):
        current = {unwrapped_name(name): param for name, param in self.model.named_parameters()}
        groups = [{**group, "params": [current[name] for name in group["names"]]} for group in self.optimizer_groups]
        try:
            optimizer = MuonAdamW(groups)
        except ValueError as error:  # Muon given flattened shards (FSDP), say
            raise PicoGPTError(f"{error}") from None
        peak, max_steps = self.optimizer_settings.learning_rate, self.trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.schedule.factor(step, peak, max_steps))
        # "name" is the metric LearningRateMonitor logs, one per parameter group: lr/muon, lr/decay, lr/no_decay.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "lr"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Everything needed to use the weights without Lightning, as plain types (weights_only-loadable)."""
        trainer = attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None) if trainer else None
        best = best_val_loss(trainer) if trainer else None
        checkpoint["picogpt"] = {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.model.config.to_dict(),
            "tokenizer": datamodule.tokenizer.to_json() if datamodule is not None else None,
            "tokenizer_sha256": datamodule.tokenizer_sha256 if datamodule is not None else None,
            "data": datamodule.describe() if datamodule is not None else None,
            "best_val_loss": best,
            "config": getattr(self, "run_config", None),
            "versions": {"picogpt_lightning": __version__, "torch": str(torch.__version__), "lightning": L.__version__,
                         "python": platform.python_version()},
            # Dropout draws from torch's global generator; Lightning does not save it, exact resume needs it.
            "torch_rng_state": torch.get_rng_state(),
        }
        template = getattr(datamodule, "chat_template", None)  # a fine-tuning run's (chat_data.py)
        if template is not None:
            checkpoint["picogpt"]["chat_template"] = template.to_dict()  # read by chat_template.template_from_meta

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_state_to_restore = checkpoint.get("picogpt", {}).get("torch_rng_state")
        # A weight-averaging run's checkpoint leads with the average; its trained weights are where training
        # stood. A resume without the averaging callback (which restores both itself) goes on from those.
        trained = checkpoint.get("current_model_state")
        if (trained is not None and attached_trainer(self) is not None and self.trainer.state.fn == "fit"
                and not any(isinstance(callback, WeightAveraging) for callback in self.trainer.callbacks)):
            checkpoint["state_dict"] = trained
            if is_sharded(self.model):  # the strategy (fsdp) has loaded the file's state_dict already
                load_whole_tensors(self, trained)

    def on_train_start(self) -> None:
        state = getattr(self, "_rng_state_to_restore", None)
        if state is not None:
            torch.set_rng_state(state)
            self._rng_state_to_restore = None


def best_val_loss(trainer) -> float | None:
    """The lowest val_loss any checkpoint callback tracking it has seen (ours, or one the user brought)."""
    scores = [float(callback.best_model_score) for callback in trainer.checkpoint_callbacks
              if getattr(callback, "monitor", None) == "val_loss" and getattr(callback, "mode", "min") == "min"
              and callback.best_model_score is not None]
    return min(scores) if scores else None


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as the plain GPT has it, without the prefixes that FSDP wrapping and activation
    checkpointing insert (torch.compile is applied in place and keeps the names)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name
