"""The docs cannot go stale: every block they mark runnable runs, and every relative link points somewhere.

The convention (also in docs/architecture.md, "Docs that are run"):
- A fenced block in README.md or docs/*.md whose info string is `bash runnable` is run by `bash -eo pipefail`;
  `python runnable` by the venv's python. Any other block (plain `bash`, `text`, a transcript) is only shown.
- The blocks of one file run in order, in one scratch folder, so a block may use what an earlier block of the
  same file made. Each file's folder starts as a clone looks after `make demo`: `configs/` and `data/` copied,
  then the Makefile's demo commands run there (its training for 20 steps instead of 560), which fill
  `data/prepared/` and `checkpoints/tiny/`. `picogpt` is on PATH from the venv, and the device is the CPU.
- A runnable block uses tiny settings (a few training steps, a few tokens): the whole test stays under a minute
  on a quiet 2-core machine. A block that fails is named by its file and line.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
# Added to the training command of `make demo` (Makefile), so that the docs' commands start from a run in seconds.
FEW_STEPS = ["--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
             "--trainer.enable_progress_bar", "false"]
BLOCK_TIMEOUT_S = 600  # against a hang; a block takes seconds on a quiet machine, minutes on a crowded one


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    info: list[str]
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return "runnable" in self.info[1:]


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the line each opens on."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    opening, body = None, []
    for number, line in enumerate(lines, start=1):
        fence = FENCE.match(line)
        if opening is None and fence:
            opening, body = (number, fence.group(1), fence.group(2).split()), []
        elif opening is not None and fence and fence.group(1).startswith(opening[1]) and not fence.group(2).strip():
            blocks.append(Block(path, opening[0], opening[2], "\n".join(body) + "\n"))
            opening = None
        elif opening is not None:
            body.append(line)
    assert opening is None, f"{path.relative_to(ROOT)}:{opening[0]}: a code block that never closes"
    return blocks


def outside_fences(path: Path) -> list[str]:
    """The file's lines, with those inside fenced blocks (and the fences) blanked."""
    lines, inside = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = FENCE.match(line)
        if fence and (inside is None or (fence.group(1).startswith(inside) and not fence.group(2).strip())):
            inside = fence.group(1) if inside is None else None
            lines.append("")
        else:
            lines.append("" if inside else line)
    return lines


def prose(path: Path) -> list[str]:
    """The file's lines outside fenced blocks and inline code, where links live."""
    return [re.sub(r"`[^`]*`", "", line) for line in outside_fences(path)]


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (lower case, punctuation dropped, spaces to
    hyphens, -1, -2 for repeats), plus explicit <a id=...> / <a name=...>."""
    seen: dict[str, int] = {}
    found = set(re.findall(r"<a (?:id|name)=\"([^\"]+)\"", path.read_text(encoding="utf-8")))
    for line in outside_fences(path):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).replace("`", "").strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link or image in the prose that is not a URL."""
    links = []
    for number, line in enumerate(prose(path), start=1):
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                links.append((number, target))
    return links


def make_demo_commands() -> list[list[str]]:
    """The commands of the Makefile's demo target, as argument lists (continuation lines joined)."""
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE)
    assert recipe, "the Makefile has no demo target"
    lines = recipe.group(1).replace("\\\n", " ").splitlines()
    return [shlex.split(line.strip().replace("$(BIN)/", "")) for line in lines if line.strip()]


def runnable_files() -> list[Path]:
    return [path for path in DOCS if any(block.runnable for block in fenced_blocks(path))]


def environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1")
    return env


def run_block(block: Block, folder: Path) -> None:
    if block.info[0] == "python":
        script = folder / f"doc_block_{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        command = [sys.executable, script.name]
    elif block.info[0] in ("bash", "sh", "shell"):
        command = ["bash", "-eo", "pipefail", "-c", block.code]
    else:
        pytest.fail(f"{block.where}: a runnable block must be bash or python, not {block.info[0]}")
    try:
        done = subprocess.run(command, cwd=folder, env=environment(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where}: the runnable block ran past {BLOCK_TIMEOUT_S} s; give it tinier settings")
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        pytest.fail(f"{block.where}: the runnable block exited with status {done.returncode}\n"
                    f"--- block ---\n{block.code}--- output (last lines) ---\n{tail}")


@pytest.fixture(scope="session")
def after_make_demo(tmp_path_factory) -> Path:
    """A folder as a clone looks after `make demo` (its commands run here), with a few training steps, not 560."""
    assert (Path(sys.executable).parent / "picogpt").exists(), "run the tests with the venv's python (make test)"
    folder = tmp_path_factory.mktemp("after-make-demo")
    shutil.copytree(ROOT / "configs", folder / "configs")
    shutil.copytree(ROOT / "data", folder / "data", ignore=shutil.ignore_patterns("prepared", "tinyshakespeare*"))
    for command in make_demo_commands():
        command = [str(Path(sys.executable).parent / command[0]), *command[1:]]
        if command[1] == "fit":
            command += FEW_STEPS
        done = subprocess.run(command, cwd=folder, env=environment(), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=BLOCK_TIMEOUT_S)
        assert done.returncode == 0, f"make demo's {shlex.join(command)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    assert (folder / "checkpoints" / "tiny" / "best.ckpt").is_file()
    return folder


@pytest.mark.parametrize("path", runnable_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_runnable_block_of_the_file_runs(path, after_make_demo, tmp_path):
    folder = tmp_path / "clone"
    shutil.copytree(after_make_demo, folder)
    for block in fenced_blocks(path):
        if block.runnable:
            run_block(block, folder)


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_and_heading_that_exist(path):
    broken = []
    for line, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{path.relative_to(ROOT)}:{line}: {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{path.relative_to(ROOT)}:{line}: {target}: no heading with that anchor in {linked.name}")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_landing_page_that_links_every_page_of_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250, "README.md is a landing page: move the details into docs/"
    linked = {target.partition("#")[0] for _, target in relative_links(ROOT / "README.md")}
    unlinked = [page.name for page in DOCS[1:] if f"docs/{page.name}" not in linked]
    assert not unlinked, f"add these pages to the Docs list of README.md: {', '.join(unlinked)}"


def test_the_docs_mark_the_commands_that_matter_runnable():
    runnable = "\n".join(block.code for path in DOCS for block in fenced_blocks(path) if block.runnable)
    for command in ("picogpt fit", "picogpt sample", "picogpt chat", "picogpt finetune", "picogpt info",
                    "picogpt export", "picogpt evaluate", "picogpt prepare", "picogpt plot", "picogpt validate",
                    "from picogpt_lightning import load"):
        assert command in runnable, f"no runnable block in the docs runs {command!r}"


def test_every_shipped_config_has_a_row_in_the_configs_table():
    training = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    missing = [config.name for config in configs if f"`{config.name}`" not in training]
    assert not missing, f"docs/training.md's table of configs lacks {', '.join(missing)}"


def test_make_demo_trains_the_tiny_config_and_samples_from_its_run():
    commands = make_demo_commands()
    assert [command[:2] for command in commands] == [["picogpt", "fit"], ["picogpt", "sample"]]
    assert "configs/tiny.yaml" in commands[0] and "checkpoints/tiny/best.ckpt" in commands[1]


def test_a_failing_block_is_named_by_its_file_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\ntext\n\n```bash runnable\ntrue\nfalse\n```\n", encoding="utf-8")
    (block,) = fenced_blocks(page)
    block.path = ROOT / "docs" / "page.md"  # as if it were one of ours
    with pytest.raises(pytest.fail.Exception, match=r"docs/page\.md:5: the runnable block exited with status 1"):
        run_block(block, tmp_path)


def test_anchors_are_githubs_and_links_in_code_are_not_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A `code` title: yes, (no)!\n\n## Again\n\n## Again\n\n```text\n[x](missing.md)\n```\n"
                    "`[y](missing.md)` and [z](page.md#again-1)\n", encoding="utf-8")
    assert anchors(page) == {"a-code-title-yes-no", "again", "again-1"}
    assert [target for _, target in relative_links(page)] == ["page.md#again-1"]
