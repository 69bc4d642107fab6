"""Any tensorstore key-value store (memory://, s3://, gs://, ...) as a Store, with deadlines."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import tensorstore as ts

from shardsave.errors import StorageError
from shardsave.storage.base import (
    _CONTEXT,
    _LIVE,
    _REMOTE_CONTEXT,
    DEFAULT_STORAGE_TIMEOUT_S,
    IOStats,
    Pending,
    _spec,
    join,
    kvstore_parts,
    kvstore_spec,
    live_kvstore,
    readable,
    uses_driver,
)
from shardsave.storage.buffers import aligned_empty
from shardsave.storage.local import WriterLock


def _wait(future: ts.Future, what: str, timeout_s: float) -> Any:
    """A tensorstore future's result within the deadline; StorageError naming `what` otherwise."""
    try:
        return future.result(timeout=timeout_s)
    except TimeoutError:
        future.cancel()
        raise StorageError(
            f"{what}: the store did not answer within {timeout_s:g} s (is the endpoint reachable? "
            "Saver(storage_timeout_s=...) sets the deadline)"
        ) from None
    except ValueError as e:
        if "OUT_OF_RANGE" in str(e):  # a ranged read past the end: the caller reports truncation
            raise
        raise StorageError(f"{what}: {e}") from e


class _StoreFuture:
    """A tensorstore future with a deadline, whose result() raises StorageError naming the location."""

    def __init__(self, future: ts.Future, what: str, timeout_s: float):
        self._future, self._what, self._timeout_s = future, what, timeout_s

    def result(self) -> Any:
        return _wait(self._future, self._what, self._timeout_s)


class _ReadResult:
    """A tensorstore read seen as a future of a uint8 array (FileNotFoundError if missing).

    A range past the end of the value gives what there is (an empty array when it
    starts past the end), as a short local read does: tensorstore refuses such a
    range, so the rest of the value is read instead.
    """

    def __init__(
        self,
        kv: ts.KvStore,
        key: str,
        start: int,
        stop: int,
        then: Callable[[np.ndarray], np.ndarray] | None,
        where: str,
        timeout_s: float,
    ):
        self._kv, self._key, self._start, self._then = kv, key, start, then
        self._where, self._timeout_s = where, timeout_s
        self._future = kv.read(key, byte_range=slice(start, stop))

    def result(self) -> np.ndarray:
        what = f"reading {self._where}"
        try:
            result = _wait(self._future, what, self._timeout_s)
        except ValueError:  # OUT_OF_RANGE: the value is shorter than the range
            whole = _wait(self._kv.read(self._key), what, self._timeout_s)
            if whole.state != "value":
                raise FileNotFoundError(self._key) from None
            data = np.frombuffer(whole.value, dtype=np.uint8)[self._start :]
        else:
            if result.state != "value":
                raise FileNotFoundError(self._key)
            data = np.frombuffer(result.value, dtype=np.uint8)
        return data if self._then is None else self._then(data)


class TensorstoreStore:
    """Any tensorstore key-value store (memory://, s3://, gs://, ...), with deadlines.

    Object stores have no rename and no lock (FORMAT.md): publish=False and
    lock() are not available.
    """

    is_local = False
    copies_writes = True  # tensorstore takes bytes, and holds its own copy while it writes
    _open: ClassVar[dict[str, ts.KvStore]] = {}
    _open_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, directory: str, timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S):
        self.path = directory
        self.timeout_s = timeout_s
        self.stats = IOStats()  # this store's reads and writes (storage.testing.Counts adds them up)
        self._owner: ts.KvStore | None = None
        parts = kvstore_parts(directory)
        if parts is not None:  # a kvstore spec or a KvStore given as a location
            token, path = parts
            if token.startswith(_LIVE):
                # Held while this store lives, so the caller's KvStore keeps its name.
                self._owner = base = live_kvstore(token, readable(directory))
            else:
                # One store for each spec, whatever the path (an OCDBT database is then
                # opened once); memory:// inside a spec is the process's, as a URL's is.
                named = kvstore_spec(token)
                gcs = os.environ.get("TENSORSTORE_GCS_HTTP_URL", "") if uses_driver(named, "gcs") else ""
                context = ts.Context(_REMOTE_CONTEXT, parent=_CONTEXT)
                base = self._opened(directory, token + gcs, named, context)
            self._kv = base.copy()
            self._kv.path = path + "/" if path else ""
            return
        spec = _spec(directory)
        # Keyed by the whole spec, endpoint and region included (and tensorstore's GCS
        # endpoint variable): a changed environment opens a new store rather than
        # reusing one that points elsewhere.
        key = repr(spec) + (
            os.environ.get("TENSORSTORE_GCS_HTTP_URL", "") if directory.startswith("gs://") else ""
        )
        shared = isinstance(spec, str) and spec.startswith("memory://")
        self._kv = self._opened(directory, key, spec, _CONTEXT if shared else ts.Context(_REMOTE_CONTEXT))

    def _opened(self, directory: str, key: str, spec: Any, context: ts.Context) -> ts.KvStore:
        """The store of a spec, opened once for the process (key says which spec)."""
        with TensorstoreStore._open_lock:
            store = TensorstoreStore._open.get(key)
        if store is None:
            store = _wait(
                ts.KvStore.open(spec, context=context), f"opening {readable(directory)}", self.timeout_s
            )
            with TensorstoreStore._open_lock:
                store = TensorstoreStore._open.setdefault(key, store)
        return store

    def _where(self, key: str) -> str:
        return readable(join(self.path, key))

    def local_path(self, key: str) -> str:
        raise ValueError(f"{self.path} is not a local directory")

    def read_range(
        self,
        key: str,
        start: int,
        stop: int,
        then: Callable[[np.ndarray], np.ndarray] | None = None,
        allocate: Callable[[int], np.ndarray] = aligned_empty,
    ) -> Pending[np.ndarray]:
        self.stats.add_read(stop - start)
        return _ReadResult(self._kv, key, start, stop, then, self._where(key), self.timeout_s)

    def read_all(self, key: str) -> bytes | None:
        result = _wait(self._kv.read(key), f"reading {self._where(key)}", self.timeout_s)
        if result.state != "value":
            return None
        self.stats.add_read(len(result.value))
        return bytes(result.value)

    def write(self, key: str, data: bytes | memoryview, *, publish: bool = True) -> Pending[Any]:
        if not publish:
            raise ValueError("publish=False needs a local directory")
        self.stats.add_written(len(data))
        value = data if isinstance(data, bytes) else bytes(data)  # tensorstore takes bytes only
        return _StoreFuture(self._kv.write(key, value), f"writing {self._where(key)}", self.timeout_s)

    def _stat(self, key: str) -> Any:
        return _wait(
            self._kv.read(key, byte_range=slice(0, 0)), f"reading {self._where(key)}", self.timeout_s
        )

    def exists(self, key: str) -> bool:
        return bool(self._stat(key).state == "value")

    def mtime(self, key: str) -> float | None:
        result = self._stat(key)
        return float(result.stamp.time) if result.state == "value" else None

    def list(self) -> list[str]:
        keys = _wait(self._kv.list(), f"listing {readable(self.path)}", self.timeout_s)
        return sorted(k.decode() for k in keys if b"/" not in k)

    def delete(self, key: str) -> Pending[None]:
        return _StoreFuture(self._kv.write(key, None), f"deleting {self._where(key)}", self.timeout_s)

    def check_parent(self, prefix: str) -> None:
        return None  # an object store has no parents that can be files

    def lock(self, stem: str, settle: Callable[[], None] | None = None) -> WriterLock | None:
        return None


def tensorstore_location(directory: str, resources: dict[str, Any] | None = None) -> tuple[Any, ts.Context]:
    """A directory as a tensorstore kvstore spec and a context to open it in.

    For readers that open tensorstore drivers of their own over a directory (a
    zarr array inside an OCDBT database, as Orbax stores them): the spec is the
    one a Store of the directory uses (a local path becomes the file driver),
    and the context is a fresh one holding `resources` (cache pools, ...) whose
    parent is the process's context, so memory:// sees the values every store of
    this process sees, and object stores get bounded retries. A KvStore of the
    caller's ("kvstore+live-N") raises ValueError: no spec names its context.
    """
    parts = kvstore_parts(directory)
    if parts is not None and parts[0].startswith(_LIVE):
        # Opened from a spec, these drivers would read another memory store than the caller's.
        raise ValueError(
            f"{directory}: tensorstore drivers cannot be opened over a tensorstore.KvStore of the "
            "caller's memory (no spec names its context); copy its contents to another location"
        )
    spec: Any = _spec(directory if "://" in directory else os.path.abspath(directory))
    context = ts.Context({**_REMOTE_CONTEXT, **(resources or {})}, parent=_CONTEXT)
    return spec, context


def list_recursive(directory: str, timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S) -> list[str]:
    """Every key under a directory, subdirectories included ('a/b/c'), sorted.

    Store.list lists one level; a reader of a format that nests directories (an
    Orbax CheckpointManager's root) needs the whole tree. Local directories are
    walked; anything else is listed through the kvstore a TensorstoreStore of it
    opens (so a KvStore of the caller's is listed, not another store).
    """
    if "://" not in directory or directory.startswith("file://"):
        root = directory[len("file://") :] if directory.startswith("file://") else directory
        keys = []
        for top, _, files in os.walk(root):
            rel = os.path.relpath(top, root)
            keys += [f if rel == "." else f"{rel}/{f}" for f in files]
        return sorted(keys)
    kv = TensorstoreStore(directory, timeout_s)._kv
    return sorted(k.decode() for k in _wait(kv.list(), f"listing {readable(directory)}", timeout_s))
