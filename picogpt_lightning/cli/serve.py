"""`picogpt serve`: an OpenAI-compatible chat server with a chat page, over a checkpoint (serve.py)."""

from __future__ import annotations

import os
from dataclasses import replace

from ..settings import ServeSettings
from .common import run_function

API_KEY_VARIABLE = "PICOGPT_API_KEY"


def serve_command(ckpt: str, device: str = "auto", **serving) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models) and a chat page
    at / until Ctrl-C.

    The prompt format is the checkpoint's chat template (qa for one that has none); requests may set
    temperature, top_p, max_tokens, stop, seed and stream. Concurrent requests are generated in batches.
    Needs FastAPI and uvicorn: pip install 'picogpt_lightning[serve]'.

    Args:
        ckpt: Checkpoint written by `picogpt fit` (e.g. checkpoints/tiny-chat/best.ckpt).
        device: cpu, cuda, cuda:N, mps, or auto (cuda, then mps, then cpu).
    """
    settings = ServeSettings(**serving)
    if settings.api_key is None and os.environ.get(API_KEY_VARIABLE):
        settings = replace(settings, api_key=os.environ[API_KEY_VARIABLE])
    from ..serve import serve  # FastAPI and torch: only once the options are known to be good

    serve(ckpt, device, settings)


def main(args: list[str]) -> None:
    run_function("serve", serve_command, args, settings=(ServeSettings,))
