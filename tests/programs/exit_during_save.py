"""Starts an asynchronous save whose writes are slow, and lets the interpreter exit at once.

    python tests/programs/exit_during_save.py PREFIX

The save must still commit: shardsave finishes pending saves at exit.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

import shardsave
from shardsave import _storage

_write = _storage.Directory.write


def _slow_write(self: Any, key: str, data: Any, **options: Any) -> Any:
    time.sleep(0.5)  # the interpreter is already exiting when the commit happens
    return _write(self, key, data, **options)


if __name__ == "__main__":
    _storage.Directory.write = _slow_write  # type: ignore[method-assign]
    shardsave.Saver().save({"a": np.arange(1000)}, sys.argv[1], global_step=1)
    print("returned")
