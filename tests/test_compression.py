"""Saver(compression="zstd"): each checksum chunk a zstd frame, checksummed as stored.

The states are real ones (optax.adamw, whose moments start as zeros); the stores
are the local disk, memory://, and real S3 and GCS protocol servers on loopback.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import gcs_bucket, s3_bucket
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
from shardsave.errors import CorruptCheckpointError

CHUNK = 4 << 20  # the writer's checksum chunk: one zstd frame each


def _adamw_state(mesh: Mesh, steps: int) -> dict:
    """A model's params and its optax.adamw state after `steps` real updates."""
    rows = NamedSharding(mesh, P("data", "model"))
    params = {
        "embed": jax.device_put(np.random.default_rng(0).standard_normal((2048, 1024), np.float32), rows),
        "dense": {
            "w": jax.device_put(np.random.default_rng(1).standard_normal((1024, 512), np.float32), rows)
        },
        "bias": jnp.zeros((512,), jnp.float32),
    }
    opt = optax.adamw(1e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.tree.map(lambda p: jnp.sin(p) * 0.1, params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return {"params": params, "opt": state, "step": steps}


def _location(kind: str, tmp_path: Path, request) -> str:
    if kind == "local":
        return str(tmp_path / "ckpt")
    if kind == "memory":
        return f"memory://compressed-{tmp_path.name}"
    if kind == "s3":
        request.getfixturevalue("s3_env")
        return f"s3://{s3_bucket(request.getfixturevalue('s3_server'))}/run"
    endpoint = request.getfixturevalue("gcs_server")
    request.getfixturevalue("monkeypatch").setenv("TENSORSTORE_GCS_HTTP_URL", endpoint)
    return f"gs://{gcs_bucket(endpoint)}/run"


def _equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _stored_bytes(path: str) -> int:
    """The sizes of a checkpoint's data files, as its index records them."""
    directory, base = path.rsplit("/", 1)
    raw = shardsave.storage.open_store(directory).read_all(base + ".index")
    assert raw is not None
    return sum(f["nbytes"] for f in json.loads(raw)["index"]["files"])


@pytest.mark.parametrize("kind", ["local", "memory", "s3", "gcs"])
def test_a_compressed_adamw_state_restores_bit_exact_onto_another_mesh_and_capped(
    kind, tmp_path, request, mesh24
):
    state = _adamw_state(mesh24, steps=0)
    where = _location(kind, tmp_path, request)
    saver = shardsave.Saver(compression="zstd")
    path = saver.save(state, f"{where}/model", global_step=0)
    saver.wait_until_finished()
    with shardsave.CheckpointReader(path) as reader:
        raw_bytes = sum(v.nbytes for v in reader.variables())
        assert reader.verify() == []
    # The moments are zeros: they compress to almost nothing; the params barely.
    stored = _stored_bytes(path)
    params = 2048 * 1024 * 4 + 1024 * 512 * 4 + 512 * 4
    assert stored < params * 1.01 and stored < raw_bytes / 2.5, (stored, raw_bytes)
    other = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    target = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(other, P("model", "data")))
            if isinstance(x, jax.Array) and x.ndim == 2
            else x
        ),
        state,
    )
    _equal(shardsave.Saver().restore(path, target), state)
    capped = shardsave.Saver(restore_sequentially=True, max_host_bytes=32 << 20)
    _equal(capped.restore(path, target), state)


def test_a_trained_state_restores_bit_exact_and_its_moments_compress_less(tmp_path, mesh24):
    state = _adamw_state(mesh24, steps=3)
    path = shardsave.Saver(compression=3, async_save=False).save(state, str(tmp_path / "m"), global_step=3)
    _equal(shardsave.Saver().restore(path, state), state)
    assert shardsave.CheckpointReader(path).verify() == []
    index = json.loads((tmp_path / "m-3.index").read_bytes())
    assert index["format_version"] == 3 and index["index"]["compression"] == "zstd"


def test_a_ranged_read_fetches_only_the_frames_it_needs(tmp_path, io_stats):
    """Rows inside the fourth 4 MiB chunk of a 32 MiB array: one frame is read."""
    value = np.random.default_rng(2).standard_normal((8192, 1024), np.float32)  # 32 MiB, 8 frames
    path = shardsave.Saver(compression="zstd", async_save=False).save({"x": value}, str(tmp_path / "m"))
    index = json.loads((tmp_path / "m.index").read_bytes())
    ((_, _, nbytes, _, _, crcs, frames),) = index["index"]["leaves"][0]["shards"]
    assert nbytes == value.nbytes and len(frames) == len(crcs) == 8
    index_size = (tmp_path / "m.index").stat().st_size
    io_stats.reset()
    with shardsave.CheckpointReader(path) as reader:
        rows = reader.get("x", np.s_[3 * 1024 + 5 : 3 * 1024 + 9])  # rows of chunk 3 (1024 rows a chunk)
    np.testing.assert_array_equal(rows, value[3 * 1024 + 5 : 3 * 1024 + 9])
    assert io_stats.bytes_read == index_size + frames[3], (io_stats.bytes_read, frames)


def _frame_at(tmp_path: Path, name: str, j: int) -> tuple[Path, int, int]:
    index = json.loads((tmp_path / f"{name}.index").read_bytes())["index"]
    ((file, offset, _, _, _, _, frames),) = index["leaves"][0]["shards"]
    return (
        tmp_path / f"{name}.data-{file:05d}-of-{len(index['files']):05d}",
        offset + sum(frames[:j]),
        frames[j],
    )


def test_a_damaged_frame_is_refused_naming_the_file_and_leaf_and_verify_lists_it(tmp_path):
    value = np.random.default_rng(3).standard_normal((4096, 1024), np.float32)  # 4 frames
    path = shardsave.Saver(compression="zstd", async_save=False).save({"x": value}, str(tmp_path / "m"))
    data, at, size = _frame_at(tmp_path, "m", 2)
    raw = bytearray(data.read_bytes())
    raw[at + size // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=r"m\.data-00000-of-00001 \(leaf 'x'\): crc32c mismatch"):
        shardsave.Saver().restore(path, {"x": np.zeros_like(value)})
    (problem,) = shardsave.CheckpointReader(path).verify()
    assert "'x'" in problem and "crc32c mismatch" in problem
    # The frames before it are sound, and a read of them alone succeeds.
    np.testing.assert_array_equal(shardsave.CheckpointReader(path).get("x", np.s_[:10]), value[:10])
    data.write_bytes(bytes(raw[: at + size // 2]))  # truncated inside frame 2
    with pytest.raises(CorruptCheckpointError, match=r"truncated"):
        shardsave.Saver().restore(path, {"x": np.zeros_like(value)})


def test_an_uncompressed_save_still_writes_version_2(tmp_path):
    shardsave.Saver(async_save=False).save({"x": np.ones(3)}, str(tmp_path / "m"))
    assert json.loads((tmp_path / "m.index").read_bytes())["format_version"] == 2


@pytest.mark.parametrize(
    "options, message",
    [
        ({"compression": "lz4"}, 'compression must be None, "zstd" or a zstd level'),
        ({"compression": 0}, "zstd level 1..22"),
        ({"compression": "zstd", "save_host_bytes": 64 << 20}, "not supported"),
    ],
)
def test_compression_options_that_cannot_be_honoured_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        shardsave.Saver(**options)


def test_a_compressed_checkpoint_in_parts_restores(tmp_path, mesh24):
    """A data file of several objects: frames may cross a part's end."""
    value = np.random.default_rng(4).standard_normal((4096, 512), np.float32)
    tree = {"x": value, "z": np.zeros((2048, 1024), np.float32)}
    saver = shardsave.Saver(compression="zstd", async_save=False, sharded=False, part_bytes=1 << 20)
    path = saver.save(tree, str(tmp_path / "m"))
    assert (tmp_path / "m.data-00000-of-00001.part-00001").exists()
    _equal(shardsave.Saver().restore(path, tree), tree)
    assert shardsave.CheckpointReader(path).verify() == []


def test_the_command_line_verifies_every_frame_of_a_compressed_checkpoint(tmp_path):
    import contextlib
    import io

    from shardsave.cli import main

    value = np.random.default_rng(5).standard_normal((2048, 1024), np.float32)  # 2 frames
    path = shardsave.Saver(compression="zstd", async_save=False).save({"x": value}, str(tmp_path / "m"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["verify", path]) == 0
    assert "lengths and crc32c sound" in out.getvalue()
    data, at, _ = _frame_at(tmp_path, "m", 1)
    raw = bytearray(data.read_bytes())
    raw[at + 3] ^= 0x01
    data.write_bytes(bytes(raw))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["verify", path]) != 0
    assert "BAD" in out.getvalue() and "crc32c mismatch" in out.getvalue()
