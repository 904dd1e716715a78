"""Smoke tests users can run from the repository root: `python scripts/NAME.py` or `python -m scripts.NAME`."""
