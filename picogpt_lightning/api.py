"""The Python API: load a checkpoint once, then generate (or evaluate) as often as you like.

    from picogpt_lightning import load

    model = load("checkpoints/tiny/best.ckpt")
    print(model.generate("Q: What is truth?\\nA:", max_new_tokens=50, seed=0))
    for piece in model.generate("Q: What is virtue?\\nA:", stream=True):
        print(piece, end="", flush=True)
    print(model.chat([{"role": "user", "content": "What is truth?"}], temperature=0))

Loading is checkpoint.py's and sampling generate.py's, the same code `picogpt sample` and `picogpt chat` run,
so the same settings and seed give the same text here as on the command line (on the same device).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .batching import GenerationRequest, generate_many
from .checkpoint import LoadedCheckpoint, load_checkpoint
from .chat_template import ChatTemplate, get_template, template_from_meta, turn_stop_strings, validate_messages
from .conversation import encode_conversation
from .evaluate import EvaluationResult, evaluate_text
from .generate import make_generator, resolve_device, stream_text
from .prompt import describe_replacements, encode_prompt, fit_to_vocabulary
from .settings import SamplingSettings


class PicoGPT:
    """A trained model and its tokenizer, ready to generate text. Build it with `load(path)`."""

    def __init__(self, loaded: LoadedCheckpoint):
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer

    @property
    def meta(self) -> dict:
        return self.loaded.meta

    @property
    def global_step(self) -> int:
        return self.loaded.global_step

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
        prompt: str | Sequence[str] = "\n",
        max_new_tokens: int = 200,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        **sampling,
    ) -> str | Iterator[str] | list[str]:
        """The continuation of `prompt` (without the prompt), or with `stream=True` an iterator of its pieces.

        Args:
            prompt: Text to continue. Characters a char model never saw are mapped to close ones or dropped,
                with a warning; a prompt longer than the context keeps its end. A list of prompts is generated
                together in batches (batching.py) and gives a list of texts, each the one its prompt gets alone
                with the same seed.
            max_new_tokens: Tokens to generate; the context window slides past block_size.
            seed: The same seed gives the same text on the same device; None draws a fresh one each call.
            stop: A string or strings; the text ends before the first one generated (which is left out).
            stream: Return an iterator that yields text as it is generated instead of the whole text.
            **sampling: `SamplingSettings` fields: temperature (0 is greedy), top_k, top_p, repetition_penalty.
        """
        settings = SamplingSettings(**sampling)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if not isinstance(prompt, str):
            if stream:
                raise ValueError("stream=True takes one prompt; pass a string")
            return self._generate_together([self._prompt_ids(text) for text in prompt], max_new_tokens, settings,
                                           seed, stops)
        prompt_ids = self._prompt_ids(prompt)
        pieces = stream_text(self.model, self.tokenizer, prompt_ids, max_new_tokens, settings,
                             make_generator(seed, self.device), stops)
        return pieces if stream else "".join(pieces)

    def _prompt_ids(self, prompt: str) -> list[int]:
        fitted, replacements = fit_to_vocabulary(prompt, self.tokenizer)
        if replacements:
            warnings.warn(describe_replacements(replacements), stacklevel=3)
        return encode_prompt(fitted, self.tokenizer, warn=False)[1]

    def _generate_together(self, prompts: list[list[int]], max_new_tokens: int, settings: SamplingSettings,
                           seed: int | None, stops: list[str], max_batch_size: int = 16) -> list[str]:
        outputs: list[list] = [[] for _ in prompts]
        requests = [GenerationRequest(ids, max_new_tokens, settings, make_generator(seed, self.device), stops,
                                      outputs[index].append) for index, ids in enumerate(prompts)]
        generate_many(self.model, self.tokenizer, requests, max_batch_size)
        return ["".join(item for item in output if isinstance(item, str)) for output in outputs]

    @property
    def chat_template(self) -> ChatTemplate:
        """The template the model was fine-tuned with; `qa`, the corpus' own form, for one that has none."""
        return template_from_meta(self.meta)

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        max_new_tokens: int = 256,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        chat_template: str | dict | None = None,
        **sampling,
    ) -> str | Iterator[str]:
        """The model's answer to a conversation, or with `stream=True` an iterator of its pieces.

        The same answer `picogpt chat` and `picogpt serve` give: the conversation rendered with the chat
        template, the answer ending at end-of-text, at the start of a next user turn or at a stop string, and
        returned without the template's own text (the space after "A:"). A conversation longer than the context
        keeps its end.

        Args:
            messages: [{"role": "system" | "user" | "assistant", "content": "..."}, ...], ending with the user's.
            max_new_tokens: Longest answer, in tokens.
            seed: The same seed gives the same answer on the same device; None draws a fresh one each call.
            stop: A string or strings that end the answer (left out).
            stream: Return an iterator that yields the answer as it is generated.
            chat_template: A template name (qa, im) or dict instead of the checkpoint's own.
            **sampling: `SamplingSettings` fields: temperature (0 is greedy), top_k, top_p, repetition_penalty.
        """
        settings = SamplingSettings(**sampling)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        template = get_template(chat_template) if chat_template is not None else self.chat_template
        messages = validate_messages(list(messages), for_generation=True)
        prompt = encode_conversation(messages, template, self.tokenizer, add_generation_prompt=True)
        if prompt.unseen.counts:
            warnings.warn(prompt.unseen.describe(), stacklevel=2)
        stops = turn_stop_strings(template, self.tokenizer.eot_id is not None)
        stops += [stop] if isinstance(stop, str) else list(stop or ())
        pieces = template.answer_pieces(stream_text(self.model, self.tokenizer, prompt.ids, max_new_tokens, settings,
                                                    make_generator(seed, self.device), stops))
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
    return PicoGPT(load_checkpoint(path, resolve_device(device)))
