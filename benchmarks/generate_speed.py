"""Generation speed with and without the key/value cache, on one random-weight model in one run.

    python -m benchmarks.generate_speed              # 6 layers x 384 wide, context 256, 500 new tokens
    python -m benchmarks.generate_speed --threads 2

Each figure is the median of `repeats` timed runs; the cached and uncached paths alternate (A/B/A/B) after a
warm-up, so a slower or busier moment of the machine hits both alike. Random weights are fine here: the work
per token does not depend on what the weights are.

Without the cache each step re-encodes the window, whose length grows with the text (and slides back to half
the context once full, the same window the cached path uses); with it each step encodes one token. So the ratio
grows with the number of new tokens and with the context length.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import machine_line, median, set_threads, synchronize
from picogpt_lightning.generate import generate_batch, make_generator, resolve_device
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.settings import SamplingSettings


def tokens_per_second(
    model: GPT, prompt: torch.Tensor, max_new_tokens: int, use_cache: bool, seed: int
) -> float:
    """New tokens per second over all rows of `prompt` for one full generation."""
    device = prompt.device
    generator = make_generator(seed, device)
    settings = SamplingSettings()
    start = time.perf_counter()
    for _ in generate_batch(model, prompt, max_new_tokens, settings, generator, use_cache):
        pass
    synchronize(device)
    return prompt.size(0) * max_new_tokens / (time.perf_counter() - start)


def main(
    n_layer: int = 6,
    n_head: int = 6,
    n_embd: int = 384,
    block_size: int = 256,
    vocab_size: int = 65,
    max_new_tokens: int = 500,
    prompt_tokens: int = 16,
    batch_size: int = 8,
    repeats: int = 3,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 1337,
) -> None:
    """Print tokens/s without and with the KV cache (batch 1), their ratio, and tokens/s with the cache at a
    larger batch.

    Args:
        n_layer: Transformer blocks.
        n_head: Attention heads.
        n_embd: Embedding width.
        block_size: Context length; generation past it slides the window.
        vocab_size: Vocabulary size (65 is a typical char-level corpus).
        max_new_tokens: Tokens generated per timed run.
        prompt_tokens: Length of the random prompt.
        batch_size: Rows generated together for the batched figure.
        repeats: Timed runs per figure; the median is reported.
        threads: torch CPU threads (torch.set_num_threads); null keeps torch's default (one per core).
        device: cpu, cuda, mps or auto.
        seed: Seed for the weights, the prompt and sampling.
    """
    target = resolve_device(device)
    threads = set_threads(threads)
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = GPT(config).to(target).eval()
    prompt = torch.randint(vocab_size, (1, prompt_tokens), device=target)
    batch_prompt = torch.randint(vocab_size, (batch_size, prompt_tokens), device=target)
    print(
        f"model: {n_layer} layers, {n_head} heads, {n_embd} wide, context {block_size}, "
        f"{model.num_params() / 1e6:.1f}M parameters; {max_new_tokens} new tokens after a {prompt_tokens}-token "
        f"prompt; {target.type}, {threads} thread(s); median of {repeats} runs",
        flush=True,
    )
    print(machine_line(target), flush=True)
    for use_cache in (False, True):  # warm-up: first calls pay for allocations and kernel selection
        tokens_per_second(model, prompt, min(max_new_tokens, 20), use_cache, seed)
    figures: dict[str, list[float]] = {"uncached": [], "cached": [], "batched": []}
    for _ in range(repeats):
        figures["uncached"].append(tokens_per_second(model, prompt, max_new_tokens, False, seed))
        figures["cached"].append(tokens_per_second(model, prompt, max_new_tokens, True, seed))
        figures["batched"].append(tokens_per_second(model, batch_prompt, max_new_tokens, True, seed))
    result = {name: median(values) for name, values in figures.items()}
    print(f"tokens/s without cache, batch 1: {result['uncached']:.1f}")
    print(f"tokens/s with cache, batch 1: {result['cached']:.1f}")
    print(f"speedup of the cache at batch 1: {result['cached'] / result['uncached']:.1f}x")
    print(f"tokens/s with cache, batch {batch_size} (all rows): {result['batched']:.1f}")


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
