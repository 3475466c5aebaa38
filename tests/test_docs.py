"""The README's and docs/'s code runs, and the files they name exist: the docs cannot drift from the code.

Every ```python block of README.md and docs/*.md runs in a fresh interpreter, in an empty
temporary folder, on the CPU, with the backend left to auto. Blocks that are not meant to run
(shell commands, layouts) use ```sh or ```text fences. Blocks that import transformers skip
where it is not installed, as the Hugging Face tests do.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
IMPORTS_TRANSFORMERS = re.compile(r"^\s*(from|import) transformers\b", re.M)
TIMEOUT_S = 300  # a block takes a few seconds; the margin is for a loaded 2-core CI machine
README_MAX_LINES = 210


def _blocks():
    for path in DOCUMENTS:
        text = path.read_text()
        for match in PYTHON_BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}:{line}")


def _block_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTTX_BACKEND", "TRITON_INTERPRET")}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


@pytest.mark.parametrize("code", list(_blocks()))
def test_code_block_runs(code, tmp_path):
    if IMPORTS_TRANSFORMERS.search(code) and importlib.util.find_spec("transformers") is None:
        pytest.skip("the block imports transformers, which is not installed (pip install .[hf])")
    script = tmp_path / "block.py"
    script.write_text(code)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_block_env(), capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, f"exit code {run.returncode}\n--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"


def test_documents_exist():
    names = {p.name for p in DOCUMENTS}
    assert {"README.md", "design.md", "benchmarks.md", "gpu.md", "cpu.md", "verification.md"} <= names


def test_readme_is_a_product_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; depth belongs in docs/"


# A path in backticks that starts at one of the repository's folders, e.g. `csrc/cpu/cross_entropy.cpp`.
REPO_PATH = re.compile(r"`((?:csrc|fasttx|kernels|tests|bench|docs|\.ci)/[\w./-]*)`")
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")
HEADING = re.compile(r"^#+ (.*)$", re.M)


def _anchors(path: Path) -> set:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in HEADING.findall(path.read_text())}


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_and_anchors_exist(path):
    text = path.read_text()
    missing = [name for name in REPO_PATH.findall(text) if not (ROOT / name).exists()]
    for link, anchor in MARKDOWN_LINK.findall(text):
        if "://" in link:
            continue
        target = path.parent / link if link else path
        if not target.exists():
            missing.append(link)
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            missing.append(f"{link}#{anchor}")
    assert not missing, f"{path.relative_to(ROOT)} names files or headings that do not exist: {missing}"


def test_design_checklist_names_every_file_of_the_op_it_walks():
    """docs/design.md walks one op through every file it touches; a file of that op (its name in the
    path) that the checklist does not name means the checklist fell behind."""
    text = (ROOT / "docs" / "design.md").read_text()
    op = re.search(r"This walks `(\w+)`", text).group(1)
    def of_op(name):  # test_cross_entropy_offsets.py is cross_entropy's; linear_cross_entropy.cu is another op's
        stem = re.sub(r"^test_(triton_aot_)?", "", name.split(".")[0])
        return stem == op or stem.startswith(op + "_")
    files = [p.relative_to(ROOT).as_posix() for top in ("csrc", "kernels", "fasttx", "tests", "bench")
             for p in (ROOT / top).rglob(f"*{op}*") if p.is_file() and "__pycache__" not in p.parts and of_op(p.name)]
    assert files, f"no files named after {op}"
    missing = [f for f in files if f"`{f}`" not in text]
    assert not missing, f"docs/design.md's checklist for {op} does not name {missing}"
