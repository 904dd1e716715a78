"""Does fine-tuning make the model answer and stop? Base vs fine-tuned on held-out conversations.

    python -m benchmarks.finetune                                      # checkpoints/tiny and checkpoints/chat
    python -m benchmarks.finetune --train true                         # trains both first, with the configs
    python -m benchmarks.finetune --base a.ckpt --finetuned b.ckpt --max_new_tokens 200

The held-out conversations are the fine-tuning run's own val split (its data settings are read from the
fine-tuned checkpoint), which neither model was fine-tuned on. Two figures per model:

- answer loss: mean cross-entropy (nats per token) over the answers' tokens and their end-of-text, in the
  packed val blocks the fine-tuning run validated on (conversations longer than the context are left out);
- clean stops: the share of greedy replies (to each held-out conversation, up to its last question) that end
  with end-of-text within max_new_tokens tokens. A model that was never fine-tuned tends to go on with the next
  "Q:" (or a new "A:") instead; those shares are printed too, and the share of replies that `picogpt chat`,
  `serve` and PicoGPT.chat() end cleanly, at end-of-text or at any turn marker (chat_template.turn_stop_strings;
  a client of the exported model relies on end-of-text alone). Target after fine-tuning: >= 95% clean stops.

Printed, not tested; the load average is printed too, since other processes slow a shared CPU down.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import machine_line, set_threads
from picogpt_lightning.chat_data import ConversationDataModule
from picogpt_lightning.chat_template import turn_stop_strings
from picogpt_lightning.checkpoint import load_checkpoint, read_checkpoint
from picogpt_lightning.conversation import encode_conversation, read_conversations, split_conversations
from picogpt_lightning.generate import generate
from picogpt_lightning.model import next_token_loss
from picogpt_lightning.settings import SamplingSettings
from picogpt_lightning.tokenizer import ENDOFTEXT

GREEDY = SamplingSettings(temperature=0)


def train_both(base_config: str, finetune_config: str) -> None:
    """Both runs through the real commands, as a user runs them."""
    for command, config in (("fit", base_config), ("finetune", finetune_config)):
        print(f"$ picogpt {command} --config {config}", flush=True)
        subprocess.run([sys.executable, "-m", "picogpt_lightning.cli", command, "--config", config], check=True)


def held_out_settings(finetuned: str) -> dict:
    """The fine-tuning run's data settings (path, split, template), from its checkpoint's stored config."""
    stored = read_checkpoint(finetuned)["picogpt"]
    data = (stored.get("config") or {}).get("data") or {}
    keys = ("path", "val_fraction", "split_seed", "chat_template", "batch_size")
    settings = {key: data[key] for key in keys if data.get(key) is not None}
    settings["chat_template"] = stored.get("chat_template") or settings.get("chat_template")
    return settings


def held_out_data(checkpoint: str, settings: dict) -> ConversationDataModule:
    """The fine-tuning data as `checkpoint`'s tokenizer encodes it, built quietly (its notes are the run's)."""
    data = ConversationDataModule(**{**settings, "tokenizer_from": checkpoint})
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        data.data  # noqa: B018 (builds it)
    return data


def answer_loss(checkpoint: str, settings: dict) -> tuple[float, int]:
    """Mean loss over the answer tokens of the held-out blocks, and how many tokens that is."""
    data = held_out_data(checkpoint, settings)
    model = load_checkpoint(checkpoint).model
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in data.val_dataloader():
            tokens = int((targets >= 0).sum())
            total += float(next_token_loss(model(inputs)[0], targets)) * tokens
            count += tokens
    return total / count, count


def replies(checkpoint: str, settings: dict, max_new_tokens: int, limit: int | None) -> list[dict]:
    """For each held-out conversation, the greedy reply to it up to its last question."""
    loaded = load_checkpoint(checkpoint)
    template, tokenizer = held_out_data(checkpoint, settings).chat_template, loaded.tokenizer
    _, held_out = split_conversations(read_conversations(settings["path"]), settings.get("val_fraction", 0.1),
                                      settings.get("split_seed", 1337))
    stop_marker = template.stop_strings(tokenizer.eot_id is not None)[-1]  # the next user turn, e.g. "\nQ:"
    # Where `picogpt chat`, `serve` and PicoGPT.chat() end an answer: end-of-text or any turn marker.
    turn_markers = [stop for stop in turn_stop_strings(template, tokenizer.eot_id is not None) if stop != ENDOFTEXT]
    results = []
    for conversation in held_out[:limit]:
        messages = conversation.messages[:-1]  # up to the last question; the model writes the last answer
        prompt = encode_conversation(messages, template, tokenizer, add_generation_prompt=True).ids
        ids = []
        for token in generate(loaded.model, prompt, max_new_tokens, GREEDY):
            ids.append(token)
            if token == tokenizer.eot_id:
                break
        text = tokenizer.decode(ids)
        answer = text.split(ENDOFTEXT)[0]
        eot = bool(ids) and ids[-1] == tokenizer.eot_id
        any_turn = any(marker in answer for marker in turn_markers)
        results.append({"tokens": len(ids), "eot": eot, "next_turn": stop_marker in answer, "any_turn": any_turn,
                        "chat_stop": eot or any_turn})
    return results


def main(
    base: str = "checkpoints/tiny/best.ckpt",
    finetuned: str = "checkpoints/chat/best.ckpt",
    train: bool = False,
    base_config: str = "configs/tiny.yaml",
    finetune_config: str = "configs/chat.yaml",
    max_new_tokens: int = 200,
    limit: int | None = None,
    threads: int | None = None,
) -> None:
    """Answer loss and clean stops of a base and a fine-tuned checkpoint on held-out conversations.

    Args:
        base: The base checkpoint (picogpt fit).
        finetuned: The fine-tuned checkpoint (picogpt finetune from the base).
        train: Train both first: picogpt fit --config base_config, then picogpt finetune --config
            finetune_config (which write the two checkpoints above with the shipped configs).
        base_config: The base model's config, for train.
        finetune_config: The fine-tuning config, for train.
        max_new_tokens: Longest reply; one without end-of-text by then is not a clean stop.
        limit: Only the first N held-out conversations (quicker, noisier).
        threads: torch threads (default: torch's choice).
    """
    set_threads(threads)
    if train:
        train_both(base_config, finetune_config)
    for path in (base, finetuned):
        if not Path(path).is_file():
            raise SystemExit(f"{path} does not exist: train them (--train true) or pass --base/--finetuned")
    settings = held_out_settings(finetuned)
    started = time.perf_counter()
    print(machine_line(torch.device("cpu")))
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    figures = {}
    for name, path in (("base", base), ("fine-tuned", finetuned)):
        loss, tokens = answer_loss(path, settings)
        made = replies(path, settings, max_new_tokens, limit)
        figures[name] = (loss, tokens, made)
    count = len(figures["base"][2])
    print(f"held-out conversations: {count} of {settings['path']} (val_fraction {settings.get('val_fraction')}, "
          f"split_seed {settings.get('split_seed')}), chat template {settings['chat_template']['name']}; "
          f"answer loss over {figures['base'][1]:,} answer tokens")
    print(f"{'':44}{'base':>14}{'fine-tuned':>14}")
    rows = [
        ("answer loss (nats/token)", lambda f: f"{f[0]:.3f}"),
        ("answer perplexity", lambda f: f"{2.718281828 ** f[0]:.1f}"),
        (f"clean stops (end-of-text within {max_new_tokens})",
         lambda f: f"{sum(r['eot'] for r in f[2])}/{count} {sum(r['eot'] for r in f[2]) / count:.0%}"),
        ("replies that start a next user turn first", lambda f: f"{sum(r['next_turn'] for r in f[2]) / count:.0%}"),
        ("replies that start any next turn first", lambda f: f"{sum(r['any_turn'] for r in f[2]) / count:.0%}"),
        ("clean stops in chat/serve (eot or a turn)",
         lambda f: f"{sum(r['chat_stop'] for r in f[2])}/{count} {sum(r['chat_stop'] for r in f[2]) / count:.0%}"),
        ("median reply length (tokens)", lambda f: f"{statistics.median(r['tokens'] for r in f[2]):.0f}"),
    ]
    for label, show in rows:
        print(f"{label:<44}{show(figures['base']):>14}{show(figures['fine-tuned']):>14}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
