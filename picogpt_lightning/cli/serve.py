"""`picogpt serve`: an OpenAI-compatible chat server over a checkpoint (serve.py, on LitServe)."""

from __future__ import annotations

from ..settings import ServeSettings
from .common import run_function


def serve_command(ckpt: str, device: str = "auto", **serving) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models) until Ctrl-C.

    The prompt format is the checkpoint's chat template (qa for one that has none); requests may set
    temperature, top_p, max_tokens, stop, seed and stream. Needs LitServe: pip install 'picogpt_lightning[serve]'.

    Args:
        ckpt: Checkpoint written by `picogpt fit` (e.g. checkpoints/tiny-chat/best.ckpt).
        device: cpu, cuda, cuda:N, mps, or auto (cuda, then mps, then cpu).
    """
    settings = ServeSettings(**serving)
    from ..serve import serve  # LitServe and torch: only once the options are known to be good

    serve(ckpt, device, settings)


def main(args: list[str]) -> None:
    run_function("serve", serve_command, args, settings=(ServeSettings,))
