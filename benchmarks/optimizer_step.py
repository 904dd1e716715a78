"""The optimizer step alone: AdamW, torch.optim.Muon + AdamW, and our MuonAdamW, on the same model and gradients.

    python -m benchmarks.optimizer_step                       # nanoGPT's CPU model (4 x 128) and small (6 x 384)
    python -m benchmarks.optimizer_step --rounds 50 --threads 1

The gradients are random and fixed, so only the update is timed (no forward or backward). The three contenders
are alternated round by round, so a change in the machine's load falls on all of them; medians are reported,
with the step time of a whole training step of the same model (forward, backward, AdamW) for scale: the
Newton-Schulz overhead that matters is Muon's extra time as a share of a training step. Last, whole training
steps with AdamW and with MuonAdamW are alternated, which gives that share directly, and tokens per second.
"torch Muon" is torch.optim.Muon (torch >= 2.9) on the same matrices MuonAdamW gives Muon, with torch's AdamW
for the rest.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import machine_line, median, run_cli, set_threads
from picogpt_lightning import optim
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.optim import MuonAdamW, OptimizerSettings, newton_schulz_dtype, param_groups

MODELS = {"4x128": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch=12),
          "6x384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=16)}


def build(shape: dict) -> GPT:
    config = GPTConfig(vocab_size=65, block_size=shape["block_size"], n_layer=shape["n_layer"],
                       n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=0.0, bias=False)
    return GPT(config)


def optimizers(model: GPT) -> dict:
    named = list(model.named_parameters())
    adamw_groups = param_groups(named, OptimizerSettings(optimizer="adamw", learning_rate=1e-3))
    muon_groups = param_groups(named, OptimizerSettings(optimizer="muon", learning_rate=1e-3))
    contenders = {"AdamW": [torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("rule", "names")}
                                               for g in adamw_groups], foreach=True)],
                  "MuonAdamW": [MuonAdamW(muon_groups)],
                  "MuonAdamW, Newton-Schulz in fp32": [MuonAdamW(param_groups(named, OptimizerSettings(
                      optimizer="muon", learning_rate=1e-3)))]}
    if hasattr(torch.optim, "Muon"):
        hidden = [g for g in muon_groups if g["rule"] == "muon"][0]["params"]
        rest = [{k: v for k, v in g.items() if k not in ("rule", "names")} for g in muon_groups
                if g["rule"] == "adamw"]
        contenders["torch Muon"] = [torch.optim.Muon(hidden, lr=0.02, momentum=0.95, nesterov=True),
                                    torch.optim.AdamW(rest, foreach=True)]
    return contenders


def time_steps(label: str, steps: list, count: int) -> float:
    chosen = optim.newton_schulz_dtype
    if "fp32" in label:
        optim.newton_schulz_dtype = lambda device: torch.float32
    try:
        started = time.perf_counter()
        for _ in range(count):
            for optimizer in steps:
                optimizer.step()
        return (time.perf_counter() - started) / count
    finally:
        optim.newton_schulz_dtype = chosen


def training_steps(shape: dict, rounds: int, steps_per_round: int) -> dict[str, float]:
    """Median seconds of a whole training step (forward, backward, optimizer step) with AdamW and with MuonAdamW,
    the same model and batch, alternated round by round."""
    x = torch.randint(0, 65, (shape["batch"], shape["block_size"]))
    runs = {}
    for rule in ("adamw", "muon"):
        torch.manual_seed(0)
        model = build(shape)
        runs[rule] = (model, MuonAdamW(param_groups(list(model.named_parameters()),
                                                    OptimizerSettings(optimizer=rule, learning_rate=1e-4))))
    seconds = {rule: [] for rule in runs}
    for round_ in range(rounds + 1):
        for rule, (model, optimizer) in runs.items():
            started = time.perf_counter()
            for _ in range(steps_per_round):
                _, loss = model(x, x)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if round_:  # the first round warms up
                seconds[rule].append((time.perf_counter() - started) / steps_per_round)
    return {rule: median(values) for rule, values in seconds.items()}


def main(models: list[str] | None = None, rounds: int = 30, steps_per_round: int = 5, threads: int | None = None) -> None:
    """Median seconds per optimizer step of each contender, alternated over `rounds` rounds.

    Args:
        models: which of 4x128 and 6x384 to run (default both).
        rounds: alternated rounds per model.
        steps_per_round: optimizer steps per contender per round.
        threads: torch threads (default: torch's, one per core).
    """
    set_threads(threads)
    torch.manual_seed(0)
    print(machine_line(torch.device("cpu")))
    print(f"Newton-Schulz dtype on this CPU: {newton_schulz_dtype(torch.device('cpu'))}")
    for name in models or list(MODELS):
        shape = MODELS[name]
        model = build(shape)
        for parameter in model.parameters():
            parameter.grad = torch.randn_like(parameter) * 1e-3
        contenders = optimizers(model)
        for label, steps in contenders.items():
            time_steps(label, steps, 2)  # warm-up: state is created on the first step
        timings = {label: [] for label in contenders}
        for _ in range(rounds):
            for label, steps in contenders.items():
                timings[label].append(time_steps(label, steps, steps_per_round))
        whole = training_steps(shape, max(3, rounds // 3), steps_per_round)
        train_step = whole["adamw"]
        adamw = median(timings["AdamW"])
        print(f"\n{name} (vocab 65, block {shape['block_size']}, batch {shape['batch']}): a whole AdamW training "
              f"step {train_step * 1000:.1f} ms")
        for label, values in timings.items():
            step = median(values)
            extra = step - adamw
            print(f"  {label:33s} {step * 1000:7.2f} ms/step  (+{extra * 1000:6.2f} ms over AdamW = "
                  f"{extra / train_step:6.1%} of a training step)")
        tokens = shape["batch"] * shape["block_size"]
        print(f"  whole training step, alternated: AdamW {train_step * 1000:.1f} ms "
              f"({tokens / train_step:,.0f} tok/s), MuonAdamW {whole['muon'] * 1000:.1f} ms "
              f"({tokens / whole['muon']:,.0f} tok/s): {whole['muon'] / train_step - 1:+.1%}")


if __name__ == "__main__":
    run_cli(main)
