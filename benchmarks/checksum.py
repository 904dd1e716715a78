"""What verifying a checkpoint costs: sha256 of the weights and the NaN/inf check, next to saving and loading.

    python -m benchmarks.checksum                    # GPT-2 small's shapes: 124M parameters, fp32 (497 MB)
    python -m benchmarks.checksum --n_layer 6 --n_embd 384 --vocab_size 8000

The weights are random (their values do not change the cost). Each figure is the median of `repeats` runs.
"""

from __future__ import annotations

import io
import time

import torch

from benchmarks.common import machine_line, median, set_threads
from picogpt_lightning.checkpoint import non_finite_weights, weights_sha256
from picogpt_lightning.model import GPT, GPTConfig


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return median(times)


def main(n_layer: int = 12, n_head: int = 12, n_embd: int = 768, block_size: int = 1024, vocab_size: int = 50257,
         repeats: int = 3, threads: int | None = None) -> None:
    """Print the seconds sha256 of a state dict, the NaN/inf check, torch.save and torch.load take.

    Args:
        n_layer: Transformer blocks.
        n_head: Attention heads.
        n_embd: Embedding width.
        block_size: Context length.
        vocab_size: Vocabulary size.
        repeats: Timed runs per figure; the median is reported.
        threads: torch CPU threads; null keeps torch's default.
    """
    set_threads(threads)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       tie_weights=True)
    model = GPT(config)
    # As in a checkpoint: the tied embedding is listed (and hashed) under both of its names.
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in state.values())
    buffer = io.BytesIO()
    print(machine_line(torch.device("cpu")))
    print(f"model: {model.num_params(non_embedding=False) / 1e6:.1f}M parameters; state dict: "
          f"{sum(t.numel() for t in state.values()) / 1e6:.1f}M numbers, {size / 1e6:.0f} MB")
    checksum = timed(lambda: weights_sha256(state), repeats)
    finite = timed(lambda: non_finite_weights(state), repeats)
    saving = timed(lambda: (buffer.seek(0), torch.save(state, buffer)), repeats)
    data = buffer.getvalue()
    loading = timed(lambda: torch.load(io.BytesIO(data), weights_only=True), repeats)
    print(f"sha256 of the weights: {checksum:.3f} s ({size / checksum / 1e9:.2f} GB/s)")
    print(f"NaN/inf check:         {finite:.3f} s")
    print(f"torch.save (memory):   {saving:.3f} s")
    print(f"torch.load (memory):   {loading:.3f} s")


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
