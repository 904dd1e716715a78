"""Settings that the commands and the library share, as plain dataclasses: the one place their defaults live.

`picogpt sample`, `chat` and `serve` and the Python API take their sampling options from `SamplingSettings`;
`picogpt prepare` and the data module take the preparation options from `PrepareSettings`; `picogpt serve`
takes the server's from `ServeSettings`. The other groups have their home beside the code that uses them:
the model's shape in `model.GPTConfig`, the optimizer's and the LR schedule's in `optim.OptimizerSettings` and
`optim.ScheduleSettings`, the serving of blocks in `data.BlockSettings`; the LightningModule's and the data
module's flags take their defaults from those, and each config in configs/ sets what differs for its recipe. Nothing here imports torch, so a command can build its
`--help` from these classes in a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .errors import SettingsError, warn
from .threads import usable_cores
from .tokenizer import BPETokenizer, WordTokenizer, bpe_available


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 to 2**64 - 1


def check_seed(seed: int | None, name: str = "seed") -> None:
    """A seed torch and numpy both accept: a whole number from 0 to 2**64 - 1 (or None for a random one)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise SettingsError(f"{name} must be a whole number from 0 to 2**64 - 1, got {seed}")


@dataclass
class SamplingSettings:
    """How the next token is chosen from the model's logits.

    temperature 0 takes the most likely token; top_k and top_p (nucleus) keep only the likeliest tokens before
    sampling; repetition_penalty > 1 makes tokens already in the context less likely (CTRL, Keskar et al.).

    Args:
        temperature: Randomness; 0 always takes the most likely token (greedy).
        top_k: Sample only among the k likeliest tokens; null for all.
        top_p: Nucleus sampling: only the likeliest tokens whose probabilities add up to p; null for off.
        repetition_penalty: Above 1 makes tokens already in the context less likely; 1 is off.
    """

    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise SettingsError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise SettingsError(f"top_k must be a positive number of tokens (or null for all), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SettingsError(f"top_p must be in (0, 1] (or null for no nucleus filter), got {self.top_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise SettingsError(f"repetition_penalty must be > 0 (1 is none), got {self.repetition_penalty}")


@dataclass(frozen=True)
class PrepareSettings:
    """How a text becomes token ids (`picogpt prepare` and the data module).

    Args:
        mode: 'char' for one token per character (vocab_size and backend are ignored), 'token' for subwords.
        backend: In token mode, 'bpe' (byte-level BPE, Hugging Face tokenizers) or 'word' (pure Python; used
            automatically, with a warning, when tokenizers cannot be imported).
        vocab_size: The number of tokens to learn in token mode (bpe: 258 or more, word: 2 or more).
        val_fraction: The share of the text held out for validation, in (0, 0.5].
        random_split: Hold out random 4 KB chunks instead of the end of the text.
        split_seed: The seed that picks the chunks when random_split is on.
        end_of_text: End each document with the end-of-text token, when the tokenizer has one: each file (the
            one given, or each of a folder), and each question/answer pair the text marks (a "Q: ..." line,
            then an "A: ..." line that ends a paragraph, becomes "A: ...<|endoftext|>"), as the qa chat
            template ends an answer, so that a model learns to stop. Turn it off for text whose Q:/A: lines
            are not separate exchanges.
        tokenizer_from: Encode with the tokenizer of this checkpoint (.ckpt), tokenizer.json, vocab.json,
            prepared or Hugging Face folder, or GPT-2's encoder.json + vocab.bpe (either file or their folder)
            instead of training one (mode, backend and vocab_size are then ignored); resuming and validating a
            checkpoint use its own by default. A char tokenizer must know every character.
        glob: For a folder text_path: the files to read, matched at any depth (e.g. '*.jsonl.gz'); default
            (null): every .txt, .md, .jsonl and .parquet file, plain or gzipped.
        text_field: The field of each JSON lines record, or the Parquet column, that holds a document's text.
        num_proc: Processes that encode the text (the ids are the same whatever the number); null: the cores
            this process may use. BPE training uses every core through the tokenizers library.
    """

    mode: Literal["char", "token"] = "token"
    backend: Literal["bpe", "word"] = "bpe"
    vocab_size: int = 8000
    val_fraction: float = 0.1
    random_split: bool = False
    split_seed: int = 1337
    end_of_text: bool = True
    tokenizer_from: str | None = None
    glob: str | None = None
    text_field: str = "text"
    num_proc: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("char", "token"):
            raise SettingsError(f"mode {self.mode!r} is unknown: use 'char' or 'token'")
        if self.mode == "token" and self.backend not in ("bpe", "word"):
            raise SettingsError(f"backend {self.backend!r} is unknown: use 'bpe' or 'word'")
        if self.mode == "token":
            (BPETokenizer if self.backend == "bpe" else WordTokenizer).check_vocab_size(self.vocab_size)
        check_seed(self.split_seed, "split_seed")
        if not 0 < self.val_fraction <= 0.5:
            raise SettingsError(
                f"val_fraction {self.val_fraction} is out of range: choose a value in (0, 0.5], e.g. 0.1"
            )
        if not self.glob and self.glob is not None:
            raise SettingsError("glob is empty: give a pattern such as '*.jsonl' (or null for every supported file)")
        if not self.text_field:
            raise SettingsError("text_field is empty: name the JSON field or Parquet column that holds the text")
        if self.num_proc is not None and (isinstance(self.num_proc, bool) or not isinstance(self.num_proc, int)
                                          or self.num_proc < 1):
            raise SettingsError(f"num_proc must be a whole number >= 1 (or null for every usable core), got "
                                f"{self.num_proc!r}")

    def processes(self) -> int:
        """How many processes encode the text: num_proc, else the cores this process may use."""
        return self.num_proc if self.num_proc is not None else usable_cores()

    def tokenizer_kind(self, quiet: bool = False) -> str:
        """The tokenizer that will be built: BPE falls back to words when `tokenizers` cannot be imported."""
        if self.mode == "char":
            return "char"
        if self.backend == "bpe" and not bpe_available():
            if not quiet:
                warn("`tokenizers` is not installed, so the word tokenizer is used instead of BPE: "
                     "pip install tokenizers")
            return "word"
        return self.backend


SERVE_HOSTS = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "0.0.0.0": "0.0.0.0", "::": "::"}


@dataclass(frozen=True)
class ServeSettings:
    """How `picogpt serve` serves a checkpoint over its OpenAI-compatible HTTP API.

    Args:
        host: 127.0.0.1 (this machine only), 0.0.0.0 or :: (every interface: anyone on the network).
        port: TCP port, 1024 to 65535.
        api_key: Every endpoint but /health and the chat page then needs `Authorization: Bearer KEY`;
            null: the PICOGPT_API_KEY environment variable, else no key.
        max_batch_size: Requests generated together, sharing each forward pass; 1 serves one at a time.
        max_queue: Requests that may wait for a place in the batch; one more is answered 503 at once.
        max_tokens: Longest answer, in tokens, for requests that do not set max_tokens.
        max_tokens_limit: The most max_tokens a request may ask for (more is a 400); null: the model's context
            (or max_tokens when that is larger).
        max_messages: The most messages one request may hold.
        max_request_bytes: The largest request body, in bytes (more is a 413).
        workers: No longer used (requests share one model in batches); kept so that old commands still run.
        threads: torch threads; null: the cores free of load (threads.py).
        model_name: The model id /v1/models reports and responses carry.
        log_level: uvicorn's logging: debug, info, warning or error.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    max_tokens: int = 256
    max_tokens_limit: int | None = None
    max_messages: int = 256
    max_request_bytes: int = 1_000_000
    workers: int = 1
    threads: int | None = None
    model_name: str = "picogpt"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def __post_init__(self) -> None:
        if self.host not in SERVE_HOSTS:
            raise SettingsError(f"host {self.host!r} cannot be served; use 127.0.0.1 (this machine), 0.0.0.0 or ::")
        if not 1024 <= self.port <= 65535:
            raise SettingsError(f"port must be from 1024 to 65535, got {self.port}")
        if self.workers < 1:
            raise SettingsError(f"workers must be at least 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise SettingsError(f"threads must be at least 1 (or null for the default), got {self.threads}")
        if self.max_tokens < 1:
            raise SettingsError(f"max_tokens must be at least 1, got {self.max_tokens}")
        for name in ("max_batch_size", "max_queue", "max_messages", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < self.max_tokens:
            raise SettingsError(f"max_tokens_limit {self.max_tokens_limit} is below the default max_tokens "
                                f"{self.max_tokens}; raise it or lower --max_tokens")
        if self.api_key is not None and (not self.api_key.strip() or not self.api_key.isprintable()):
            raise SettingsError("api_key must be printable text that is not blank")

    @property
    def bind_address(self) -> str:
        return SERVE_HOSTS[self.host]
