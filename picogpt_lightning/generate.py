"""Sampling from a trained GPT over its key/value cache.

Reads top to bottom: devices, the choice of one token under `SamplingSettings`, the token generator with its
sliding window, and `stream_text`, which turns the tokens into printable text (prompt.py's StreamingDecoder).

Only torch and our plain modules are used here, never Lightning, so the generator works from any PyTorch code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .errors import PicoGPTError
from .prompt import StreamingDecoder
from .settings import SamplingSettings, check_seed

# ----------------------------------------------------------------------------------------------- devices


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; a named device must exist on this machine."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PicoGPTError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise PicoGPTError(f"unsupported device {name!r}; use cpu, cuda, cuda:N, mps or auto")
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }[device.type]
    if not available:
        raise PicoGPTError(f"device {name!r} is not available on this machine; use --device cpu or auto")
    return device


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A random generator on the model's device: the same seed gives the same text on the same device."""
    check_seed(seed)
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# ----------------------------------------------------------------------------------------------- one token


def penalize_repetition(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: logits of tokens present in `context` are divided by `penalty` when positive and
    multiplied by it when negative, so both move towards less likely."""
    seen = logits.gather(1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, context, seen)


def keep_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The k likeliest tokens keep their logits, the others get -inf: exactly k, also when logits tie."""
    best, where = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1, sorted=False)  # order unneeded
    return torch.full_like(logits, float("-inf")).scatter(-1, where, best)


def keep_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: the fewest likeliest tokens whose probabilities reach top_p; the best always stays."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    dropped = mass_before >= top_p
    dropped[..., 0] = False  # a top_p that is 0 in float32 (1e-300) would otherwise drop the best one too
    sorted_logits = sorted_logits.masked_fill(dropped, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def sample_next_token(
    logits: torch.Tensor,
    context: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (batch, vocab), given the `context` (batch, steps) it continues."""
    logits = logits.float()
    if settings.repetition_penalty != 1.0:
        logits = penalize_repetition(logits, context, settings.repetition_penalty)
    if is_greedy(settings):
        return logits.argmax(dim=-1)
    probs = sampling_probabilities(logits, settings)
    return draw_tokens(probs, uniform_draws(probs.size(0), generator, probs.device))


def uniform_draws(count: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """`count` draws in [0, 1) for draw_tokens, in float64 where the device has it (MPS has not)."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.rand(count, generator=generator, device=device, dtype=dtype)


def draw_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (batch, vocab) from one uniform draw in [0, 1) per row, by the inverse of
    the row's cumulative distribution: the first token whose cumulative probability exceeds the draw.

    The same distribution as torch.multinomial, but one draw per row rather than one call: a batch whose rows
    each have their own generator (batching.py) then samples in one call, and a row draws the same token
    batched as alone. Tokens of probability 0 are never drawn; the draw is scaled to the row's total so that
    rounding in the sum can never run past the last token.
    """
    cdf = probs.to(uniforms.dtype).cumsum(dim=-1)
    total = cdf[:, -1:]
    point = torch.minimum(uniforms[:, None] * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).squeeze(1)


def is_greedy(settings: SamplingSettings) -> bool:
    """Temperature 0, or so small (1e-300) that it is 0 in float32."""
    return torch.tensor(settings.temperature, dtype=torch.float32) == 0


def sampling_probabilities(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The distribution each row (float logits, batch x vocab) is sampled from, after temperature, top_k, top_p."""
    # Shifted so the best logit is 0 before dividing: a tiny temperature then sends the others to -inf
    # (greedy in the limit) instead of overflowing every logit to inf and the softmax to NaN.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / settings.temperature
    if settings.top_k:
        logits = keep_top_k(logits, settings.top_k)
    if settings.top_p is not None and settings.top_p < 1:
        logits = keep_top_p(logits, settings.top_p)
    return logits.softmax(dim=-1)


# ----------------------------------------------------------------------------------------------- many tokens


def slide_keep(block_size: int) -> int:
    """Tokens kept when the window is full: half the context.

    Absolute position embeddings mean a slid window must be re-encoded from scratch (every position moves).
    Keeping block_size - 1 tokens would re-encode a full window at every step, which is no faster than not
    caching at all; keeping half pays one prefill of block_size // 2 tokens every block_size // 2 steps, about
    one token's forward per step, while the model still sees at least half its context.
    """
    return max(1, block_size // 2)


def last_logits(model: torch.nn.Module, idx: torch.Tensor, cache=None, vocab_size: int | None = None) -> torch.Tensor:
    """Logits of the next token after `idx` (batch, steps), which continues `cache` when one is given; with
    `vocab_size` (the tokenizer's), only its ids: the rows of a vocabulary padded beyond it are never sampled."""
    # Inside the function rather than around the generator: a generator holding no_grad across its yields
    # would leave gradients off in the caller's code between tokens.
    with torch.no_grad():
        return model(idx, cache=cache, last_only=True)[0][:, -1, :vocab_size]


def generate_batch(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    settings: SamplingSettings | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` tokens, one (batch,) tensor per step, continuing `prompt` (batch, steps).

    The context window is the whole sequence until it would exceed block_size (a longer prompt is cropped from
    the left); then it slides to its last `slide_keep(block_size)` tokens and grows again. With `use_cache` the
    window is encoded once and each step feeds only the new token; without it each step re-encodes the window.
    Both paths see the same window at every step, so with temperature 0 they give the same tokens at any length
    (and up to block_size tokens that is nanoGPT's crop-to-block_size reference exactly). `model` is a GPT
    in eval mode (dropout off), or any module with its `config`, `wte`, `new_cache` and forward. With
    `vocab_size`, only ids below it are sampled (a model's vocabulary may be padded beyond its tokenizer's).
    """
    settings = settings or SamplingSettings()
    block_size = model.config.block_size
    device = model.wte.weight.device
    window = prompt.to(device=device, dtype=torch.long)[:, -block_size:]
    cache = model.new_cache(window.size(0)) if use_cache else None
    logits = last_logits(model, window, cache, vocab_size)
    for step in range(max_new_tokens):
        token = sample_next_token(logits, window, settings, generator)
        yield token
        if step + 1 == max_new_tokens:
            return
        window = torch.cat([window, token[:, None]], dim=1)
        if window.size(1) > block_size:
            window = window[:, -slide_keep(block_size) :]
            cache = model.new_cache(window.size(0)) if use_cache else None
            logits = last_logits(model, window, cache, vocab_size)
        else:
            logits = last_logits(model, token[:, None] if use_cache else window, cache, vocab_size)


def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    settings: SamplingSettings | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
) -> Iterator[int]:
    """Token ids continuing one prompt, yielded one at a time (see `generate_batch`)."""
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long)
    for token in generate_batch(model, prompt, max_new_tokens, settings, generator, use_cache, vocab_size):
        yield int(token[0])


def stream_text(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    settings: SamplingSettings | None = None,
    generator: torch.Generator | None = None,
    stop: Sequence[str] = (),
    use_cache: bool = True,
) -> Iterator[str]:
    """Pieces of the continuation of `prompt_ids`, ready to print, ending before any stop string."""
    decoder = StreamingDecoder(tokenizer, stop)
    for token_id in generate(model, prompt_ids, max_new_tokens, settings, generator, use_cache, tokenizer.vocab_size):
        piece = decoder.push(token_id)
        if piece:
            yield piece
        if decoder.stopped:
            return
    rest = decoder.flush()
    if rest:
        yield rest
