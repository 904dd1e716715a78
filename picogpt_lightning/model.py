"""A GPT language model in plain PyTorch.

Reads top to bottom: the configuration, the KV cache, rotary positions, the attention layer, the MLPs, the
transformer block, the model. Nothing here knows about Lightning, tokenizers or files, so the model can be used
from any PyTorch code.

The architecture options span GPT-2's 2019 design (learned positions, LayerNorm, GELU: the "classic" values,
which old checkpoints were trained with) and the 2024 one that modded-nanogpt and nanochat train faster with
(rotary positions, RMSNorm, QK-norm, ReLU^2 or SwiGLU, zero-initialised output projections). Parameter names
follow the classic model, so its checkpoints load unchanged; the modern options add or drop parameters without
renaming the others.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

CHOICES = {"position": ("learned", "rotary"), "norm": ("layer", "rms"), "mlp": ("gelu", "gelu_tanh", "relu2", "swiglu")}

# GPT-2's architecture. Checkpoints written before the options existed lack these keys and were trained with
# these values, whatever the dataclass defaults become.
CLASSIC = {"position": "learned", "norm": "layer", "qk_norm": False, "mlp": "gelu", "zero_init": False}

# Up to this many positions, CPU attention in 16-bit precision runs as plain matmuls (causal_attention_cpu).
CPU_ATTENTION_STEPS = 192
RMS_NORM_EPS = 1e-6  # Llama's and Qwen3's value, so exported models normalise identically
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, GPT-2's value


@dataclass
class GPTConfig:
    """The model's shape and architecture.

    position: "learned" (GPT-2's table of block_size vectors, `wpe`) or "rotary" (RoPE on queries and keys,
        Llama's rotate-half layout; no position parameters). rope_theta is RoPE's base wavelength.
    norm: "layer" (LayerNorm, with a bias when `bias`) or "rms" (RMSNorm with a learned gain, no bias).
    qk_norm: RMSNorm over each head's queries and keys before rotary (Qwen3's q_norm/k_norm), which bounds the
        attention logits and lets higher learning rates train stably.
    mlp: "gelu" (4x wide, exact GELU), "gelu_tanh" (GPT-2's own tanh-approximated GELU, transformers'
        `gelu_new`, so imported GPT-2 weights give GPT-2's logits), "relu2" (4x wide, relu(x)^2) or "swiglu"
        (silu(gate) * up, `mlp_hidden` wide so it costs about what the 4x MLPs cost).
    mlp_width: the MLP's hidden width; None for the default above (`mlp_hidden`).
    n_kv_head: key/value heads (grouped-query attention, Llama's num_key_value_heads): each serves
        n_head / n_kv_head query heads, which shrinks the KV cache by that factor. None: one per query head.
    head_dim: width of one head; None for n_embd / n_head (Qwen3 uses 128 with any width).
    norm_eps: the norms' epsilon; None for 1e-5 with LayerNorm, 1e-6 with RMSNorm.
    attention_bias, mlp_bias: biases in the attention and MLP linear layers; None follows `bias` (which also
        decides LayerNorm's bias). Llama's attention_bias and mlp_bias.
    zero_init: start the attention and MLP output projections at zero (modded-nanogpt), so every block begins
        as the identity, instead of GPT-2's normal init scaled by depth.
    tie_weights: share the token embedding with the output layer.
    """

    vocab_size: int
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    position: str = CLASSIC["position"]
    rope_theta: float = 10000.0
    norm: str = CLASSIC["norm"]
    qk_norm: bool = CLASSIC["qk_norm"]
    mlp: str = CLASSIC["mlp"]
    zero_init: bool = CLASSIC["zero_init"]
    mlp_width: int | None = None
    n_kv_head: int | None = None
    head_dim: int | None = None
    norm_eps: float | None = None
    attention_bias: bool | None = None
    mlp_bias: bool | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_width", "n_kv_head", "head_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:  # None: the default, for the last three
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}); "
                             f"each key/value head serves the same number of query heads")
        if self.norm_eps is not None and not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                valid = ", ".join(choices[:-1]) + f" or {choices[-1]}"
                raise ValueError(f"{name} {getattr(self, name)!r} is unknown; choose {valid}")
        if self.position == "rotary" and self.head_size % 2:
            raise ValueError(
                f"position 'rotary' needs an even head size, but n_embd {self.n_embd} / n_head {self.n_head} = "
                f"{self.head_size}; pick n_embd and n_head with an even ratio (e.g. n_embd="
                f"{self.n_head * (self.head_size + 1)}) or use position 'learned'"
            )
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a number > 0, got {self.rope_theta}")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def eps(self) -> float:
        return self.norm_eps if self.norm_eps is not None else RMS_NORM_EPS if self.norm == "rms" else LAYER_NORM_EPS

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the MLP. SwiGLU has three matrices instead of two, so 8/3 * n_embd (rounded up to a
        multiple of 32 for friendly matmul shapes) keeps its parameters and FLOPs close to the 4x MLPs'."""
        if self.mlp_width is not None:
            return self.mlp_width
        if self.mlp == "swiglu":
            return 32 * math.ceil(8 * self.n_embd / 3 / 32)
        return 4 * self.n_embd

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        """A config from a saved dict; architecture keys it lacks (an old checkpoint's) take the CLASSIC values."""
        known = {f.name for f in fields(cls)}
        return cls(**{**CLASSIC, **{k: v for k, v in values.items() if k in known}})


class KVCache:
    """Keys and values of the positions seen so far, one buffer pair per layer.

    Generation then feeds only the new token through the network instead of the whole context, which turns
    each step from O(T^2) attention over the full prefix into O(T). Buffers hold at most `block_size`
    positions because the position tables end there; the caller slides the window when it is full. Keys are
    stored after rotary is applied, so cached keys never need rotating again.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, config.kv_heads, config.block_size, config.head_size)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0
        self.capacity = config.block_size

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def positions(self, steps: int) -> torch.Tensor:
        """Positions of the next `steps` tokens: every row continues at `length` (batching.SlotCache gives
        each row its own)."""
        return torch.arange(self.length, self.length + steps, device=self.keys[0].device)

    def attention_mask(self, steps: int) -> torch.Tensor | None:
        """Which keys the next `steps` queries may see: each every key up to its own position (None when
        that is plain causal attention or a single query seeing every cached key)."""
        if not self.length or steps == 1:
            return None
        return torch.ones(steps, self.length + steps, dtype=torch.bool, device=self.keys[0].device).tril(self.length)

    def advance(self, steps: int) -> None:
        self.length += steps


def make_norm(config: GPTConfig, size: int) -> nn.Module:
    if config.norm == "rms":
        return nn.RMSNorm(size, eps=config.eps)
    return nn.LayerNorm(size, eps=config.eps, bias=config.bias)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for positions 0..block_size-1, in Hugging Face Llama's rotate-half layout: the
    head's first half pairs with its second half, frequency i of head_size/2 shared by dimensions i and
    i + head_size/2. Rotating q and k by their position makes attention scores depend on relative distance.

    The tables are non-persistent buffers: they follow .to(device) but are not in the state dict.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        half = config.head_size // 2
        inverse_frequency = 1.0 / config.rope_theta ** (torch.arange(half, dtype=torch.float32) / half)
        angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inverse_frequency)
        angles = torch.cat([angles, angles], dim=-1)  # (block_size, head_size)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[start : start + steps], self.sin[start : start + steps]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at `positions`: (steps,) shared by every row, or (batch, steps), one row each."""
        cos, sin = self.cos[positions], self.sin[positions]
        return (cos, sin) if positions.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, steps, head_size) rotated as Llama's `apply_rotary_pos_emb` does."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


def causal_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Causal attention over whole sequences as plain matmuls, the softmax in float32. On the CPU in bfloat16 at
    contexts up to CPU_ATTENTION_STEPS this is 1.8-3x faster than scaled_dot_product_attention's kernels (a 5x320
    training step 1.13x as fast); at longer contexts, and in float32, the fused kernels win (docs/benchmarks.md)."""
    if k.size(1) != q.size(1):  # grouped-query attention: each kv head serves n_head / n_kv_head query heads
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    steps = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
    future = torch.ones(steps, steps, dtype=torch.bool, device=q.device).triu(1)
    weights = torch.softmax(scores.float().masked_fill(future, float("-inf")), dim=-1).to(v.dtype)
    return F.dropout(weights, dropout) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        self.layer_index = layer_index
        self.dropout = config.dropout
        bias = config.bias if config.attention_bias is None else config.attention_bias
        # Queries for every head, then keys and values for the kv heads only (all heads without GQA).
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * self.n_kv_head) * self.head_size, bias=bias)
        # One gain of head_size shared by all heads, as Qwen3's q_norm / k_norm.
        self.q_norm = nn.RMSNorm(config.head_size, eps=config.eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(config.head_size, eps=config.eps) if config.qk_norm else None
        self.proj = nn.Linear(config.n_head * self.head_size, config.n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch, steps, _ = x.shape
        sizes = (self.n_head * self.head_size, self.n_kv_head * self.head_size, self.n_kv_head * self.head_size)
        q, k, v = (t.view(batch, steps, -1, self.head_size) for t in self.qkv(x).split(sizes, dim=2))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        past, mask = 0, None
        if cache is not None:
            # New queries sit at positions past..past+steps-1 and may see every key up to their own.
            past, mask = cache.length, cache.attention_mask(steps)
            k, v = cache.append(self.layer_index, k, v)
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype != torch.float32 and cache is None and 1 < steps <= CPU_ATTENTION_STEPS:
            y = causal_attention_cpu(q, k, v, dropout)
        else:
            # scaled_dot_product_attention picks flash / memory-efficient kernels where the device has them.
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask is None and past == 0 and steps > 1,
                enable_gqa=self.n_kv_head != self.n_head,  # each kv head serves n_head / n_kv_head query heads
            )
        y = y.transpose(1, 2).contiguous().view(batch, steps, self.n_head * self.head_size)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Two matrices around a GELU (exact, or GPT-2's tanh approximation) or a squared ReLU (modded-nanogpt:
    sparser and cheaper, and it trained faster there)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.activation = config.mlp
        bias = config.bias if config.mlp_bias is None else config.mlp_bias
        self.fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=bias)
        self.proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(x)
        if self.activation == "relu2":
            hidden = F.relu(hidden).square()
        else:
            hidden = F.gelu(hidden, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.dropout(self.proj(hidden))


class SwiGLU(nn.Module):
    """Llama's gated MLP: silu(gate(x)) * up(x), then down. `gate`, `up` and `proj` are Llama's gate_proj,
    up_proj and down_proj."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        bias = config.bias if config.mlp_bias is None else config.mlp_bias
        self.gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=bias)
        self.up = nn.Linear(config.n_embd, config.mlp_hidden, bias=bias)
        self.proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block: normalising before each sublayer keeps the residual stream an identity
    path, which is what lets deep stacks train without warm-up tricks."""

    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, rotary)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:
            self.rotary = RotaryEmbedding(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # Sharing the input and output embeddings saves vocab_size * n_embd parameters, which on small
            # corpora is most of the model and the part most prone to overfitting.
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                if config.zero_init:
                    # Each block starts as the identity; the gradient still reaches the projection (its input
                    # is not zero), so it leaves zero on the first step and the layers before it on the next.
                    nn.init.zeros_(param)
                else:
                    # GPT-2: each residual branch adds to the stream, so its output projection is scaled down by
                    # sqrt(2 * n_layer) to keep the variance of the stream independent of depth.
                    nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (batch, steps, vocab) for the positions of `idx` (batch, steps) and, given `targets`, their
        mean cross-entropy (`next_token_loss`; a training loss with label smoothing is the caller's to compute
        from the logits).

        With a `cache`, `idx` continues the cached positions. `last_only` computes the logits of the last
        position only (batch, 1, vocab), which is all generation needs and spares the output layer's cost,
        the largest matmul of a small model with a big vocabulary, for every other position.
        """
        steps = idx.size(1)
        start = cache.length if cache is not None else 0
        if start + steps > self.config.block_size:
            raise ValueError(
                f"sequence of {start + steps} tokens is longer than block_size {self.config.block_size}"
            )
        if last_only and targets is not None:
            raise ValueError("last_only gives one position's logits, so it cannot score targets")
        x = self.wte(idx)
        rotary = None
        positions = cache.positions(steps) if cache is not None else torch.arange(steps, device=idx.device)
        if self.config.position == "learned":
            x = x + self.wpe(positions)
        else:
            rotary = self.rotary.at(positions)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cache, rotary)
        if cache is not None:
            cache.advance(steps)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.ln_f(x))
        loss = next_token_loss(logits, targets) if targets is not None else None
        return logits, loss

    def new_cache(self, batch_size: int = 1) -> KVCache:
        param = self.wte.weight
        return KVCache(self.config, batch_size, param.device, param.dtype)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embedding (learned positions only) is left out by default, as in the
        GPT-2 paper's counts. Tied weights are counted once."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.position == "learned":
            total -= self.wpe.weight.numel()
        return total

    def flops_per_token(self, sequence_length: int | None = None) -> int:
        """Training FLOPs per token (forward and backward): 6 per parameter outside the position table (every
        matrix, SwiGLU's three included) plus attention's 12 * n_layer * n_embd * T, the PaLM appendix B
        estimate. Norms and rotary are elementwise and left out."""
        cfg = self.config
        steps = sequence_length or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * steps


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of `logits` (batch, steps, vocab) against `targets` (batch, steps); targets equal to
    -1 are ignored. The one definition of the loss, for the model's forward and the trainer's smoothed loss."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=-1,
        label_smoothing=label_smoothing,
    )


def dropout_disagreement(first: torch.Tensor, second: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """R-Drop's term: the symmetric KL divergence between two predictions of the same positions (logits of the
    same batch under two dropout masks), halved, averaged over the positions that have a target (not -1)."""
    first, second = first.float().log_softmax(-1), second.float().log_softmax(-1)
    # KL(p || q) + KL(q || p) = sum over the vocabulary of (p - q)(log p - log q)
    per_position = ((first.exp() - second.exp()) * (first - second)).sum(-1)
    scored = targets >= 0
    return (per_position * scored).sum() / scored.sum().clamp(min=1) / 2
