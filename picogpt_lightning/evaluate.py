"""Loss, perplexity and bits per byte of a model on any text, streamed (`picogpt evaluate`).

Loss and perplexity are per token, so they cannot compare a char model with a BPE model: a BPE token covers
several characters. Bits per byte can: the total negative log-likelihood of the text in bits, divided by the
UTF-8 bytes of the text scored, is what a compressor built on the model would spend per byte.

Windows. The text is one stream of tokens (the files of a folder joined as `prepare` joins them). Windows of
block_size + 1 tokens start every `stride` tokens and each scores only the targets no earlier window scored.
With stride = block_size (the default) the windows do not overlap: fastest, and the same conditions as
training, where a token sees from 0 to block_size - 1 tokens of context. A smaller stride gives every token
at least block_size - stride tokens of context (a lower, truer loss) at block_size / stride times the cost.
The first token of the text is context only; its bytes are not counted. The last window ends at the last token.

Characters a char model never saw are mapped as `picogpt sample` maps them (a close stand-in, else dropped),
with a warning; bytes are counted on the text as scored.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .errors import SettingsError
from .prompt import fit_to_vocabulary

ENCODE_BATCH_CHARS = 1 << 16  # text is encoded 64 KB at a time: batches for BPE, and a progress bar that keeps up
LOGITS_PER_BATCH = 1 << 24  # the automatic batch size keeps a batch's logits near 64 MB (float32)
MAX_AUTO_BATCH = 64


@dataclass
class EvaluationResult:
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text those tokens cover
    nll: float  # total negative log-likelihood, nats
    block_size: int
    stride: int

    @property
    def loss(self) -> float:
        """Mean cross-entropy per token, in nats (the `val_loss` of training)."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}


# ----------------------------------------------------------------------------------------------- windows


def scored_windows(id_pieces: Iterable[list[int]], block_size: int, stride: int) -> Iterator[tuple[list[int], int]]:
    """(window, n) pairs: a window of at most block_size + 1 token ids, whose last n targets are to be scored.

    Every token after the first is scored exactly once. Only the tokens later windows still need are kept,
    so memory does not grow with the text.
    """
    buffer: list[int] = []
    base = 0  # position in the text of buffer[0]
    scored = 0  # position of the last scored token; token 0 is context only
    begin = 0  # position where the next full window starts
    for ids in id_pieces:
        buffer.extend(ids)
        while base + len(buffer) > begin + block_size:
            end = begin + block_size
            yield buffer[begin - base : end - base + 1], end - scored
            scored, begin = end, begin + stride
            keep_from = scored - block_size  # the final window reaches back at most this far
            if keep_from > base:
                del buffer[: keep_from - base]
                base = keep_from
    last = base + len(buffer) - 1
    if last > scored:
        start = max(0, last - block_size)
        yield buffer[start - base :], last - scored


def _batches(windows: Iterable[tuple[list[int], int]], batch_size: int) -> Iterator[list[tuple[list[int], int]]]:
    """Windows grouped batch_size at a time; only windows of one length share a batch (the last may be short)."""
    batch: list[tuple[list[int], int]] = []
    for window in windows:
        if batch and (len(batch) == batch_size or len(window[0]) != len(batch[0][0])):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def score_batch(model, batch: list[tuple[list[int], int]], device) -> float:
    """Summed negative log-likelihood (nats) of the scored targets of windows of equal length."""
    tokens = torch.tensor([window for window, _ in batch], dtype=torch.long, device=device)
    with torch.no_grad():
        logits = model(tokens[:, :-1])[0].float()
        nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # (batch, steps)
    steps = nll.size(1)
    scored = torch.tensor([count for _, count in batch], device=device)
    mask = torch.arange(steps, device=device)[None, :] >= steps - scored[:, None]
    return float((nll * mask).cpu().double().sum())  # summed in float64 on the CPU: MPS has no float64


# ----------------------------------------------------------------------------------------------- text


class _TextMeter:
    """Encodes text pieces in batches while counting bytes and the unknown characters it had to map."""

    def __init__(self, tokenizer, on_bytes=None):
        self.tokenizer = tokenizer
        self.on_bytes = on_bytes or (lambda count: None)
        self.bytes = 0
        self.first_token_bytes = 0
        self.replaced: Counter[str] = Counter()
        self.replacements: dict[str, str | None] = {}

    def encode(self, pieces: Iterable[str]) -> Iterator[list[int]]:
        batch: list[str] = []
        size = 0
        for piece in pieces:
            raw_bytes = len(piece.encode("utf-8"))
            fitted, replacements = fit_to_vocabulary(piece, self.tokenizer)
            for char in replacements:
                self.replaced[char] += piece.count(char)
            self.replacements.update(replacements)
            self.bytes += len(fitted.encode("utf-8"))
            batch.append(fitted)
            size += len(fitted)
            self.on_bytes(raw_bytes)
            if size >= ENCODE_BATCH_CHARS:
                yield from self._encode_batch(batch)
                batch, size = [], 0
        if batch:
            yield from self._encode_batch(batch)

    def _encode_batch(self, texts: list[str]) -> Iterator[list[int]]:
        for ids in self.tokenizer.encode_batch([text for text in texts if text]):
            if ids and not self.first_token_bytes:
                self.first_token_bytes = len(self.tokenizer.decode(ids[:1]).encode("utf-8"))
            yield ids


def auto_batch_size(block_size: int, vocab_size: int) -> int:
    """Windows per batch whose logits (block_size x vocab_size each) stay near LOGITS_PER_BATCH numbers."""
    return max(1, min(MAX_AUTO_BATCH, LOGITS_PER_BATCH // (block_size * vocab_size)))


def evaluate_pieces(
    model,
    tokenizer,
    pieces: Iterable[str],
    stride: int | None = None,
    batch_size: int | None = None,
    on_bytes=None,
) -> tuple[EvaluationResult, dict[str, str | None], Counter]:
    """Evaluate `model` on the text given as consecutive pieces (cut where the tokenizer would not join them).

    Returns the result, {unknown character: stand-in or None} and how often each unknown character occurred.
    """
    block_size = model.config.block_size
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise SettingsError(f"stride must be from 1 to the model's block_size {block_size}, got {stride}")
    if batch_size is None:
        batch_size = auto_batch_size(block_size, model.config.vocab_size)
    if batch_size < 1:
        raise SettingsError(f"batch_size must be >= 1, got {batch_size}")
    device = model.wte.weight.device
    meter = _TextMeter(tokenizer, on_bytes)
    tokens, nll = 0, 0.0
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(scored_windows(meter.encode(pieces), block_size, stride), batch_size):
            nll += score_batch(model, batch, device)
            tokens += sum(count for _, count in batch)
    finally:
        model.train(was_training)
    scored_bytes = max(0, meter.bytes - meter.first_token_bytes) if tokens else 0
    return EvaluationResult(tokens, scored_bytes, nll, block_size, stride), meter.replacements, meter.replaced


def evaluate_text(
    model, tokenizer, text: str, stride: int | None = None, batch_size: int | None = None
) -> EvaluationResult:
    """Loss, perplexity and bits per byte of `text` (a string held in memory)."""
    return evaluate_pieces(model, tokenizer, [text], stride, batch_size)[0]
