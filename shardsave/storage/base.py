"""Locations and the Store protocol: what every store offers, and how a location names one.

A local path, a file:// URL, memory://, s3://bucket/path and gs://bucket/path
(and any other kvstore URL tensorstore understands) behave the same through the
Store protocol (storage/testing.py is its contract). Writes are whole values,
either absent or complete, and durable once written.

s3:// honours AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (MinIO, R2, Ceph, a local
test server) and AWS_REGION / AWS_DEFAULT_REGION as boto3 does; credentials come
from the usual variables through tensorstore. gs:// honours tensorstore's
TENSORSTORE_GCS_HTTP_URL. Every wait on an object store has a deadline (the
store's timeout_s) and tensorstore's retries are bounded, so an unreachable
or stalled endpoint raises StorageError naming the location instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import tensorstore as ts

from shardsave.errors import StorageError

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
    """Bytes moved through one store (Store.stats); storage.testing.Counts adds them up.

    Updated from the I/O threads, so every change takes the lock.
    """

    bytes_read: int = 0
    reads: int = 0
    bytes_written: int = 0
    bytes_read_uncached: int = 0  # of bytes_read, read with O_DIRECT (see local._read_uncached)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_read(self, nbytes: int) -> None:
        with self._lock:
            self.reads += 1
            self.bytes_read += nbytes

    def add_written(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_written += nbytes

    def add_uncached(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read_uncached += nbytes

    def reset(self) -> None:
        with self._lock:
            self.bytes_read = self.reads = self.bytes_written = self.bytes_read_uncached = 0


# Marks the temporary file of a local write in progress: "<key>.tmp-<random>".
TEMP_MARK = ".tmp-"


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
            bucket = place["bucket"]
            known = _S3_BUCKETS.get(bucket)
            if options and known is not None and known != options:
                # The URL s3://bucket/... names both: a second endpoint would silently
                # redirect every store of the first one.
                raise ValueError(
                    f"the kvstore spec gives s3 bucket {bucket!r} the options {options}, but an "
                    f"earlier location in this process gave it {known}; s3://{bucket}/... cannot "
                    "name two endpoints: give each bucket one endpoint in a process"
                )
            if options:
                _S3_BUCKETS[bucket] = options
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


class Lock(Protocol):
    """An owner's claim on a save path (storage.local.WriterLock on local file systems)."""

    @property
    def held(self) -> bool:
        """Whether the claim still holds the path (not released, not taken over)."""
        ...

    def check(self) -> None:
        """Raises ConcurrentSaveError if a newer claim in this process holds the path now."""
        ...

    def release(self) -> None: ...


class Store(Protocol):
    """A directory of whole values (files, objects): what checkpoints are stored in.

    Keys are names inside it. A value is written whole and is either absent or
    complete; reads of a missing key report it (read_all: None; read_range:
    FileNotFoundError from result()). Every wait has the store's deadline.
    storage.testing.StoreTests holds every implementation to this contract.
    """

    path: str  # the location, as shardsave shows it ("ckpt", "s3://bucket/run1")
    timeout_s: float
    stats: IOStats  # this store's own counts of what it read and wrote

    @property
    def is_local(self) -> bool:
        """Whether the keys are files of the local file system (local_path, locks, renames)."""
        ...

    @property
    def copies_writes(self) -> bool:
        """Whether write() holds a copy of its data until the write completes
        (a capped save counts that copy in its budget)."""
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

    def lock(self, stem: str, settle: Callable[[], None] | None = None) -> Lock | None:
        """Claims the save path `stem` (local stores; None where the store has no locks).

        settle waits for the claimant's pending work, before a later claim in this
        process takes the path over (see storage.local.WriterLock).
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


def temp_target(key: str) -> str | None:
    """The key a temporary file of a local write was for, or None if key is not one."""
    written, mark, tag = key.rpartition(TEMP_MARK)
    return written if mark and len(tag) == 8 and all(c in "0123456789abcdef" for c in tag) else None
