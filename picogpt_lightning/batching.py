"""Continuous batching: many generations share each forward pass, joining and leaving between steps.

Each request gets a slot: one row of a `SlotCache` (its own keys and values, at its own length), its own
sampling settings, random generator, stop strings and length. Every step feeds each active slot's last token
through the model together, one row each, then samples each row with its own settings. A request joins at the
next step (its prompt is encoded alone into its row first) and leaves as soon as it ends or is cancelled; the
last row then moves into its place, so the active rows are always the first ones.

Every slot sees exactly the window `generate.generate_batch` gives a lone request (the same sliding rule), and
draws from its own generator, so its tokens are the ones it would get alone (up to floating-point rounding of
a batched matmul, which only matters where two logits all but tie).

`BatchGenerator` is the step loop (used by `PicoGPT.generate` for a list of prompts); `Scheduler` runs one in a
thread behind a bounded queue for the server. Plain torch: nothing here imports Lightning or HTTP code.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .generate import (draw_tokens, is_greedy, last_logits, sample_next_token, sampling_probabilities, slide_keep,
                       uniform_draws)
from .prompt import StreamingDecoder
from .settings import SamplingSettings

# ----------------------------------------------------------------------------------------------- the cache


class SlotCache:
    """The model's own KV cache (`model.new_cache(slots)`), one row per slot, each row at its own length.

    The model asks it, as it asks a plain KVCache, for the positions of the new tokens, the attention mask and
    where to append keys and values; only rows 0..active-1 take part in a forward.
    """

    def __init__(self, model: torch.nn.Module, slots: int):
        self.store = model.new_cache(slots)
        self.lengths = [0] * slots
        self.active = 0  # rows in the next forward
        self.device = self.store.keys[0].device

    def prepare(self, active: int) -> None:
        """Before a forward of rows 0..active-1: where each row writes, once for every layer."""
        self.active = active
        self.rows = torch.arange(active, device=self.device)
        self.at = torch.tensor(self.lengths[:active], device=self.device)
        self.length = max(self.lengths[:active])  # the longest row: what the model checks against its context
        keys = torch.arange(self.length + 1, device=self.device)
        self.mask = (keys <= self.at[:, None])[:, None, None, :]  # (rows, 1, 1, keys): own keys up to its own

    def positions(self, steps: int) -> torch.Tensor:
        return self.at[:, None]

    def attention_mask(self, steps: int) -> torch.Tensor:
        if steps != 1:
            raise ValueError("a SlotCache feeds one token per row; encode prompts into a KVCache and load() it")
        return self.mask

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.store.keys[layer], self.store.values[layer]
        keys[self.rows, :, self.at] = k[:, :, 0]
        values[self.rows, :, self.at] = v[:, :, 0]
        end = self.length + 1
        return keys[: self.active, :, :end], values[: self.active, :, :end]

    def advance(self, steps: int) -> None:
        for row in range(self.active):
            self.lengths[row] += steps

    def load(self, row: int, cache) -> None:
        """Put a one-row cache (a prompt encoded alone) into `row`."""
        for layer, (keys, values) in enumerate(zip(cache.keys, cache.values)):
            self.store.keys[layer][row, :, : cache.length] = keys[0, :, : cache.length]
            self.store.values[layer][row, :, : cache.length] = values[0, :, : cache.length]
        self.lengths[row] = cache.length

    def move(self, source: int, target: int) -> None:
        length = self.lengths[source]
        for keys, values in zip(self.store.keys, self.store.values):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]
        self.lengths[target] = length


# ----------------------------------------------------------------------------------------------- requests


@dataclass
class Finish:
    """How a request ended: "stop" (end-of-text or a stop string), "length" (max_new_tokens), "cancelled", or
    "error" (a failure of the server, logged where it runs)."""

    reason: str
    completion_tokens: int


@dataclass
class GenerationRequest:
    """One generation: its prompt, length, sampling, random generator and stop strings.

    `emit` is called from the generating thread with each piece of text as it becomes final, then once with
    a `Finish`. Setting `cancelled` (from any thread) ends it at the next step.
    """

    prompt_ids: Sequence[int]
    max_new_tokens: int
    settings: SamplingSettings
    generator: torch.Generator | None
    stop: Sequence[str]
    emit: Callable[[str | Finish], None]
    cancelled: bool = False


@dataclass
class _Slot:
    request: GenerationRequest
    decoder: StreamingDecoder
    window: list[int]  # the tokens the model sees, its last one not yet in the cache
    tokens: int = 0
    finish: str | None = field(default=None)


# ----------------------------------------------------------------------------------------------- the step loop


class BatchGenerator:
    """Runs up to `max_batch_size` generations together, one token each per `step()`."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch_size: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.cache = SlotCache(model, max_batch_size)
        self.slots: list[_Slot] = []

    @property
    def free(self) -> int:
        return self.max_batch_size - len(self.slots)

    def add(self, request: GenerationRequest) -> None:
        """Start a request in the next free row: its prompt (cropped to the context) is encoded alone and its
        first token drawn at once, so a request joining a busy batch waits for no step to see it."""
        if not self.free:
            raise RuntimeError("no free slot: check `free` before adding")
        block_size = self.model.config.block_size
        slot = _Slot(request, StreamingDecoder(self.tokenizer, request.stop), list(request.prompt_ids)[-block_size:])
        if request.max_new_tokens < 1:
            return self._end(slot, "length")
        self.slots.append(slot)
        cache = self.model.new_cache(1)
        window = self._tensor([slot.window])
        logits = last_logits(self.model, window, cache, self.tokenizer.vocab_size)
        self.cache.load(len(self.slots) - 1, cache)
        self._take(len(self.slots) - 1, slot, int(sample_next_token(logits, window, request.settings,
                                                                    request.generator)))
        self._drop_finished()

    def _encode_window(self, row: int) -> None:
        """All of the row's window but its last token into its cache row (the next step feeds the last one)."""
        window = self.slots[row].window
        cache = self.model.new_cache(1)
        if len(window) > 1:
            last_logits(self.model, self._tensor([window[:-1]]), cache)
        self.cache.load(row, cache)

    def step(self) -> None:
        """One token for every active request; requests that end or were cancelled leave."""
        for slot in [s for s in self.slots if s.request.cancelled]:
            slot.finish = "cancelled"
        self._drop_finished()
        if not self.slots:
            return
        self.cache.prepare(len(self.slots))
        last_tokens = self._tensor([slot.window[-1:] for slot in self.slots])
        logits = last_logits(self.model, last_tokens, self.cache, self.tokenizer.vocab_size)
        for row, token in enumerate(self._sample(logits)):
            self._take(row, self.slots[row], token)
        self._drop_finished()

    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.cache.device)

    def _sample(self, logits: torch.Tensor) -> list[int]:
        """A token per row, as sample_next_token would draw it for that row alone. Rows with the same settings
        (and no repetition penalty, which reads each row's own window) are filtered and drawn together, each
        row with one uniform from its own generator."""
        tokens: list[int] = [0] * len(self.slots)
        groups: dict[tuple, list[int]] = {}
        for row, slot in enumerate(self.slots):
            settings = slot.request.settings
            if settings.repetition_penalty != 1.0:
                tokens[row] = int(sample_next_token(logits[row : row + 1], self._tensor([slot.window]), settings,
                                                    slot.request.generator))
            else:
                groups.setdefault((settings.temperature, settings.top_k, settings.top_p), []).append(row)
        for rows in groups.values():
            settings = self.slots[rows[0]].request.settings
            group_logits = logits[rows].float()
            if is_greedy(settings):
                drawn = group_logits.argmax(dim=-1)
            else:
                uniforms = torch.cat([uniform_draws(1, self.slots[row].request.generator, logits.device)
                                      for row in rows])
                drawn = draw_tokens(sampling_probabilities(group_logits, settings), uniforms)
            for row, token in zip(rows, drawn.tolist()):
                tokens[row] = token
        return tokens

    def _take(self, row: int, slot: _Slot, token: int) -> None:
        slot.tokens += 1
        piece = slot.decoder.push(token)
        if piece:
            slot.request.emit(piece)
        if slot.decoder.stopped or slot.tokens == slot.request.max_new_tokens:
            slot.finish = "stop" if slot.decoder.stopped else "length"
            return
        block_size = self.model.config.block_size
        slot.window.append(token)
        if len(slot.window) > block_size:  # slide as generate_batch does: re-encode the kept half
            slot.window = slot.window[-slide_keep(block_size) :]
            self._encode_window(row)

    def _drop_finished(self) -> None:
        row = 0
        while row < len(self.slots):
            slot = self.slots[row]
            if slot.finish is None:
                row += 1
                continue
            last = len(self.slots) - 1
            if row != last:
                self.cache.move(last, row)
            self.slots[row] = self.slots[last]
            self.slots.pop()
            self._end(slot, slot.finish)

    def _end(self, slot: _Slot, reason: str) -> None:
        if reason == "length":
            rest = slot.decoder.flush()
            if rest:
                slot.request.emit(rest)
        slot.request.emit(Finish(reason, slot.tokens))


def generate_many(model: torch.nn.Module, tokenizer, requests: Sequence[GenerationRequest],
                  max_batch_size: int) -> None:
    """Run `requests` to their ends, at most `max_batch_size` at a time, the next one joining as one ends."""
    batch = BatchGenerator(model, tokenizer, max_batch_size)
    waiting = list(requests)[::-1]
    while waiting or batch.slots:
        while waiting and batch.free:
            batch.add(waiting.pop())
        batch.step()


# ----------------------------------------------------------------------------------------------- the server's loop


class QueueFull(Exception):
    """More requests wait than the queue holds: the server answers 503 at once."""


class Scheduler:
    """A thread that runs a BatchGenerator over requests submitted from other threads.

    Requests beyond the batch wait in a queue of `max_queue`; `submit` refuses one more with QueueFull rather
    than letting waits grow without bound. Cancelled requests still waiting are dropped when their turn comes.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch_size: int, max_queue: int):
        self.batch = BatchGenerator(model, tokenizer, max_batch_size)
        self.waiting: queue.Queue[GenerationRequest] = queue.Queue(maxsize=max_queue)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="picogpt-batching", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Cancel every request and end the thread after its current step."""
        self.stopping.set()
        self.thread.join(timeout=10)

    def submit(self, request: GenerationRequest) -> None:
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull from None

    def _run(self) -> None:
        while not self.stopping.is_set():
            self._admit(block=not self.batch.slots)
            try:
                self.batch.step()
            except Exception:  # a bug, not the user's: fail the requests in flight, keep serving the next ones
                traceback.print_exc()
                for slot in self.batch.slots:
                    slot.request.emit(Finish("error", slot.tokens))
                self.batch = BatchGenerator(self.batch.model, self.batch.tokenizer, self.batch.max_batch_size)
        for slot in self.batch.slots:
            slot.request.cancelled = True
        self.batch.step()
        while not self.waiting.empty():
            self.waiting.get_nowait().emit(Finish("cancelled", 0))

    def _admit(self, block: bool) -> None:
        """Move waiting requests into free slots; with `block`, wait a little for the first one."""
        while self.batch.free:
            try:
                request = self.waiting.get(timeout=0.1) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if request.cancelled:
                request.emit(Finish("cancelled", 0))
            else:
                self.batch.add(request)
