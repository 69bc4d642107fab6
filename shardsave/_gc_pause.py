"""Pauses Python's cyclic garbage collector while a caller waits inside shardsave.

A save or restore of thousands of leaves allocates hundreds of thousands of small
objects (index entries, shard boxes, reads). Each allocation burst triggers the
collector, whose passes walk the whole heap of a training process (jax arrays,
compiled functions, the model itself): with thousands of leaves those passes cost
a tenth of the operation (benchmarks/NOTES.md, "The garbage collector"). Nothing
shardsave allocates forms reference cycles that must be freed during the
operation, so the pause only defers work.

The collector is process-wide, so the pause is taken only where the caller's
thread is blocked in shardsave anyway: Saver.save until it returns (the blocking
copy, or the whole of a synchronous save), Saver.restore and restore_leaves.
The commit thread never takes it: an asynchronous save's commit runs while the
training loop does, and that loop keeps its collector.

The pause nests and is shared by threads (two callers may both be inside one):
the collector is re-enabled when the last one leaves, and only if it was
enabled when the first one came in.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

_lock = threading.Lock()
_depth = 0
_was_enabled = False

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def paused() -> Iterator[None]:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()


def pausing(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorates fn to run with the collector paused."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with paused():
            return fn(*args, **kwargs)

    return wrapper
