"""Which fine-tuning recipe suits pretrained weights? A pretrained tiny model, fine-tuned on conversations.

    python -m benchmarks.pretrained_recipe                 # pretrains configs/tiny.yaml for --base_steps first
    python -m benchmarks.pretrained_recipe --steps 100
    python -m benchmarks.pretrained_recipe --base checkpoints/tiny/last.ckpt   # an existing base instead

The base is trained here with configs/tiny.yaml (shortened to --base_steps), exported as a Hugging Face folder
and fine-tuned from that folder (`picogpt finetune --model.init_from HF_DIR`, as a downloaded model would be)
on data/philosophy-chat.jsonl with configs/chat.yaml's data settings, once per recipe: AdamW at several peak
rates and Muon at its default rates. Printed: the held-out answer loss (the run's best val_loss) per recipe,
and the base's own before any step. Printed, not tested; the load average is printed too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from picogpt_lightning.checkpoint import read_checkpoint

RECIPES = {
    "adamw 3e-5": ["--model.optimizer", "adamw", "--model.learning_rate", "3e-5", "--model.min_lr", "3e-6"],
    "adamw 1e-4": ["--model.optimizer", "adamw", "--model.learning_rate", "1e-4", "--model.min_lr", "1e-5"],
    "adamw 3e-4": ["--model.optimizer", "adamw", "--model.learning_rate", "3e-4", "--model.min_lr", "3e-5"],
    "adamw 1e-3": ["--model.optimizer", "adamw", "--model.learning_rate", "1e-3", "--model.min_lr", "1e-4"],
    "muon (0.02, adamw 6e-4)": ["--model.optimizer", "muon", "--model.learning_rate", "6e-4", "--model.min_lr", "6e-5"],
}


def picogpt(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "picogpt_lightning.cli", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--base", default=None, help="a trained checkpoint to use as the base (no pretraining)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="pretrained-recipe-"))
    started = time.perf_counter()
    base = args.base
    if base is None:
        picogpt("fit", "--config", "configs/tiny.yaml", "--ckpt_dir", str(work / "base"), "--trainer.max_steps",
                str(args.base_steps), "--trainer.val_check_interval", str(args.base_steps), "--sample_tokens", "0",
                "--trainer.enable_progress_bar", "false")
        base = work / "base" / "last.ckpt"
    picogpt("export", "--ckpt", str(base), "--out_dir", str(work / "hf"))
    step = read_checkpoint(base)["global_step"]
    print(f"base: {base} (step {step}), exported to {work / 'hf'} ({time.perf_counter() - started:.0f} s)")
    common = ["--config", "configs/chat.yaml", "--model.init_from", str(work / "hf"), "--trainer.max_steps",
              str(args.steps), "--trainer.val_check_interval", str(args.steps // 4), "--model.warmup_iters", "10",
              "--sample_tokens", "0", "--trainer.enable_progress_bar", "false"]
    picogpt("finetune", *common, "--ckpt_dir", str(work / "zero"), "--trainer.max_steps", "1",
            "--model.learning_rate", "1e-12", "--model.min_lr", "1e-12", "--trainer.val_check_interval", "1")
    print(f"{'recipe':<26} held-out answer loss (nats/token), after {args.steps} steps")
    print(f"{'base, no fine-tuning':<26} {read_checkpoint(work / 'zero' / 'best.ckpt')['picogpt']['best_val_loss']:.4f}")
    for name, flags in RECIPES.items():
        run = work / name.split()[0].replace("(", "") / name.split()[1].strip("(,")
        began = time.perf_counter()
        picogpt("finetune", *common, *flags, "--ckpt_dir", str(run))
        loss = read_checkpoint(run / "best.ckpt")["picogpt"]["best_val_loss"]
        print(f"{name:<26} {loss:.4f}   ({time.perf_counter() - began:.0f} s)", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}; {work}")


if __name__ == "__main__":
    main()
