"""Threads against load: training steps per second of the tiny model with 1 and 2 torch threads, with and
without a competing CPU-bound process, and what threads.thread_choice() picks in each case.

    python -m benchmarks.threads                  # 3 rounds of 2 s per figure
    python -m benchmarks.threads --seconds 1 --rounds 2

The model is configs/tiny.yaml's shape (2 layers, 4 heads, 128 wide, block 64, batch 16, vocab 2000), trained on
random tokens with AdamW in a plain torch loop (Lightning adds the same small cost to every setting). Rounds
alternate the settings and medians are printed, with the load average before and after: on a machine shared
with other jobs the "alone" figures are not those of an idle machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from benchmarks.common import machine_line, median
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.threads import thread_choice


def steps_per_second(threads: int, seconds: float) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2000, block_size=64, n_layer=2, n_head=4, n_embd=128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 2000, (16, 65))
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 2:
        logits, loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return steps / (time.perf_counter() - start)


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(seconds: float = 2.0, rounds: int = 3) -> None:
    """Print median steps per second for 1 and 2 threads, alone and beside a busy process.

    Args:
        seconds: How long each figure trains.
        rounds: Rounds; each measures every setting once.
    """
    print(machine_line(torch.device("cpu")))
    print(f"load average before: {load()}; the choice now: {thread_choice(environ={}).describe()}")
    steps_per_second(1, 0.5)  # warm-up
    figures: dict[tuple[str, int], list[float]] = {}
    choices: dict[str, str] = {}
    for _ in range(rounds):
        for condition in ("alone", "beside a busy process"):
            busy = None
            if condition != "alone":
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.3)
            try:
                for threads in (1, 2):
                    figures.setdefault((condition, threads), []).append(steps_per_second(threads, seconds))
                choices[condition] = thread_choice(environ={}).describe()
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    print(f"load average after: {load()}")
    for condition in ("alone", "beside a busy process"):
        one, two = median(figures[(condition, 1)]), median(figures[(condition, 2)])
        print(f"{condition:>22}: 1 thread {one:.2f} it/s, 2 threads {two:.2f} it/s (2/1 = {two / one:.2f}x); "
              f"thread_choice at the end: {choices[condition]}")


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
