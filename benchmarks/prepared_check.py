"""What checking prepared data costs each time the cache is used, against a tiny run's start-up.

    python -m benchmarks.prepared_check --text_path SMALL.txt     # SMALL.txt: the first 40 KB of data/philosophy.txt

Prints: load_prepared with and without the bins' checksums (the median of `repeats`, the in-process memo
cleared each time), the wall time of a tiny `picogpt fit` of one step on the same cached data, and the speed
of the whole-file and the sampled hash on a synthetic bin of `large_mib` MiB, which is what sets
prepared_checks.FULL_CHECK_BYTES.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_line, median
from picogpt_lightning import prepared_checks
from picogpt_lightning.prepare import load_prepared, prepare


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        prepared_checks._verified.clear()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return median(times)


def tiny_fit_seconds(text_path: str, work: Path) -> float:
    config = {"seed_everything": 7, "ckpt_dir": str(work / "run"),
              "trainer": {"accelerator": "cpu", "max_steps": 1, "val_check_interval": 1, "limit_val_batches": 1,
                          "enable_progress_bar": False, "enable_model_summary": False},
              "model": {"n_layer": 1, "n_head": 2, "n_embd": 16},
              "data": {"text_path": text_path, "mode": "char", "block_size": 16, "batch_size": 4, "eval_iters": 1,
                       "cache_dir": str(work / "cache")}}
    (work / "tiny.yaml").write_text(json.dumps(config))
    command = [sys.executable, "-m", "picogpt_lightning.cli", "fit", "--config", str(work / "tiny.yaml"),
               "--sample_tokens", "0", "--overwrite", "true"]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # prepares
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def main(text_path: str, repeats: int = 20, large_mib: int = 256) -> None:
    """Args:
        text_path: The text to prepare (char mode), e.g. the first 40 KB of data/philosophy.txt.
        repeats: Timed runs per figure; the median is reported.
        large_mib: Size of the synthetic bin the two hashes are timed on.
    """
    print(machine_line(torch.device("cpu")))
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        meta = prepare(text_path, str(work / "out"), mode="char")
        size = sum((work / "out" / f"{split}.bin").stat().st_size for split in ("train", "val"))
        checked = timed(lambda: load_prepared(work / "out"), repeats)
        del meta["checksums"]
        (work / "out" / "meta.json").write_text(json.dumps(meta))
        unchecked = timed(lambda: load_prepared(work / "out"), repeats)
        startup = tiny_fit_seconds(text_path, work)
        print(f"bins: {size:,} bytes; load_prepared {checked * 1e3:.2f} ms with checksums, {unchecked * 1e3:.2f} ms "
              f"without: the check costs {(checked - unchecked) * 1e3:.2f} ms")
        print(f"a tiny `picogpt fit` of one step on the cached data: {startup:.2f} s; the check is "
              f"{(checked - unchecked) / startup:.4%} of it")
        large = work / "large.bin"
        with open(large, "wb") as file:
            for _ in range(large_mib):
                file.write(os.urandom(1 << 20))
        whole = timed(lambda: prepared_checks._whole_digest(large), 3)
        sampled = timed(lambda: prepared_checks.sampled_digest(large), 3)
        print(f"a {large_mib} MiB bin: whole blake2b {whole:.3f} s ({large_mib / 1024 / whole:.2f} GiB/s); sampled "
              f"({prepared_checks.SAMPLE_BLOCKS} x {prepared_checks.SAMPLE_BLOCK_BYTES >> 10} KiB) {sampled:.4f} s")
        full = prepared_checks.FULL_CHECK_BYTES
        print(f"so a bin of FULL_CHECK_BYTES ({full >> 20} MiB) costs about {whole * full / (large_mib << 20):.3f} s "
              f"to hash whole; above it the sampled check costs about {sampled:.4f} s whatever the size")


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
