"""Preparation at scale: a generated many-file corpus of 100 MB and 1 GB prepared on every core, against the
`tokenizers` library's own trainer and `encode_batch_fast` over the same text, in the same run.

    python -m benchmarks.prepare_scale                          # 100 MB and 1 GB (1 GB: long on 2 cores)
    python -m benchmarks.prepare_scale --sizes_mb '[100]'
    python -m benchmarks.prepare_scale --sizes_mb '[20]' --word true   # the word tokenizer's training too

The corpus is generated here, nothing is downloaded: FILES files in nested folders, each a document of its own
"topic" (the Zipf ranks of a shared 50,000-word lexicon reshuffled per file, so word frequencies differ from
file to file), paragraphs of varied length and now and then a Q:/A: pair that preparation marks with
end-of-text. It is written under a temporary folder (or --work_dir) and deleted at the end.

What runs, each in a fresh process so its peak memory (VmHWM) is its own; worker processes' peaks are the
largest child's (RUSAGE_CHILDREN):
- ours: `picogpt prepare` (BPE, --vocab_size) with --num_proc 1 (the library's own threads encode) and with
  --num_proc CORES (a process pool, one thread each); its tokenizer training is timed apart from the rest.
- the library's trainer, `Tokenizer.train(files)` (it reads the files itself, in parallel);
- the library's `encode_batch_fast` over the same files with our trained tokenizer: the files read 1 MB at
  a time, each 4 MB of lines encoded in one call (every core), the ids written to one file.
The ratios are reference time / our time: 1 is as fast as the library, above 1 faster.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

FILES = 200
GENERATOR_SEED = 2212
LEXICON_SIZE = 50_000
TOPIC_WORDS = 3_000  # words moved into the frequent ranks of each file's topic
BATCH_CHARS = 4 << 20


# ---------------------------------------------------------------------------------------------------------------
# The corpus


def _paragraph_text(rng: np.random.Generator, lexicon: np.ndarray, ranks: np.ndarray, cumulative: np.ndarray,
                    words: int) -> str:
    """`words` words in sentences of 5 to 30 words, paragraphs of 1 to 8 sentences."""
    ids = ranks[np.searchsorted(cumulative, rng.random(words))]
    lengths = rng.integers(5, 31, size=words // 5 + 1)
    ends = np.cumsum(lengths)
    ends = ends[ends < words]
    starts = np.concatenate([[0], ends])
    capital = np.zeros(words, dtype=np.int64)
    capital[starts] = LEXICON_SIZE
    pieces = np.empty(2 * words, dtype=object)
    pieces[0::2] = lexicon[ids + capital]
    separators = np.where(rng.random(words) < 0.08, ", ", " ").astype(object)
    separators[ends - 1] = ". "
    paragraph_ends = ends[rng.random(len(ends)) < 0.25] - 1
    separators[paragraph_ends] = ".\n\n"
    separators[-1] = ".\n"
    pieces[1::2] = separators
    return "".join(pieces)


def _question_answer(rng: np.random.Generator, lexicon: np.ndarray) -> str:
    question = " ".join(lexicon[rng.integers(0, 2_000, size=rng.integers(4, 12))])
    answer = " ".join(lexicon[rng.integers(0, 5_000, size=rng.integers(4, 20))])
    return f"Q: {question.capitalize()}?\nA: {answer.capitalize()}.\n\n"


def generate_corpus(folder: Path, size_bytes: int, files: int = FILES, seed: int = GENERATOR_SEED) -> int:
    """Write about size_bytes of text as `files` files in 10 subfolders; returns the bytes written."""
    from benchmarks.prepare_speed import make_lexicon

    rng = np.random.default_rng(seed)
    lower = make_lexicon(rng)
    lexicon = np.array(lower + [word.capitalize() for word in lower], dtype=object)
    base = np.arange(1, LEXICON_SIZE + 1) ** -1.07
    cumulative = np.cumsum(base) / base.sum()
    written = 0
    per_file = size_bytes // files
    for index in range(files):
        file_rng = np.random.default_rng([seed, index])
        ranks = np.arange(LEXICON_SIZE)
        topic = file_rng.choice(np.arange(200, LEXICON_SIZE), size=TOPIC_WORDS, replace=False)
        places = file_rng.choice(np.arange(50, 5_000), size=TOPIC_WORDS, replace=False)
        ranks[places], ranks[topic] = topic, places  # the topic's words become frequent in this file
        path = folder / f"part-{index % 10}" / f"doc-{index:04d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with open(path, "w", encoding="utf-8", newline="\n") as out:
            while size < per_file:
                text = _paragraph_text(file_rng, lexicon, ranks, cumulative, 20_000)
                if file_rng.random() < 0.3:
                    text += _question_answer(file_rng, lexicon)
                out.write(text)
                size += len(text.encode("utf-8"))
        written += size
    return written


# ---------------------------------------------------------------------------------------------------------------
# What is timed, each in a fresh process


def ours(corpus: str, out_dir: str, vocab_size: int, num_proc: int, backend: str = "bpe") -> dict:
    """`picogpt prepare`, as a user runs it; the tokenizer training (the first pass) timed on its own."""
    from picogpt_lightning import prepare as prepare_module
    from picogpt_lightning.cli import main as picogpt

    train = prepare_module._train_tokenizer
    timing = {}

    def timed_train(*args):
        start = time.perf_counter()
        tokenizer = train(*args)
        timing["train_s"] = time.perf_counter() - start
        return tokenizer

    prepare_module._train_tokenizer = timed_train
    code = picogpt(["prepare", "--text_path", corpus, "--out_dir", out_dir, "--vocab_size", str(vocab_size),
                    "--num_proc", str(num_proc), "--backend", backend])
    if code:
        raise RuntimeError(f"picogpt prepare exited with {code}")
    return timing


def library_train(corpus: str, out_dir: str, vocab_size: int, num_proc: int) -> dict:
    """The library's trainer fed the same files (it reads them itself), set up as ours is."""
    import tokenizers as tk

    from picogpt_lightning.corpus import find_text_files

    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(path) for path in find_text_files(corpus)], trainer=trainer)
    return {}


def library_encode(corpus: str, out_dir: str, vocab_size: int, num_proc: int) -> dict:
    """The library's encode_batch_fast over the files' lines, 4 MB per call, with the tokenizer ours trained."""
    import tokenizers as tk

    from picogpt_lightning.corpus import find_text_files

    tokenizer = tk.Tokenizer.from_file(str(Path(out_dir) / "tokenizer.json"))
    with open(Path(out_dir) / "reference.bin", "wb") as out:
        for path in find_text_files(corpus):
            for lines in _line_batches(path):
                encodings = tokenizer.encode_batch_fast(lines, add_special_tokens=False)
                ids = itertools.chain.from_iterable(encoding.ids for encoding in encodings)
                np.fromiter(ids, dtype=np.uint16).tofile(out)
    return {}


def _line_batches(path: Path):
    batch, size = [], 0
    with open(path, encoding="utf-8") as file:
        for line in file:
            batch.append(line)
            size += len(line)
            if size >= BATCH_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _peak_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _child(function_name: str, args: tuple, results) -> None:
    import resource

    start = time.perf_counter()
    extra = globals()[function_name](*args)
    seconds = time.perf_counter() - start
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest child's
    results.put((seconds, _peak_kib("VmHWM:") * 1024, workers * 1024, extra))


def run_in_process(function_name: str, *args) -> tuple[float, int, int, dict]:
    """Seconds, peak memory (bytes) of the process and of its largest child, and what the function returned."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(function_name, args, results))
    process.start()
    outcome = results.get()
    process.join()
    if process.exitcode:
        raise SystemExit(f"{function_name} failed (exit code {process.exitcode})")
    return outcome


# ---------------------------------------------------------------------------------------------------------------


def measure(size_mb: float, folder: Path, vocab_size: int, cores: int, files: int, processes: list[int],
            word: bool = False) -> None:
    corpus, out = folder / f"corpus-{size_mb:g}MB", folder / "out"
    corpus.mkdir()
    start = time.perf_counter()
    size = generate_corpus(corpus, int(size_mb * 1e6), files)
    print(f"\n== {size / 1e6:.0f} MB in {files} files (generated in {time.perf_counter() - start:.0f} s)", flush=True)
    mb = size / 1e6
    ours_runs = {}
    for num_proc in processes:
        shutil.rmtree(out, ignore_errors=True)
        seconds, peak, worker_peak, timing = run_in_process("ours", str(corpus), str(out), vocab_size, num_proc)
        train_s = timing["train_s"]
        ours_runs[num_proc] = (seconds, train_s)
        workers = f", largest worker {worker_peak / 2**20:.0f} MiB" if num_proc > 1 else ""
        print(f"ours --num_proc {num_proc}: {seconds:.1f} s in all, {mb / seconds:.2f} MB/s "
              f"({mb / seconds / cores:.2f} MB/s per core); tokenizer training {train_s:.1f} s, encoding and "
              f"writing {seconds - train_s:.1f} s ({mb / (seconds - train_s):.2f} MB/s); peak memory "
              f"{peak / 2**20:.0f} MiB{workers}", flush=True)
    train_s = run_in_process("library_train", str(corpus), str(out), vocab_size, 1)[0]
    print(f"library trainer on the files: {train_s:.1f} s", flush=True)
    encode_s, encode_peak = run_in_process("library_encode", str(corpus), str(out), vocab_size, 1)[:2]
    print(f"library encode_batch_fast: {encode_s:.1f} s, {mb / encode_s:.2f} MB/s, peak {encode_peak / 2**20:.0f} "
          f"MiB", flush=True)
    for num_proc, (seconds, ours_train_s) in ours_runs.items():
        print(f"ratio --num_proc {num_proc}: encoding {encode_s / (seconds - ours_train_s):.2f}x the library's "
              f"encode_batch_fast; training {train_s / ours_train_s:.2f}x the library's trainer", flush=True)
    for num_proc in processes if word else []:
        shutil.rmtree(out, ignore_errors=True)
        seconds, _, _, timing = run_in_process("ours", str(corpus), str(out), vocab_size, num_proc, "word")
        print(f"word tokenizer (--backend word) --num_proc {num_proc}: training {timing['train_s']:.1f} s "
              f"({mb / timing['train_s']:.2f} MB/s), {seconds:.1f} s in all", flush=True)
    shutil.rmtree(corpus)
    shutil.rmtree(out, ignore_errors=True)


def main(sizes_mb: list[float] | None = None, vocab_size: int = 8000, files: int = FILES,
         num_proc: list[int] | None = None, work_dir: str | None = None, word: bool = False) -> None:
    """Preparation of generated many-file corpora, against the tokenizers library in the same run.

    Args:
        sizes_mb: corpus sizes in MB (10^6 bytes); default 100 and 1000.
        vocab_size: BPE vocabulary size.
        files: how many files each corpus has.
        num_proc: the --num_proc values to time ours with; default 1 and the usable cores.
        work_dir: where the corpus and outputs go (default: a temporary folder); deleted at the end.
        word: also prepare with the word tokenizer at each num_proc, timing its training (counted in workers).
    """
    import datetime

    import tokenizers

    from benchmarks.common import cpu_name
    from picogpt_lightning.threads import usable_cores

    cores = usable_cores()
    processes = list(num_proc or sorted({1, cores}))
    load = os.getloadavg()[0]
    print(f"machine: {cpu_name()}, {cores} usable cores (load {load:.2f} at the start); tokenizers "
          f"{tokenizers.__version__}; {datetime.date.today().isoformat()}", flush=True)
    root = Path(work_dir) if work_dir else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="picogpt-prepare-scale-", dir=root))
    try:
        for size_mb in sizes_mb or [100, 1000]:
            measure(size_mb, folder, vocab_size, cores, files, processes, word)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    from benchmarks.common import run_cli

    run_cli(main)
