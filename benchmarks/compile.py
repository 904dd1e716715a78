"""What `compile: true` (torch.compile of the GPT) buys: compile time and steady-state speedup, in one run.

    python -m benchmarks.compile --config configs/shakespeare-char-cpu.yaml
    python -m benchmarks.compile --config configs/gpt2-124m.yaml --steps 50        # on a GPU

`picogpt fit --model.compile true` runs observed by the A/B timer of `benchmarks.train_speed`; each round
also runs the plain PyTorch loop twice, once with the model compiled the same way (in place, `GPT.compile()`)
and once eager. Figures: our first step (which includes compiling forward and backward) against a steady
step, ms/step of the three, the speedup of compiling (eager reference / compiled reference, per round), the
ratio ours/reference with both compiled, the graphs compiled during the timed steps (0 means no
recompilation), and whether the checkpoint saved by the compiled run loads into an uncompiled GPT.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import median, run_cli, set_threads
from benchmarks.train_speed import (
    ABTimer,
    ReferenceLoop,
    RunFacts,
    fit_with_timer,
    paired_ratio,
    print_figures,
    print_header,
)
from picogpt_lightning.model import GPT, GPTConfig


def compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def checkpoint_loads_uncompiled(path: Path) -> tuple[bool, str]:
    """Whether a checkpoint written by a compiled run loads, with weights_only, into a plain GPT."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    odd = [k for k in state if "_orig_mod" in k]
    if odd:
        return False, f"compiled names such as {odd[0]}"
    model = GPT(GPTConfig.from_dict(checkpoint["picogpt"]["model_config"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        return False, str(error).splitlines()[0]
    return True, f"{len(state)} tensors with plain names"


def main(
    config: str = "configs/shakespeare-char-cpu.yaml",
    steps: int = 20,
    rounds: int = 5,
    warmup: int = 10,
    threads: int | None = None,
    overrides: list[str] | None = None,
    cold: bool = True,
) -> None:
    """Compile time and steady-state speedup of `compile: true`, against the plain loop compiled and eager.

    Args:
        config: a picogpt YAML config; compile is switched on whatever it says.
        steps: optimizer steps per timed segment.
        rounds: timed segments of each loop (ours, reference compiled, reference eager in turn).
        warmup: untimed steps of each loop before the first segment (compilation happens here).
        threads: torch CPU threads (torch.set_num_threads); null keeps torch's default (one per core).
        overrides: extra `picogpt fit` settings as KEY=VALUE, e.g. data.batch_size=8.
        cold: disable torch.compile's on-disk caches, so the compile time is that of a first run; false shows
            what later runs of the same model pay.
    """
    overrides = [*(overrides or []), "model.compile=true"]
    set_threads(threads)
    if cold:
        import torch._inductor.config

        torch._inductor.config.force_disable_caches = True
    references = {
        "reference compiled": lambda trainer, module: ReferenceLoop(trainer, module, compile=True),
        "reference eager": lambda trainer, module: ReferenceLoop(trainer, module, compile=False),
    }
    timer = ABTimer(references, warmup, steps, rounds, probe=compiled_graphs)
    facts = RunFacts()
    loads, detail = fit_with_timer(config, timer, facts, overrides,
                                   inspect_run=lambda run_dir: checkpoint_loads_uncompiled(run_dir / "last.ckpt"))

    peak = print_header(facts, config, overrides)
    times = timer.timings
    steady = median(times.ours)
    print(f"ours first step: {times.first_step_ours:.1f} s, i.e. compile time about "
          f"{times.first_step_ours - steady:.1f} s ({'cold: compile caches disabled' if cold else 'caches allowed'}; "
          f"a steady step takes {steady * 1e3:.1f} ms)")
    print_figures("ours compiled", times.ours, facts, peak)
    for name in references:
        print_figures(name, times.references[name], facts, peak)
    compiled, eager = times.references["reference compiled"], times.references["reference eager"]
    print(f"speedup of compile (reference eager / reference compiled): {paired_ratio(eager, compiled):.3f}")
    print(f"speedup of compile for users (reference eager / ours compiled): {paired_ratio(eager, times.ours):.3f}")
    print(f"ratio ours/reference, both compiled (speed): {paired_ratio(compiled, times.ours):.3f}")
    print(f"graphs compiled during the timed steps: {times.probe_at_end - times.probe_at_start} "
          f"(of {times.probe_at_end} in the run)")
    print(f"checkpoint of the compiled run loads into an uncompiled GPT: {'yes' if loads else 'NO'} ({detail})")


if __name__ == "__main__":
    run_cli(main)
