"""`picogpt prepare`: text into a tokenizer and train.bin/val.bin, ready for `picogpt fit`."""

from __future__ import annotations

from pathlib import Path

from ..settings import PrepareSettings
from .common import run_function


def prepare_command(text_path: str, out_dir: str | None = None, **settings) -> None:
    """Turn text into a tokenizer and train.bin/val.bin of token ids, ready for `picogpt fit`.

    Args:
        text_path: A text, JSON lines or Parquet file (plain or .gz), or a folder of them searched at any depth;
            each file (text) or record (JSON lines, Parquet) is one document, joined with a blank line between.
        out_dir: Where to write. By default the cache folder that `picogpt fit` looks for, so fit reuses it.
    """
    from ..prepare import cached_prepare, load_prepared, prepare

    if out_dir is None:
        folder = cached_prepare(text_path, **settings)
        meta, _ = load_prepared(folder)
    else:
        folder, meta = Path(out_dir), prepare(text_path, out_dir, **settings)
    source = meta["source"]
    markers = f"; {source['end_of_text_markers']:,} end-of-text markers" if source.get("end_of_text_markers") else ""
    print(f"text:      {text_path} ({len(source['files'])} file(s), {source['chars']:,} characters{markers})")
    print(f"tokenizer: {meta['backend']}, {meta['vocab_size']:,} tokens ({meta['tokenizer_file']})")
    print(f"tokens:    {meta['train_tokens']:,} train, {meta['val_tokens']:,} val, stored as {meta['dtype']}")
    print(f"saved to:  {folder}")


def main(args: list[str]) -> None:
    run_function("prepare", prepare_command, args, settings=(PrepareSettings,))
