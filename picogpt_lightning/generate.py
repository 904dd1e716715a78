"""Sampling from a trained GPT over its key/value cache, and the `picogpt sample` command.

Reads top to bottom: devices, prompt text (escapes, characters a char model never saw), the sampling settings
and the choice of one token, the token generator with its sliding window, the streaming decoder that turns
tokens into printable text and honours stop strings, and the command itself.

Only torch, tokenizers and our light modules are used here, never Lightning, so the generator works from any
PyTorch code. torch itself is loaded on first use, so `picogpt sample --help` answers in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import typing
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import PicoGPTError
from .tokenizer import load_tokenizer

# ----------------------------------------------------------------------------------------------- start-up


def _import_on_first_use(name: str):
    """The module `name`, executed only when one of its attributes is first read (importlib's LazyLoader).

    Importing torch takes one to two seconds; `picogpt sample --help` and `picogpt chat --help` only need the
    commands' signatures, so they should not pay for it.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


torch = _import_on_first_use("torch")


def with_evaluated_annotations(command):
    """Replace a command's postponed (string) annotations by the types they name, once, here.

    Left as strings, jsonargparse evaluates them itself and reads every global of the module on the way,
    which would load torch and make `--help` pay for it.
    """
    command.__annotations__ = typing.get_type_hints(command)
    return command


# ----------------------------------------------------------------------------------------------- devices


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; a named device must exist on this machine."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PicoGPTError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise PicoGPTError(f"unsupported device {name!r}; use cpu, cuda, cuda:N, mps or auto")
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }[device.type]
    if not available:
        raise PicoGPTError(f"device {name!r} is not available on this machine; use --device cpu or auto")
    return device


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A random generator on the model's device: the same seed gives the same text on the same device."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# ----------------------------------------------------------------------------------------------- prompt text

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def read_escapes(text: str) -> str:
    r"""`\n`, `\t` and `\\` typed on a command line become a newline, a tab and a backslash."""
    return re.sub(r"\\([nt\\])", lambda match: _ESCAPES[match.group(1)], text)


# Stand-ins, best first, for characters that corpora written on different keyboards disagree on.
SIMILAR_CHARACTERS = {
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032`\u00b4", ("'", "\u2019")),
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", ('"', "\u201d", "'")),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", ("-", "\u2014", "\u2013")),
    **dict.fromkeys("\u00a0\u2009\u202f\t\n", (" ",)),
    "\u2026": ("...", "."),
    "'": ("\u2019", '"'),
    '"': ("\u201d", "'"),
    "-": ("\u2014", "\u2013"),
}


def _stand_in(char: str, known: set[str] | dict) -> str | None:
    """The closest known text for an unknown character: the other case, a similar mark, the letter without
    its accent; None when nothing fits."""
    stripped = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
    candidates = [char.swapcase(), char.lower(), char.upper(), *SIMILAR_CHARACTERS.get(char, ())]
    candidates += [stripped, stripped.swapcase()]
    for candidate in candidates:
        if candidate and candidate != char and all(c in known for c in candidate):
            return candidate
    return None


def fit_to_vocabulary(text: str, tokenizer) -> tuple[str, dict[str, str | None]]:
    """For a char tokenizer, `text` with each unknown character replaced by its stand-in or dropped.

    Returns the new text and {unknown character: stand-in or None when dropped}. Other tokenizers encode any
    text, so they get the text back unchanged.
    """
    if tokenizer.kind != "char":
        return text, {}
    known = tokenizer.stoi
    replacements: dict[str, str | None] = {}
    pieces = []
    for char in text:
        if char in known:
            pieces.append(char)
            continue
        if char not in replacements:
            replacements[char] = _stand_in(char, known)
        pieces.append(replacements[char] or "")
    return "".join(pieces), replacements


def describe_replacements(replacements: dict[str, str | None]) -> str:
    """One line naming each unknown character and what became of it."""
    parts = [
        f"{char!r} -> {stand_in!r}" if stand_in is not None else f"{char!r} dropped"
        for char, stand_in in replacements.items()
    ]
    return "characters the model never saw: " + ", ".join(parts)


def encode_prompt(text: str, tokenizer, warn: bool = True) -> tuple[str, list[int]]:
    """The prompt text as the model will see it, and its token ids.

    Unknown characters are mapped first, with one warning line to stderr unless `warn` is off. The ids are
    never empty: an empty prompt becomes a newline if the model knows one (the usual start of a document),
    else token 0.
    """
    text, replacements = fit_to_vocabulary(text, tokenizer)
    if replacements and warn:
        print(f"warning: {describe_replacements(replacements)}", file=sys.stderr)
    ids = list(tokenizer.encode(text)) if text else []
    if not ids:
        fitted, _ = fit_to_vocabulary("\n", tokenizer)
        ids = list(tokenizer.encode(fitted)) if fitted == "\n" else []
        ids = ids or [0]
    return text, ids


def read_stop_strings(stop: list[str] | str | None) -> list[str]:
    """Stop strings as given on a command line (one or a list, with escapes) as a list of plain strings."""
    stop = [stop] if isinstance(stop, str) else stop or []
    return [read_escapes(s) for s in stop]


# ----------------------------------------------------------------------------------------------- one token


@dataclass
class SamplingSettings:
    """How the next token is chosen from the model's logits.

    temperature 0 takes the most likely token; top_k and top_p (nucleus) keep only the likeliest tokens before
    sampling; repetition_penalty > 1 makes tokens already in the context less likely (CTRL, Keskar et al.).
    """

    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise PicoGPTError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise PicoGPTError(f"top_k must be a positive number of tokens (or null for all), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise PicoGPTError(f"top_p must be in (0, 1] (or null for no nucleus filter), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise PicoGPTError(f"repetition_penalty must be > 0 (1 is none), got {self.repetition_penalty}")


def penalize_repetition(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: logits of tokens present in `context` are divided by `penalty` when positive and
    multiplied by it when negative, so both move towards less likely."""
    seen = logits.gather(1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, context, seen)


def keep_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth_best = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth_best, float("-inf"))


def keep_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: the fewest likeliest tokens whose probabilities reach top_p; the best always stays."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def sample_next_token(
    logits: torch.Tensor,
    context: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (batch, vocab), given the `context` (batch, steps) it continues."""
    logits = logits.float()
    if settings.repetition_penalty != 1.0:
        logits = penalize_repetition(logits, context, settings.repetition_penalty)
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / settings.temperature
    if settings.top_k:
        logits = keep_top_k(logits, settings.top_k)
    if settings.top_p is not None and settings.top_p < 1:
        logits = keep_top_p(logits, settings.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------------------- many tokens


def slide_keep(block_size: int) -> int:
    """Tokens kept when the window is full: half the context.

    Absolute position embeddings mean a slid window must be re-encoded from scratch (every position moves).
    Keeping block_size - 1 tokens would re-encode a full window at every step, which is no faster than not
    caching at all; keeping half pays one prefill of block_size // 2 tokens every block_size // 2 steps, about
    one token's forward per step, while the model still sees at least half its context.
    """
    return max(1, block_size // 2)


def last_logits(model: torch.nn.Module, idx: torch.Tensor, cache=None) -> torch.Tensor:
    """Logits of the next token after `idx` (batch, steps), which continues `cache` when one is given."""
    # Inside the function rather than around the generator: a generator holding no_grad across its yields
    # would leave gradients off in the caller's code between tokens.
    with torch.no_grad():
        return model(idx, cache=cache)[0][:, -1]


def generate_batch(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    settings: SamplingSettings | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` tokens, one (batch,) tensor per step, continuing `prompt` (batch, steps).

    The context window is the whole sequence until it would exceed block_size (a longer prompt is cropped from
    the left); then it slides to its last `slide_keep(block_size)` tokens and grows again. With `use_cache` the
    window is encoded once and each step feeds only the new token; without it each step re-encodes the window.
    Both paths see the same window at every step, so with temperature 0 they give the same tokens at any length
    (and up to block_size tokens that is nanoGPT's crop-to-block_size reference exactly). `model` is a GPT
    in eval mode (dropout off), or any module with its `config`, `wte`, `new_cache` and forward.
    """
    settings = settings or SamplingSettings()
    block_size = model.config.block_size
    device = model.wte.weight.device
    window = prompt.to(device=device, dtype=torch.long)[:, -block_size:]
    cache = model.new_cache(window.size(0)) if use_cache else None
    logits = last_logits(model, window, cache)
    for step in range(max_new_tokens):
        token = sample_next_token(logits, window, settings, generator)
        yield token
        if step + 1 == max_new_tokens:
            return
        window = torch.cat([window, token[:, None]], dim=1)
        if window.size(1) > block_size:
            window = window[:, -slide_keep(block_size) :]
            cache = model.new_cache(window.size(0)) if use_cache else None
            logits = last_logits(model, window, cache)
        else:
            logits = last_logits(model, token[:, None] if use_cache else window, cache)


def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    settings: SamplingSettings | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Token ids continuing one prompt, yielded one at a time (see `generate_batch`)."""
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long)
    for token in generate_batch(model, prompt, max_new_tokens, settings, generator, use_cache):
        yield int(token[0])


# ----------------------------------------------------------------------------------------------- tokens to text


class StreamingDecoder:
    """Turns generated token ids into text as they come, holding back what is not final yet.

    Only the tokens since the text last ended on a whole character are decoded again at each step, so a
    character split over several byte-level BPE tokens is released once complete (never as a broken U+FFFD)
    and long outputs cost linear time. This relies on decoding being concatenation at character boundaries,
    true of our char, word and byte-level BPE tokenizers. Text that could be the start of a stop string is held
    back until it is known not to be one; a stop string ends the stream and is never released.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.pending_ids: list[int] = []
        self.complete_text = ""  # decoded text up to the last whole character
        self.text = ""
        self.released = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that is now safe to print (possibly empty)."""
        self.pending_ids.append(token_id)
        self.text = self.complete_text + self.tokenizer.decode(self.pending_ids)
        unfinished = len(self.text) - len(self.text.rstrip("\ufffd"))
        if not unfinished:
            self.complete_text, self.pending_ids = self.text, []
        stop_at = self._stop_position()
        if stop_at is not None:
            self.stopped = True
            return self._release(stop_at)
        end = len(self.text) - unfinished
        return self._release(end - self._partial_stop_length(end))

    def flush(self) -> str:
        """The held-back rest, at the end of generation (empty once a stop string was found)."""
        return "" if self.stopped else self._release(len(self.text))

    @property
    def output(self) -> str:
        """All text released so far."""
        return self.text[: self.released]

    def _release(self, end: int) -> str:
        end = max(end, self.released)
        delta = self.text[self.released : end]
        self.released = end
        return delta

    def _stop_position(self) -> int | None:
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, self.released - longest)
        found = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _partial_stop_length(self, end: int) -> int:
        """Length of the longest tail of text[:end] that begins some stop string."""
        tail = self.text[self.released : end]
        best = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(tail)), best, -1):
                if tail.endswith(stop[:size]):
                    best = size
                    break
        return best


def stream_text(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    settings: SamplingSettings | None = None,
    generator: torch.Generator | None = None,
    stop: Sequence[str] = (),
    use_cache: bool = True,
) -> Iterator[str]:
    """Pieces of the continuation of `prompt_ids`, ready to print, ending before any stop string."""
    decoder = StreamingDecoder(tokenizer, stop)
    for token_id in generate(model, prompt_ids, max_new_tokens, settings, generator, use_cache):
        piece = decoder.push(token_id)
        if piece:
            yield piece
        if decoder.stopped:
            return
    rest = decoder.flush()
    if rest:
        yield rest


# ----------------------------------------------------------------------------------------------- the command

MODES = {"char": ("char",), "token": ("bpe", "word"), "bpe": ("bpe",), "word": ("word",)}


def _json_value(tokenizer) -> object:
    value = tokenizer.to_json()
    return json.loads(value) if isinstance(value, str) else value


def check_tokenizer_options(
    tokenizer, mode: str | None = None, vocab_path: str | None = None, tokenizer_path: str | None = None
) -> None:
    """The original's --mode, --vocab_path and --tokenizer_path are optional; given, they must agree with the
    tokenizer stored in the checkpoint."""
    if mode is not None:
        if mode not in MODES:
            raise PicoGPTError(f"unknown --mode {mode!r}; use char or token (or leave it out)")
        if tokenizer.kind not in MODES[mode]:
            actual = "char" if tokenizer.kind == "char" else f"token ({tokenizer.kind})"
            raise PicoGPTError(
                f"--mode {mode} does not match the checkpoint, which was trained in {actual} mode; "
                "leave --mode out, the checkpoint says which"
            )
    for flag, path in (("--vocab_path", vocab_path), ("--tokenizer_path", tokenizer_path)):
        if path is not None:
            _check_same_tokenizer(tokenizer, flag, path)


def _check_same_tokenizer(tokenizer, flag: str, path: str) -> None:
    if not Path(path).exists():
        raise PicoGPTError(f"{flag} {path} does not exist; leave it out, the checkpoint carries its tokenizer")
    given = load_tokenizer(path)
    if given.kind != tokenizer.kind:
        raise PicoGPTError(
            f"{flag} {path} is a {given.kind} tokenizer but the checkpoint was trained with a {tokenizer.kind} "
            "tokenizer; leave it out, the checkpoint carries its own"
        )
    if given.vocab_size != tokenizer.vocab_size or _json_value(given) != _json_value(tokenizer):
        raise PicoGPTError(
            f"{flag} {path} differs from the tokenizer stored in the checkpoint (vocab size {given.vocab_size} vs "
            f"{tokenizer.vocab_size} or different entries); leave it out, the checkpoint carries its own"
        )


def crop_note(prompt_length: int, block_size: int) -> str:
    return (
        f"note: the prompt is {prompt_length} tokens, longer than the model's context of {block_size}; "
        f"only its last {block_size} tokens are used"
    )


@with_evaluated_annotations
def sample_command(
    ckpt: str,
    prompt: str = "\\n",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = 1337,
    num_samples: int = 1,
    stop: list[str] | str | None = None,
    device: str = "auto",
    stream: bool | None = None,
    mode: str | None = None,
    vocab_path: str | None = None,
    tokenizer_path: str | None = None,
) -> None:
    """Generate text from a checkpoint: prints the prompt and its continuation.

    The tokenizer and the mode (char or token) come from the checkpoint itself.

    Args:
        ckpt: Checkpoint written by `picogpt fit` (e.g. checkpoints/small/best.ckpt).
        prompt: Text to continue; \\n and \\t are read as a newline and a tab. Characters a char model never
            saw are mapped to a close one or dropped, with a warning. A prompt longer than the context keeps
            its end.
        max_new_tokens: Number of tokens to generate per sample (the window slides past the context).
        temperature: Randomness; 0 always takes the most likely token (greedy).
        top_k: Sample only among the k likeliest tokens; null for all.
        top_p: Nucleus sampling: only the likeliest tokens whose probabilities add up to p; null for off.
        repetition_penalty: Above 1 makes tokens already in the context less likely; 1 is off.
        seed: Random seed; the same seed gives the same text on the same device. null for a random one.
        num_samples: Number of samples to generate, one after the other.
        stop: A stop string, or a list of them (--stop "\\nQ:" or --stop '[".", "\\n\\n"]'); a sample ends
            before the first one it produces, which is not printed.
        device: cpu, cuda, cuda:N, mps, or auto (cuda, then mps, then cpu).
        stream: Print tokens as they are generated; default: on when writing to a terminal.
        mode: Accepted for compatibility: char or token, checked against the checkpoint.
        vocab_path: Accepted for compatibility: a char vocab.json, which must match the checkpoint's.
        tokenizer_path: Accepted for compatibility: a tokenizer.json, which must match the checkpoint's.
    """
    from .checkpoint import load_checkpoint  # imports torch and the model: not needed for --help

    if max_new_tokens < 0:
        raise PicoGPTError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise PicoGPTError(f"num_samples must be >= 1, got {num_samples}")
    settings = SamplingSettings(temperature, top_k, top_p, repetition_penalty)
    target = resolve_device(device)
    loaded = load_checkpoint(ckpt, target)
    check_tokenizer_options(loaded.tokenizer, mode, vocab_path, tokenizer_path)
    tokenizer, model = loaded.tokenizer, loaded.model
    prompt_text, prompt_ids = encode_prompt(read_escapes(prompt), tokenizer)
    if len(prompt_ids) > model.config.block_size:
        print(crop_note(len(prompt_ids), model.config.block_size), file=sys.stderr)
    stop_strings = read_stop_strings(stop)
    streaming = sys.stdout.isatty() if stream is None else stream
    generator = make_generator(seed, target)
    for index in range(num_samples):
        if index:
            print("-" * 40)
        pieces = stream_text(model, tokenizer, prompt_ids, max_new_tokens, settings, generator, stop_strings)
        if streaming:
            sys.stdout.write(prompt_text)
            sys.stdout.flush()
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            print(prompt_text + "".join(pieces))
        sys.stdout.flush()
