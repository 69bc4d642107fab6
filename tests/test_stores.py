"""The Store contract, held over every store: local files, memory://, S3 and GCS.

As zarr-python's StoreTests do, one suite of tests runs against each
implementation of shardsave's Store protocol (shardsave/_storage.py), with the
object stores served by real servers on loopback (see conftest.py).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from conftest import gcs_bucket, s3_bucket

from shardsave import _storage
from shardsave.errors import StorageError


@pytest.fixture(params=["local", "memory", "s3", "gcs"])
def store(request, tmp_path) -> _storage.Store:
    if request.param == "local":
        location = str(tmp_path / "store")
    elif request.param == "memory":
        location = f"memory://{uuid.uuid4().hex}/store"
    elif request.param == "s3":
        location = f"s3://{s3_bucket(request.getfixturevalue('s3_env'))}/store"
    else:
        location = f"gs://{gcs_bucket(request.getfixturevalue('gcs_server'))}/store"
    return _storage.open_store(location, timeout_s=30)


def test_a_missing_key(store):
    assert store.read_all("absent") is None
    assert not store.exists("absent")
    assert store.mtime("absent") is None
    with pytest.raises(FileNotFoundError):
        store.read_range("absent", 0, 4).result()
    store.delete("absent").result()  # deleting what is not there is not an error
    assert store.list() == []


def test_write_then_read_whole_and_ranges(store):
    value = bytes(range(256)) * 64
    store.write("k", value).result()
    assert store.read_all("k") == value
    assert store.exists("k") and store.mtime("k") is not None
    np.testing.assert_array_equal(
        store.read_range("k", 100, 300).result(), np.frombuffer(value[100:300], np.uint8)
    )
    short = store.read_range("k", len(value) - 10, len(value) + 50).result()  # past the end: shorter
    assert short.tobytes() == value[-10:]


def test_a_write_replaces_the_whole_value(store):
    store.write("k", b"a much longer first value").result()
    store.write("k", memoryview(b"short")).result()
    assert store.read_all("k") == b"short"


def test_then_and_allocate(store):
    store.write("k", b"0123456789").result()
    seen = []

    def then(data: np.ndarray) -> np.ndarray:
        seen.append(data.tobytes())
        return data[::-1]

    assert store.read_range("k", 2, 6, then=then).result().tobytes() == b"5432"
    assert seen == [b"2345"]

    def failing(data: np.ndarray) -> np.ndarray:
        raise ValueError("bad data")

    with pytest.raises(ValueError, match="bad data"):
        store.read_range("k", 0, 4, then=failing).result()


def test_list_and_delete(store):
    for key in ("b", "a", "c.data-00000-of-00001"):
        store.write(key, b"x").result()
    assert store.list() == ["a", "b", "c.data-00000-of-00001"]
    store.delete("b").result()
    assert store.list() == ["a", "c.data-00000-of-00001"]


def test_what_only_local_stores_do(store, tmp_path):
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
    assert lock is not None
    lock.release()


def test_a_hung_local_file_system_raises_within_the_deadline(tmp_path):
    """A write that never finishes (a FIFO nobody reads stands in for a hung NFS server)."""
    import os
    import threading

    local = _storage.open_store(str(tmp_path), timeout_s=1)
    os.mkfifo(tmp_path / "hung")
    with pytest.raises(StorageError, match="did not finish within 1 s"):
        local.read_range("hung", 0, 10).result()  # opening a FIFO to read blocks until a writer comes
    threading.Thread(
        target=lambda: open(tmp_path / "hung", "wb").close(), daemon=True
    ).start()  # free the I/O thread
