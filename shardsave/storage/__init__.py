"""The storage layer: the Store protocol, a local store and a tensorstore store.

Everything above this package reads and writes through a Store; it never asks
which one it has, only what it can do (is_local, lock, publish=False).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from shardsave.errors import CheckpointNotFoundError
from shardsave.storage.base import DEFAULT_STORAGE_TIMEOUT_S as DEFAULT_STORAGE_TIMEOUT_S
from shardsave.storage.base import TEMP_MARK as TEMP_MARK
from shardsave.storage.base import IOStats as IOStats
from shardsave.storage.base import Lock as Lock
from shardsave.storage.base import Pending as Pending
from shardsave.storage.base import PendingFile as PendingFile
from shardsave.storage.base import Store as Store
from shardsave.storage.base import join as join
from shardsave.storage.base import location as location
from shardsave.storage.base import readable as readable
from shardsave.storage.base import split_prefix as split_prefix
from shardsave.storage.base import temp_target as temp_target
from shardsave.storage.buffers import DIRECT_IO_ALIGNMENT as DIRECT_IO_ALIGNMENT
from shardsave.storage.buffers import MIN_UNCACHED_READ_BYTES as MIN_UNCACHED_READ_BYTES
from shardsave.storage.buffers import BufferPool as BufferPool
from shardsave.storage.buffers import aligned_empty as aligned_empty
from shardsave.storage.buffers import mapped_empty as mapped_empty
from shardsave.storage.kvstore import TensorstoreStore as TensorstoreStore
from shardsave.storage.local import LOCK_SUFFIX as LOCK_SUFFIX
from shardsave.storage.local import LocalStore as LocalStore
from shardsave.storage.local import WriterLock as WriterLock
from shardsave.storage.local import sync_directory as sync_directory

# Test kits wrap every store opened while they are active (a failing or slowed
# store), so faults are injected through a store, never by patching shardsave.
_wrappers: list[Callable[[Store], Store]] = []


@contextlib.contextmanager
def wrapping_stores(wrap: Callable[[Store], Store]) -> Iterator[None]:
    """While active, every store shardsave opens is wrap(store)."""
    _wrappers.append(wrap)
    try:
        yield
    finally:
        _wrappers.remove(wrap)


def open_store(location: str, timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S) -> Store:
    """The store of a directory given as a path or URL (see location())."""
    store: Store
    if "://" not in location or location.startswith("file://"):
        store = LocalStore(location, timeout_s)
    else:
        store = TensorstoreStore(location, timeout_s)
    for wrap in list(_wrappers):
        store = wrap(store)
    return store


def open_prefix(path: str, timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S) -> tuple[Store, str]:
    directory, base = split_prefix(path)
    if not base:
        raise CheckpointNotFoundError(f"{path!r} names a directory, not a checkpoint prefix")
    return open_store(directory, timeout_s), base
