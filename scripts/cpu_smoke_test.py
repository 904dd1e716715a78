"""Smoke test without training: a random-weight GPT over a text's characters generates on the CPU.

    python scripts/cpu_smoke_test.py --text_path data/philosophy.txt --prompt "What is virtue?\\n"
    python -m scripts.cpu_smoke_test --text_path data/philosophy.txt

It checks that the model, the char tokenizer and the sampler fit together on this machine; the output is
noise, since nothing was learned. Prompt characters the text does not contain are mapped to close ones or
dropped, with one warning line.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/cpu_smoke_test.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import ensure_dependencies  # noqa: E402

ensure_dependencies("cpu_smoke_test")

import torch  # noqa: E402

from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.generate import make_generator, stream_text
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.prompt import encode_prompt, read_escapes
from picogpt_lightning.settings import SamplingSettings
from picogpt_lightning.tokenizer import CharTokenizer


def read_text(text_path: str) -> str:
    path = Path(text_path)
    if not path.is_file():
        raise PicoGPTError(f"text file {path} does not exist; pass --text_path with a UTF-8 text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text:
        raise PicoGPTError(f"text file {path} is empty; pass --text_path with some text in it")
    return text


def main(
    text_path: str,
    prompt: str = "\\n",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 1337,
    block_size: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
) -> str:
    """Build a random-weight char-level GPT from a text's characters and print a sample from it on the CPU.

    Args:
        text_path: UTF-8 text whose characters make the vocabulary.
        prompt: Text to continue; \\n and \\t are read as escapes; unknown characters are mapped or dropped.
        max_new_tokens: Characters to generate.
        temperature: Randomness; 0 is greedy.
        top_k: Sample only among the k likeliest characters; null for all.
        seed: Seed for the weights and for sampling.
        block_size: Context length of the model.
        n_layer: Transformer blocks.
        n_head: Attention heads.
        n_embd: Embedding width.
    """
    tokenizer = CharTokenizer.train([read_text(text_path)])
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd
    )
    model = GPT(config).eval()
    prompt_text, prompt_ids = encode_prompt(read_escapes(prompt), tokenizer)
    settings = SamplingSettings(temperature=temperature, top_k=top_k)
    generator = make_generator(seed, torch.device("cpu"))
    start = time.perf_counter()
    continuation = "".join(stream_text(model, tokenizer, prompt_ids, max_new_tokens, settings, generator))
    seconds = time.perf_counter() - start
    print(prompt_text + continuation)
    print(
        f"ok: {model.num_params() / 1e6:.2f}M-parameter model, vocabulary of {tokenizer.vocab_size} characters, "
        f"{max_new_tokens} tokens in {seconds:.2f} s on cpu",
        file=sys.stderr,
    )
    return continuation


def run(argv: list[str] | None = None) -> int:
    from jsonargparse import auto_cli

    try:
        auto_cli(main, args=argv, as_positional=False)
    except PicoGPTError as error:
        print(f"cpu_smoke_test: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
