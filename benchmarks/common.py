"""Helpers shared by the benchmarks: the machine's description, its measured matmul peak, and running the real
`picogpt fit` in this process with extra callbacks.

Shared machines are noisy, so every benchmark compares against a reference measured in the same run and
reports medians; these helpers only make the numbers comparable from one benchmark to the next.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import platform
import statistics
import time
from typing import Iterator, Sequence

import torch


def set_threads(threads: int | None) -> int:
    """Apply --threads and return the thread count torch will use."""
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device) -> str:
    """One line that says where a figure was measured: hardware, torch version, date."""
    if device.type == "cuda":
        hardware = f"{torch.cuda.get_device_name(device)} (cuda {torch.version.cuda})"
    elif device.type == "mps":
        hardware = f"Apple MPS ({platform.machine()})"
    else:
        hardware = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    today = datetime.date.today().isoformat()
    return f"machine: {hardware}; torch {torch.__version__}; {platform.system()}; {today}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul: the machine's practical dense peak in `dtype`, the denominator of MFU.

    Measured rather than taken from a spec sheet, because a shared CPU's usable peak depends on its cores,
    threads and clock at the time; on a GPU it lands a little under the vendor's dense figure.
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    calls = 20 if device.type == "cuda" else 1
    best = float("inf")
    torch.mm(a, b)  # warm-up: kernel selection, allocations
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * size**3 / best


# Dense (no sparsity) tensor-core peaks from the vendors' data sheets, by device name and dtype.
SPEC_SHEET_PEAKS = (
    ("H100 PCIe", torch.bfloat16, 756e12),
    ("H100", torch.bfloat16, 989e12),
    ("H200", torch.bfloat16, 989e12),
    ("A100", torch.bfloat16, 312e12),
)


def spec_sheet_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """The vendor's dense peak for this GPU and dtype, where known (MFU is usually quoted against it)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peak_dtype, peak in SPEC_SHEET_PEAKS:
        if fragment in name and dtype == peak_dtype:
            return peak
    return None


def training_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls of a Lightning precision setting run in."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def si(value: float, unit: str) -> str:
    """1.23e9 -> '1.23 G<unit>'."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


@contextlib.contextmanager
def extra_fit_callbacks(callbacks: list) -> Iterator[None]:
    """While active, `picogpt fit` adds `callbacks` to the ones it builds (through LightningCLI's trainer
    defaults), so a benchmark measures the real command and only observes it."""
    from picogpt_lightning.cli import fit as train

    original = train.TRAINER_DEFAULTS
    train.TRAINER_DEFAULTS = {**original, "callbacks": list(callbacks)}
    try:
        yield
    finally:
        train.TRAINER_DEFAULTS = original


def run_fit(args: list[str], callbacks: list) -> None:
    """`picogpt fit ARGS` in this process, with `callbacks` observing it."""
    from picogpt_lightning.errors import PicoGPTError
    from picogpt_lightning.cli.fit import run_lightning_cli

    with extra_fit_callbacks(callbacks):
        try:
            code = run_lightning_cli("fit", args)
        except PicoGPTError as error:
            raise SystemExit(f"picogpt fit failed: {error}") from None
    if code:
        raise SystemExit(f"picogpt fit exited with code {code}")


def override_args(overrides: Sequence[str]) -> list[str]:
    """['data.num_workers=1', 'trainer.enable_progress_bar=false'] -> ['--data.num_workers', '1', ...]."""
    args = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"override {item!r} is not KEY=VALUE (e.g. data.num_workers=1)")
        args += [f"--{key.lstrip('-')}", value]
    return args


def run_cli(function) -> None:
    """`python -m benchmarks.NAME --help`: a command line generated from `function`'s signature and docstring.

    Not jsonargparse.auto_cli, because it reserves `--config` for its own config files and drops a parameter
    of that name, and here `--config` is the picogpt recipe being measured.
    """
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description=inspect.getdoc(function).split("\n\n")[0])
    parser.add_function_arguments(function, as_group=False)
    function(**parser.parse_args().as_dict())
