"""The storage layer: one Store protocol, a local store and a tensorstore store.

A local path, a file:// URL, memory://, s3://bucket/path and gs://bucket/path
(and any other kvstore URL tensorstore understands) behave the same through the
Store protocol (tests/test_stores.py is its contract). Writes are whole values,
either absent or complete, and durable once written.

s3:// honours AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (MinIO, R2, Ceph, a local
test server) and AWS_REGION / AWS_DEFAULT_REGION as boto3 does; credentials come
from the usual variables through tensorstore. gs:// honours tensorstore's
TENSORSTORE_GCS_HTTP_URL. Every wait on an object store has a deadline (the
store's timeout_s) and tensorstore's retries are bounded, so an unreachable
or stalled endpoint raises StorageError naming the location instead of hanging.

Local files are written and read here with plain system calls rather than
through tensorstore's Python binding, which copies every value while holding
the GIL (stalling every other Python thread, a training loop included, for the
whole copy; README "Storage") and hands every read back as a new bytes object. A
local write goes to a temporary file (TEMP_MARK in its name), which is fsync'd,
renamed over the key, and made durable with an fsync of the directory, the
protocol tensorstore's file driver follows too. Every other URL (memory://,
s3://, gs://, ...) goes through tensorstore.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import posixpath
import secrets
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

import numpy as np
import tensorstore as ts

from ._threads import Pool
from .errors import CheckpointNotFoundError, ConcurrentSaveError, StorageError

T_co = TypeVar("T_co", covariant=True)

# One context for the process: memory:// stores live in it, so a store opened twice
# (by a Saver, then by a reader) sees the same values.
_CONTEXT = ts.Context()
# Object stores get bounded retries (tensorstore's default retries for a long time),
# so that an unreachable endpoint fails within the deadline rather than at it.
_REMOTE_CONTEXT = {
    "s3_request_retries": {"max_retries": 6, "initial_delay": "50ms", "max_delay": "2s"},
    "gcs_request_retries": {"max_retries": 6, "initial_delay": "50ms", "max_delay": "2s"},
}
DEFAULT_STORAGE_TIMEOUT_S = 300.0  # the deadline of one storage operation unless a Saver says otherwise


@dataclass
class IOStats:
    """Bytes moved through the storage layer; tests use it to prove what was read."""

    bytes_read: int = 0
    reads: int = 0
    bytes_written: int = 0
    bytes_read_uncached: int = 0  # of bytes_read, read with O_DIRECT (see _read_uncached)

    def reset(self) -> None:
        self.bytes_read = self.reads = self.bytes_written = self.bytes_read_uncached = 0


STATS = IOStats()
_stats_lock = threading.Lock()

# Reads and write() calls of local files are memory copies into or out of the page
# cache: more threads than cores only steal CPU from the training loop (they
# lengthened the longest stall of another Python thread during an async commit
# and saved no time). fsync and rename wait on the device, and a disk is fastest
# with several in flight, so they have threads of their own.
_IO = Pool("shardsave-io", min(8, max(2, os.cpu_count() or 2)))
_SYNC = Pool("shardsave-sync", 8)

# A local read of at least this many bytes that the page cache holds none of is read
# with O_DIRECT, straight from the disk into its buffer, where offset, length and
# buffer allow: no CPU copies it out of the page cache (README "Storage").
MIN_UNCACHED_READ_BYTES = 1 << 20
DIRECT_IO_ALIGNMENT = 4096  # what O_DIRECT asks of offsets, lengths and memory on common file systems

# Marks the temporary file of a local write in progress: "<key>.tmp-<random>".
TEMP_MARK = ".tmp-"
_WRITE_BYTES = 64 << 20  # one write() call at most: Linux caps a call near 2 GiB


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialized uint8 buffer whose start is 64-byte aligned, or page-aligned
    from MIN_UNCACHED_READ_BYTES (a read can then land in it from the disk directly).

    jax adopts such a host buffer as a CPU device buffer without copying it, and
    numpy backs large allocations with transparent huge pages.
    """
    alignment = DIRECT_IO_ALIGNMENT if nbytes >= MIN_UNCACHED_READ_BYTES else 64
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes]


def mapped_empty(nbytes: int) -> np.ndarray:
    """A zeroed, page-aligned uint8 buffer in a mapping of its own.

    Its memory goes back to the system as soon as the last view of it is dropped,
    where malloc (behind aligned_empty) keeps freed blocks of up to 32 MiB for
    reuse, outside any budget (a capped restore takes its buffers from a
    BufferPool, which reuses them within its cap).
    """
    if nbytes == 0:
        return np.empty(0, np.uint8)
    return np.frombuffer(_mapping(nbytes), np.uint8)


def _mapping(nbytes: int) -> mmap.mmap:
    block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= 4 << 20:
        block.madvise(mmap.MADV_HUGEPAGE)  # as numpy asks for its own large buffers
    return block


class BufferPool:
    """Mappings that a capped restore reuses for its reads, from batch to batch.

    A fresh mapping is faulted in and zeroed by the kernel on first touch, which
    costs about as much as the read that fills it. A buffer goes back to the pool
    when the last view of it is dropped (a weakref finalizer on the array), so a
    buffer that anything still holds (jax copying it to a device, or a CPU device
    that adopted it as its own) is never handed out again while in use.

    The pool maps a new buffer only when none of the free ones fits, and first
    unmaps free buffers until what it has mapped, in use and free, plus the new
    one is within `limit` (or none is left); a buffer given back is kept only
    within the limit. So it holds no more than `limit`, or what its caller had in
    use at once where that is more. close() unmaps the free buffers and makes
    buffers given back later go back to the system.
    """

    def __init__(self, limit: int):
        self.limit = limit
        # Reentrant: a garbage collection inside take() may drop a buffer and give it back.
        self._lock = threading.RLock()
        self._free: list[mmap.mmap] = []
        self._free_bytes = 0
        self._in_use = 0  # bytes of buffers handed out and not given back yet
        self._closed = False

    def take(self, nbytes: int) -> np.ndarray:
        """A page-aligned uint8 buffer of nbytes, its contents undefined."""
        if nbytes == 0:
            return np.empty(0, np.uint8)
        block = None
        with self._lock:
            # A free buffer up to twice the size asked for fits (reads are whole
            # checksum chunks, so their sizes repeat).
            fits = [b for b in self._free if nbytes <= len(b) <= 2 * nbytes]
            if fits:
                block = min(fits, key=len)
                self._free.remove(block)
                self._free_bytes -= len(block)
            else:
                self._free.sort(key=len)
                while self._free and self._in_use + self._free_bytes + nbytes > self.limit:
                    self._free_bytes -= len(self._free.pop())  # unmapped once unreferenced
            self._in_use += len(block) if block is not None else nbytes
        if block is None:
            block = _mapping(nbytes)
        array = np.frombuffer(block, np.uint8, count=nbytes)
        weakref.finalize(array, self._give_back, block)
        return array

    def _give_back(self, block: mmap.mmap) -> None:
        with self._lock:
            self._in_use -= len(block)
            # Kept only within the limit (a buffer given back late may not fit any more).
            if not self._closed and self._in_use + self._free_bytes + len(block) <= self.limit:
                self._free.append(block)
                self._free_bytes += len(block)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._free.clear()
            self._free_bytes = 0


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


# Endpoint and region of s3 buckets named by a kvstore spec: a spec names them per
# location, and the URL it becomes (s3://bucket/path) carries neither.
_S3_BUCKETS: dict[str, dict[str, Any]] = {}
_S3_OPTIONS = ("endpoint", "aws_region", "host_header", "requester_pays")


# KvStores given as locations that no URL names (another driver, or a store whose
# context must be kept, such as a memory store of the caller's): each gets a
# process-local name "kvstore+N://PATH", PATH relative to the store's own path.
_KVSTORES: list[ts.KvStore] = []
_KVSTORE_SCHEME = "kvstore+"


def _registered(kv: ts.KvStore) -> str:
    base = kv.copy()
    path = base.path.strip("/")
    base.path = ""
    spec = base.spec().to_json()  # the same store given twice gets the same name
    number = next((n for n, known in enumerate(_KVSTORES) if known.spec().to_json() == spec), None)
    if number is None:
        _KVSTORES.append(base)
        number = len(_KVSTORES) - 1
    return f"{_KVSTORE_SCHEME}{number}://{path}"


def location(place: Any) -> str:
    """A checkpoint location as the string the rest of shardsave uses.

    Accepts a path (str or os.PathLike), a URL, a tensorstore kvstore spec (a
    dict, or its JSON text) or a tensorstore.KvStore. Specs of the file, memory,
    s3 and gcs drivers (and KvStores of the file, s3 and gcs drivers) become
    paths and URLs (an s3 spec's endpoint and region then apply to that bucket
    in this process: the URL s3://bucket/path cannot hold them); any other
    KvStore (a memory store keeps its caller's context) and a spec of any other
    driver is kept as it is and named "kvstore+N://PATH" for this process.
    """
    if isinstance(place, str) and place.lstrip().startswith("{"):
        place = json.loads(place)
    if isinstance(place, ts.KvStore):
        spec = place.spec().to_json()
        if spec.get("driver") not in ("file", "s3", "gcs"):  # memory: its context is the caller's
            return _registered(place)
        place = spec
    if not isinstance(place, dict):
        return os.fspath(place)
    driver, path = place.get("driver"), str(place.get("path", "")).strip("/")
    if driver == "file":
        return "/" + path if str(place.get("path", "")).startswith("/") else path or "."
    if driver == "memory":
        return f"memory://{path}"
    if driver in ("s3", "gcs") and isinstance(place.get("bucket"), str):
        if driver == "s3":
            options = {k: place[k] for k in _S3_OPTIONS if k in place}
            if options:
                _S3_BUCKETS[place["bucket"]] = options
        scheme = "s3" if driver == "s3" else "gs"
        return f"{scheme}://{place['bucket']}/{path}" if path else f"{scheme}://{place['bucket']}"
    try:
        kv = ts.KvStore.open(place, context=ts.Context(_REMOTE_CONTEXT)).result()
    except Exception as e:
        raise ValueError(f"cannot use the kvstore spec {place!r:.200} as a checkpoint location: {e}") from e
    return _registered(kv)


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _bucket_and_path(url: str) -> tuple[str, str]:
    bucket, _, path = url.split("://", 1)[1].partition("/")
    return bucket, path.strip("/") + "/" if path.strip("/") else ""


def _spec(directory: str) -> str | dict[str, Any]:
    """The tensorstore kvstore spec of a directory given as a path or URL."""
    if directory.startswith("s3://"):
        bucket, path = _bucket_and_path(directory)
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": path}
        if bucket in _S3_BUCKETS:
            spec.update(_S3_BUCKETS[bucket])
            return spec
        endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        region = _env("AWS_REGION", "AWS_DEFAULT_REGION")
        if endpoint:
            spec["endpoint"] = endpoint
        if region or endpoint:  # with an endpoint tensorstore cannot look the region up
            spec["aws_region"] = region or "us-east-1"
        return spec
    if directory.startswith("gs://"):
        bucket, path = _bucket_and_path(directory)
        return {"driver": "gcs", "bucket": bucket, "path": path}
    if "://" in directory:
        if directory.startswith("file://"):
            return {"driver": "file", "path": directory[len("file://") :].rstrip("/") + "/"}
        return directory.rstrip("/") + "/" if not directory.endswith("://") else directory
    return {"driver": "file", "path": os.path.abspath(directory) + "/"}


class Pending(Protocol[T_co]):
    """A storage operation in flight; result() waits for it (within the store's deadline)."""

    def result(self) -> T_co: ...


class Store(Protocol):
    """A directory of whole values (files, objects): what checkpoints are stored in.

    Keys are names inside it. A value is written whole and is either absent or
    complete; reads of a missing key report it (read_all: None; read_range:
    FileNotFoundError from result()). Every wait has the store's deadline.
    tests/test_stores.py holds every implementation to this contract.
    """

    path: str  # the location, as shardsave shows it ("ckpt", "s3://bucket/run1")
    timeout_s: float

    @property
    def is_local(self) -> bool:
        """Whether the keys are files of the local file system (local_path, locks, renames)."""
        ...

    def local_path(self, key: str) -> str: ...

    def read_range(
        self,
        key: str,
        start: int,
        stop: int,
        then: Callable[[np.ndarray], np.ndarray] | None = None,
        allocate: Callable[[int], np.ndarray] = ...,
    ) -> Pending[np.ndarray]:
        """Bytes [start, stop) of key as a uint8 array (shorter when the value is).

        then(array), if given, is applied before the result is ready (it may raise);
        allocate(nbytes) makes the buffer a read lands in, where the store can.
        """
        ...

    def read_all(self, key: str) -> bytes | None: ...

    def write(self, key: str, data: bytes | memoryview, *, publish: bool = True) -> Pending[Any]:
        """Writes the whole value of key. publish=False (local stores): durable under a
        temporary name, the result a PendingFile to rename into place."""
        ...

    def exists(self, key: str) -> bool: ...

    def mtime(self, key: str) -> float | None: ...

    def list(self) -> list[str]:
        """The keys directly in the directory, sorted (no subdirectories)."""
        ...

    def delete(self, key: str) -> Pending[None]:
        """Deletes key; an absent key is not an error."""
        ...

    def check_parent(self, prefix: str) -> None: ...

    def lock(self, stem: str, settle: Callable[[], None] | None = None) -> WriterLock | None:
        """Claims the save path `stem` (local stores; None where the store has no locks).

        settle waits for the claimant's pending work, before a later claim in this
        process takes the path over (see WriterLock).
        """
        ...


class _Local(Generic[T_co]):
    """A local read or write on shardsave's I/O threads, waited for within the store's deadline.

    A hung file system (an NFS server gone) then raises StorageError naming the
    file instead of blocking the save or restore for good.
    """

    def __init__(self, future: Future[T_co], what: str, timeout_s: float):
        self._future, self._what, self._timeout_s = future, what, timeout_s

    def result(self) -> T_co:
        try:
            return self._future.result(timeout=self._timeout_s)
        except TimeoutError:
            raise StorageError(
                f"{self._what}: the file system did not finish within {self._timeout_s:g} s "
                "(Saver(storage_timeout_s=...) sets the deadline)"
            ) from None


class _Done(Generic[T_co]):
    """An operation that finished when it was asked for."""

    def __init__(self, value: T_co):
        self._value = value

    def result(self) -> T_co:
        return self._value


def _count_read(nbytes: int) -> None:
    with _stats_lock:
        STATS.reads += 1
        STATS.bytes_read += nbytes


class LocalStore:
    """A local directory, read and written with system calls on shardsave's I/O threads.

    Not through tensorstore's Python binding, which copies every value while
    holding the GIL and hands every read back as a new bytes object (README
    "Storage"). Reads land with preadv straight in an aligned buffer, from the disk
    itself (O_DIRECT) where the page cache holds none of a large one (_uncached); a
    write goes to a temporary file that is fsync'd and renamed into place.
    """

    is_local = True

    def __init__(self, directory: str, timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S):
        self.path = directory
        self.timeout_s = timeout_s
        root = directory[len("file://") :] if directory.startswith("file://") else directory
        self._root = os.path.abspath(root)

    def local_path(self, key: str) -> str:
        return os.path.join(self._root, key)

    def read_range(
        self,
        key: str,
        start: int,
        stop: int,
        then: Callable[[np.ndarray], np.ndarray] | None = None,
        allocate: Callable[[int], np.ndarray] = aligned_empty,
    ) -> Pending[np.ndarray]:
        _count_read(stop - start)
        future = _IO.submit(_pread, self.local_path(key), start, stop, then, allocate)
        return _Local(future, f"reading {self.local_path(key)}", self.timeout_s)

    def read_all(self, key: str) -> bytes | None:
        try:
            with open(self.local_path(key), "rb") as f:
                data = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        _count_read(len(data))
        return data

    def write(self, key: str, data: bytes | memoryview, *, publish: bool = True) -> Pending[Any]:
        with _stats_lock:
            STATS.bytes_written += len(data)
        path = self.local_path(key)
        done: Future[Any] = Future()
        finish = _sync_and_rename if publish else _sync_only

        def then_sync(written: Future[tuple[int, str]]) -> None:
            if (error := written.exception()) is not None:
                done.set_exception(error)
            else:
                _SYNC.submit(finish, *written.result(), path).add_done_callback(settle)

        def settle(synced: Future[Any]) -> None:
            if (error := synced.exception()) is not None:
                done.set_exception(error)
            else:
                done.set_result(synced.result())

        _IO.submit(_write_temp, path, data).add_done_callback(then_sync)
        return _Local(done, f"writing {path}", self.timeout_s)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self.local_path(key))

    def mtime(self, key: str) -> float | None:
        try:
            return os.stat(self.local_path(key)).st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list(self) -> list[str]:
        try:
            with os.scandir(self._root) as entries:
                return sorted(e.name for e in entries if e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, key: str) -> Pending[None]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.local_path(key))
        return _Done(None)

    def check_parent(self, prefix: str) -> None:
        """ValueError when a checkpoint cannot be created here: a path component is a file."""
        path = self._root
        while path and not os.path.lexists(path):
            parent = os.path.dirname(path.rstrip("/"))
            if parent == path:
                return
            path = parent
        if path and not os.path.isdir(path):
            raise ValueError(
                f"cannot save {prefix!r}: {path!r} is not a directory (it is a file); "
                "choose a save path inside a directory"
            )

    def lock(self, stem: str, settle: Callable[[], None] | None = None) -> WriterLock | None:
        """Takes an exclusive claim on the save path `stem`.

        Two writers of one save path delete each other's files in flight (each
        removes the other's uncommitted data as leftovers) and interleave their
        retention. An flock on `.STEM.lock` excludes a second writer, in this
        process or another, and the kernel releases it when its holder dies, so a
        killed job never blocks the next one. Inside one process a later claim takes
        the path over once settle() returns (WriterLock).
        """
        return _take_lock(self.local_path(f".{stem}{LOCK_SUFFIX}"), join(self.path, stem), settle)


class TensorstoreStore:
    """Any tensorstore key-value store (memory://, s3://, gs://, ...), with deadlines.

    Object stores have no rename and no lock (FORMAT.md): publish=False and
    lock() are not available.
    """

    is_local = False
    _open: ClassVar[dict[str, ts.KvStore]] = {}
    _open_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, directory: str, timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S):
        self.path = directory
        self.timeout_s = timeout_s
        if directory.startswith(_KVSTORE_SCHEME):  # a KvStore given as a location
            number, _, path = directory[len(_KVSTORE_SCHEME) :].partition("://")
            self._kv = _KVSTORES[int(number)].copy()
            self._kv.path = path.strip("/") + "/" if path.strip("/") else ""
            return
        spec = _spec(directory)
        # Keyed by the whole spec, endpoint and region included (and tensorstore's GCS
        # endpoint variable): a changed environment opens a new store rather than
        # reusing one that points elsewhere.
        key = repr(spec) + (
            os.environ.get("TENSORSTORE_GCS_HTTP_URL", "") if directory.startswith("gs://") else ""
        )
        with TensorstoreStore._open_lock:
            store = TensorstoreStore._open.get(key)
        if store is None:
            shared = isinstance(spec, str) and spec.startswith("memory://")
            context = _CONTEXT if shared else ts.Context(_REMOTE_CONTEXT)
            store = _wait(ts.KvStore.open(spec, context=context), f"opening {directory}", timeout_s)
            with TensorstoreStore._open_lock:
                store = TensorstoreStore._open.setdefault(key, store)
        self._kv = store

    def _where(self, key: str) -> str:
        return join(self.path, key)

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
        _count_read(stop - start)
        return _ReadResult(self._kv, key, start, stop, then, self._where(key), self.timeout_s)

    def read_all(self, key: str) -> bytes | None:
        result = _wait(self._kv.read(key), f"reading {self._where(key)}", self.timeout_s)
        if result.state != "value":
            return None
        _count_read(len(result.value))
        return bytes(result.value)

    def write(self, key: str, data: bytes | memoryview, *, publish: bool = True) -> Pending[Any]:
        if not publish:
            raise ValueError("publish=False needs a local directory")
        with _stats_lock:
            STATS.bytes_written += len(data)
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
        keys = _wait(self._kv.list(), f"listing {self.path}", self.timeout_s)
        return sorted(k.decode() for k in keys if b"/" not in k)

    def delete(self, key: str) -> Pending[None]:
        return _StoreFuture(self._kv.write(key, None), f"deleting {self._where(key)}", self.timeout_s)

    def check_parent(self, prefix: str) -> None:
        return None  # an object store has no parents that can be files

    def lock(self, stem: str, settle: Callable[[], None] | None = None) -> WriterLock | None:
        return None


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


def _take_lock(path: str, what: str, settle: Callable[[], None] | None) -> WriterLock:
    """Claims the save path `what` through the lock file at path (see WriterLock)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    path = os.path.realpath(path)
    with _holds_lock:
        hold = _holds.get(path)
        earlier = hold.claim() if hold is not None else None
    if earlier is not None:
        earlier.settle()  # outside the registry's lock: it waits for a commit in flight
    with _holds_lock:
        hold = _holds.get(path)
        if hold is not None:  # held by this process: taken over
            return WriterLock(hold, what, settle)
    while True:
        handle = open(path, "a+")  # noqa: SIM115 (held open for the owner's life)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(50):  # the holder writes who it is right after it locks
                handle.seek(0)
                holder = handle.read().strip()
                if holder:
                    break
                time.sleep(0.01)
            handle.close()
            holder = holder or "a writer that has not said who it is"
            raise ConcurrentSaveError(
                f"another writer holds the save path {what!r} ({holder}; lock file {path}): two "
                "writers of one save path would delete each other's files. Stop the other job, "
                "close() its Saver, or save under another name"
            ) from None
        except BaseException:
            handle.close()
            raise
        # The holder before us may have removed the file between our open and our
        # lock: then we hold a lock on a name nobody sees, so take the new file.
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n")
    handle.flush()
    hold = _Hold(path, handle)
    with _holds_lock:
        _holds[path] = hold
    return WriterLock(hold, what, settle)


LOCK_SUFFIX = ".lock"


class WriterLock:
    """One owner's claim on a save path: this process's flock, held for that owner.

    Across processes the flock decides: a second writer is refused. Inside one
    process, a later claim of the same lock file (a Saver made again in a notebook
    cell, or tf.train.Saver's idiom of a fresh Saver beside the old ones) takes the
    flock over from the earlier claim once the earlier owner's pending work has
    settled; the earlier claim is then superseded, and check() says so. A claim that
    is released, or garbage-collected with its owner, lets the flock go, and
    release() removes the lock file too (a killed holder leaves it, harmless and
    reused by the next writer).
    """

    def __init__(self, hold: _Hold, what: str, settle: Callable[[], None] | None):
        self._hold, self._what, self._settle = hold, what, settle
        hold.claim = weakref.ref(self)

    @property
    def held(self) -> bool:
        """Whether this claim still holds the save path (not released, not taken over)."""
        hold = self._hold
        return _holds.get(hold.path) is hold and hold.claim() is self

    def check(self) -> None:
        """Raises ConcurrentSaveError if a newer claim in this process holds the path now."""
        hold = _holds.get(self._hold.path)
        current = hold.claim() if hold is not None else None
        if current is not None and current is not self:
            raise ConcurrentSaveError(
                f"a newer Saver in this process holds the save path {self._what!r} (lock file "
                f"{self._hold.path}): it took the path over when it first saved there, after this "
                "Saver's pending saves had committed. Save with the newer Saver, or close() it first"
            )

    def settle(self) -> None:
        """Waits for the owner's pending work on the path (before a takeover)."""
        if self._settle is not None:
            self._settle()

    def release(self) -> None:
        with _holds_lock:
            if not self.held:
                return  # taken over or released already: the flock is someone else's now
            del _holds[self._hold.path]
        self._hold.close()

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter exit module globals may be gone.
        try:  # noqa: SIM105
            self.release()
        except Exception:
            pass


@dataclass
class _Hold:
    """A flock this process holds on a lock file, and the claim it is held for."""

    path: str  # the lock file's real path
    handle: Any
    claim: Callable[[], WriterLock | None] = lambda: None  # a weak reference to the claim

    def close(self) -> None:
        if not self.handle.closed:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still held: a waiter re-checks the name
            self.handle.close()  # closing the descriptor releases the flock


# The flocks this process holds, by lock file. A flock belongs to an open file
# description, so a second open of the same file in this process would be refused
# like another process: a claim inside the process is handed over here instead.
_holds: dict[str, _Hold] = {}
_holds_lock = threading.Lock()


@dataclass
class PendingFile:
    """A durable temporary file waiting to be renamed to its key."""

    temp: str
    path: str

    def publish(self) -> None:
        os.replace(self.temp, self.path)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.temp)


def sync_directory(directory: Store) -> None:
    """Makes renames and deletions in a local directory durable."""
    if directory.is_local:
        fd = os.open(directory.local_path(""), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_target(key: str) -> str | None:
    """The key a temporary file of a local write was for, or None if key is not one."""
    written, mark, tag = key.rpartition(TEMP_MARK)
    return written if mark and len(tag) == 8 and all(c in "0123456789abcdef" for c in tag) else None


def _write_temp(path: str, data: bytes | memoryview) -> tuple[int, str]:
    """Writes data to a new temporary file next to path; returns its open fd and name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = f"{path}{TEMP_MARK}{secrets.token_hex(4)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done : done + _WRITE_BYTES])
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return fd, temp


def _sync_only(fd: int, temp: str, path: str) -> PendingFile:
    """Makes the temporary file durable and leaves it under its temporary name."""
    try:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return PendingFile(temp, path)


def _sync_and_rename(fd: int, temp: str, path: str) -> None:
    """Makes the temporary file durable, renames it to path, and makes the rename durable."""
    pending = _sync_only(fd, temp, path)
    try:
        pending.publish()
    except BaseException:
        pending.discard()
        raise
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pread(
    path: str,
    start: int,
    stop: int,
    then: Callable[[np.ndarray], np.ndarray] | None,
    allocate: Callable[[int], np.ndarray],
) -> np.ndarray:
    out = allocate(stop - start)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        if (
            out.size >= MIN_UNCACHED_READ_BYTES
            and start % DIRECT_IO_ALIGNMENT == 0
            and out.ctypes.data % DIRECT_IO_ALIGNMENT == 0
            and _uncached(fd, start, out.size)
        ):
            done = _read_uncached(fd, out[: out.size // DIRECT_IO_ALIGNMENT * DIRECT_IO_ALIGNMENT], start)
        while done < out.size:
            n = os.preadv(fd, [cast(Any, out[done:])], start + done)
            if n == 0:  # end of file: the caller sees a short array
                break
            done += n
    finally:
        os.close(fd)
    return out[:done] if then is None else then(out[:done])


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_CACHESTAT = 451  # the system call's number (Linux 6.5 and later) on x86-64 and arm64 alike
# File systems whose files keep pages of their own in the page cache (which cachestat
# reports) and read with O_DIRECT: ext2/3/4, XFS, btrfs. Others read through the page
# cache as before: overlayfs (a container's root), whose pages belong to the files
# beneath, so cachestat reports none even of a file just read; ZFS, whose cache is
# not the page cache; network and cluster file systems, whose O_DIRECT was not measured.
_DIRECT_FILE_SYSTEMS = {0xEF53, 0x58465342, 0x9123683E}
_direct_devices: dict[int, bool] = {}  # st_dev -> whether reads there may go past the page cache


def _direct_device(fd: int) -> bool:
    device = os.fstat(fd).st_dev
    verdict = _direct_devices.get(device)
    if verdict is None:
        statfs = ctypes.create_string_buffer(512)  # struct statfs; f_type is its first word
        verdict = bool(
            _libc.fstatfs(fd, statfs) == 0 and ctypes.c_long.from_buffer(statfs).value in _DIRECT_FILE_SYSTEMS
        )
        _direct_devices[device] = verdict
    return verdict


def _no_direct_reads(fd: int) -> None:
    """Every later read on fd's file system goes through the page cache."""
    _direct_devices[os.fstat(fd).st_dev] = False


def _uncached(fd: int, start: int, nbytes: int) -> bool:
    """Whether the page cache holds no page of the range (cachestat(2)), on a file
    system whose reads may go past it (_DIRECT_FILE_SYSTEMS).

    A cached range is read from memory, as it always was (a checkpoint just written,
    tmpfs); on other file systems, kernels before 6.5 and other operating systems,
    every read is.
    """
    if sys.platform != "linux" or not _direct_device(fd):
        return False
    stats = _Cachestat()
    if _libc.syscall(_CACHESTAT, fd, ctypes.byref(_CachestatRange(start, nbytes)), ctypes.byref(stats), 0):
        _no_direct_reads(fd)  # ENOSYS before 6.5; EPERM under a seccomp filter
        return False
    return stats.nr_cache == 0


def _read_uncached(fd: int, out: np.ndarray, start: int) -> int:
    """Reads into out (whole pages) with O_DIRECT: the disk's DMA lands in the buffer,
    with none of the page cache's copying and bookkeeping; the bytes read.

    0 where the file system refuses (EINVAL: no O_DIRECT, or other alignment rules),
    and the caller reads as before; so does every later read on that file system.
    """
    done = 0
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        _no_direct_reads(fd)
        return 0
    try:
        while done < out.size:
            n = os.preadv(fd, [cast(Any, out[done:])], start + done)
            done += n
            if n == 0 or n % DIRECT_IO_ALIGNMENT:  # the end of the file
                break
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        _no_direct_reads(fd)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    with _stats_lock:
        STATS.bytes_read_uncached += done
    return done


def open_prefix(path: str, timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S) -> tuple[Store, str]:
    directory, base = split_prefix(path)
    if not base:
        raise CheckpointNotFoundError(f"{path!r} names a directory, not a checkpoint prefix")
    return open_store(directory, timeout_s), base
