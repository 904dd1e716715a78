"""A recipe sized to the corpus and the time budget: what `picogpt fit --data.text_path FILE --budget 3m` trains
when no --config is given.

One dial sets the model, as in nanochat: depth d gives d blocks of width 64*d (heads of 64). The rule picks the
deepest model the budget still gives MIN_STEPS optimizer steps and MIN_TOKENS_PER_PARAM trained tokens per
parameter at its measured step time, and the corpus can hold (at most MAX_PARAMS_PER_TOKEN parameters per
training token):

    choose the largest d with steps(d) >= MIN_STEPS, trained tokens(d) >= MIN_TOKENS_PER_PARAM * params(d)
    and params(d) <= MAX_PARAMS_PER_TOKEN * training tokens

Measured here (docs/benchmarks.md, issue 26), at equal wall on a CPU: a larger model that sees each token fewer
times wins in these minutes-long runs, far below the ~20 tokens per parameter of compute-optimal LLM scaling
(configs/char.yaml's 4x256 at 0.14 tokens per parameter beat a 2x128 at ~9 on a 250 KB text); what a model needs
is enough steps for warmup and decay, and not far under one trained token per parameter (on a 1 MB text in 50
minutes a 6x384 at 0.2 lost to a 5x320 at 0.8 and a 4x256 at 2.8). On a corpus that even the deepest model
would repeat more than MAX_EPOCHS times, the run stops there, before the budget ends, rather than memorise (the
issue's 4x128 without dropout collapsed after 9 epochs); dropout once the text repeats (0.1, then 0.2 past 16
passes), and early stopping on a val plateau (Lightning's EarlyStopping, in the written config) guards the rest.
Where the budget has time to spare on such a text, it goes into R-Drop (CONSISTENCY): each batch twice, under two
dropout masks, with the two predictions pulled together, which regularises where more passes would memorise.
MAX_EPOCHS is 24 (the figures of this paragraph were validated on a sample of the val split, about 0.016 easier
than the whole of it): on a 250 KB text a 4x256 still improved at 16 epochs with dropout 0.1 (1.088 nats/char, against
1.115 capped at 8 and configs/char.yaml's best 1.119 at 13 epochs before it memorised); at ~25 epochs dropout 0.1
memorised (early stopping at 1.108) where 0.2 reached 1.079-1.080, last within 0.001 of best; a schedule of 32
passes with dropout 0.2 memorised from about the 25th, before its decay (early stopping at 1.086). Characters
train at the speedrun's rates (AdamW 1e-2 beside Muon, a linear decay to 0: 0.02 nats better than char.yaml's 1e-3
cosine at 3 minutes); tokens at configs/tiny.yaml's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

from .errors import SettingsError

DEPTHS = (1, 2, 3, 4, 5, 6, 8)
MIN_STEPS = 200
# At most this many parameters (outside the embeddings) per training token: configs/char.yaml's 3.1M on the
# bundled 324K-character text trained 14 epochs with dropout 0.1 to its best val (about 10 per token).
MAX_PARAMS_PER_TOKEN = 16
# At least this many trained tokens per parameter: on a 1 MB text in 50 minutes a 6x384 at 0.2 was far behind at
# equal time (a 4x256 at 2.8 reached 1.328 nats/char, a 5x320 at 0.8 1.332-1.342); with 1.0, a 10 MB text in 2
# minutes at token level got a 1x64 that ended 0.018 nats/char behind the 2x128 at 0.94 (docs/benchmarks.md).
MIN_TOKENS_PER_PARAM = 0.5
# The depth at which the sized recipe measures whether mixed precision is faster on this machine.
REFERENCE_DEPTH = 4
MAX_EPOCHS = 24.0
MIN_BLOCK = 16
# A validation reads the whole val split when it holds at most this many blocks (50 batches of 32), else this
# many random ones.
MAX_VAL_BLOCKS = 1600
# Rough bytes per token of a byte-level BPE trained on the text itself, to size a corpus before it is encoded.
BYTES_PER_BPE_TOKEN = 3.0

CHAR_RECIPE = {"optimizer": "muon", "position": "rotary", "norm": "rms", "qk_norm": True, "mlp": "swiglu",
               "zero_init": True, "bias": False, "learning_rate": 1.0e-2, "min_lr": 0.0, "beta2": 0.99,
               "weight_decay": 0.1, "lr_schedule": "linear"}
TOKEN_RECIPE = {"optimizer": "muon", "position": "rotary", "norm": "rms", "qk_norm": True, "mlp": "swiglu",
                "zero_init": True, "bias": False, "learning_rate": 6.0e-3, "min_lr": 0.0, "weight_decay": 0.1,
                "lr_schedule": "linear"}
# Past this many passes over the text, dropout rises to 0.2 and Muon's weight decay stops (dropout_for,
# muon_weight_decay_for).
MANY_PASSES = 16
MUON_WEIGHT_DECAY = 0.1
# R-Drop's weight (model.consistency) for characters that the budget, even at the doubled step cost, still goes
# through more than MANY_PASSES times: there the text, not the time, limits a plain run (on a 250 KB text it ends
# its 24 passes in half of char.yaml's wall; more passes memorise). With each batch twice, a 4x256 with dropout
# 0.2 reached 1.050-1.053 nats/char on the whole val split in 96-97% of char.yaml's wall, against 1.095 without
# (char.yaml: 1.123; docs/benchmarks.md, issue 26 eighth round).
CONSISTENCY = 1.0
WARMUP_FRACTION = 0.08
GRADIENT_CLIP = 1.0  # as every shipped config
# Token runs that go through their text more than TOKEN_EMA_MIN_EPOCHS times validate and save an EMA of the
# weights, as configs/tiny.yaml (its decay; ~6 passes there, 0.025 nats lower): 0.02-0.07 lower on a 250 KB text
# at ~10 passes, but 0.16 and 0.29 nats per token higher at 1.7 and 0.1 passes of a 1 MB and a 10 MB text, where
# the average lags a model still learning fresh text. At character level it cost 0.006-0.015 (docs/benchmarks.md,
# Weight averaging and issue 26), so characters train without it.
TOKEN_EMA_DECAY = 0.995
TOKEN_EMA_MIN_EPOCHS = 4.0


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    batch_size: int
    passes: int = 1  # how many times a step runs its batch: 2 with R-Drop (CONSISTENCY), at about twice the cost

    @property
    def params(self) -> int:
        """Non-embedding parameters: attention 4C^2 and a SwiGLU MLP ~8C^2 per block."""
        return 12 * self.n_layer * self.n_embd**2

    @property
    def tokens_per_step(self) -> int:
        return self.block_size * self.batch_size


def shape_at(depth: int, block_size: int, batch_size: int) -> Shape:
    return Shape(n_layer=depth, n_embd=64 * depth, n_head=depth, block_size=block_size, batch_size=batch_size)


@dataclass(frozen=True)
class Recipe:
    shape: Shape
    mode: str
    train_tokens: int
    budget_tokens: int  # what the budget trains at this shape's step time
    dropout: float
    max_epochs: float
    settings: dict = field(default_factory=dict)  # dotted keys, e.g. "model.n_layer"
    precision: str | None = None
    precision_reason: str = ""  # why, as measured: "a step 1.4x as fast as float32's here"

    @property
    def planned_tokens(self) -> int:
        return min(self.budget_tokens, int(self.max_epochs * self.train_tokens))

    @property
    def averaged(self) -> bool:
        """Whether the run validates and saves an EMA of its weights (TOKEN_EMA_DECAY)."""
        return self.mode == "token" and self.planned_tokens > TOKEN_EMA_MIN_EPOCHS * self.train_tokens

    @property
    def data_limited(self) -> bool:
        return self.budget_tokens > self.max_epochs * self.train_tokens

    def line(self) -> str:
        shape = self.shape
        limit = (f"capped at {self.max_epochs:g} epochs (the corpus, not the budget, limits it)" if self.data_limited
                 else f"{self.planned_tokens / self.train_tokens:.2g} epochs in the budget")
        steps = self.planned_tokens // shape.tokens_per_step
        per_param = self.planned_tokens / shape.params
        return (f"recipe for {self.train_tokens:,} training tokens ({self.mode}): {shape.n_layer} layers x "
                f"{shape.n_embd} ({shape.params / 1e6:.2g}M parameters outside the embeddings), context "
                f"{shape.block_size}, batch {shape.batch_size}, dropout {self.dropout:g}"
                + (f", Muon weight decay {decay:g}" if (decay := self.settings.get("model.muon_weight_decay")) else "")
                + (f", R-Drop consistency {weight:g} (each batch twice)"
                   if (weight := self.settings.get("model.consistency")) else "")
                + (f", {self.precision}" if self.precision else "")
                + (f" ({self.precision_reason})" if self.precision and self.precision_reason else "")
                + f"; the deepest model the corpus holds that the budget gives {MIN_STEPS}+ steps and "
                f"{MIN_TOKENS_PER_PARAM:g}+ tokens per parameter (~{steps:,} steps, {per_param:.2g}), {limit}")


def corpus_tokens(size_bytes: int, mode: str) -> int:
    """A corpus's tokens before it is encoded: its characters (~bytes), or bytes / BYTES_PER_BPE_TOKEN."""
    return size_bytes if mode == "char" else int(size_bytes / BYTES_PER_BPE_TOKEN)


def context_for(val_tokens: int, mode: str, val_fraction: float) -> int:
    """Context length: 128 (characters) or 64 (tokens), halved until the validation split holds a few blocks."""
    block = 128 if mode == "char" else 64
    while block > MIN_BLOCK and val_tokens < 4 * (block + 1):
        block //= 2
    if val_tokens < block + 1:
        unit = "characters" if mode == "char" else "tokens"
        raise SettingsError(
            f"the corpus is too small for a sized recipe: its validation split holds ~{val_tokens} {unit}, fewer "
            f"than the {block + 1} that the smallest context ({block}) needs; give a text of at least "
            f"{math.ceil((block + 1) / val_fraction):,} {unit}, or a --config with its own --data.block_size"
        )
    return block


def dropout_for(epochs: float) -> float:
    """No dropout on a first pass over the text, 0.1 when it comes round again, 0.2 past 16 passes: 0.2 cost 0.12
    nats at 7 epochs of a 250 KB text in 8 minutes, and won by 0.03 at ~25 (docs/benchmarks.md, issue 26)."""
    return 0.0 if epochs <= 1 else 0.1 if epochs <= MANY_PASSES else 0.2


def muon_weight_decay_for(mode: str, epochs: float) -> float:
    """Muon's weight decay: MUON_WEIGHT_DECAY for characters seen at most 16 times, none past that
    (docs/benchmarks.md, issue 26): with it, and validations in 5% of the budget, a 5x320 reached 1.311 nats/char
    at ~6 passes of a 1 MB text, against 1.318 without; but a 4x256 memorised a 250 KB text from its 25th pass
    (early stopping at 1.094, against 1.081). Token runs are not measured with it and train without."""
    return MUON_WEIGHT_DECAY if mode == "char" and epochs <= MANY_PASSES else 0.0


def reference_shape(size_bytes: int, mode: str, val_fraction: float) -> Shape:
    """The shape at REFERENCE_DEPTH with the context and batch the recipe gives this corpus: where the precision
    is measured."""
    val_tokens = int(corpus_tokens(size_bytes, mode) * val_fraction)
    return shape_at(REFERENCE_DEPTH, context_for(val_tokens, mode, val_fraction), 32 if mode == "char" else 16)


def choose(size_bytes: int, mode: str, val_fraction: float, budget_seconds: float,
           tokens_in: Callable[[Shape, float], int], vocab_size: int = 2000, precision: str | None = None) -> Recipe:
    """The recipe for a corpus of `size_bytes` in `mode`; `tokens_in(shape, seconds)` is how many tokens the
    budget trains at that shape (measured by a probe on the real machine, or a fake one in the tests) in
    `precision` (a trainer.precision the caller chose by measuring it, or None to leave the trainer's)."""
    tokens = corpus_tokens(size_bytes, mode)
    val_tokens = int(tokens * val_fraction)
    train_tokens = max(1, tokens - val_tokens)
    reference = reference_shape(size_bytes, mode, val_fraction)
    chosen = None
    for depth in DEPTHS:
        shape = shape_at(depth, reference.block_size, reference.batch_size)
        budget_tokens = tokens_in(shape, budget_seconds)
        trained = min(budget_tokens, MAX_EPOCHS * train_tokens)
        too_few_steps = budget_tokens < MIN_STEPS * shape.tokens_per_step
        too_few_tokens = trained < MIN_TOKENS_PER_PARAM * shape.params
        if chosen is not None and (too_few_steps or too_few_tokens
                                   or shape.params > MAX_PARAMS_PER_TOKEN * train_tokens):
            break
        chosen = (shape, budget_tokens)
    shape, budget_tokens = chosen

    def epochs_of(tokens: int) -> float:
        return min(tokens, MAX_EPOCHS * train_tokens) / train_tokens

    consistency = 0.0
    if mode == "char" and epochs_of(budget_tokens) > MANY_PASSES:
        # Time to spare on a small text: each batch twice (R-Drop), where that still passes it often enough.
        paired = replace(shape, passes=2)
        paired_tokens = tokens_in(paired, budget_seconds)
        if epochs_of(paired_tokens) > MANY_PASSES:
            shape, budget_tokens, consistency = paired, paired_tokens, CONSISTENCY
    epochs = epochs_of(budget_tokens)
    dropout = dropout_for(epochs)
    muon_decay = muon_weight_decay_for(mode, epochs)
    optimizer = CHAR_RECIPE if mode == "char" else TOKEN_RECIPE
    settings = {f"model.{key}": value for key, value in optimizer.items()}
    settings.update({"model.n_layer": shape.n_layer, "model.n_embd": shape.n_embd, "model.n_head": shape.n_head,
                     "model.block_size": shape.block_size, "model.dropout": dropout,
                     "model.muon_weight_decay": muon_decay, "model.consistency": consistency,
                     "data.block_size": shape.block_size, "data.batch_size": shape.batch_size,
                     "data.random_split": True,
                     "data.eval_iters": eval_iters_for(shape.batch_size),
                     "trainer.gradient_clip_val": GRADIENT_CLIP})
    if mode == "token":
        settings["data.vocab_size"] = vocab_size
    if precision:
        settings["trainer.precision"] = precision
    return Recipe(shape=shape, mode=mode, train_tokens=train_tokens, budget_tokens=budget_tokens, dropout=dropout,
                  max_epochs=MAX_EPOCHS, settings=settings, precision=precision)


def eval_iters_for(batch_size: int) -> int:
    """Validation batches of `batch_size` blocks: MAX_VAL_BLOCKS of them, so that the data module reads the whole
    val split once when it holds at most that many blocks, else as many seeded random ones (the count does not
    depend on the batch, so neither does what is scored). Not sized from the corpus: a random split's val share
    is only about val_fraction (whole 4 KB chunks go to val), and a count from the estimate would read a sample
    of a split that fits whole."""
    return math.ceil(MAX_VAL_BLOCKS / batch_size)


def vocab_for(size_bytes: int) -> int:
    """A BPE vocabulary that grows with the corpus: 2000 tokens under 1 MB, 4000 under 10 MB, else 8000."""
    return 2000 if size_bytes < 1_000_000 else 4000 if size_bytes < 10_000_000 else 8000
