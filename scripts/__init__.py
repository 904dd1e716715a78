"""Smoke tests users can run from the repository root: `python scripts/NAME.py` or `python -m scripts.NAME`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
REEXEC_MARK = "PICOGPT_SCRIPT_REEXEC"


def ensure_dependencies(script: str) -> None:
    """Run under the project's virtual environment when this Python lacks torch (`python scripts/X.py` with
    the venv not activated): start again with .venv/bin/python (made by `make install`) if it exists, else say
    in one line how to get it."""
    try:
        import torch  # noqa: F401
        import jsonargparse  # noqa: F401
    except ImportError as error:
        if VENV_PYTHON.is_file() and not os.environ.get(REEXEC_MARK):
            os.environ[REEXEC_MARK] = "1"
            os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])  # argv[0]: the script file
        print(f"{script}: error: {sys.executable} cannot import {error.name}: run `make install` (it creates "
              f".venv/), then `.venv/bin/python scripts/{script}.py ...`, or activate the environment that has "
              f"picogpt_lightning installed", file=sys.stderr)
        sys.exit(1)
