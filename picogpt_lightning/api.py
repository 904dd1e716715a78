"""The Python API: load a checkpoint once, then generate (or evaluate) as often as you like.

    from picogpt_lightning import load

    model = load("checkpoints/tiny/best.ckpt")
    print(model.generate("Q: What is truth?\\nA:", max_new_tokens=50, seed=0))
    for piece in model.generate("Q: What is virtue?\\nA:", stream=True):
        print(piece, end="", flush=True)

Sampling is generate.py's, the same code `picogpt sample` and `picogpt chat` run, so the same settings and
seed give the same text here as on the command line (on the same device).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .errors import PicoGPTError
from .evaluate import EvaluationResult, evaluate_text
from .export import PICOGPT_CONFIG, load_safetensors_export
from .generate import (
    SamplingSettings,
    describe_replacements,
    encode_prompt,
    fit_to_vocabulary,
    make_generator,
    resolve_device,
    stream_text,
)


class PicoGPT:
    """A trained model and its tokenizer, ready to generate text. Build it with `load(path)`."""

    def __init__(self, model, tokenizer, meta: dict | None = None, global_step: int = 0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.meta = meta or {}
        self.global_step = global_step

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def __repr__(self) -> str:
        config = self.model.config
        return (f"PicoGPT({config.n_layer} layers, {config.n_embd} wide, context {config.block_size}, "
                f"{self.tokenizer.kind} tokenizer of {self.tokenizer.vocab_size:,} tokens, step {self.global_step}, "
                f"on {self.device})")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def generate(
        self,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 200,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """The continuation of `prompt` (without the prompt), or with `stream=True` an iterator of its pieces.

        Args:
            prompt: Text to continue. Characters a char model never saw are mapped to close ones or dropped,
                with a warning; a prompt longer than the context keeps its end.
            max_new_tokens: Tokens to generate; the context window slides past block_size.
            temperature: Randomness; 0 always takes the most likely token (greedy).
            top_k: Sample among the k likeliest tokens only; None for all.
            top_p: Nucleus sampling: the likeliest tokens whose probabilities reach top_p; None for off.
            repetition_penalty: Above 1 makes tokens already in the context less likely; 1 is off.
            seed: The same seed gives the same text on the same device; None draws a fresh one each call.
            stop: A string or strings; the text ends before the first one generated (which is left out).
            stream: Return an iterator that yields text as it is generated instead of the whole text.
        """
        settings = SamplingSettings(temperature, top_k, top_p, repetition_penalty)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        fitted, replacements = fit_to_vocabulary(prompt, self.tokenizer)
        if replacements:
            warnings.warn(describe_replacements(replacements), stacklevel=2)
        _, prompt_ids = encode_prompt(fitted, self.tokenizer, warn=False)
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        pieces = stream_text(self.model, self.tokenizer, prompt_ids, max_new_tokens, settings,
                             make_generator(seed, self.device), stops)
        return pieces if stream else "".join(pieces)

    def evaluate(self, text: str, stride: int | None = None, batch_size: int | None = None) -> EvaluationResult:
        """Loss (nats/token), perplexity and bits per byte of `text`; see `picogpt evaluate`."""
        return evaluate_text(self.model, self.tokenizer, text, stride, batch_size)


def load(path: str | Path, device: str = "auto") -> PicoGPT:
    """Load a checkpoint of `picogpt fit` (a .ckpt file) or a `picogpt export --format safetensors` folder.

    Args:
        path: The .ckpt file, or the exported folder holding model.safetensors and picogpt.json.
        device: cpu, cuda, cuda:N, mps, or auto (cuda, then mps, then cpu).
    """
    target = resolve_device(device)
    if Path(path).is_dir():
        if not (Path(path) / PICOGPT_CONFIG).is_file():
            raise PicoGPTError(f"{path} is a folder without {PICOGPT_CONFIG}: pass a .ckpt file, or a folder "
                               f"written by `picogpt export --format safetensors`")
        loaded = load_safetensors_export(path, target)
    else:
        loaded = load_checkpoint(path, target)
    return PicoGPT(loaded.model, loaded.tokenizer, loaded.meta, loaded.global_step)
