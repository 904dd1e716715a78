"""picogpt_lightning: train a small GPT on your own text with PyTorch Lightning, then sample and chat with it."""

__version__ = "0.1.0"
