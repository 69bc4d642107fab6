"""A notebook whose Saver cell is run twice, in a real IPython kernel (nbclient, ipykernel).

Running a cell again is what every Jupyter and Colab user does. The cell makes a
new Saver for the same save path; the earlier one may still be alive (a cell
whose last expression is the Saver leaves it in Out[]). The newer Saver takes the
path over, and the earlier one, if used again, says why it may not save there.
"""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

SETUP = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax.numpy as jnp, shardsave
d = {directory!r}
state = {{"w": jnp.arange(8.0), "b": jnp.zeros(3)}}
step = 0
"""
# The cell run twice: async saves (the default), so the first may still be in flight.
SAVER_CELL = """
step += 1
saver = shardsave.Saver(max_to_keep=3)
saver.save(state, d + "/model", global_step=step)
{last}
"""
CHECK = """
import json
saver.wait_until_finished()
outcome = {{"latest": shardsave.latest_checkpoint(d)}}
{use_first}
print(json.dumps(outcome))
"""
USE_FIRST = """
first = Out[{first_out}]
try:
    first.save(state, d + "/model", global_step=100)
    outcome["first"] = "saved"
except shardsave.errors.ConcurrentSaveError as e:
    outcome["first"] = str(e)
"""


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")


@pytest.mark.parametrize("saver_is_shown", [False, True], ids=["plain", "saver-in-Out"])
def test_a_saver_cell_run_twice_saves_both_times(tmp_path, saver_is_shown):
    cells = [
        nbformat.v4.new_code_cell(SETUP.format(directory=str(tmp_path))),
        nbformat.v4.new_code_cell(SAVER_CELL.format(last="saver" if saver_is_shown else "")),
        nbformat.v4.new_code_cell(""),
    ]
    notebook = nbformat.v4.new_notebook(cells=cells)
    client = NotebookClient(notebook, kernel_name="python3", timeout=120, allow_errors=False)
    with client.setup_kernel():
        client.execute_cell(cells[0], 0, execution_count=1)
        client.execute_cell(cells[1], 1, execution_count=2)  # the Saver cell ...
        client.execute_cell(cells[1], 1, execution_count=3)  # ... and again
        use_first = USE_FIRST.format(first_out=2) if saver_is_shown else ""
        cells[2].source = CHECK.format(use_first=use_first)
        client.execute_cell(cells[2], 2, execution_count=4)
    outcome = json.loads(_stdout(cells[2]).strip().splitlines()[-1])
    assert outcome["latest"] == str(tmp_path / "model-2")
    assert sorted(p.name for p in tmp_path.glob("*.index")) == ["model-1.index", "model-2.index"]
    if saver_is_shown:
        # Out[2] kept the first Saver alive; the second one took the save path over.
        assert "a newer Saver in this process holds the save path" in outcome["first"], outcome
        assert not (tmp_path / "model-100.index").exists()
