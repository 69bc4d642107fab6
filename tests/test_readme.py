"""The README's code blocks run as written."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_python

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    out = run_python("\n".join(blocks), devices=8)
    assert out.strip().endswith("model-1000")


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = next(line for line in text.splitlines() if "pytest" in line and line.startswith("python3"))
    assert test_command in ci.splitlines()
