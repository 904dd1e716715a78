"""`picogpt import HF_DIR --out PATH.ckpt`: a Hugging Face model folder as an ordinary picogpt checkpoint."""

from __future__ import annotations

from typing import Literal

from .common import run_function


def import_command(
    folder: str,
    out: str,
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "float32",
    block_size: int | None = None,
) -> None:
    """Import a local Hugging Face GPT-2, Llama or Qwen3 folder (weights, tokenizer, chat template).

    The checkpoint works with every command: sample, chat, serve, evaluate, validate, info, export, and
    `fit`/`finetune --model.init_from`. Nothing is written unless the whole model converts.

    Args:
        folder: The model folder: config.json, model.safetensors (or shards with model.safetensors.index.json),
            tokenizer.json, tokenizer_config.json, generation_config.json (picogpt import HF_DIR works too).
        out: The checkpoint file to write, e.g. checkpoints/smollm2.ckpt.
        dtype: float32 (default: bf16/fp16 weights are widened, as training wants), or bfloat16/float16 to keep
            half-precision weights (half the file).
        block_size: Context of the checkpoint, at most the model's (rotary models; default the model's, capped at
            4096 tokens, since each token of context costs KV cache memory).
    """
    from ..hf_import import import_checkpoint

    path = import_checkpoint(folder, out, dtype, block_size)
    print(f"imported {folder} to {path} ({path.stat().st_size / 1e6:.1f} MB); try: picogpt info --ckpt {path}")


def main(args: list[str]) -> None:
    if args and not args[0].startswith("-"):  # the folder as a positional argument
        args = ["--folder", args[0], *args[1:]]
    run_function("import", import_command, args)
