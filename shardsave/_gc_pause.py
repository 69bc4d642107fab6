"""Pauses Python's cyclic garbage collector while shardsave builds per-leaf objects.

A save or restore of thousands of leaves allocates hundreds of thousands of small
objects (index entries, shard boxes, reads). Each allocation burst triggers the
collector, whose full passes walk the whole heap of a training process (jax
arrays, compiled functions, the model itself): with thousands of leaves those
passes took longer than the restore's own work (the commit that added this
module has the measurement). Nothing shardsave allocates forms reference cycles
that must be freed during the operation, so the pause only defers work.

The pause nests and is shared by threads (the commit thread and the caller may
both be inside one): the collector is re-enabled when the last one leaves, and
only if it was enabled when the first one came in.
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
