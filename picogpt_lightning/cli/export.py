"""`picogpt export`: a checkpoint as a Hugging Face folder or as plain safetensors weights."""

from __future__ import annotations

from typing import Literal

from .common import run_function


def export_command(ckpt: str, out_dir: str, format: Literal["hf", "safetensors"] = "hf",
                   overwrite: bool = False) -> None:
    """Export a checkpoint for use outside picogpt: a Hugging Face folder, or plain safetensors weights.

    With --format hf (the default), `transformers` loads the folder as it loads any model:
    AutoModelForCausalLM.from_pretrained(OUT_DIR) and AutoTokenizer.from_pretrained(OUT_DIR) give the same
    logits and token ids as picogpt (char, word and bpe tokenizers alike). The layout follows the architecture:
    GPT-2 for the classic model, Llama for rotary + rms + swiglu, Qwen3 with qk_norm as well; an architecture
    transformers has no equivalent for (relu2, say) is refused.

    Args:
        ckpt: Checkpoint written by `picogpt fit` (e.g. checkpoints/small/best.ckpt), or a run folder (its
            best.ckpt) or a `picogpt export --format safetensors` folder.
        out_dir: Folder to write into (created if missing). It is replaced whole once the export is complete:
            a failed export leaves the previous one (or nothing), never a mix.
        format: hf: config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json
            and special_tokens_map.json for `transformers`.
            safetensors: model.safetensors under our own parameter names plus picogpt.json (model config and
            tokenizer), which picogpt_lightning.load() reads.
        overwrite: Replace --out_dir even when it holds files that are not an earlier export (they are deleted).
    """
    from ..export import export

    written = export(ckpt, out_dir, format, overwrite)
    size = sum(path.stat().st_size for path in written)
    print(f"exported {ckpt} ({format}) to {out_dir}: {', '.join(path.name for path in written)} "
          f"({size / 1e6:.1f} MB)")
    if format == "hf":
        print(f'load it with: AutoModelForCausalLM.from_pretrained("{out_dir}"), '
              f'AutoTokenizer.from_pretrained("{out_dir}")')


def main(args: list[str]) -> None:
    run_function("export", export_command, args)
