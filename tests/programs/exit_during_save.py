"""Starts an asynchronous save whose writes are slow, and lets the interpreter exit at once.

    python tests/programs/exit_during_save.py PREFIX

The save must still commit: shardsave finishes pending saves at exit.
"""

from __future__ import annotations

import sys

import numpy as np

import shardsave
import shardsave.storage
from shardsave.storage.testing import SlowWrites

if __name__ == "__main__":
    # Writes wait half a second: the interpreter is already exiting when the commit happens.
    with shardsave.storage.wrapping_stores(lambda store: SlowWrites(store, 0.5)):
        shardsave.Saver().save({"a": np.arange(1000)}, sys.argv[1], global_step=1)
        print("returned", flush=True)
        sys.exit(0)
