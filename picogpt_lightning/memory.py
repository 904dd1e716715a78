"""Will a model and one batch fit in memory? An estimate made from the settings alone, before any data is
prepared or any tensor allocated, so that `--model.n_embd 1000000` or `--data.batch_size 1000000000` is refused
in one line instead of filling memory for minutes and ending in an allocator traceback.

The estimate is a lower bound, so it never refuses a run that fits: fp32 weights, their gradients and the
optimizer's state (AdamW: two numbers a parameter; Muon: one for its matrices, counted as one), plus the
activations one training batch keeps for the backward pass (about 16 numbers per token, layer and width unit
in our blocks, plus the logits and their gradient), at 2 bytes a number under 16-bit precision. Attention's
T x T scores are left out (scaled_dot_product_attention may not keep them; the CPU's explicit attention at
short contexts does, model.causal_attention_cpu), and so is everything else.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import SettingsError

BYTES = 4  # fp32 weights, gradients and optimizer state
ACTIVATIONS_PER_TOKEN_LAYER_WIDTH = 16
GiB = 1 << 30


@dataclass
class MemoryEstimate:
    parameters: int
    training_bytes: int  # weights + gradients + optimizer state
    batch_bytes: int  # activations of one batch

    @property
    def total(self) -> int:
        return self.training_bytes + self.batch_bytes


def count_parameters(vocab_size: int, block_size: int, n_layer: int, n_embd: int, mlp: str = "gelu",
                     position: str = "learned", tie_weights: bool = True, bias: bool = True) -> int:
    """The GPT's parameters (model.py's layout, norms and biases included); tests check it against GPT."""
    hidden = 32 * math.ceil(8 * n_embd / 3 / 32) if mlp == "swiglu" else 4 * n_embd
    mlp_weights = (3 if mlp == "swiglu" else 2) * n_embd * hidden
    mlp_biases = (hidden * (2 if mlp == "swiglu" else 1) + n_embd) if bias else 0
    attention = 4 * n_embd * n_embd + (4 * n_embd if bias else 0)
    norm = n_embd * (2 if bias else 1)  # a gain, and a bias when LayerNorm has one (RMSNorm never: within 1%)
    per_layer = attention + mlp_weights + mlp_biases + 2 * norm
    embeddings = vocab_size * n_embd * (1 if tie_weights else 2) + (block_size * n_embd if position == "learned" else 0)
    return n_layer * per_layer + embeddings + norm


def estimate(vocab_size: int, block_size: int, n_layer: int, n_embd: int, batch_size: int, optimizer: str = "adamw",
             precision: str = "32-true", **architecture) -> MemoryEstimate:
    parameters = count_parameters(vocab_size, block_size, n_layer, n_embd, **architecture)
    states = 1 if optimizer == "muon" else 2
    training = parameters * BYTES * (2 + states)
    number = 2 if "16" in str(precision) else BYTES
    tokens = batch_size * block_size
    batch = tokens * (n_layer * n_embd * ACTIVATIONS_PER_TOKEN_LAYER_WIDTH + 2 * vocab_size) * number
    return MemoryEstimate(parameters, training, batch)


def available_host_bytes() -> int | None:
    """Memory the machine can still give (MemAvailable plus free swap), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in file if line.split()[1:]}
        return fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def accelerator_bytes(accelerator: object) -> tuple[int | None, str]:
    """Memory of one device that will train, and its name: a CUDA GPU's when the run uses one, else the host's."""
    if str(accelerator) in ("gpu", "cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, f"the GPU's {torch.cuda.get_device_name(0)}"
    return available_host_bytes(), "this machine's available memory"


def _gib(value: int) -> str:
    return f"{value / GiB:,.1f} GiB" if value < 1 << 50 else f"{value / GiB:.2e} GiB"


def check_fits(estimated: MemoryEstimate, available: int | None, where: str, processes: int = 1) -> None:
    """Refuse, in one line, a run whose estimate exceeds `available` bytes (shared by `processes` on the host)."""
    if available is None:
        return
    need = estimated.total * processes
    if need > available:
        each = f" ({processes} processes)" if processes > 1 else ""
        raise SettingsError(
            f"this run needs at least {_gib(need)}{each} ({estimated.parameters:,} parameters: "
            f"{_gib(estimated.training_bytes)} for weights, gradients and optimizer state; one batch's activations: "
            f"{_gib(estimated.batch_bytes)}), "
            f"more than {where} ({_gib(available)}): lower --model.n_embd / --model.n_layer or --data.batch_size / "
            f"--data.block_size")


def check_run_memory(model: dict, data: dict, trainer: dict) -> None:
    """The fit/finetune settings (plain dicts of the model, data and trainer sections) against the memory of
    the device that will train. Unknown parts count at their smallest (a char vocabulary as 0 tokens, `auto`
    tied embeddings as tied), so the check never refuses a run that fits."""
    sizes = {name: model.get(name) for name in ("n_layer", "n_embd")}
    block_size, batch_size = data.get("block_size") or model.get("block_size"), data.get("batch_size")
    if not all(isinstance(value, int) and value > 0 for value in (*sizes.values(), block_size, batch_size)):
        return  # the other checks say what is wrong with these
    vocab = model.get("vocab_size") or (data.get("vocab_size") if data.get("mode", "token") == "token" else 0) or 0
    architecture = {name: model[name] for name in ("mlp", "position", "bias")
                    if isinstance(model.get(name), (str, bool))}
    architecture["tie_weights"] = model.get("tie_weights") is not False
    passes = 2 if model.get("consistency") else 1  # R-Drop runs each batch twice, in one forward
    estimated = estimate(int(vocab), block_size, sizes["n_layer"], sizes["n_embd"], batch_size * passes,
                         str(model.get("optimizer", "adamw")), str(trainer.get("precision") or "32-true"),
                         **architecture)
    if estimated.total < 1 << 30:
        return  # under a GiB: not worth asking the machine
    if any(word in str(trainer.get("strategy")) for word in ("fork", "notebook")):
        return  # asking CUDA for its memory here would break the forked workers' own CUDA
    available, where = accelerator_bytes(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices")
    host = where.startswith("this machine")
    check_fits(estimated, available, where, devices if host and isinstance(devices, int) and devices > 1 else 1)
