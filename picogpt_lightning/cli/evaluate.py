"""`picogpt evaluate`: loss, perplexity and bits per byte of a checkpoint on any text."""

from __future__ import annotations

import json as json_module
import sys

from ..errors import PicoGPTError
from .common import run_function


def evaluate_command(
    ckpt: str,
    text_path: str,
    stride: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    json: bool = False,
    quiet: bool = False,
) -> None:
    """Loss, perplexity and bits per byte of a checkpoint on any text, so char and BPE models compare fairly.

    The text is streamed (any size) in windows of the model's block_size; bits per byte = total loss in bits
    / UTF-8 bytes of the text scored, which does not depend on the tokenizer.

    Args:
        ckpt: Checkpoint written by `picogpt fit` (e.g. checkpoints/small/best.ckpt), or a run folder (its
            best.ckpt) or a `picogpt export --format safetensors` folder.
        text_path: A UTF-8 text file, or a folder whose .txt files are joined with a blank line (as prepare does).
        stride: Tokens between window starts, from 1 to block_size (default block_size: windows do not
            overlap, as in training). Smaller gives each token more context: lower loss, more time.
        batch_size: Windows evaluated at once (default: up to 64, fewer for large block_size x vocab_size,
            so that a batch's logits take about 64 MB).
        device: cpu, cuda, cuda:N, mps, or auto (cuda, then mps, then cpu).
        json: Print one JSON object on stdout instead of the table.
        quiet: No progress: no bar on a terminal, no periodic lines (every 10 s) elsewhere.
    """
    from ..checkpoint import load_checkpoint
    from ..corpus import chunks, find_text_files
    from ..errors import warn
    from ..evaluate import evaluate_pieces
    from ..generate import resolve_device
    from ..progress import Progress
    from ..prompt import describe_replacements

    files = find_text_files(text_path)
    loaded = load_checkpoint(ckpt, resolve_device(device))
    total = sum(path.stat().st_size for path in files)
    with Progress(f"evaluating {text_path}", total, quiet=quiet, stream=sys.stderr) as progress:
        result, replacements, counts = evaluate_pieces(
            loaded.model, loaded.tokenizer, chunks(files, warn_on_bad_bytes=not json), stride, batch_size,
            progress.update,
        )
    seconds = progress.seconds
    if result.tokens == 0:
        raise PicoGPTError(f"{text_path} has fewer than 2 tokens for this model: nothing to score")
    if replacements:
        warn(f"{sum(counts.values()):,} {describe_replacements(replacements)}")
    report = {"checkpoint": ckpt, "text_path": text_path, "files": len(files), "tokenizer": loaded.tokenizer.kind,
              **result.to_dict(), "unknown_chars": sum(counts.values()), "seconds": round(seconds, 3),
              "tokens_per_s": round(result.tokens / max(seconds, 1e-9), 1)}
    if json:
        print(json_module.dumps(report))
        return
    print(f"text:           {text_path} ({len(files)} file(s), {result.bytes:,} bytes scored)")
    print(f"tokens scored:  {result.tokens:,} ({loaded.tokenizer.kind} tokenizer, window {result.block_size}, "
          f"stride {result.stride})")
    print(f"loss:           {result.loss:.4f} nats/token")
    print(f"perplexity:     {result.perplexity:.2f}")
    print(f"bits per byte:  {result.bits_per_byte:.4f}")
    print(f"speed:          {report['tokens_per_s']:,.0f} tokens/s ({seconds:.1f} s on {loaded.model.wte.weight.device})")


def main(args: list[str]) -> None:
    run_function("evaluate", evaluate_command, args)
