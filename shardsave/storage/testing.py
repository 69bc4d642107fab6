"""A test kit for every Store: the contract suite, counts of what stores read, fault wrappers.

As zarr-python's `zarr.testing.store.StoreTests`: a backend's tests subclass
StoreTests and give it a `store` fixture (an empty store); every method then
holds that store to the contract the rest of shardsave relies on. A store
declares what it can do (`is_local`: rename-before-publish and locks), and the
suite checks the declared capability, so callers never branch on which store
they have.

Faults are injected through a store, never by patching shardsave: while
`storage.wrapping_stores(wrap)` is active, every store shardsave opens is
`wrap(store)`, and a wrapper here delegates every Store method to the store it
wraps and overrides the ones it breaks:

    with shardsave.storage.wrapping_stores(lambda store: FullDisk(store, budget=[64 << 10])):
        ...  # every store shardsave opens now runs out of space after 64 KiB

This module imports pytest (the suite's assertions): it is for tests only.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from shardsave.storage.base import Pending, Store


class WrappedStore:
    """A Store that forwards everything to the store it wraps."""

    def __init__(self, inner: Store):
        self.inner = inner
        self.path = inner.path
        self.timeout_s = inner.timeout_s

    @property
    def is_local(self) -> bool:
        return self.inner.is_local

    @property
    def copies_writes(self) -> bool:
        return self.inner.copies_writes

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Counts:
    """What every store opened while `wrap` is active has read and written, added up.

    Each store counts for itself (Store.stats); this keeps the stores it saw and
    sums their counts. The `io_stats` fixture of shardsave's tests is one:

        counts = Counts()
        with shardsave.storage.wrapping_stores(counts.wrap):
            ...  # a restore
        counts.bytes_read
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: list[Store] = []

    def wrap(self, store: Store) -> Store:
        with self._lock:
            self._stores.append(store)
        return store

    def _sum(self, name: str) -> int:
        with self._lock:
            return sum(getattr(store.stats, name) for store in self._stores)

    @property
    def reads(self) -> int:
        return self._sum("reads")

    @property
    def bytes_read(self) -> int:
        return self._sum("bytes_read")

    @property
    def bytes_written(self) -> int:
        return self._sum("bytes_written")

    @property
    def bytes_read_uncached(self) -> int:
        """Of bytes_read, those read past the page cache (O_DIRECT, local stores)."""
        return self._sum("bytes_read_uncached")

    def reset(self) -> None:
        """Starts counting from zero (stores opened before keep being counted)."""
        with self._lock:
            for store in self._stores:
                store.stats.reset()


class FullDisk(WrappedStore):
    """Writes fail with ENOSPC once `budget[0]` bytes have been written (a list: shared by every store)."""

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
        deadline_s: float = 30.0,
    ):
        super().__init__(inner)
        self.started, self.release, self.fail, self.lifted = started, release, fail, lifted
        self.deadline_s = deadline_s

    def write(self, key: str, data: Any, **options: Any) -> Pending[Any]:
        if ".data-" in key and not self.lifted.is_set():
            self.started.set()
            if not self.release.wait(self.deadline_s):
                raise TimeoutError(f"GatedWrites: {key} was not released within {self.deadline_s:g} s")
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


class StoreTests:
    """The Store contract. Subclass it in a test module and give it a `store` fixture.

    Example:
      class TestMemoryStore(StoreTests):
          @pytest.fixture
          def store(self):
              return shardsave.storage.open_store(f"memory://{uuid.uuid4().hex}/s")
    """

    def test_a_missing_key(self, store: Store) -> None:
        assert store.read_all("absent") is None
        assert not store.exists("absent")
        assert store.mtime("absent") is None
        with pytest.raises(FileNotFoundError):
            store.read_range("absent", 0, 4).result()
        store.delete("absent").result()  # deleting what is not there is not an error
        assert store.list() == []

    def test_write_then_read_whole_and_ranges(self, store: Store) -> None:
        value = bytes(range(256)) * 64
        store.write("k", value).result()
        assert store.read_all("k") == value
        assert store.exists("k") and store.mtime("k") is not None
        np.testing.assert_array_equal(
            store.read_range("k", 100, 300).result(), np.frombuffer(value[100:300], np.uint8)
        )
        short = store.read_range("k", len(value) - 10, len(value) + 50).result()  # past the end: shorter
        assert short.tobytes() == value[-10:]

    def test_a_write_replaces_the_whole_value(self, store: Store) -> None:
        store.write("k", b"a much longer first value").result()
        store.write("k", memoryview(b"short")).result()
        assert store.read_all("k") == b"short"

    def test_then_and_allocate(self, store: Store) -> None:
        store.write("k", b"0123456789").result()
        seen = []

        def then(data: np.ndarray) -> np.ndarray:
            seen.append(data.tobytes())
            return data[::-1]

        assert store.read_range("k", 2, 6, then=then).result().tobytes() == b"5432"
        assert seen == [b"2345"]
        # allocate is where a store may land the bytes (the local store does); any store
        # returns them.
        region = np.zeros(16, np.uint8)
        assert store.read_range("k", 0, 4, allocate=lambda n: region[:n]).result().tobytes() == b"0123"

        def failing(data: np.ndarray) -> np.ndarray:
            raise ValueError("bad data")

        with pytest.raises(ValueError, match="bad data"):
            store.read_range("k", 0, 4, then=failing).result()

    def test_list_and_delete(self, store: Store) -> None:
        for key in ("b", "a", "c.data-00000-of-00001"):
            store.write(key, b"x").result()
        assert store.list() == ["a", "b", "c.data-00000-of-00001"]
        store.delete("b").result()
        assert store.list() == ["a", "c.data-00000-of-00001"]

    def test_what_the_store_declares_it_can_do(self, store: Store) -> None:
        """is_local: writes durable under a temporary name (publish=False), and locks."""
        if not store.is_local:
            with pytest.raises(ValueError):
                store.write("k", b"v", publish=False)
            assert store.lock("model") is None
            return
        pending = store.write("k", b"v", publish=False).result()
        assert store.read_all("k") is None  # durable under a temporary name, not yet visible
        pending.publish()
        assert store.read_all("k") == b"v"
        lock = store.lock("model")
        assert lock is not None and lock.held
        lock.release()
        assert not lock.held
