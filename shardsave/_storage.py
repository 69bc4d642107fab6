"""All I/O goes through a tensorstore key-value store rooted at a directory.

A local path, a file:// URL and memory:// (and any other kvstore URL tensorstore
understands, such as gs:// or s3:// where it is built with them) behave the same.
Writes are whole values: tensorstore's file driver writes a temporary file and
renames it, so a value is either absent or complete, and it syncs the data before
the rename (the `file_io_sync` context default), so a written value is durable.
"""

from __future__ import annotations

import os
import posixpath
import threading
from dataclasses import dataclass
from typing import ClassVar

import tensorstore as ts

from .errors import CheckpointNotFoundError

# One context for the process: memory:// stores live in it, so a store opened twice
# (by a Saver, then by a reader) sees the same values.
_CONTEXT = ts.Context()


@dataclass
class IOStats:
    """Bytes moved through the storage layer; tests use it to prove what was read."""

    bytes_read: int = 0
    reads: int = 0
    bytes_written: int = 0

    def reset(self) -> None:
        self.bytes_read = self.reads = self.bytes_written = 0


STATS = IOStats()
_stats_lock = threading.Lock()


def split_prefix(path: str) -> tuple[str, str]:
    """'ckpt/model-10' -> ('ckpt', 'model-10'); URLs keep their scheme."""
    path = os.fspath(path)
    if "://" in path:
        scheme, rest = path.split("://", 1)
        head, base = posixpath.split(rest)
        return f"{scheme}://{head}", base
    head, base = os.path.split(path)
    return head or ".", base


def join(directory: str, name: str) -> str:
    if "://" in directory:
        return directory.rstrip("/") + "/" + name if not directory.endswith("://") else directory + name
    return os.path.join(directory, name)


def _spec(directory: str) -> str | dict[str, str]:
    if "://" in directory:
        if directory.startswith("file://"):
            return {"driver": "file", "path": directory[len("file://") :].rstrip("/") + "/"}
        return directory.rstrip("/") + "/" if not directory.endswith("://") else directory
    return {"driver": "file", "path": os.path.abspath(directory) + "/"}


class Directory:
    """A checkpoint directory: keys are file names inside it."""

    _open: ClassVar[dict[str, ts.KvStore]] = {}
    _open_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, directory: str):
        self.path = directory
        key = repr(_spec(directory))
        with Directory._open_lock:
            store = Directory._open.get(key)
            if store is None:
                store = ts.KvStore.open(_spec(directory), context=_CONTEXT).result()
                Directory._open[key] = store
        self._kv = store

    @property
    def is_local(self) -> bool:
        return "://" not in self.path or self.path.startswith("file://")

    def write(self, key: str, data: bytes) -> ts.Future:
        with _stats_lock:
            STATS.bytes_written += len(data)
        return self._kv.write(key, data)

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> ts.Future:
        """A future of the ReadResult for bytes [start, stop) of key (all if None)."""
        with _stats_lock:
            STATS.reads += 1
            if start is not None and stop is not None:
                STATS.bytes_read += stop - start
        if start is None:
            return self._kv.read(key)
        return self._kv.read(key, byte_range=slice(start, stop))

    def read_all(self, key: str) -> bytes | None:
        """The whole value of key, or None if it does not exist."""
        result = self.read(key).result()
        if result.state != "value":
            return None
        with _stats_lock:
            STATS.bytes_read += len(result.value)
        return result.value

    def exists(self, key: str) -> bool:
        return self._kv.read(key, byte_range=slice(0, 0)).result().state == "value"

    def list(self) -> list[str]:
        """Every key in the directory (not recursive into subdirectories' names)."""
        try:
            keys = self._kv.list().result()
        except ValueError as e:  # the directory does not exist
            if "NOT_FOUND" in str(e) or "No such file" in str(e):
                return []
            raise
        return sorted(k.decode() for k in keys if b"/" not in k)

    def delete(self, key: str) -> ts.Future:
        return self._kv.write(key, None)


def open_prefix(path: str) -> tuple[Directory, str]:
    directory, base = split_prefix(path)
    if not base:
        raise CheckpointNotFoundError(f"{path!r} names a directory, not a checkpoint prefix")
    return Directory(directory), base
