"""The README's code blocks run as written."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import run_python

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_run():
    """The quick start and the blocks that continue it, run as one program."""
    blocks = [b for b in _blocks() if "import optax" not in b and "optax," not in b]
    assert len(blocks) >= 2
    out = run_python("\n".join(blocks), devices=8)
    assert out.strip().endswith("model-1000")


def test_readme_training_loop_runs():
    """The complete training loop: a notice at step 130, step 131 saved, resumed on 4 devices, best 2 kept."""
    (loop,) = [b for b in _blocks() if "optax" in b]
    out = run_python(loop, devices=8).strip().splitlines()
    assert out[:2] == ["preempted: saved step 131", "resumed model-131 on 4 devices"], out
    kept = {int(line.split()[1].split("-")[1]): ast.literal_eval(line.split(" ", 2)[2]) for line in out[2:]}
    # The newest and the 2 best (which may include it); which are best is tested in test_policies.
    assert 300 in kept and 2 <= len(kept) <= 3, out
    assert all(set(m) == {"eval_loss"} and m["eval_loss"] < 1 for m in kept.values()), kept


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = next(line for line in text.splitlines() if "pytest" in line and line.startswith("python3"))
    assert test_command in ci.splitlines()
