"""Smoke test of training: a tiny char-level GPT learns a text for a few steps with a plain PyTorch loop.

    python scripts/train_smoke_test.py --text_path data/philosophy.txt --max_steps 200
    python -m scripts.train_smoke_test --text_path data/philosophy.txt --max_steps 400 --resume
    python -m scripts.train_smoke_test --text_path other.txt --init_from checkpoints/smoke/last.ckpt

No Lightning: this checks the model, the tokenizer and the checkpoint format on this machine in seconds
(cuda or mps when present, else cpu). `picogpt sample --ckpt checkpoints/smoke/last.ckpt` reads the result.

`--resume` continues from OUT_DIR/last.ckpt: its weights and step count are restored, the optimizer starts
afresh (the file is a weights-only checkpoint), so the loss may jump a little at the first resumed steps.
`--init_from` starts a new run (step 0) from another checkpoint's weights and tokenizer.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/train_smoke_test.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import ensure_dependencies  # noqa: E402

ensure_dependencies("train_smoke_test")

import torch  # noqa: E402

from picogpt_lightning.checkpoint import load_checkpoint, save_checkpoint
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.generate import resolve_device
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.prompt import encode_prompt
from picogpt_lightning.tokenizer import CharTokenizer
from scripts.cpu_smoke_test import read_text


def random_batch(
    data: torch.Tensor, block_size: int, batch_size: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of `batch_size` random blocks; a pure function of `seed`, so a resumed run
    draws the batches the uninterrupted run would have drawn."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    inputs = torch.stack([data[s : s + block_size] for s in starts.tolist()])
    targets = torch.stack([data[s + 1 : s + 1 + block_size] for s in starts.tolist()])
    return inputs.to(device), targets.to(device)


@torch.no_grad()
def validation_loss(model: GPT, data: torch.Tensor, block_size: int, batch_size: int, device: torch.device) -> float:
    model.eval()
    losses = [model(*random_batch(data, block_size, batch_size, seed, device))[1].item() for seed in range(4)]
    model.train()
    return sum(losses) / len(losses)


def main(
    text_path: str,
    out_dir: str = "checkpoints/smoke",
    max_steps: int = 100,
    batch_size: int = 16,
    block_size: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    learning_rate: float = 3e-3,
    eval_interval: int = 25,
    seed: int = 1337,
    device: str = "auto",
    resume: bool = False,
    init_from: str | None = None,
) -> list[tuple[int, float]]:
    """Train a tiny char-level GPT on a text for a few steps and save OUT_DIR/last.ckpt.

    Args:
        text_path: UTF-8 text to learn.
        out_dir: Folder for last.ckpt.
        max_steps: Total optimizer steps (a resumed run continues up to this number).
        batch_size: Blocks per step.
        block_size: Context length (ignored with --resume or --init_from: the checkpoint's model is used).
        n_layer: Transformer blocks (new models only).
        n_head: Attention heads (new models only).
        n_embd: Embedding width (new models only).
        learning_rate: AdamW learning rate.
        eval_interval: Steps between validation losses.
        seed: Seed for the weights and the batches.
        device: cpu, cuda, mps, or auto (cuda, then mps, then cpu).
        resume: Continue from OUT_DIR/last.ckpt (weights and step; the optimizer starts afresh).
        init_from: Start from this checkpoint's weights and tokenizer, at step 0.
    """
    if resume and init_from:
        raise PicoGPTError("--resume and --init_from exclude each other; resume a run or start one from weights")
    target = resolve_device(device)
    last_path = Path(out_dir) / "last.ckpt"
    text = read_text(text_path)
    start_step = 0
    if resume or init_from:
        source = last_path if resume else Path(init_from)
        if resume and not source.is_file():
            raise PicoGPTError(f"nothing to resume: {source} does not exist; run once without --resume")
        loaded = load_checkpoint(source, target)
        model, tokenizer = loaded.model.train(), loaded.tokenizer
        start_step = loaded.global_step if resume else 0
        print(f"{'resuming' if resume else 'initialised'} from {source} (step {loaded.global_step})")
    else:
        tokenizer = CharTokenizer.train([text])
        torch.manual_seed(seed)
        config = GPTConfig(tokenizer.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        model = GPT(config).to(target).train()
    block_size = model.config.block_size
    data = torch.tensor(encode_prompt(text, tokenizer)[1], dtype=torch.long)
    if len(data) < 10 * (block_size + 1):
        raise PicoGPTError(f"{text_path} is too short for block_size {block_size}; use a longer text")
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    if start_step >= max_steps:
        print(f"already at step {start_step}; raise --max_steps to train further")
        return []
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1)
    history = [(start_step, validation_loss(model, val_data, block_size, batch_size, target))]
    print(f"step {start_step}: val loss {history[-1][1]:.4f} on {target.type}")
    for step in range(start_step + 1, max_steps + 1):
        inputs, targets = random_batch(train_data, block_size, batch_size, seed * 1_000_003 + step, target)
        _, loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % eval_interval == 0 or step == max_steps:
            history.append((step, validation_loss(model, val_data, block_size, batch_size, target)))
            print(f"step {step}: train loss {loss.item():.4f}, val loss {history[-1][1]:.4f}")
    save_checkpoint(
        last_path, model, tokenizer, global_step=max_steps, best_val_loss=min(v for _, v in history),
        data={"text_path": str(text_path)},
    )  # fmt: skip
    print(f"saved {last_path} at step {max_steps}")
    return history


def run(argv: list[str] | None = None) -> int:
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog="train_smoke_test", description=main.__doc__.splitlines()[0])
    parser.add_function_arguments(main, skip={"resume"}, as_group=False)
    # A plain `--resume` (and `--no_resume`), as in the original script, rather than `--resume true`.
    parser.add_argument(
        "--resume", action=ActionYesNo, default=False,
        help="Continue from OUT_DIR/last.ckpt (weights and step; the optimizer starts afresh).",
    )  # fmt: skip
    try:
        main(**parser.parse_args(argv).as_dict())
    except PicoGPTError as error:
        print(f"train_smoke_test: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
