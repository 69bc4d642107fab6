"""Orbax checkpoints, read by shardsave without Orbax: written here by the installed
orbax-checkpoint, one committed fixture of the folder layout (tests/fixtures/orbax),
and committed checkpoints written by old Orbaxes (tests/fixtures/orbax_old: 0.3.5,
before OCDBT and _METADATA were the default, flax.training.checkpoints over it, and
0.4.8), each with the script and the versions that wrote it.

Every checkpoint is restored by shardsave and compared, bit for bit, with what
Orbax's own restore of it gives: as saved, onto another mesh, and under a 32 MiB
cap, from local disk, memory://, S3 (moto) and GCS (fake-gcs-server).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from conftest import free_port, gcs_bucket, s3_bucket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint.experimental import v1 as ocp_v1

import shardsave
import shardsave.tree
from shardsave.cli import main as cli
from shardsave.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ShardsaveError,
    StructureMismatchError,
)
from shardsave.formats import claimed, open_checkpoint
from shardsave.restore import LeafRequest, restore_leaves
from shardsave.storage import open_store

FIXTURE = Path(__file__).parent / "fixtures" / "orbax" / "folders"
OLD = Path(__file__).parent / "fixtures" / "orbax_old"
PROGRAM = Path(__file__).parent / "programs" / "orbax_processes.py"
MIB = 1 << 20

# What each checkpoint of the module's fixture is, and which Orbax restores it.
KINDS = ["standard", "zarr3", "nocomp", "folders_zarr3", "manager", "v1", "fixture"]


def _state(mesh: Mesh) -> dict[str, Any]:
    """A training state: sharded and replicated f32, bf16, a real optax.adamw state after
    one update (its EmptyState and None nodes), a typed PRNG key, Python scalars and
    empty containers."""
    params = {
        "w": jax.device_put(
            jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32) / 3,
            NamedSharding(mesh, P("data", "model")),
        ),
        "e": jax.device_put(
            (jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) - 40).astype(jnp.bfloat16),
            NamedSharding(mesh, P(None, "model")),
        ),
        "b": jax.device_put(jnp.linspace(-1, 1, 24, dtype=jnp.float32), NamedSharding(mesh, P())),
    }
    tx = optax.adamw(1e-2)
    opt = tx.init(params)
    _, opt = tx.update(jax.tree.map(jnp.ones_like, params), opt, params)
    return {
        "params": params,
        "opt": opt,
        "key": jax.random.key(3),
        "step": 5,
        "lr": 0.25,
        "empty": {},
        "nothing": None,
    }


def _numpy(tree: Any) -> dict[str, Any]:
    """A restored tree as {leaf name: numpy value} (keys as their key data)."""
    names, leaves, _ = shardsave.tree.flatten(tree)
    out = {}
    for name, leaf in zip(names, leaves):
        if isinstance(leaf, jax.Array) and shardsave.tree.is_key_dtype(leaf.dtype):
            leaf = jax.random.key_data(leaf)
        out[name] = leaf if isinstance(leaf, (int, float, str)) else np.asarray(leaf)
    return out


def _assert_same(restored: dict[str, Any], expected: dict[str, Any]) -> None:
    assert set(restored) == set(expected)
    for name, value in expected.items():
        got = restored[name]
        if isinstance(value, (int, float, str)):
            assert type(got) is type(value) and got == value, name
            continue
        assert got.dtype == value.dtype and got.shape == value.shape, name
        assert got.tobytes() == value.tobytes(), name  # bit for bit (bf16 and NaN included)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Any]:
    """Checkpoints written by Orbax, each with Orbax's own restore of it (as numpy)."""
    root = tmp_path_factory.mktemp("orbax")
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    state = _state(mesh)
    with_string = {**state, "name": "run-1"}
    paths = {
        "standard": root / "standard",
        "zarr3": root / "zarr3",
        "nocomp": root / "nocomp",
        "folders_zarr3": root / "folders_zarr3",
    }
    ocp.StandardCheckpointer().save(paths["standard"], state)
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True)).save(paths["zarr3"], with_string)
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)).save(paths["nocomp"], state)
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True)).save(
        paths["folders_zarr3"], with_string
    )
    manager = ocp.CheckpointManager(root / "manager", options=ocp.CheckpointManagerOptions(max_to_keep=3))
    for step in (1, 2):
        stepped = {**state, "step": step}
        manager.save(step, args=ocp.args.StandardSave(stepped))
    manager.wait_until_finished()
    manager.close()
    # A later save that never finished: Orbax's temporary name, and no commit.
    shutil.copytree(root / "manager" / "2", root / "manager" / "3.orbax-checkpoint-tmp-1712345678")
    paths["manager"] = root / "manager"
    paths["v1"] = root / "v1"  # Orbax's v1 API: the tree in the step's item folder `state`
    ocp_v1.save(paths["v1"], state)
    paths["fixture"] = FIXTURE
    expected = {}
    for kind, path in paths.items():
        checkpointer = ocp.PyTreeCheckpointer() if kind in ("zarr3", "folders_zarr3", "fixture") else None
        if kind == "manager":
            restored = ocp.StandardCheckpointer().restore(path / "2" / "default")
        elif kind == "v1":
            restored = ocp_v1.load(path)
        elif checkpointer is not None:
            restored = checkpointer.restore(path)
        else:
            restored = ocp.StandardCheckpointer().restore(path)
        expected[kind] = _numpy(restored)
    return {"paths": {k: str(v) for k, v in paths.items()}, "expected": expected, "root": root}


def _other_mesh_target(path: str) -> tuple[Any, Mesh]:
    """load_structure's tree, on a (4, 2) mesh: each leaf split where its shape allows."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    structure = shardsave.load_structure(path)
    reader = shardsave.CheckpointReader(path)
    kinds = {e.name: e for e in reader.index.leaves}
    names, leaves, treedef = shardsave.tree.flatten(structure)
    out = []
    for name, leaf in zip(names, leaves):
        entry = kinds[name]
        if entry.kind == shardsave.tree.KIND_KEY:
            key = jax.eval_shape(lambda impl=entry.key_impl: jax.random.key(0, impl=impl))
            out.append(jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P())))
            continue
        if entry.kind != shardsave.tree.KIND_ARRAY:  # host leaves: numbers, numpy arrays, strings
            host = {shardsave.tree.KIND_INT: 0, shardsave.tree.KIND_FLOAT: 0.0, shardsave.tree.KIND_STR: ""}
            out.append(host.get(entry.kind, np.zeros(leaf.shape, leaf.dtype)))
            continue
        spec = [None] * len(leaf.shape)
        for axis, (dim, size) in enumerate(zip(leaf.shape, (4, 2))):
            spec[axis] = ("a", "b")[axis] if dim % size == 0 else None
        out.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, P(*spec))))
    return jax.tree_util.tree_unflatten(treedef, out), mesh


def _check_onto(restored: Any, target: Any, expected: dict[str, Any]) -> None:
    _assert_same(_numpy(restored), expected)
    wanted = dict(zip(*shardsave.tree.flatten(target)[:2]))
    names, leaves, _ = shardsave.tree.flatten(restored)
    for name, leaf in zip(names, leaves):
        if isinstance(wanted[name], jax.ShapeDtypeStruct) and isinstance(leaf, jax.Array):
            assert leaf.sharding == wanted[name].sharding, name
            if not shardsave.tree.is_key_dtype(leaf.dtype):
                for shard in leaf.addressable_shards:  # each device holds its own box, as Orbax's value
                    assert np.asarray(shard.data).tobytes() == expected[name][shard.index].tobytes(), name


@pytest.mark.parametrize("kind", KINDS)
def test_restore_is_what_orbax_restores_as_saved_onto_another_mesh_and_capped(written, kind):
    path, expected = written["paths"][kind], written["expected"][kind]
    saver = shardsave.Saver()
    _assert_same(_numpy(saver.restore(path)), expected)
    target, _ = _other_mesh_target(path)
    _check_onto(saver.restore(path, target), target, expected)
    capped = saver.restore(path, target, restore_sequentially=True, max_host_bytes=32 * MIB)
    _check_onto(capped, target, expected)


def test_the_fixture_holds_what_its_script_wrote():
    sys.path.insert(0, str(FIXTURE.parent))
    try:
        import make_orbax_fixture
    finally:
        sys.path.remove(str(FIXTURE.parent))
    v = make_orbax_fixture.values()
    restored = shardsave.Saver().restore(str(FIXTURE))
    assert restored["name"] == v["name"] and restored["step"] == v["step"] and restored["lr"] == v["lr"]
    for name in ("w", "b"):
        np.testing.assert_array_equal(np.asarray(restored["params"][name]), v["params"][name])
    written_by = json.loads((FIXTURE.parent / "expected.json").read_text())["written_by"]
    assert written_by["orbax-checkpoint"].startswith("0.")


def test_a_manager_root_gives_its_newest_committed_step_and_each_folder_names_one(written):
    root = written["paths"]["manager"]
    for path, step in ((root, 2), (f"{root}/1", 1), (f"{root}/1/default", 1), (f"{root}/2/", 2)):
        _, base, index = open_checkpoint(path)
        assert (index.global_step, base, index.source) == (step, "default", "orbax")
        assert shardsave.Saver().restore(path)["step"] == step
    with pytest.raises(CheckpointNotFoundError, match="never finished"):
        shardsave.Saver().restore(f"{root}/3.orbax-checkpoint-tmp-1712345678")


def test_names_partial_reshape_and_cast_work_as_on_a_shardsave_checkpoint(written):
    path, expected = written["paths"]["standard"], written["expected"]["standard"]
    mesh = Mesh(np.array(jax.devices()), ("x",))
    saver = shardsave.Saver()
    partial = saver.restore(path, {"params": {"w": np.zeros((64, 32), np.float32)}})
    assert partial["params"]["w"].tobytes() == expected["params/w"].tobytes()
    # names=: Orbax's own param names ('.'-joined keys) and tree paths both find a leaf.
    target = {
        "weights": jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P("x"))),
        "bias": np.zeros(24, np.float32),
    }
    renamed = saver.restore(path, target, names={"weights": "params.w", "bias": "params/b"})
    assert np.asarray(renamed["weights"]).tobytes() == expected["params/w"].tobytes()
    assert renamed["bias"].tobytes() == expected["params/b"].tobytes()
    flat = {"w": jax.ShapeDtypeStruct((32, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "x")))}
    reshaped = saver.restore(path, {"params": flat}, reshape=True)
    np.testing.assert_array_equal(np.asarray(reshaped["params"]["w"]), expected["params/w"].reshape(32, 64))
    cast = saver.restore(path, {"params": {"e": np.zeros((16, 8), np.float32)}}, cast=True)
    np.testing.assert_array_equal(cast["params"]["e"], expected["params/e"].astype(np.float32))
    with pytest.raises(StructureMismatchError, match="pass cast=True"):
        saver.restore(path, {"params": {"e": np.zeros((16, 8), np.float32)}})


def test_reader_structure_inspect_verify_and_convert(written, tmp_path):
    path, expected = written["paths"]["zarr3"], written["expected"]["zarr3"]
    with shardsave.CheckpointReader(path) as reader:
        assert reader.get("name") == "run-1"
        assert reader.get("params/w", (slice(8, 40), 3)).tobytes() == expected["params/w"][8:40, 3].tobytes()
        assert reader.get("params.e").tobytes() == expected["params/e"].tobytes()  # Orbax's name
        assert reader.verify() == []
        by_name = {v.name: v for v in reader.variables()}
        assert by_name["params/w"].sharding.startswith("P(data, model)")
    structure = shardsave.load_structure(path)
    assert structure["params"]["w"].shape == (64, 32) and structure["params"]["e"].dtype == jnp.bfloat16
    assert structure["empty"] == {} and structure["nothing"] is None
    assert isinstance(structure["opt"], list) and structure["opt"][1] is None  # optax's EmptyState
    assert shardsave.Saver().restore(path, {"name": structure["name"]})["name"] == "run-1"
    out = io.StringIO()
    assert cli(["inspect", path], out=out) == 0 and "params/w" in out.getvalue()
    out = io.StringIO()
    assert cli(["verify", path], out=out) == 0 and out.getvalue().startswith("OK")
    out = io.StringIO()
    assert cli(["convert", path, str(tmp_path / "model")], out=out) == 0
    assert "left out, as no array can hold them: name (string)" in out.getvalue()
    converted = shardsave.Saver().restore(str(tmp_path / "model"))
    assert np.asarray(converted["params"]["w"]).tobytes() == expected["params/w"].tobytes()
    assert converted["step"] == 5
    assert cli(["convert", path, str(tmp_path / "st"), "--to", "safetensors"], out=io.StringIO()) == 0
    loaded = shardsave.load_safetensors(str(tmp_path / "st"))
    assert np.asarray(loaded["params"]["e"]).tobytes() == expected["params/e"].tobytes()


def test_a_restore_reads_only_the_chunks_its_boxes_need(written):
    store, base, index = open_checkpoint(written["paths"]["standard"])
    (entry,) = [e for e in index.leaves if e.name == "params/w"]
    assert len(entry.shards) == 8 and entry.shards[0].shape == (32, 8)  # Orbax's chunks: one per device
    for box, chunks in ((((0, 32), (0, 8)), 1), (((4, 20), (6, 10)), 2), (((0, 64), (0, 32)), 8)):
        store.stats.reset()
        request = LeafRequest(entry, tuple(b - a for a, b in box), entry.dtype, None, box)
        (value,), _ = restore_leaves(store, base, index, [request], budget=None, sequential=False)
        assert store.stats.bytes_read == chunks * 32 * 8 * 4, box
        wanted = written["expected"]["standard"]["params/w"][tuple(slice(a, b) for a, b in box)]
        assert value.tobytes() == wanted.tobytes()


def _upload(source: Path, destination: str, skip: tuple[str, ...] = ()) -> None:
    store = open_store(destination)
    pending = []
    for top, _, files in os.walk(source):
        for name in files:
            key = os.path.relpath(os.path.join(top, name), source)
            if not any(part in skip for part in key.split(os.sep)):
                pending.append(store.write(key.replace(os.sep, "/"), Path(top, name).read_bytes()))
    for p in pending:
        p.result()


@pytest.mark.parametrize("where", ["memory", "s3", "gcs"])
def test_restores_from_object_stores_as_from_local_disk(written, where, request):
    if where == "memory":
        root = f"memory://{uuid.uuid4().hex}"
    elif where == "s3":
        root = f"s3://{s3_bucket(request.getfixturevalue('s3_env'))}/runs"
    else:
        root = f"gs://{gcs_bucket(request.getfixturevalue('gcs_server'))}/runs"
    for kind in ("manager", "zarr3", "fixture"):
        _upload(Path(written["paths"][kind]), f"{root}/{kind}")
        path, expected = f"{root}/{kind}", written["expected"][kind]
        target, _ = _other_mesh_target(path)
        _check_onto(shardsave.Saver().restore(path, target), target, expected)
        capped = shardsave.Saver().restore(path, target, restore_sequentially=True, max_host_bytes=32 * MIB)
        _check_onto(capped, target, expected)
    assert open_checkpoint(f"{root}/manager")[2].global_step == 2
    if where == "gcs":
        # On GCS Orbax commits a folder by writing commit_success.txt into it, not by a rename.
        _upload(Path(written["paths"]["zarr3"]), f"{root}/uncommitted", skip=("commit_success.txt",))
        with pytest.raises(CheckpointNotFoundError, match=r"commit_success\.txt"):
            shardsave.Saver().restore(f"{root}/uncommitted")


def test_per_process_databases_never_merged_are_refused_as_uncommitted(written, tmp_path):
    item = tmp_path / "unmerged"
    shutil.copytree(written["paths"]["standard"], item)
    (item / "manifest.ocdbt").unlink()
    shutil.rmtree(item / "d")
    with pytest.raises(CheckpointNotFoundError, match=r"ocdbt\.process_0\) were never merged") as e:
        shardsave.Saver().restore(str(item))
    assert str(item) in str(e.value)


def test_two_processes_save_with_orbax_and_each_restores_its_devices(tmp_path):
    port = free_port()
    argv = [sys.executable, str(PROGRAM), str(tmp_path), "--processes", "2", "--port", str(port)]
    procs = []
    for pid in range(2):
        env = {
            **os.environ,
            "PID": str(pid),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_PLATFORMS": "cpu",
        }
        procs.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        )
    deadline = time.monotonic() + 180
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
            assert proc.returncode == 0, f"a process failed ({proc.returncode}):\n{out}\n{err[-3000:]}"
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:  # every process ends with the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sorted(o["pid"] for o in outs) == [0, 1]
    item = tmp_path / "orbax"
    assert (item / "ocdbt.process_0").is_dir() and (item / "ocdbt.process_1").is_dir()
    # Here, on this process's 8 devices: the merged database holds both processes' shards.
    values = {
        "w": np.arange(32 * 16, dtype=np.float32).reshape(32, 16) / 3,
        "r": np.arange(8, dtype=np.int32) * 5,
    }
    restored = shardsave.Saver().restore(str(item), {k: np.zeros_like(v) for k, v in values.items()})
    for name, value in values.items():
        assert restored[name].tobytes() == value.tobytes()


# ---------------------------------------------------------------- hostile input


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _copy(source: str, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(source, target)
    return target


def _first_entry(doc: dict) -> dict:
    return doc["tree_metadata"][next(iter(doc["tree_metadata"]))]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "_METADATA").write_text("{not json"), r"_METADATA is not JSON"),
        (lambda p: (p / "_METADATA").write_text("[]"), r"_METADATA has no tree_metadata"),
        (
            lambda p: _edit_json(p / "_METADATA", lambda d: _first_entry(d).pop("key_metadata")),
            "lacks key_metadata",
        ),
        (
            lambda p: _edit_json(
                p / "_METADATA",
                lambda d: d["tree_metadata"]["('params', 'w')"]["value_metadata"].update(
                    write_shape=[32, 8, 2]
                ),
            ),
            r"written in pieces of \[32, 8, 2\]",
        ),
        (
            lambda p: _edit_json(
                p / "_METADATA",
                lambda d: d["tree_metadata"]["('params', 'w')"]["key_metadata"][1].update(key="ghost"),
            ),
            r"lists the array 'params.ghost'",
        ),
        (
            lambda p: _edit_json(p / "params.w" / ".zarray", lambda d: d.update(dtype="|O")),
            r"params\.w/\.zarray",
        ),
        (
            lambda p: _edit_json(p / "params.w" / ".zarray", lambda d: d.update(shape=[16, 9])),
            r"params\.w/\.zarray: array 'params.w' has the shape \[16, 9\], but .*_sharding splits",
        ),
        (
            lambda p: _edit_json(
                p / "array_metadatas" / "process_0",
                lambda d: d["array_metadatas"][0]["array_metadata"].update(chunk_shape=[3]),
            ),
            "records",
        ),
    ],
)
def test_damaged_metadata_is_refused_naming_the_file(tmp_path, damage, message):
    item = _copy(str(FIXTURE), tmp_path)
    damage(item)
    with pytest.raises(CorruptCheckpointError, match=message) as e:
        shardsave.Saver().restore(str(item))
    assert str(item) in str(e.value)


@pytest.mark.parametrize(
    "damage, where",
    [
        (
            # a shape beyond the stored chunks: the restore names the first absent one it
            # asks for (reads run in parallel, so which of them is not fixed)
            lambda p: _edit_json(p / "params.w" / ".zarray", lambda d: d.update(shape=[16, 12])),
            r"params\.w/[01]\.[45]",
        ),
        (
            lambda p: _edit_json(p / "params.w" / ".zarray", lambda d: d.update(dtype="<f2")),
            r"params\.w/0\.",
        ),
        (lambda p: _truncate(p / "params.w" / "1.2"), r"params\.w/1\.2"),
        (lambda p: (p / "params.w" / "0.3").unlink(), r"params\.w/0\.3"),
    ],
)
def test_damaged_arrays_are_refused_by_restore_and_reported_by_verify(tmp_path, damage, where):
    item = _copy(str(FIXTURE), tmp_path)
    damage(item)
    with pytest.raises(CorruptCheckpointError) as e:
        shardsave.Saver().restore(str(item))
    assert re.search(re.escape(str(item) + os.sep) + where, str(e.value)), str(e.value)
    problems = shardsave.CheckpointReader(str(item)).verify()
    assert problems and any("params.w" in p for p in problems)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damage_inside_an_ocdbt_database_is_refused_naming_it(written, tmp_path):
    item = _copy(written["paths"]["standard"], tmp_path)
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}/"}).result()
    meta = json.loads(kv.read("params.w/.zarray").result().value)
    kv.write("params.w/.zarray", json.dumps({**meta, "dtype": "<f2"}).encode()).result()
    with pytest.raises(CorruptCheckpointError, match="OCDBT database") as e:
        shardsave.Saver().restore(str(item))
    assert str(item) in str(e.value) and "params.w" in str(e.value)
    item2 = tmp_path / "truncated"
    shutil.copytree(written["paths"]["standard"], item2)
    for data in [*(item2 / "d").iterdir(), *(item2 / "ocdbt.process_0" / "d").iterdir()]:
        _truncate(data)  # the data files (small values live in the B-tree's nodes)
    with pytest.raises(CorruptCheckpointError) as e:
        shardsave.Saver().restore(str(item2))
    assert str(item2) in str(e.value)


def test_a_damaged_zarr3_shard_index_is_caught_by_its_crc32c(written, tmp_path):
    item = _copy(written["paths"]["folders_zarr3"], tmp_path)
    shard = item / "params.w" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-6] ^= 0xFF  # the shard index (offsets and lengths of the inner chunks) ends the file
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as e:
        shardsave.Saver().restore(str(item))
    assert str(item / "params.w" / "c" / "0" / "0") in str(e.value)


# ---------------------------------------------------------------- checkpoints of old Orbaxes

# (Orbax version, checkpoint in its expected.json, the step a restore of its folder gives)
OLD_CHECKPOINTS = [
    ("0.3.5", "pytree", None),
    ("0.3.5", "manager", 2),
    ("0.3.5", "flax", 3),
    ("0.4.8", "manager", 2),
    ("0.4.8", "folders", None),
]


def _old(version: str, checkpoint: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A committed old checkpoint's folder, what that Orbax restored of it ({path: value})
    and its record in expected.json."""
    doc = json.loads((OLD / f"orbax-{version}" / "expected.json").read_text())
    assert doc["written_by"]["orbax-checkpoint"] == version
    record = doc["checkpoints"][checkpoint]
    expected: dict[str, Any] = {}
    for name, leaf in record["restored"].items():
        if "python" in leaf:
            expected[name] = leaf["value"]
            continue
        value = np.frombuffer(base64.b64decode(leaf["data"]), jnp.dtype(leaf["dtype"])).reshape(leaf["shape"])
        expected[name] = value if leaf["type"] in ("ndarray", "ArrayImpl") else value[()]
    return str(OLD / f"orbax-{version}" / checkpoint), expected, record


def _containers(tree: Any) -> Any:
    """The containers of a tree as make_fixtures.py records them: dicts, lists, None, '*'."""
    if isinstance(tree, dict):
        return {k: _containers(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_containers(v) for v in tree]
    return None if tree is None else "*"


def _types_are_orbaxs(restored: Any, record: dict[str, Any]) -> None:
    """Each leaf comes back as the type that Orbax's own restore gave: numpy or jax
    arrays, numpy scalars, Python numbers and strings."""
    names, leaves, _ = shardsave.tree.flatten(restored)
    for name, leaf in zip(names, leaves):
        want = record["restored"][name]
        if "python" in want:
            assert type(leaf).__name__ == want["python"], name
        elif want["type"] == "ndarray":
            assert isinstance(leaf, np.ndarray), (name, type(leaf))
        elif want["type"] == "ArrayImpl":
            assert isinstance(leaf, jax.Array), (name, type(leaf))
        else:  # a numpy scalar
            assert isinstance(leaf, np.generic) and leaf.dtype.name == want["dtype"], (name, type(leaf))


def _onto_mesh(path: str) -> tuple[Any, Mesh]:
    """load_structure's tree on a (4, 2) mesh: every array of one or more dimensions (numpy
    ones included: the target decides where a leaf goes) split where its shape allows."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    entries = {e.name: e for e in shardsave.CheckpointReader(path).index.leaves}
    names, _, treedef = shardsave.tree.flatten(shardsave.load_structure(path))
    out: list[Any] = []
    for name in names:
        entry = entries[name]
        if entry.kind in (shardsave.tree.KIND_ARRAY, shardsave.tree.KIND_NUMPY) and entry.shape:
            spec = [axis if n % size == 0 else None for n, axis, size in zip(entry.shape, "ab", (4, 2))]
            sharding = NamedSharding(mesh, P(*spec))
            out.append(jax.ShapeDtypeStruct(entry.shape, entry.dtype, sharding=sharding))
        elif entry.kind == shardsave.tree.KIND_NUMPY_SCALAR:
            out.append(np.zeros((), entry.dtype)[()])
        else:  # host leaves: numbers, strings, 0-d numpy arrays
            host = {shardsave.tree.KIND_INT: 0, shardsave.tree.KIND_FLOAT: 0.0, shardsave.tree.KIND_STR: ""}
            out.append(host.get(entry.kind, np.zeros(entry.shape, entry.dtype)))
    return jax.tree_util.tree_unflatten(treedef, out), mesh


@pytest.mark.parametrize("version, checkpoint, step", OLD_CHECKPOINTS)
def test_old_orbax_checkpoints_restore_as_that_orbax_did_onto_another_mesh_and_capped(
    version, checkpoint, step
):
    path, expected, record = _old(version, checkpoint)
    _, _, index = open_checkpoint(path)
    assert index.source == "orbax" and index.global_step == step
    restored = shardsave.Saver().restore(path)
    assert _containers(restored) == record["structure"]  # optax's EmptyState: None, as Orbax stored it
    _types_are_orbaxs(restored, record)
    _assert_same(_numpy(restored), expected)
    target, _ = _onto_mesh(path)
    placed = shardsave.Saver().restore(path, target)
    _check_onto(placed, target, expected)
    assert len(placed["params"]["w"].addressable_shards) == 8
    capped = shardsave.Saver().restore(path, target, restore_sequentially=True, max_host_bytes=32 * MIB)
    _check_onto(capped, target, expected)


@pytest.mark.parametrize("version, checkpoint, step", OLD_CHECKPOINTS)
def test_old_orbax_checkpoints_verify_inspect_and_read_by_orbax_names(version, checkpoint, step):
    path, expected, _ = _old(version, checkpoint)
    with shardsave.CheckpointReader(path) as reader:
        assert reader.verify() == []
        assert reader.get("name") == expected["name"] == "old-orbax"
        assert reader.get("params.w", (slice(3, 11), 2)).tobytes() == expected["params/w"][3:11, 2].tobytes()
        assert np.asarray(reader.get("opt/0/mu/e")).tobytes() == expected["opt/0/mu/e"].tobytes()
    structure = shardsave.load_structure(path)
    assert structure["params"]["e"].dtype == jnp.bfloat16 and structure["params"]["w"].shape == (16, 8)
    assert structure["nested"]["empty"] == {} and structure["nested"]["none"] is None
    assert structure["opt"][1] is None and structure["opt"][2] is None
    out = io.StringIO()
    assert cli(["inspect", path], out=out) == 0
    assert "params/w" in out.getvalue() and "opt/0/nu/e" in out.getvalue()
    out = io.StringIO()
    assert cli(["verify", path], out=out) == 0 and out.getvalue().startswith("OK"), out.getvalue()


def test_each_step_of_an_old_manager_and_the_flax_step_folder_are_found():
    root = OLD / "orbax-0.3.5"
    # (a location, the step it names, the tree's own `step` leaf: the manager saved each
    # step's number there, flax's save the state's 7)
    for path, step, leaf in (
        (root / "manager", 2, 2),
        (root / "manager" / "1", 1, 1),
        (root / "manager" / "1" / "default", 1, 1),
        (root / "flax", 3, 7),
        (root / "flax" / "checkpoint_3", 3, 7),
        (OLD / "orbax-0.4.8" / "manager" / "1", 1, 1),
    ):
        assert claimed(str(path)), path
        assert open_checkpoint(str(path))[2].global_step == step, path
        assert shardsave.Saver().restore(str(path), {"step": np.zeros((), np.int64)})["step"] == leaf


@pytest.mark.parametrize("where", ["memory", "s3", "gcs"])
def test_old_orbax_checkpoints_restore_from_object_stores(where, request):
    if where == "memory":
        root = f"memory://{uuid.uuid4().hex}"
    elif where == "s3":
        root = f"s3://{s3_bucket(request.getfixturevalue('s3_env'))}/old"
    else:
        root = f"gs://{gcs_bucket(request.getfixturevalue('gcs_server'))}/old"
    for version, checkpoint, step in (("0.3.5", "manager", 2), ("0.3.5", "flax", 3), ("0.4.8", "manager", 2)):
        local, expected, _ = _old(version, checkpoint)
        path = f"{root}/{version}/{checkpoint}"
        # Orbax commits a folder on GCS by writing commit_success.txt into it; these Orbaxes
        # wrote them on a local disk, where a rename commits: the upload adds the marker.
        _upload(Path(local), path)
        if where == "gcs":
            store = open_store(path)
            for name in os.listdir(local):
                if name.isdigit() or name.startswith("checkpoint_"):
                    store.write(f"{name}/commit_success.txt", b"").result()
                    for item in os.listdir(Path(local, name)):  # and into each item of a step
                        if (Path(local, name, item) / "checkpoint").is_file():
                            store.write(f"{name}/{item}/commit_success.txt", b"").result()
        assert claimed(path) and open_checkpoint(path)[2].global_step == step
        target, _ = _onto_mesh(path)
        capped = shardsave.Saver().restore(path, target, restore_sequentially=True, max_host_bytes=32 * MIB)
        _check_onto(capped, target, expected)


def test_a_shardsave_or_tensorflow_directory_is_not_taken_for_an_old_orbax_item(tmp_path):
    # Their state file is called `checkpoint` too, as Orbax's msgpack file is.
    shardsave.Saver(async_save=False).save({"w": np.arange(4.0)}, str(tmp_path / "model"), global_step=1)
    assert (tmp_path / "checkpoint").is_file()
    (tmp_path / "notes").mkdir()  # a folder beside it, holding no zarr array
    assert not claimed(str(tmp_path))
    assert shardsave.Saver().restore(str(tmp_path / "model-1"))["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def _msgpack_copy(tmp_path: Path, checkpoint: str = "pytree") -> Path:
    item = tmp_path / "item"
    shutil.copytree(OLD / "orbax-0.3.5" / checkpoint / ("checkpoint_3" if checkpoint == "flax" else ""), item)
    return item


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[: len(raw) // 2], r"checkpoint is not Orbax's msgpack file: truncated"),
        (lambda raw: raw + b"\x00", r"checkpoint is not Orbax's msgpack file: 1 bytes after the end"),
        (lambda raw: b"\xc1" + raw[1:], r"checkpoint is not Orbax's msgpack file: byte 0 is 0xc1"),
        (lambda raw: b"\x92\x01\x02", r"checkpoint: the tree is a list, not a dict"),
        (
            lambda raw: raw.replace(b"PLACEHOLDER://params.w", b"PLACEHOLDER://params.v"),
            r"the leaf 'params.w' stands for 'PLACEHOLDER://params.v'",
        ),
        # an extension type Orbax's msgpack file does not use (a fixext 1 of code 9)
        (lambda raw: b"\x81\xa1x\xd4\x09\x00", r"the extension type 9"),
        # an array extension whose bytes do not fill its shape: ((4,), 'float32', 8 bytes)
        (
            lambda raw: b"\x81\xa1x\xc7\x15\x01" + b"\x93\x91\x04\xa7float32\xc4\x08" + bytes(8),
            r"an array of shape \[4\] and 8 bytes of float32",
        ),
    ],
)
def test_a_damaged_msgpack_file_is_refused_naming_it(tmp_path, damage, message):
    item = _msgpack_copy(tmp_path)
    (item / "checkpoint").write_bytes(damage((item / "checkpoint").read_bytes()))
    with pytest.raises(CorruptCheckpointError, match=message) as e:
        shardsave.Saver().restore(str(item))
    assert str(item / "checkpoint") in str(e.value)


def test_an_array_the_msgpack_file_lists_but_that_is_gone_is_refused_naming_it(tmp_path):
    item = _msgpack_copy(tmp_path)
    shutil.rmtree(item / "params.ids")
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint lists the array 'params.ids'") as e:
        shardsave.Saver().restore(str(item))
    assert str(item / "params.ids" / ".zarray") in str(e.value)
    item2 = tmp_path / "damaged-chunk"
    shutil.copytree(item, item2)
    shutil.copytree(OLD / "orbax-0.3.5" / "pytree" / "params.ids", item2 / "params.ids")
    _truncate(item2 / "params.w" / "1.2")
    with pytest.raises(CorruptCheckpointError) as e:
        shardsave.Saver().restore(str(item2))
    assert str(item2 / "params.w" / "1.2") in str(e.value)
    assert any("params.w" in p for p in shardsave.CheckpointReader(str(item2)).verify())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_msgpack_files_are_read_or_refused_with_a_shardsave_error(tmp_path_factory, data):
    checkpoint = data.draw(st.sampled_from(["pytree", "flax"]))
    item = _msgpack_copy(tmp_path_factory.mktemp("fuzz"), checkpoint)
    raw = bytearray((item / "checkpoint").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    (item / "checkpoint").write_bytes(bytes(raw[:cut]))
    with contextlib.suppress(ShardsaveError):  # refused: a shardsave error, never a raw exception
        shardsave.CheckpointReader(str(item)).verify()
