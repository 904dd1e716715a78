"""Tiny texts and configs shared by the end-to-end tests."""

from __future__ import annotations

import random
from pathlib import Path

import yaml

WORDS = (
    "the a truth mind virtue friend time reason art is was seems knows asks why how what when good "
    "wise small world life death law we you they think learn doubt change love fear hope light"
).split()


def make_text(path: Path, sentences: int = 600, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_config(tmp_path: Path, text: Path, name: str = "run", **overrides) -> Path:
    """A runnable YAML config for a 1-layer, 16-wide model; overrides are {"section": {key: value}}."""
    config = {
        "seed_everything": 7,
        "ckpt_dir": str(tmp_path / "checkpoints" / name),
        "trainer": {"accelerator": "cpu", "max_steps": 25, "val_check_interval": 10, "log_every_n_steps": 5,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0, "learning_rate": 3e-3,
                  "warmup_iters": 5},
        "data": {"text_path": str(text), "mode": "char", "vocab_size": 300, "block_size": 16, "batch_size": 4,
                 "eval_iters": 4, "cache_dir": str(tmp_path / "prepared")},
    }
    for section, values in overrides.items():
        config[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def typed_input(monkeypatch, lines: list[str], screen) -> None:
    """`input()` answers with `lines`, one per call, then end of input (EOFError, as Ctrl-D), echoing each prompt
    and line to `screen` as a terminal shows them."""
    import builtins

    typed = iter(lines)

    def fake_input(prompt):
        try:
            line = next(typed)
        except StopIteration:
            raise EOFError from None
        screen.write(prompt + line + "\n")
        return line

    monkeypatch.setattr(builtins, "input", fake_input)
