"""Faults injected through a store: wrappers that shardsave opens instead of its own stores.

Used by the tests (as programs.store_faults) and by the programs beside it.

    with shardsave.storage.wrapping_stores(lambda store: FullDisk(store, budget=64 << 10)):
        ...  # every store shardsave opens now runs out of space after 64 KiB

A wrapper delegates every Store method to the store it wraps and overrides the
ones it breaks, so tests never patch shardsave's own functions.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import Any

from shardsave.storage import Pending, Store


class WrappedStore:
    """A Store that forwards everything to the store it wraps."""

    def __init__(self, inner: Store):
        self.inner = inner
        self.path = inner.path
        self.timeout_s = inner.timeout_s

    @property
    def is_local(self) -> bool:
        return self.inner.is_local

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class FullDisk(WrappedStore):
    """Writes fail with ENOSPC once `budget` bytes have been written (shared by every store)."""

    def __init__(self, inner: Store, budget: list[int]):
        super().__init__(inner)
        self.budget = budget

    def write(self, key: str, data: Any, **options: Any) -> Pending[Any]:
        self.budget[0] -= len(data)
        if self.budget[0] < 0:
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return self.inner.write(key, data, **options)


class GatedWrites(WrappedStore):
    """Data writes wait for `release` (and then fail with `fail`, if given), until `lifted`."""

    def __init__(
        self,
        inner: Store,
        started: threading.Event,
        release: threading.Event,
        fail: Exception | None,
        lifted: threading.Event,
    ):
        super().__init__(inner)
        self.started, self.release, self.fail, self.lifted = started, release, fail, lifted

    def write(self, key: str, data: Any, **options: Any) -> Pending[Any]:
        if ".data-" in key and not self.lifted.is_set():
            self.started.set()
            assert self.release.wait(30)
            if self.fail is not None:
                raise self.fail
        return self.inner.write(key, data, **options)


class BeforeFirstRead(WrappedStore):
    """Runs `action` once, just before the first ranged read (a data read of a restore)."""

    def __init__(self, inner: Store, action: Callable[[], None], done: threading.Event):
        super().__init__(inner)
        self.action, self.done = action, done

    def read_range(self, key: str, *args: Any, **kwargs: Any) -> Pending[Any]:
        if not self.done.is_set():
            self.done.set()
            self.action()
        return self.inner.read_range(key, *args, **kwargs)


class SlowWrites(WrappedStore):
    """Every write waits `seconds` first."""

    def __init__(self, inner: Store, seconds: float):
        super().__init__(inner)
        self.seconds = seconds

    def write(self, key: str, data: Any, **options: Any) -> Pending[Any]:
        time.sleep(self.seconds)
        return self.inner.write(key, data, **options)


class Hooked(WrappedStore):
    """Calls on_write(key) before each write and on_delete(key) before each delete."""

    def __init__(self, inner: Store, on_write: Callable[[str], None], on_delete: Callable[[str], None]):
        super().__init__(inner)
        self.on_write, self.on_delete = on_write, on_delete

    def write(self, key: str, data: Any, **options: Any) -> Pending[Any]:
        self.on_write(key)
        return self.inner.write(key, data, **options)

    def delete(self, key: str) -> Pending[None]:
        self.on_delete(key)
        return self.inner.delete(key)
