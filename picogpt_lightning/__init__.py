"""picogpt_lightning: train a small GPT on your own text with PyTorch Lightning, then sample and chat with it."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `load` lives in api.py, which imports torch: imported on first use, so `import picogpt_lightning` and
    # every `picogpt --help` stay fast.
    if name == "load":
        from .api import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
