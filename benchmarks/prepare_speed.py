"""Preparation throughput (MB/s) and peak memory of `picogpt prepare`, char and BPE, on a generated text.

    python -m benchmarks.prepare_speed                       # 200 MB, char and BPE (vocab 8000)
    python -m benchmarks.prepare_speed --size_mb 20 --modes '[char]'

The text is generated here (no download): sentences of pseudo-words drawn from a 50,000-word lexicon with
Zipf-distributed frequencies, like natural language, plus some accented words so that UTF-8 is multi-byte
here and there. Each preparation runs in a fresh process, the way a user runs `picogpt prepare`, so its
peak memory (max RSS) is its own. References, in the same run and on the same file: for char, a plain
two-pass numpy preparation (code points -> ids by table lookup, 1 MB at a time); for BPE, the `tokenizers`
library used directly (its own file-based training, then batch encoding of the lines of 1 MB pieces). The
ratios are reference time / our time: below 1, ours is slower.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

GENERATOR_SEED = 1337
LEXICON_SIZE = 50_000
PIECE_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------------------------
# The text


def make_lexicon(rng: np.random.Generator) -> list[str]:
    """Distinct pronounceable pseudo-words, most frequent first: one-syllable words lead, as in real text
    ("the", "of", "and"), then longer ones; about 1% of syllables carry an accent (multi-byte UTF-8)."""
    onsets = np.array(["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
                       "th", "st", "br", "ch", "sh", "gr", "pl"], dtype=object)
    vowels = np.array(["a", "e", "i", "o", "u", "ea", "ou", "ai", "\u00e9", "\u00fc"], dtype=object)
    vowel_p = np.array([10, 12, 9, 8, 5, 2, 2, 2, 0.6, 0.4])
    codas = np.array(["", "", "", "n", "r", "s", "t", "l", "nd", "ng", "ck"], dtype=object)
    words: dict[str, None] = {}
    for syllables in (1, 2, 3, 4):
        candidates = np.full(4 * LEXICON_SIZE, "", dtype=object)
        for _ in range(syllables):
            candidates += (onsets[rng.integers(len(onsets), size=candidates.size)]
                           + vowels[rng.choice(len(vowels), size=candidates.size, p=vowel_p / vowel_p.sum())]
                           + codas[rng.integers(len(codas), size=candidates.size)])
        quota = [1_500, 12_000, 40_000, LEXICON_SIZE][syllables - 1]
        for word in candidates:
            if len(words) >= quota:
                break
            words.setdefault(word)
    return list(words)


def generate_text(path: Path, size_bytes: int, seed: int = GENERATOR_SEED) -> int:
    """Write about size_bytes of text to path, 1 MB at a time; returns the bytes written."""
    rng = np.random.default_rng(seed)
    lower = make_lexicon(rng)
    lexicon = np.array(lower + [word.capitalize() for word in lower], dtype=object)
    ranks = np.arange(1, LEXICON_SIZE + 1)
    cumulative = np.cumsum(ranks**-1.07)
    cumulative /= cumulative[-1]
    separators = np.array([" ", ", ", ". ", ".\n", "? ", ".\n\n"], dtype=object)
    separator_p = np.array([0.86, 0.06, 0.05, 0.02, 0.005, 0.005])
    written = 0
    words_per_piece = PIECE_BYTES // 6
    with open(path, "w", encoding="utf-8", newline="\n") as file:
        sentence_start = True
        while written < size_bytes:
            ids = np.searchsorted(cumulative, rng.random(words_per_piece))
            seps = rng.choice(len(separators), size=words_per_piece, p=separator_p)
            ends = seps >= 2
            starts = np.concatenate([[sentence_start], ends[:-1]])
            sentence_start = bool(ends[-1])
            pieces = np.empty(2 * words_per_piece, dtype=object)
            pieces[0::2] = lexicon[ids + starts * LEXICON_SIZE]
            pieces[1::2] = separators[seps]
            data = "".join(pieces).encode("utf-8")
            file.write(data.decode("utf-8"))
            written += len(data)
    return written


# ---------------------------------------------------------------------------------------------------------------
# What is timed, each in a fresh process


def ours(text_path: str, out_dir: str, mode: str, vocab_size: int) -> None:
    """`picogpt prepare`, as a user runs it."""
    from picogpt_lightning.cli import main as picogpt

    code = picogpt(["prepare", "--text_path", text_path, "--out_dir", out_dir, "--mode", mode,
                    "--vocab_size", str(vocab_size)])
    if code:
        raise RuntimeError(f"picogpt prepare exited with {code}")


def reference_char(text_path: str, out_dir: str, mode: str, vocab_size: int) -> None:
    """Plain numpy, streaming in 1 MB pieces: pass 1 marks the code points present, pass 2 maps each piece's
    code points to ids with one table lookup; the first 90% of characters go to train."""
    present = np.zeros(0x110000, dtype=bool)
    chars = 0
    for piece in _pieces(text_path):
        points = np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)
        present[points] = True
        chars += len(points)
    table = (np.cumsum(present) - 1).astype(np.uint16)
    val_start, done = int(chars * 0.9), 0
    with open(Path(out_dir) / "train.bin", "wb") as train, open(Path(out_dir) / "val.bin", "wb") as val:
        for piece in _pieces(text_path):
            ids = table[np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)]
            cut = min(max(val_start - done, 0), len(ids))
            ids[:cut].tofile(train)
            ids[cut:].tofile(val)
            done += len(ids)


def _pieces(text_path: str):
    with open(text_path, "rb") as file:
        pending = b""
        while block := file.read(PIECE_BYTES):
            pending += block
            cut = pending.rfind(b"\n") + 1 or len(pending)
            yield pending[:cut].decode("utf-8")
            pending = pending[cut:]
        if pending:
            yield pending.decode("utf-8")


def reference_bpe(text_path: str, out_dir: str, mode: str, vocab_size: int) -> None:
    """The `tokenizers` library used directly: file-based training, then batch encoding of its lines."""
    import tokenizers as tk

    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([text_path], trainer=trainer)
    with open(Path(out_dir) / "train.bin", "wb") as out:
        for piece in _pieces(text_path):
            lines = piece.splitlines(keepends=True)
            for encoding in tokenizer.encode_batch_fast(lines):
                np.asarray(encoding.ids, dtype=np.uint16).tofile(out)


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM belongs to the process's own address space, unlike
    getrusage's ru_maxrss, which keeps the parent's figure across fork and exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not Linux: the best available figure

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(function_name: str, args: tuple, results) -> None:
    start = time.perf_counter()
    globals()[function_name](*args)
    seconds = time.perf_counter() - start
    results.put((seconds, peak_rss_bytes()))


def run_in_process(function_name: str, *args) -> tuple[float, int]:
    """Seconds and peak resident memory (bytes) of function(*args) run in a fresh Python process."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(function_name, args, results))
    process.start()
    process.join()
    if process.exitcode:
        raise SystemExit(f"{function_name} failed (exit code {process.exitcode})")
    return results.get()


# ---------------------------------------------------------------------------------------------------------------


def main(
    size_mb: float = 200,
    modes: list[str] | None = None,
    vocab_size: int = 8000,
    text_path: str | None = None,
    reference: bool = True,
    work_dir: str | None = None,
) -> None:
    """MB/s and peak memory of char and BPE preparation on a generated text, and ratios to references.

    Args:
        size_mb: size of the generated text in MB (10^6 bytes).
        modes: which preparations to time: char, bpe (default both).
        vocab_size: BPE vocabulary size.
        text_path: time this text instead of generating one (it is not deleted).
        reference: also time the references (plain numpy for char, `tokenizers` directly for BPE).
        work_dir: where the text and outputs go (default: a temporary folder, deleted at the end).
    """
    modes = list(modes or ["char", "bpe"])
    unknown = set(modes) - {"char", "bpe"}
    if unknown:
        raise SystemExit(f"unknown mode(s) {sorted(unknown)}: use char and/or bpe")
    folder = Path(work_dir or tempfile.mkdtemp(prefix="picogpt-prepare-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if text_path is None:
            text = folder / "generated.txt"
            start = time.perf_counter()
            size = generate_text(text, int(size_mb * 1e6))
            print(f"generated {size / 1e6:.0f} MB of text in {time.perf_counter() - start:.1f} s", flush=True)
        else:
            text = Path(text_path)
            size = text.stat().st_size
        import datetime

        import tokenizers

        from benchmarks.common import cpu_name

        print(f"machine: {cpu_name()}, {os.cpu_count()} cores; tokenizers {tokenizers.__version__}, numpy "
              f"{np.__version__}; {datetime.date.today().isoformat()}; text {size / 1e6:.1f} MB ({text.name})")
        for mode in modes:
            runs = [("ours", "ours")] + ([("reference", f"reference_{mode}")] if reference else [])
            seconds = {}
            for name, function_name in runs:
                out_dir = folder / f"{name}-{mode}"
                out_dir.mkdir(exist_ok=True)
                seconds[name], peak = run_in_process(function_name, str(text), str(out_dir),
                                                     "token" if mode == "bpe" else "char", vocab_size)
                label = f"{mode} {name}"
                print(f"{label} throughput: {size / 1e6 / seconds[name]:.1f} MB/s ({seconds[name]:.1f} s)", flush=True)
                print(f"{label} peak memory: {peak / 2**20:.0f} MiB", flush=True)
                shutil.rmtree(out_dir, ignore_errors=True)
            if "reference" in seconds:
                print(f"{mode} ratio ours/reference (speed): {seconds['reference'] / seconds['ours']:.3f}")
    finally:
        if work_dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    from benchmarks.common import run_cli

    run_cli(main)
