"""CPU attention: the plain-matmul path the model takes in 16-bit precision at short contexts
(`model.causal_attention_cpu`) against torch's `scaled_dot_product_attention`, alone and inside a training step.

    python -m benchmarks.cpu_attention --threads 1
    python -m benchmarks.cpu_attention --contexts '[64, 128, 256, 512]' --steps false

Part 1 times forward and backward of causal attention alone (batch x context = 4,096 positions, heads of 64) in
bfloat16 and float32, both paths alternated round by round so that a change of load falls on both. Part 2 times
the forward and backward of the sized recipe's 4x256 and 5x320 (context 128, batch 32, dropout 0.1) under bf16
autocast with each path, by pointing the model at one or the other (float32 always takes SDPA). Medians; ratios
are SDPA's time over ours (above 1: ours is faster). `model.CPU_ATTENTION_STEPS` is where part 1 says the plain
path stops winning in bfloat16.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from benchmarks.common import machine_line, median, run_cli, set_threads
from picogpt_lightning import model as model_module
from picogpt_lightning.model import GPT, GPTConfig, causal_attention_cpu, next_token_loss

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
POSITIONS = 4096
HEAD = 64


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)


def timed(function, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def attention_alone(context: int, heads: int, dtype: torch.dtype, rounds: int) -> tuple[float, float]:
    batch = max(1, POSITIONS // context)
    q, k, v = (torch.randn(batch, heads, context, HEAD, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, context, HEAD, dtype=dtype)
    runs = {"ours": lambda: causal_attention_cpu(q, k, v, 0.0).backward(grad),
            "sdpa": lambda: fused(q, k, v, 0.0).backward(grad)}
    for run in runs.values():
        run()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name] += timed(run, 1)
    return median(times["ours"]), median(times["sdpa"])


def training_step(n_layer: int, n_embd: int, rounds: int) -> tuple[float, float]:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=65, block_size=128, n_layer=n_layer, n_head=n_embd // HEAD, n_embd=n_embd,
                       dropout=0.1, bias=False, position="rotary", norm="rms", qk_norm=True, mlp="swiglu",
                       zero_init=True)
    model = GPT(config)
    idx, targets = torch.randint(0, 65, (32, 128)), torch.randint(0, 65, (32, 128))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = next_token_loss(model(idx)[0], targets)
        loss.backward()

    paths = {"ours": causal_attention_cpu, "sdpa": fused}
    times = {name: [] for name in paths}
    try:
        for _ in range(rounds):
            for name, path in paths.items():
                model_module.causal_attention_cpu = path
                step()  # warm-up for this path
                times[name] += timed(step, 2)
    finally:
        model_module.causal_attention_cpu = causal_attention_cpu
    return median(times["ours"]), median(times["sdpa"])


def main(contexts: list[int] | None = None, heads: int = 5, rounds: int = 5, steps: bool = True,
         threads: int | None = None) -> None:
    """Forward+backward milliseconds of causal attention on the CPU, ours against SDPA, then whole steps.

    Args:
        contexts: context lengths for part 1 (default 64, 128, 192, 256, 512, 1024).
        heads: attention heads of 64 in part 1.
        rounds: alternated rounds (medians are reported).
        steps: also time whole training steps of a 4x256 and a 5x320 (part 2).
        threads: torch threads (default: torch's, one per core).
    """
    set_threads(threads)
    print(machine_line(torch.device("cpu")))
    print(f"part 1: causal attention alone, {POSITIONS:,} positions, {heads} heads of {HEAD}, forward+backward")
    for context in contexts or [64, 128, 192, 256, 512, 1024]:
        for label, dtype in DTYPES.items():
            ours, sdpa = attention_alone(context, heads, dtype, rounds)
            print(f"  context {context:5d} {label}: ours {ours * 1e3:7.1f} ms, sdpa {sdpa * 1e3:7.1f} ms, "
                  f"sdpa/ours {sdpa / ours:.2f}")
    if not steps:
        return
    print("part 2: forward+backward of the sized recipe's models, context 128, batch 32, dropout 0.1, bf16-mixed")
    for n_layer, n_embd in ((4, 256), (5, 320)):
        ours, sdpa = training_step(n_layer, n_embd, rounds)
        print(f"  {n_layer}x{n_embd} bf16-mixed: ours {ours:.3f} s, sdpa {sdpa:.3f} s, sdpa/ours {sdpa / ours:.2f}")


if __name__ == "__main__":
    run_cli(main)
