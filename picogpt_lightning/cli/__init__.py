"""The `picogpt` command line: `main.py` dispatches to one module per command. Library modules never import
this package."""

from .main import main

__all__ = ["main"]
