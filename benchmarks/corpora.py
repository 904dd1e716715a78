"""Assembles the three corpora the budget benchmark (benchmarks/budget.py) trains on, none of which the tests use:

    python -m benchmarks.corpora --out _runs/corpora

- small.txt  (~250 KB): the opening of the King James Bible (Genesis on), verse numbers dropped, as Debian's
  bible-kjv-text package ships it (public domain);
- medium.txt (~1.1 MB): Tiny Shakespeare, copied from ../shared/data/tinyshakespeare.txt (public domain);
- large.txt  (>= 10 MB): varied text from Debian and Python packages: the whole King James Bible (public
  domain, 4.3 MB), the Jargon File 4.4.7 (public domain, 1.4 MB, dict-jargon), the fortune cookie files
  (fortunes, fortunes-min: quotations, jokes and poems from many authors under the package's free licence), and
  the docstrings of Python's standard library (PSF licence, English prose about programs) until 10 MB is reached.

Needs `apt-get install bible-kjv-text fortunes dict-jargon` (the `bible` program comes with bible-kjv-text).
No network beyond that: every text is read from the installed packages.
"""

from __future__ import annotations

import ast
import gzip
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"  # the checkout's shared/ sits beside it
SMALL_CHARS = 250_000
LARGE_CHARS = 10_500_000


def bible() -> str:
    """The whole KJV as prose: chapter headings kept, verse numbers dropped, verses on their own lines."""
    if shutil.which("bible") is None:
        raise SystemExit("no `bible` program: apt-get install bible-kjv-text")
    text = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    return re.sub(r"(?m)^ +\d+ ", "", text)


def jargon() -> str:
    path = Path("/usr/share/dictd/jargon.dict.dz")  # dictzip is gzip-compatible
    if not path.is_file():
        raise SystemExit(f"no {path}: apt-get install dict-jargon")
    return gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")


def fortunes() -> str:
    folder = Path("/usr/share/games/fortunes")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.suffix and not p.is_symlink())
    if not files:
        raise SystemExit(f"no fortune files in {folder}: apt-get install fortunes")
    parts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return "\n".join(part.replace("\n%\n", "\n\n") for part in parts)


def docstrings(limit: int) -> str:
    """Docstrings of the standard library's modules, classes and functions, up to `limit` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if {"test", "idle_test", "site-packages"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    pieces.append(doc)
                    size += len(doc) + 2
                    if size >= limit:
                        return "\n\n".join(pieces)
    return "\n\n".join(pieces)


def main(out: str = "_runs/corpora", shakespeare: str = str(SHAKESPEARE)) -> None:
    """Write small.txt, medium.txt and large.txt into `out` and print their sizes.

    Args:
        out: folder for the three texts.
        shakespeare: a copy of Tiny Shakespeare (medium.txt).
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    kjv = bible()
    small = kjv[:SMALL_CHARS]
    small = small[:small.rfind("\n") + 1]
    (folder / "small.txt").write_text(small, encoding="utf-8")
    shutil.copyfile(shakespeare, folder / "medium.txt")
    large = "\n\n".join([kjv, jargon(), fortunes()])
    large += "\n\n" + docstrings(max(0, LARGE_CHARS - len(large)))
    (folder / "large.txt").write_text(large, encoding="utf-8")
    for name in ("small.txt", "medium.txt", "large.txt"):
        print(f"{folder / name}: {(folder / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    from benchmarks.common import run_cli

    run_cli(main)
