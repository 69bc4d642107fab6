"""Locations and the Store protocol: what every store offers, and how a location names one.

A local path, a file:// URL, memory://, s3://bucket/path and gs://bucket/path
(and any other kvstore URL tensorstore understands) behave the same through the
Store protocol (storage/testing.py is its contract). Writes are whole values,
either absent or complete, and durable once written.

s3:// honours AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (MinIO, R2, Ceph, a local
test server) and AWS_REGION / AWS_DEFAULT_REGION as boto3 does; credentials come
from the usual variables through tensorstore; a kvstore spec with an endpoint of
its own becomes a location that carries it (see location()). gs:// honours
tensorstore's TENSORSTORE_GCS_HTTP_URL. Every wait on an object store has a
deadline (the store's timeout_s) and tensorstore's retries are bounded, so an
unreachable or stalled endpoint raises StorageError naming the location
instead of hanging.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
import os
import posixpath
import threading
import weakref
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


# Every kvstore spec becomes a string location that names all of it, so nothing is
# recorded for the process: the same spec is the same string in every process and
# every run, and two specs of one bucket with different endpoints are two locations.
# A spec that no plain URL names is "kvstore+<token>://PATH": the token is the spec
# less its path, as canonical JSON (tensorstore's normalized form, sorted keys) in
# lowercase base32 without padding, which a URL scheme may hold (no "/", no ":", so
# split_prefix and join see PATH as the part after "://").
_KVSTORE_SCHEME = "kvstore+"

# The marker of a token that names a KvStore of the caller's ("kvstore+live-N://"):
# "-" is not in base32's alphabet, so no spec's token starts with it.
_LIVE = "live-"


def _token(spec: dict[str, Any]) -> str:
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return base64.b32encode(text.encode()).decode().rstrip("=").lower()


def _untoken(token: str) -> dict[str, Any]:
    try:
        spec = json.loads(base64.b32decode(token.upper() + "=" * (-len(token) % 8)))
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{_KVSTORE_SCHEME}{token}:// names no kvstore spec ({e})") from e
    if not isinstance(spec, dict):
        raise ValueError(f"{_KVSTORE_SCHEME}{token}:// names no kvstore spec")
    return spec


def kvstore_parts(place: str) -> tuple[str, str] | None:
    """(token, path) of a "kvstore+<token>://PATH" location, None for any other location."""
    if not place.startswith(_KVSTORE_SCHEME) or "://" not in place:
        return None
    token, _, path = place[len(_KVSTORE_SCHEME) :].partition("://")
    return token, path.strip("/")


def kvstore_spec(token: str) -> dict[str, Any]:
    """The kvstore spec (without its path) a token of a kvstore+ location names."""
    if token.startswith(_LIVE):
        raise ValueError(f"{_KVSTORE_SCHEME}{token}:// names a tensorstore.KvStore, not a spec")
    return _untoken(token)


def _encoded(spec: dict[str, Any]) -> str:
    rest = dict(spec)
    path = str(rest.pop("path", "")).strip("/")
    return f"{_KVSTORE_SCHEME}{_token(rest)}://{path}"


# A KvStore of the caller's whose values live in its context (a memory store, or a
# store over one) cannot be written down: no spec names that context. Each is named
# "kvstore+live-N://PATH" while the caller holds it. The table is keyed weakly by
# the KvStores the caller gave, so shardsave keeps none of the caller's values alive
# and the table holds only stores still in use; a store opened over one holds it
# (TensorstoreStore), so an operation in flight keeps its name. N counts up and is
# never reused: a name whose KvStore is gone raises rather than naming another
# store. These names are for this process only (so are the values they name).
_LIVE_STORES: weakref.WeakKeyDictionary[ts.KvStore, int] = weakref.WeakKeyDictionary()
_live_numbers = itertools.count()
_live_lock = threading.Lock()


def _bound(kv: ts.KvStore) -> ts.KvStore.Spec:
    """The store under kv: specs with their context bound compare equal only when
    they are of the same store (the same memory store; any path)."""
    base = kv.copy()
    base.path = ""
    return base.spec(retain_context=True)


def _named_live(kv: ts.KvStore) -> str:
    path = kv.path.strip("/")
    with _live_lock:
        number = _LIVE_STORES.get(kv)
        if number is None:
            bound = _bound(kv)
            # Another KvStore of the same store (a copy at another path) has its name.
            number = next((n for known, n in list(_LIVE_STORES.items()) if _bound(known) == bound), None)
            if number is None:
                number = next(_live_numbers)
            _LIVE_STORES[kv] = number
    return f"{_KVSTORE_SCHEME}{_LIVE}{number}://{path}"


def live_kvstore(token: str, where: str) -> ts.KvStore:
    """The caller's KvStore that a "kvstore+live-N" token names (its own path, whatever it is)."""
    number = int(token[len(_LIVE) :]) if token[len(_LIVE) :].isdigit() else -1
    with _live_lock:
        kv = next((known for known, n in list(_LIVE_STORES.items()) if n == number), None)
    if kv is None:
        raise StorageError(
            f"{where}: the tensorstore.KvStore this location named is gone (a KvStore is a "
            "location while the caller holds it); pass the KvStore itself again"
        )
    return kv


def uses_driver(spec: Any, driver: str) -> bool:
    """Whether a kvstore spec (or a base of it, at any depth) is of the driver."""
    if isinstance(spec, str):
        return spec.startswith(f"{driver}://")
    if not isinstance(spec, dict):
        return False
    return spec.get("driver") == driver or any(uses_driver(v, driver) for v in spec.values())


def location(place: Any) -> str:
    """A checkpoint location as the string the rest of shardsave uses.

    Accepts a path (str or os.PathLike), a URL, a tensorstore kvstore spec (a
    dict, or its JSON text) or a tensorstore.KvStore. Specs and KvStores of the
    file driver become paths, of the memory driver memory:// URLs, of the s3 and
    gcs drivers with nothing but a bucket and a path s3:// and gs:// URLs. Any
    other spec (an s3 endpoint or region, another driver) becomes
    "kvstore+<token>://PATH", which names the whole spec: the same spec is the
    same string in every process. A KvStore whose values are in memory keeps
    its caller's context and is named "kvstore+live-N://PATH" while the caller
    holds it.
    """
    if isinstance(place, str) and place.lstrip().startswith("{"):
        place = json.loads(place)
    if isinstance(place, ts.KvStore):
        spec = place.spec().to_json()
        if uses_driver(spec, "memory"):  # its values are in the caller's context, not ours
            return _named_live(place)
        place = spec
    if not isinstance(place, dict):
        return os.fspath(place)
    try:
        # tensorstore's normalized form: one string for equivalent specs, defaults left out
        normal = ts.KvStore.Spec(place).to_json()
    except Exception as e:
        raise ValueError(f"cannot use the kvstore spec {place!r:.200} as a checkpoint location: {e}") from e
    driver, path = normal.get("driver"), str(normal.get("path", "")).strip("/")
    if driver == "file":
        return "/" + path if str(normal.get("path", "")).startswith("/") else path or "."
    if driver == "memory":
        return f"memory://{path}"
    plain = set(normal) <= {"driver", "bucket", "path"}  # else its options need the token
    if driver in ("s3", "gcs") and isinstance(normal.get("bucket"), str) and plain:
        scheme = "s3" if driver == "s3" else "gs"
        return f"{scheme}://{normal['bucket']}/{path}" if path else f"{scheme}://{normal['bucket']}"
    return _encoded(normal)


def readable(place: str) -> str:
    """A location as a person reads it: a kvstore+<token> location's spec spelled out.

    For messages only; the location itself is what names the store.
    """
    parts = kvstore_parts(place)
    if parts is None or parts[0].startswith(_LIVE):
        return place
    token, path = parts
    try:
        spec = kvstore_spec(token)
    except ValueError:
        return place
    if spec.get("driver") in ("s3", "gcs") and isinstance(spec.get("bucket"), str):
        scheme = "s3" if spec["driver"] == "s3" else "gs"
        options = ", ".join(
            f"{k} {v if isinstance(v, str) else json.dumps(v, sort_keys=True)}"
            for k, v in sorted(spec.items())
            if k not in ("driver", "bucket")
        )
        return f"{scheme}://{spec['bucket']}/{path} ({options})"
    return f"{path or '/'} in the kvstore {json.dumps(spec, sort_keys=True)}"


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _bucket_and_path(url: str) -> tuple[str, str]:
    bucket, _, path = url.split("://", 1)[1].partition("/")
    return bucket, path.strip("/") + "/" if path.strip("/") else ""


def _spec(directory: str) -> str | dict[str, Any]:
    """The tensorstore kvstore spec of a directory given as a path or URL.

    The environment's endpoint and region apply to s3:// URLs only: a
    kvstore+<token> location is its own spec, as it was given.
    """
    parts = kvstore_parts(directory)
    if parts is not None:
        token, path = parts
        return {**kvstore_spec(token), "path": path + "/" if path else ""}
    if directory.startswith("s3://"):
        bucket, path = _bucket_and_path(directory)
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": path}
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
