"""The Store contract, held over every store: local files, memory://, S3 and GCS.

As zarr-python's StoreTests do, one suite (shardsave.storage.testing.StoreTests)
runs against each implementation of shardsave's Store protocol, with the object
stores served by real servers on loopback (see conftest.py).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import tensorstore as ts
from conftest import evict, gcs_bucket, s3_bucket

import shardsave
import shardsave.storage
import shardsave.storage.local
from shardsave.errors import StorageError
from shardsave.storage.testing import StoreTests


class TestEveryStore(StoreTests):
    """The contract over local files, memory://, and S3 and GCS servers on loopback."""

    @pytest.fixture(params=["local", "memory", "s3", "gcs", "s3-spec", "caller-kvstore"])
    def store(self, request, tmp_path) -> shardsave.storage.Store:
        if request.param == "local":
            location = str(tmp_path / "store")
        elif request.param == "memory":
            location = f"memory://{uuid.uuid4().hex}/store"
        elif request.param == "s3":
            location = f"s3://{s3_bucket(request.getfixturevalue('s3_env'))}/store"
        elif request.param == "s3-spec":
            # kvstore+<token>: the endpoint is in the location, none in the environment.
            endpoint = request.getfixturevalue("s3_server")
            monkeypatch = request.getfixturevalue("monkeypatch")
            for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            bucket = s3_bucket(endpoint)
            spec = {
                "driver": "s3",
                "bucket": bucket,
                "path": "store",
                "endpoint": endpoint,
                "aws_region": "us-east-1",
            }
            location = shardsave.storage.location(spec)
            assert location.startswith("kvstore+")
        elif request.param == "caller-kvstore":
            # kvstore+live-N: a memory store in the caller's own context.
            own = ts.KvStore.open({"driver": "memory", "path": "store/"}, context=ts.Context()).result()
            location = shardsave.storage.location(own)
            # Only the store opened below holds `own` once the fixture returns: a store in
            # use keeps the caller's KvStore, and so its name.
            assert location.startswith("kvstore+live-")
        else:
            location = f"gs://{gcs_bucket(request.getfixturevalue('gcs_server'))}/store"
        return shardsave.storage.open_store(location, timeout_s=30)


def test_a_hung_local_file_system_raises_within_the_deadline(tmp_path):
    """A write that never finishes (a FIFO nobody reads stands in for a hung NFS server)."""
    import os
    import threading

    local = shardsave.storage.open_store(str(tmp_path), timeout_s=1)
    os.mkfifo(tmp_path / "hung")
    with pytest.raises(StorageError, match="did not finish within 1 s"):
        local.read_range("hung", 0, 10).result()  # opening a FIFO to read blocks until a writer comes
    threading.Thread(
        target=lambda: open(tmp_path / "hung", "wb").close(), daemon=True
    ).start()  # free the I/O thread


def test_a_file_no_page_cache_holds_is_read_past_it_and_a_cached_one_through_it(tmp_path, io_stats):
    data = np.random.default_rng(0).integers(0, 256, (5 << 20) + 100, dtype=np.uint8)
    (tmp_path / "f").write_bytes(data.tobytes())
    local = shardsave.storage.open_store(str(tmp_path))
    evict(tmp_path / "f")
    # Page-aligned from its start: all but the last partial page comes past the cache.
    got = local.read_range("f", 4096, data.size).result()
    np.testing.assert_array_equal(got, data[4096:])
    assert io_stats.bytes_read_uncached == (data.size - 4096) // 4096 * 4096
    assert got.ctypes.data % 4096 == 0
    # Past the end: what there is, as a buffered read gives it.
    evict(tmp_path / "f")
    io_stats.reset()
    np.testing.assert_array_equal(local.read_range("f", 4 << 20, 8 << 20).result(), data[4 << 20 :])
    assert io_stats.bytes_read_uncached == data.size - (4 << 20)
    # A range the page cache holds (read once through it), and one that does not start
    # on a page, are read through the cache.
    io_stats.reset()
    (tmp_path / "f").read_bytes()
    np.testing.assert_array_equal(local.read_range("f", 0, 3 << 20).result(), data[: 3 << 20])
    evict(tmp_path / "f")
    np.testing.assert_array_equal(local.read_range("f", 64, 3 << 20).result(), data[64 : 3 << 20])
    assert io_stats.bytes_read_uncached == 0


@pytest.fixture
def fresh_direct_io_decisions():
    """No file system decided before the test, and none after it: a refusal the test
    provokes must not send later tests' reads of tmp_path through the page cache."""
    shardsave.storage.local.forget_direct_io_decisions()
    yield
    shardsave.storage.local.forget_direct_io_decisions()


def test_a_file_system_that_refuses_o_direct_is_read_through_the_page_cache(
    tmp_path, io_stats, fresh_direct_io_decisions
):
    import os

    data = np.arange(2 << 20, dtype=np.uint8)
    (tmp_path / "f").write_bytes(data.tobytes())
    evict(tmp_path / "f")
    # Memory off every block boundary is what each file system refuses an O_DIRECT read
    # into (EINVAL), as some refuse O_DIRECT altogether: the read gives nothing, and the
    # file system is marked so that later reads do not try again.
    buffer = shardsave.storage.mapped_empty((2 << 20) + 4096)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert shardsave.storage.local.read_uncached(fd, buffer[1 : 1 + (1 << 20)], 0) == 0
    finally:
        os.close(fd)
    assert shardsave.storage.local.direct_io_decisions() == {os.stat(tmp_path / "f").st_dev: False}
    got = shardsave.storage.open_store(str(tmp_path)).read_range("f", 0, data.size).result()
    np.testing.assert_array_equal(got, data)
    assert io_stats.bytes_read_uncached == 0


def test_overlayfs_and_tmpfs_files_are_read_through_the_page_cache(tmp_path, io_stats):
    # overlayfs (a container's root file system) keeps a file's pages with the file
    # beneath it, so cachestat on it reports no page cached even right after a read:
    # its reads must not go past the page cache, or a warm restore would read the disk.
    import os
    import subprocess

    layers = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for path in layers.values():
        path.mkdir()
    options = f"lowerdir={layers['lower']},upperdir={layers['upper']},workdir={layers['work']}"
    mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(layers["merged"])])
    if mounted.returncode != 0:
        pytest.skip("cannot mount an overlay file system here (needs root and the overlay module)")
    try:
        data = np.random.default_rng(1).integers(0, 256, 4 << 20, dtype=np.uint8)
        for directory in (layers["merged"], "/dev/shm"):
            path = os.path.join(directory, f"shardsave-{uuid.uuid4().hex}")
            with open(path, "wb") as f:
                f.write(data.tobytes())
            try:
                got = shardsave.storage.open_store(str(directory)).read_range(
                    os.path.basename(path), 0, data.size
                )
                np.testing.assert_array_equal(got.result(), data)
            finally:
                os.remove(path)
        assert io_stats.bytes_read_uncached == 0
    finally:
        subprocess.run(["umount", str(layers["merged"])], check=True)
