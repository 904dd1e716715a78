"""The LightningModule: the GPT's loss, AdamW with decay groups, the LR schedule, metrics and checkpoint facts."""

from __future__ import annotations

import math
import platform
import time
from contextlib import contextmanager
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torchmetrics import MeanMetric

from . import __version__
from .checkpoint import model_state_dict, read_checkpoint
from .errors import PicoGPTError, SettingsError
from .model import GPT, GPTConfig, next_token_loss
from .optim import MuonAdamW, OptimizerSettings, lr_at, param_groups
from .tokenizer import fingerprint, tokenizer_from_json, vocabulary

AUTO_TIE_MAX_TOKENS = 1_000_000
# Strategies that shard parameters over ranks, so no rank holds a whole matrix.
SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


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
    def __init__(
        self,
        vocab_size: int = 0,
        block_size: int = GPTConfig.block_size,
        n_layer: int = GPTConfig.n_layer,
        n_head: int = GPTConfig.n_head,
        n_embd: int = GPTConfig.n_embd,
        dropout: float = GPTConfig.dropout,
        bias: bool = GPTConfig.bias,
        tie_weights: bool | Literal["auto"] = "auto",
        position: Literal["learned", "rotary"] = GPTConfig.position,
        norm: Literal["layer", "rms"] = GPTConfig.norm,
        qk_norm: bool = GPTConfig.qk_norm,
        mlp: Literal["gelu", "relu2", "swiglu"] = GPTConfig.mlp,
        zero_init: bool = GPTConfig.zero_init,
        rope_theta: float = GPTConfig.rope_theta,
        train_tokens: int = 0,
        label_smoothing: float = 0.0,
        optimizer: Literal["adamw", "muon"] = "adamw",
        learning_rate: float = 6e-4,
        min_lr: float = 6e-5,
        weight_decay: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.95,
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
        muon_weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        cosine_lr: bool = True,
        warmup_iters: int = 100,
        lr_decay_iters: int | None = None,
        init_from: str | None = None,
        init_strict: bool = True,
        compile: bool = False,
    ):
        """
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
            mlp: gelu (GPT-2), relu2 (squared ReLU) or swiglu (Llama's gated MLP).
            zero_init: start each block's output projections at zero, so every block starts as the identity.
            rope_theta: base wavelength of rotary positions.
            train_tokens: training split size in tokens (set from the prepared data by the CLI).
            label_smoothing: label smoothing of the training loss (validation reports plain cross-entropy).
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
            cosine_lr: the older switch: false means lr_schedule constant.
            warmup_iters: optimizer steps of linear warmup.
            lr_decay_iters: step at which the decay reaches min_lr (default: trainer.max_steps).
            init_from: warm start: load weights (only) from this checkpoint when a new run starts (not on resume).
            init_strict: with init_from, require every weight to match; false loads what matches and lists the rest.
            compile: torch.compile the GPT (in place, so checkpoints keep plain parameter names).
        """
        super().__init__()
        self.save_hyperparameters()
        # Only the settings' own checks are turned into one line: a ValueError from building the model itself
        # would be a bug, and keeps its traceback.
        with model_settings_checked():
            config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                               n_embd=n_embd, dropout=dropout, bias=bias,
                               tie_weights=resolve_tie_weights(tie_weights, train_tokens), position=position,
                               norm=norm, qk_norm=qk_norm, mlp=mlp, zero_init=zero_init, rope_theta=rope_theta)
            settings = OptimizerSettings(optimizer=optimizer, learning_rate=learning_rate, betas=(beta1, beta2),
                                         weight_decay=weight_decay, muon_lr=muon_lr, muon_momentum=muon_momentum,
                                         muon_weight_decay=muon_weight_decay)
        self.model = GPT(config)
        with model_settings_checked():
            # Decided here, on the unwrapped model, by name: strategies that shard parameters (FSDP keeps the
            # original parameters as flattened 1-D shards) hand configure_optimizers shapes that no longer tell
            # a matrix from a bias.
            self.optimizer_groups = [
                {**{k: v for k, v in group.items() if k != "params"}, "name": group_name(group)}
                for group in param_groups(self.model.named_parameters(), settings)
            ]
        self.val_loss = MeanMetric()
        self._tokens_at_last_log = 0
        self._time_at_last_log = None

    def warm_start(self, path: str, strict: bool, tokenizer=None) -> None:
        """Load weights only (no optimizer, no step) from a checkpoint, opened with weights_only=True.

        When the checkpoint's tokenizer is not `tokenizer` (the data's), the token-indexed tensors (embedding,
        output layer) would put every id's row on another token: strict refuses; otherwise they are mapped
        token by token (a token both vocabularies have keeps its row, the others their fresh initialisation),
        or, between tokenizers of different kinds, left fresh. The CLI calls it once, when a new run starts;
        resuming a run (or rebuilding the module from one of its checkpoints) never loads them again."""
        checkpoint = read_checkpoint(path)
        source = model_state_dict(checkpoint)
        target = self.model.state_dict()
        rows = _token_rows(checkpoint, tokenizer)  # None: same tokenizer (or unknown), ids mean the same tokens
        if strict and rows is not None:
            raise PicoGPTError(
                f"warm start from {path}: its tokenizer is not this data's ({rows[1]}); pass "
                f"--model.init_strict false to map the embeddings and output layer token by token"
            )
        token_tensors = [k for k in TOKEN_INDEXED if k in source and k in target] if rows is not None else []
        mismatched = [k for k in source if k in target and source[k].shape != target[k].shape
                      and k not in token_tensors]
        missing = [k for k in target if k not in source]
        unexpected = [k for k in source if k not in target]
        if strict and (mismatched or missing or unexpected):
            detail = "; ".join(
                [f"{k}: {tuple(source[k].shape)} in checkpoint vs {tuple(target[k].shape)} here" for k in mismatched[:3]]
                + ([f"missing {', '.join(missing[:3])}"] if missing else [])
                + ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
            )
            raise PicoGPTError(
                f"warm start from {path} does not fit this model ({detail}); use the same model settings and data, "
                f"or pass --model.init_strict false to load only the weights that match"
            )
        loadable = {k: v for k, v in source.items()
                    if k in target and v.shape == target[k].shape and k not in token_tensors}
        mapped = []
        for key in token_tensors:
            pairs = rows[0]
            if pairs is not None and source[key].shape[1:] == target[key].shape[1:]:
                tensor = target[key].clone()
                tensor[pairs[:, 1]] = source[key][pairs[:, 0]].to(tensor.dtype)
                loadable[key] = tensor
                mapped.append(key)
        self.model.load_state_dict(loadable, strict=False)
        skipped = sorted(set(mismatched) | set(missing) | (set(token_tensors) - set(mapped)))
        message = f"warm start: loaded {len(loadable)} tensors from {path}"
        if mapped:
            message += f"; mapped {', '.join(mapped)} token by token ({rows[1]})"
        if skipped:
            message += f"; kept fresh initialisation for {len(skipped)}: {', '.join(skipped)}"
        rank_zero_only(print)(message)  # every rank loads; one says so

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if stage == "fit" and self.hparams.optimizer == "muon" and isinstance(strategy, SHARDED_STRATEGIES):
            raise PicoGPTError(
                f"--model.optimizer muon cannot run under {type(strategy).__name__}: Muon orthogonalises whole "
                f"matrices, and this strategy hands the optimizer flattened shards of them; use "
                f"--trainer.strategy ddp (the model is replicated), or --model.optimizer adamw"
            )
        if strategy.root_device.type == "cuda":
            # TF32 tensor cores for the matmuls that stay in float32 (all of them with 32-true precision).
            torch.set_float32_matmul_precision("high")
        if self.hparams.compile and stage == "fit":
            self.model.compile()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        logits, _ = self.model(inputs)
        loss = next_token_loss(logits, targets, self.hparams.label_smoothing)
        return loss  # logged in on_train_batch_end, at the logger's interval only

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        _, loss = self.model(inputs, targets)
        # Weighted by the tokens that carry loss (all of them in text; the answers in conversations) and
        # synchronised across ranks by torchmetrics, so the val loss of a distributed run equals a
        # single-process evaluation of the same batches.
        self.val_loss.update(loss, weight=(targets >= 0).sum())

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
        hp = self.hparams
        current = {unwrapped_name(name): param for name, param in self.model.named_parameters()}
        groups = [{**group, "params": [current[name] for name in group["names"]]} for group in self.optimizer_groups]
        try:
            optimizer = MuonAdamW(groups)
        except ValueError as error:  # Muon given flattened shards (FSDP), say
            raise PicoGPTError(f"{error}") from None
        decay_iters = hp.lr_decay_iters or max(1, self.trainer.max_steps)
        shape = hp.get("lr_schedule", "cosine") if hp.get("cosine_lr", True) else "constant"
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_at(step, 1.0, hp.min_lr / hp.learning_rate, hp.warmup_iters, decay_iters, shape),
        )
        # "name" is the metric LearningRateMonitor logs, one per parameter group: lr/muon, lr/decay, lr/no_decay.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "lr"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Everything needed to use the weights without Lightning, as plain types (weights_only-loadable)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        best = best_val_loss(self.trainer) if self._trainer else None
        checkpoint["picogpt"] = {
            "format": 1,
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
        if (trained is not None and self._trainer is not None and self.trainer.state.fn == "fit"
                and not any(isinstance(callback, WeightAveraging) for callback in self.trainer.callbacks)):
            checkpoint["state_dict"] = trained

    def on_train_start(self) -> None:
        state = getattr(self, "_rng_state_to_restore", None)
        if state is not None:
            torch.set_rng_state(state)
            self._rng_state_to_restore = None


TOKEN_INDEXED = ("wte.weight", "lm_head.weight", "lm_head.bias")  # one row per token id


def _token_rows(checkpoint: dict, tokenizer) -> tuple[torch.Tensor | None, str] | None:
    """None when the checkpoint's tokenizer is `tokenizer` (or either is unknown); else (pairs of (its row,
    our row) for the tokens both have, or None between tokenizers of different kinds; a note on the overlap)."""
    stored = checkpoint["picogpt"].get("tokenizer")
    if tokenizer is None or not stored:
        return None
    theirs = tokenizer_from_json(stored)
    if fingerprint(theirs) == fingerprint(tokenizer):
        return None
    if theirs.kind != tokenizer.kind:
        return None, f"a {theirs.kind} tokenizer, this data's is {tokenizer.kind}"
    index = {token: row for row, token in enumerate(vocabulary(theirs))}
    pairs = [(index[token], row) for row, token in enumerate(vocabulary(tokenizer)) if token in index]
    same_ids = sum(1 for their_row, our_row in pairs if their_row == our_row)
    note = (f"{len(pairs):,} of this data's {tokenizer.vocab_size:,} tokens are in its vocabulary, "
            f"{same_ids:,} of them under the same id")
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), note


def check_training_settings(settings: dict) -> None:
    """The model and recipe settings that would fail late (a division by zero, a NaN) or silently (a beta
    of 1.5), checked before any data is prepared; `settings` is this class's init arguments as a dict."""
    def need(name: str, ok, rule: str) -> None:
        value = settings.get(name)
        if name in settings and value is not None and not (isinstance(value, (int, float)) and ok(value)):
            raise SettingsError(f"model.{name} must be {rule}, got {value}")

    finite = math.isfinite
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        need(name, lambda v: v >= 1, "a positive integer")
    need("learning_rate", lambda v: finite(v) and v > 0, "a number > 0")
    need("min_lr", lambda v: finite(v) and v >= 0, "a number >= 0")
    need("weight_decay", lambda v: finite(v) and v >= 0, "a number >= 0")
    for name in ("beta1", "beta2"):
        need(name, lambda v: 0 <= v < 1, "in [0, 1)")
    for name in ("dropout", "label_smoothing"):
        need(name, lambda v: 0 <= v < 1, "in [0, 1)")
    need("muon_lr", lambda v: finite(v) and v > 0, "a number > 0")
    need("muon_momentum", lambda v: 0 <= v < 1, "in [0, 1)")
    need("muon_weight_decay", lambda v: finite(v) and v >= 0, "a number >= 0")
    need("rope_theta", lambda v: finite(v) and v > 0, "a number > 0")
    need("warmup_iters", lambda v: v >= 0, "a number of steps >= 0")
    need("lr_decay_iters", lambda v: v >= 1, "a positive number of steps (or null: trainer.max_steps)")


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


ARCHITECTURE_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "tie_weights", "position",
                     "norm", "qk_norm", "mlp")


def model_mismatch_message(saved: dict, current: dict) -> str | None:
    """None when a checkpoint's model config has the same architecture as the current one (dropout and the
    initialisation may differ), else a message that names each difference. Keys an old checkpoint lacks take
    the classic values it was trained with."""
    saved = GPTConfig.from_dict(saved).to_dict()
    current = GPTConfig.from_dict(current).to_dict()
    differences = ", ".join(f"{k} {saved.get(k)} in checkpoint vs {current.get(k)} now"
                            for k in ARCHITECTURE_KEYS if saved.get(k) != current.get(k))
    if not differences:
        return None
    return (f"the checkpoint's model does not match this config ({differences}); resume with the config the run "
            f"was started with, or start a new run with --model.init_from CHECKPOINT --model.init_strict false")


def optimizer_mismatch_message(saved_hparams: dict, optimizer: str) -> str | None:
    """None when a checkpoint was trained with `optimizer` (checkpoints from before the choice used adamw)."""
    saved = saved_hparams.get("optimizer", "adamw")
    if saved == optimizer:
        return None
    return (f"the checkpoint was trained with optimizer {saved}, not {optimizer}: its optimizer state cannot "
            f"continue with another rule; resume with --model.optimizer {saved}, or start a new run from its "
            f"weights with --model.init_from CHECKPOINT --model.optimizer {optimizer}")
