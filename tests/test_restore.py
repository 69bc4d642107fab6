"""Restore at scale: any mesh or device count, abstract and partial targets, reshape, cast."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_program
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
import shardsave.restore
from shardsave.errors import StructureMismatchError


def _mesh(shape, names=("a", "b")):
    n = int(np.prod(shape))
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names[: len(shape)])


def _value(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture
def saved(tmp_path, mesh24):
    values = {"w": _value((8, 16)), "v": _value((16,), 1), "r": _value((8, 8), 2), "s": _value((16, 8), 3)}
    tree = {
        "w": jax.device_put(values["w"], NamedSharding(mesh24, P("data", "model"))),
        "v": jax.device_put(values["v"], NamedSharding(mesh24, P("model"))),
        "r": jax.device_put(values["r"], NamedSharding(mesh24, P())),
        "s": jax.device_put(values["s"], jax.devices()[2]),
    }
    path = shardsave.Saver(async_save=False).save(tree, str(tmp_path / "m"), global_step=1)
    return path, values


TARGETS = {
    "4x2": ((4, 2), P("a", "b")),
    "4x2-transposed": ((4, 2), P("b", "a")),
    "1x8": ((1, 8), P("a", "b")),
    "8x1": ((8, 1), P("a", None)),
    "8-cols": ((8,), P(None, "a")),
    "replicated": ((2, 4), P()),
    "2-devices": ((2,), P("a")),
}


@pytest.mark.parametrize("name", TARGETS)
def test_reshard_onto_other_meshes_and_specs(saved, name):
    path, values = saved
    mesh_shape, spec = TARGETS[name]
    mesh = _mesh(mesh_shape)
    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, spec if v.ndim == 2 else P()))
        for k, v in values.items()
    }
    restored = shardsave.Saver().restore(path, target)
    for k, v in values.items():
        assert restored[k].sharding == target[k].sharding
        np.testing.assert_array_equal(np.asarray(restored[k]), v)
        for shard in restored[k].addressable_shards:  # every device holds exactly its box
            np.testing.assert_array_equal(np.asarray(shard.data), v[shard.index])


def test_single_device_and_replicated_into_sharded_and_back(saved):
    path, values = saved
    mesh = _mesh((2, 4))
    target = {
        "s": jax.ShapeDtypeStruct((16, 8), np.float32, sharding=NamedSharding(mesh, P("a", "b"))),
        "r": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=NamedSharding(mesh, P("b", "a"))),
        "w": jax.ShapeDtypeStruct(
            (8, 16), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[7])
        ),
    }
    restored = shardsave.Saver().restore(path, target)
    for k in target:
        np.testing.assert_array_equal(np.asarray(restored[k]), values[k])
    assert restored["w"].devices() == {jax.devices()[7]}


def test_odd_shapes(tmp_path, mesh24):
    # jax 0.10 refuses shardings that do not divide a dimension evenly (IndivisibleError),
    # so a 7x13 array lives replicated or on one device; it still moves between layouts.
    value = _value((7, 13))
    with pytest.raises(ValueError, match="evenly divide"):
        jax.device_put(value, NamedSharding(_mesh((4,)), P("a")))
    tree = {
        "odd": jax.device_put(value, NamedSharding(mesh24, P())),
        "odd_single": jax.device_put(value, jax.devices()[6]),
        "zero_d": jnp.float32(2.0),
        "empty": jnp.zeros((0, 8)),
    }
    path = shardsave.Saver(async_save=False).save(tree, str(tmp_path / "m"))
    other = _mesh((2, 4))
    target = {
        "odd": jax.ShapeDtypeStruct(
            (7, 13), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[1])
        ),
        "odd_single": jax.ShapeDtypeStruct((7, 13), np.float32, sharding=NamedSharding(other, P())),
        "zero_d": jax.ShapeDtypeStruct((), np.float32, sharding=NamedSharding(other, P())),
        "empty": jax.ShapeDtypeStruct((0, 8), np.float32, sharding=NamedSharding(other, P(None, "b"))),
    }
    restored = shardsave.Saver().restore(path, target)
    np.testing.assert_array_equal(np.asarray(restored["odd"]), value)
    np.testing.assert_array_equal(np.asarray(restored["odd_single"]), value)
    assert float(restored["zero_d"]) == 2.0 and restored["empty"].shape == (0, 8)


def test_partial_restore_reads_only_its_leaves(saved, io_stats):
    path, values = saved
    restored = shardsave.Saver().restore(path, {"v": np.zeros(16, np.float32)})
    np.testing.assert_array_equal(restored["v"], values["v"])
    assert io_stats.bytes_read - _index_bytes(path) == values["v"].nbytes


def _index_bytes(path):
    with open(path + ".index", "rb") as f:
        return len(f.read())


def test_same_layout_reads_each_byte_once(saved, io_stats, mesh24):
    path, values = saved
    shardsave.Saver().restore(path)
    stored = sum(v.nbytes for v in values.values())
    assert io_stats.bytes_read - _index_bytes(path) == stored


def test_last_restore_reports_where_the_time_went(saved):
    path, values = saved
    saver = shardsave.Saver()
    assert saver.last_restore is None
    saver.restore(path, {"v": np.zeros(16, np.float32), "w": np.zeros((8, 16), np.float32)})
    info = saver.last_restore
    assert info.path == path and info.nbytes == values["v"].nbytes + values["w"].nbytes
    parts = (info.index_seconds, info.plan_seconds, info.place_seconds)
    assert all(p >= 0 for p in parts) and sum(parts) <= info.seconds
    saver.restore(path)
    assert saver.last_restore.nbytes == sum(v.nbytes for v in values.values())
    assert saver.last_restore.place_seconds > 0


def test_missing_leaves_are_listed_with_close_names(saved):
    path, _ = saved
    with pytest.raises(StructureMismatchError) as info:
        shardsave.Saver().restore(path, {"w_": np.zeros((8, 16), np.float32), "vv": np.zeros(16, np.float32)})
    message = str(info.value)
    assert (
        "2 leaves are not in checkpoint" in message and "'w_'" in message and "closest saved: 'w'" in message
    )
    assert "'vv'" in message and "'v'" in message


def test_shape_dtype_reshape_and_cast(saved):
    path, values = saved
    saver = shardsave.Saver()
    with pytest.raises(StructureMismatchError, match=r"leaf 'w'.*\(8, 16\).*\(16, 8\).*reshape=True"):
        saver.restore(path, {"w": np.zeros((16, 8), np.float32)})
    with pytest.raises(StructureMismatchError, match=r"leaf 'w'.*\(8, 16\).*\(3, 3\)"):
        saver.restore(path, {"w": np.zeros((3, 3), np.float32)})
    mesh = _mesh((2, 4))
    reshaped = saver.restore(
        path,
        {"w": jax.ShapeDtypeStruct((16, 8), np.float32, sharding=NamedSharding(mesh, P("b")))},
        reshape=True,
    )
    np.testing.assert_array_equal(np.asarray(reshaped["w"]), values["w"].reshape(16, 8))
    assert shardsave.Saver(reshape=True).restore(path, {"v": np.zeros((4, 4), np.float32)})["v"].shape == (
        4,
        4,
    )
    with pytest.raises(StructureMismatchError, match=r"leaf 'v'.*float32.*bfloat16.*cast=True"):
        saver.restore(path, {"v": jnp.zeros(16, jnp.bfloat16)})
    cast = saver.restore(path, {"v": jnp.zeros(16, jnp.bfloat16)}, cast=True)
    assert cast["v"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(cast["v"]), values["v"].astype(jnp.bfloat16))


def test_load_structure_restores_without_the_model(saved):
    path, values = saved
    structure = shardsave.load_structure(path)
    assert {k: (v.shape, v.dtype) for k, v in structure.items()} == {
        k: (v.shape, v.dtype) for k, v in values.items()
    }
    restored = shardsave.Saver().restore(path, structure)
    np.testing.assert_array_equal(np.asarray(restored["w"]), values["w"])


OTHER_DEVICES = Path(__file__).parent / "programs" / "other_devices.py"


@pytest.mark.parametrize("devices", [4, 2, 1])
def test_restore_onto_fewer_devices(saved, tmp_path, devices):
    path, values = saved
    out = tmp_path / "out.npz"
    lines = run_program([str(OTHER_DEVICES), "restore", path, str(out)], devices=devices).splitlines()
    has_sharding = json.loads(lines[0])
    assert has_sharding["s"] == (devices > 2)  # saved on device 2
    assert lines[1].startswith("error:" if devices < 8 else "no error")
    with np.load(out) as restored:
        for k, v in values.items():
            np.testing.assert_array_equal(restored[k], v)


def test_restore_from_one_device_onto_eight(tmp_path):
    path = str(tmp_path / "one")
    run_program([str(OTHER_DEVICES), "save-one", path], devices=1)
    # Saved on device 0 of a 1-device process; device 0 exists here too.
    assert shardsave.Saver().restore(path)["x"].devices() == {jax.devices()[0]}
    target = {
        "x": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=NamedSharding(_mesh((2, 4)), P("a", "b")))
    }
    restored = shardsave.Saver().restore(path, target)
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(64, dtype=np.float32).reshape(8, 8))


class _Reads(shardsave.restore.RestoreObserver):
    """Records every group of reads a restore starts, and whether it was streamed."""

    def __init__(self):
        self.calls = []

    def on_read(self, reads, streamed):
        self.calls.append((reads, streamed))


def test_on_accelerators_a_default_restore_streams_large_shards_in_blocks(tmp_path, io_stats, engine_restore):
    """A shard larger than half a batch is streamed into its device buffer, in blocks,
    so each block's copy to the device overlaps the next reads. CI has no accelerator:
    the CPU devices are taken for accelerators here (the path is the same jax calls)."""
    import shardsave
    from shardsave.restore import Placement

    value = _value((4096, 4096))  # 64 MiB: over half the default batch of a 64 MiB restore
    sharding = NamedSharding(_mesh((2,), ("a",)), P("a"))
    saver = shardsave.Saver(async_save=False)
    path = saver.save({"w": jax.device_put(value, sharding)}, str(tmp_path / "big"))
    target = {"w": jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)}
    observer = _Reads()
    io_stats.reset()
    restored = engine_restore(path, target, placement=Placement.ACCELERATOR, observer=observer)
    np.testing.assert_array_equal(np.asarray(restored["w"]), value)
    assert restored["w"].sharding == sharding
    assert io_stats.bytes_read - _index_bytes(path) == value.nbytes  # each byte read once
    blocks = [read.nbytes for reads, _ in observer.calls for read in reads]
    # Streamed: CPU devices (Placement.BY_PLATFORM) read the same blocks in batches.
    assert all(streamed for _, streamed in observer.calls)
    assert (
        len(blocks) == 4 and max(blocks) <= shardsave.restore.MAX_SPAN_BYTES
    )  # 32 MiB shards in 16 MiB blocks


class _Placements(shardsave.restore.RestoreObserver):
    """Records the leaves placed over several batches, and whether each landing read
    its rows into place."""

    def __init__(self):
        self.split, self.landed = set(), []

    def on_place(self, request, last):
        if not last:
            self.split.add(request.entry.name)

    def on_land(self, read, in_place):
        self.landed.append(in_place)


@pytest.mark.parametrize("store", ["local", "memory"])
def test_a_capped_restore_places_leaves_split_over_batches_exactly(
    tmp_path, mesh24, io_stats, engine_restore, store
):
    """Leaves larger than the one batch a 32 MiB cap holds, resharded onto 4x2, one of them
    cast and one streamed whole: every device holds exactly its box. Reads of whole rows
    of a box land in it directly from local files; other stores hand back their own
    buffers, which are copied."""
    import shardsave

    values = {
        "a": _value((3072, 4096)),  # 48 MiB: its target boxes span two batches
        "b": _value((4096, 3072), 1),
        "cast": _value((2048, 4096), 2),  # 32 MiB to read, and its boxes to assemble
        "stacked": _value((2048, 2048), 4),  # each target box is two stored shards, stacked
        "replicated": _value((3072, 4096), 3),  # one 48 MiB box, larger than a batch: streamed
    }
    specs = {
        "a": P("data", "model"),
        "b": P("model"),
        "cast": P(None, "model"),
        "stacked": P("model"),
        "replicated": P("data"),
    }
    tree = {k: jax.device_put(v, NamedSharding(mesh24, specs[k])) for k, v in values.items()}
    saver = shardsave.Saver(async_save=False)
    path = saver.save(tree, str(tmp_path / "m") if store == "local" else f"memory://{tmp_path}/m")
    del tree
    other = _mesh((4, 2))
    target = {
        "a": jax.ShapeDtypeStruct((3072, 4096), np.float32, sharding=NamedSharding(other, P("a", "b"))),
        "b": jax.ShapeDtypeStruct((4096, 3072), np.float32, sharding=NamedSharding(other, P("b", "a"))),
        "cast": jax.ShapeDtypeStruct((2048, 4096), jnp.bfloat16, sharding=NamedSharding(other, P("a"))),
        "stacked": jax.ShapeDtypeStruct((2048, 2048), np.float32, sharding=NamedSharding(other, P("b"))),
        "replicated": jax.ShapeDtypeStruct((3072, 4096), np.float32, sharding=NamedSharding(other, P())),
    }
    observer = _Placements()
    io_stats.reset()
    restored = engine_restore(
        path, target, restore_sequentially=True, max_host_bytes=32 << 20, cast=True, observer=observer
    )
    split, landed = observer.split, observer.landed
    assert {"a", "b", "cast"} <= split  # the path under test: leaves placed over several batches
    if store == "local":
        # "stacked": 2 reads into each of 2 boxes; "replicated": 6 streamed reads of 8 MiB.
        assert sum(landed) == 10
        # Only a checksum chunk that boxes in two batches share is read twice.
        stored = sum(v.nbytes for v in values.values())
        assert stored <= io_stats.bytes_read - _index_bytes(path) <= stored * 1.1
    else:
        assert landed and not any(landed)
    for k, v in values.items():
        expected = v.astype(jnp.bfloat16) if k == "cast" else v
        assert restored[k].sharding == target[k].sharding and restored[k].dtype == expected.dtype
        for shard in restored[k].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
