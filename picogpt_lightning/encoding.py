"""The ids of a text's parts, batch by batch and in order: in this process, or in worker processes on every core.

prepare.py streams a text as (text, is_val) parts; this module groups them into batches of about ENCODE_BATCH_CHARS
characters and gives back each batch's train and val ids, in the order of the text. With `num_proc` above 1 the
batches are encoded by that many worker processes (a process pool, each worker with its own copy of the tokenizer),
at most IN_FLIGHT_PER_WORKER batches per worker ahead of the writer, so memory stays flat whatever the size of the
text; the results are taken in submission order, so the ids are exactly those of one process
(tests/test_prepare_parallel.py). The word tokenizer's training counts its words the same way, batch by batch in the
workers (`word_counts`), and the counts are summed here (their order does not matter). Processes rather than threads
because the char and word tokenizers run Python code that holds the GIL, and because turning each batch's ids into
an array is Python work too; a BPE worker encodes with one thread, so the workers share the cores instead of
fighting for them (measured against the library's own threaded `encode_batch`: docs/benchmarks.md, "Issue 22:
preparation at scale").

Workers are started with "spawn": safe whatever threads the calling process runs (Lightning, torch, the
tokenizers library). Like every spawned worker (a DataLoader's too), one runs the top of the script that
started it: a script that prepares data without the `if __name__ == "__main__":` guard would prepare again in
each worker, so `check_not_starting_worker` refuses that, the pool breaks, and the text is encoded in this
process instead, with one line saying why.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import tempfile
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from .errors import PicoGPTError, warn
from .tokenizer import ENDOFTEXT, BPETokenizer, CharTokenizer, Tokenizer, WordTokenizer

ENCODE_BATCH_CHARS = 4 << 20  # one batch: ~1,000 chunks, enough for every thread of encode_batch or a worker
IN_FLIGHT_PER_WORKER = 2  # batches queued per worker: one encoding, one waiting, so no worker ever idles
POOL_MIN_CHARS = 3 * ENCODE_BATCH_CHARS  # a smaller text is encoded in this process: starting workers costs more

Part = tuple[str, bool]
Encoded = tuple[int, np.ndarray, np.ndarray]  # characters of the batch, its train ids, its val ids


def batches(parts: Iterable[Part], batch_chars: int | None = None) -> Iterator[list[Part]]:
    """Parts grouped into lists of about `batch_chars` (default ENCODE_BATCH_CHARS) characters."""
    batch_chars = batch_chars or ENCODE_BATCH_CHARS
    batch, size = [], 0
    for text, is_val in parts:
        batch.append((text, is_val))
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    """The ids of texts, concatenated. Characters go through CharTokenizer.encode_array: a Python int per
    character would cap char preparation near 18 MB/s (benchmarks/prepare_speed.py)."""
    if isinstance(tokenizer, CharTokenizer):
        arrays = [tokenizer.encode_array(text) for text in texts]
        return np.concatenate(arrays).astype(dtype) if arrays else np.empty(0, dtype=dtype)
    if isinstance(tokenizer, BPETokenizer):
        return np.fromiter(itertools.chain.from_iterable(_bpe_ids(tokenizer, texts)), dtype=dtype)
    return np.fromiter(itertools.chain.from_iterable(tokenizer.encode_batch(texts)), dtype=dtype)


def _bpe_ids(tokenizer: BPETokenizer, texts: list[str]) -> Iterator[list[int]]:
    """The ids of each text, without the tokens a tokenizer's post-processor adds to every text it encodes (a
    Hugging Face tokenizer may put its begin-of-text before each 4 KB chunk). A document's end, written
    <|endoftext|> in the text, becomes the tokenizer's own end-of-text id, whatever that token is called."""
    library, eot_id = tokenizer.tokenizer, tokenizer.eot_id
    split = eot_id is not None and library.token_to_id(ENDOFTEXT) != eot_id  # else the literal encodes to it
    pieces = [text.split(ENDOFTEXT) if split else [text] for text in texts]
    encoded = iter(library.encode_batch_fast([piece for parts in pieces for piece in parts], add_special_tokens=False))
    for parts in pieces:
        ids = next(encoded).ids
        for _ in parts[1:]:
            ids += [eot_id] + next(encoded).ids
        yield ids


def encode_batch(tokenizer: Tokenizer, batch: list[Part], dtype: np.dtype) -> Encoded:
    """One batch's characters, train ids and val ids."""
    chars = sum(len(text) for text, _ in batch)
    train = encode(tokenizer, [text for text, is_val in batch if not is_val and text], dtype)
    val = encode(tokenizer, [text for text, is_val in batch if is_val and text], dtype)
    return chars, train, val


def encoded_batches(tokenizer: Tokenizer, parts: Iterable[Part], dtype: np.dtype, num_proc: int = 1,
                    total_chars: int | None = None) -> Iterator[Encoded]:
    """Each batch of parts encoded, in the order of the parts: in `num_proc` worker processes when that is above
    1 and the text (`total_chars`, when known) is large enough to pay for starting them."""
    yield from _batch_by_batch(_encode, (tokenizer, dtype), batches(parts), num_proc, total_chars)


def word_counts(chunks: Iterable[str], num_proc: int = 1, total_chars: int | None = None) -> Counter:
    """How often each word-level token (WordTokenizer.count) occurs in the chunks, counted batch by batch in
    `num_proc` worker processes as the encoding is, and summed here: the same counts as one process's."""
    counts: Counter[str] = Counter()
    for batch_counts in _batch_by_batch(_count_words, None, batches((chunk, False) for chunk in chunks), num_proc,
                                        total_chars):
        counts.update(batch_counts)
    return counts


def _batch_by_batch(work, state, grouped: Iterator[list[Part]], num_proc: int, total_chars: int | None) -> Iterator:
    """work(state, batch) for each batch, in order: in worker processes or in this one (see encoded_batches)."""
    if num_proc > 1 and (total_chars is None or total_chars >= POOL_MIN_CHARS):
        yield from _in_workers(work, state, grouped, num_proc)
    else:
        for batch in grouped:
            yield work(state, batch)


def _encode(state: tuple[Tokenizer, np.dtype], batch: list[Part]) -> Encoded:
    tokenizer, dtype = state
    return encode_batch(tokenizer, batch, dtype)


def _count_words(state: None, batch: list[Part]) -> Counter:
    return WordTokenizer.count(text for text, _ in batch)


# ---------------------------------------------------------------------------------------------------------------
# Worker processes


def check_not_starting_worker() -> None:
    """Refuse to prepare inside a worker that is still starting (running an unguarded script's top level)."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # set by spawn while a child starts
        raise PicoGPTError("a worker process started to encode a text is running the script that started it: "
                           "put the script's work under `if __name__ == \"__main__\":`")

_worker_state = None  # what the work of this worker process needs (encoding: the tokenizer and dtype)


def _start_worker(path: str) -> None:
    global _worker_state
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers share out the cores
    with open(path, "rb") as file:
        _worker_state = pickle.load(file)


def _work_in_worker(work, batch: list[Part]):
    return work(_worker_state, batch)


def _in_workers(work, state, grouped: Iterator[list[Part]], num_proc: int) -> Iterator:
    """work(state, batch) for each batch, submitted to a pool of num_proc workers, at most IN_FLIGHT_PER_WORKER
    each ahead, and the results taken in submission order. A pool that breaks at start-up falls back to this
    process."""
    # The state reaches the workers through a file, not the start-up pipe: a worker that dies while starting
    # would leave a large start-up message half read and this process blocked writing it.
    with tempfile.NamedTemporaryFile(prefix="picogpt-tokenizer-", suffix=".pickle", delete=False) as file:
        pickle.dump(state, file)
    pool = ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(file.name,))
    pending: deque = deque()
    done = 0
    try:
        for batch in grouped:
            pending.append((batch, pool.submit(_work_in_worker, work, batch)))
            while len(pending) >= IN_FLIGHT_PER_WORKER * num_proc:
                yield pending[0][1].result()
                pending.popleft()
                done += 1
        while pending:
            yield pending[0][1].result()
            pending.popleft()
            done += 1
    except BrokenProcessPool as error:
        if done:
            raise PicoGPTError(f"a worker process encoding the text stopped ({error}): free some memory, or "
                               f"prepare with --num_proc 1") from None
        warn(f"could not start {num_proc} worker processes to encode ({error}): encoding in this process "
             f"(a script that prepares data needs `if __name__ == \"__main__\":` around its work)")
        for batch, _ in pending:
            yield work(state, batch)
        for batch in grouped:
            yield work(state, batch)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        os.unlink(file.name)
