"""Running `picogpt serve` in tests: free ports, the server process, and tiny chat models with known answers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from picogpt_lightning.chat_template import get_template
from picogpt_lightning.checkpoint import save_checkpoint
from picogpt_lightning.conversation import encode_conversation
from picogpt_lightning.model import GPT, GPTConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def random_chat_model(tokenizer, path: Path, template: str) -> Path:
    """Large random weights keep logits far apart, so greedy choices cannot flip between processes or batches."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    save_checkpoint(path, model, tokenizer, chat_template=get_template(template).to_dict())
    return path


def start_server(ckpt: Path, log: Path, *options: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PICOGPT_API_KEY", None)
    command = [sys.executable, "-m", "picogpt_lightning.cli", "serve", "--ckpt", str(ckpt), "--port", str(port),
               "--device", "cpu", "--threads", "1", "--log_level", "warning", *options]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                   start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while not ready(base):
        assert process.poll() is None, f"the server exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()}"
        time.sleep(0.2)
    return process, base


def stop_server(process: subprocess.Popen) -> float:
    """SIGTERM, like `kill`; the seconds it took to exit."""
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever of its session is left
        except ProcessLookupError:
            pass
    return time.monotonic() - start


def ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def scripted_chat_model(path: Path, tokenizer, messages: list[dict], reply: str, template: str = "qa") -> Path:
    """A model that answers `messages` with exactly `reply` (then end-of-text), greedy, by position alone.

    Its blocks are identities (zero output projections), tokens embed to zero and position p to the p-th unit
    vector, so the output layer sees only the position; its row for the token due after position p holds a 1
    there. The prompt is this template's rendering of `messages`, so a page or client sending them gets `reply`.
    """
    chat_template = get_template(template)
    prompt = encode_conversation(messages, chat_template, tokenizer, add_generation_prompt=True).ids
    answer = tokenizer.encode(chat_template.answer_lead + reply) + [tokenizer.eot_id]
    size = len(prompt) + len(answer) + 8
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=size, n_layer=1, n_head=1, n_embd=size,
                          tie_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.ones_like(param) if name.endswith("ln_f.weight") else torch.zeros_like(param))
        model.wpe.weight.copy_(torch.eye(size))
        for offset, token in enumerate(answer):
            model.lm_head.weight[token, len(prompt) - 1 + offset] = 1.0
    save_checkpoint(path, model, tokenizer, chat_template=chat_template.to_dict())
    return path
