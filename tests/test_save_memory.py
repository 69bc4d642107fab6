"""Host memory of saves: under a cap (Saver(save_host_bytes=...)), what they hold and
write; uncapped, the staging that Saver.prepare makes ahead of the first save.

Memory is measured in fresh processes (tests/programs/measure_save.py): peak RSS
during the save minus RSS before the Saver was made, the state's arrays alive
throughout (on CPU they are host memory: counted out that way).
"""

from __future__ import annotations

import json
from pathlib import Path

import index_doc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_program, s3_bucket
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
from shardsave.errors import SaveFailedError
from shardsave.formats.shardsave import CRC_CHUNK_BYTES
from shardsave.index import shard_checksums
from shardsave.save.stream import ShardChecksums, device_range, piece_bytes
from shardsave.storage.testing import FullDisk

MIB = 1 << 20

MEASURE = Path(__file__).parent / "programs" / "measure_save.py"


def _measure(location, total_mib, layout, cap_mib, modes="sync,async", timeout=900):
    out = run_program(
        [str(MEASURE), str(location), str(total_mib), layout, str(cap_mib), modes], timeout=timeout
    )
    result = json.loads(out.strip().splitlines()[-1])
    print(result)  # blocking and save-to-commit times, for the log
    return result


def _within_cap(result, cap_mib):
    assert result["ok"], "a leaf did not restore bit-exact"
    for mode, m in result["modes"].items():
        bound = (cap_mib + 64) * MIB
        assert m["peak"] < bound, f"{mode}: held {m['peak'] / MIB:.0f} MiB, more than cap + 64 MiB"
        # Between saves the Saver keeps its buffers, and nothing more.
        assert m["kept"] < bound, f"{mode}: kept {m['kept'] / MIB:.0f} MiB after the save"


def test_an_8_gib_state_saves_within_512_mib_locally(tmp_path):
    # 16 leaves over the 8 devices and one leaf of 1 GiB on one device (twice the cap).
    _within_cap(_measure(tmp_path, 8192, "sharded", 512), 512)


def test_an_8_gib_state_saves_within_512_mib_to_s3(s3_env):
    # Async only: a sync save streams the same way and differs only in where the commit
    # runs (the local test has both); moto takes about a minute per 8 GiB here.
    location = f"s3://{s3_bucket(s3_env)}/run"
    _within_cap(_measure(location, 8192, "sharded", 512, modes="async"), 512)


def test_1024_small_leaves_save_within_the_cap(tmp_path):
    _within_cap(_measure(tmp_path, 256, "small", 32), 32)


def _tree():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    rng = np.random.default_rng(5)
    return {
        "sharded": jax.device_put(
            rng.standard_normal((512, 1030), np.float32), NamedSharding(mesh, P("x", "y"))
        ),
        # 20 MiB as one shard on one device: larger than an 8 MiB cap, streamed in pieces
        "big": jax.device_put(rng.standard_normal((5, 1 << 20), np.float32), jax.devices()[3]),
        "bf16": jax.device_put(
            rng.standard_normal((77, 130)).astype(jnp.bfloat16), NamedSharding(mesh, P(None, "y"))
        ),
        "replicated": jax.device_put(np.arange(3000, dtype=np.int32), NamedSharding(mesh, P())),
        "host": rng.integers(0, 100, (1000, 33)),
        "scalar": 3.5,
        "small": [jnp.arange(i + 1, dtype=jnp.int8) for i in range(30)],
    }


def _assert_same(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("async_save", [False, True])
def test_a_capped_save_restores_bit_exact_and_stores_parts_of_one_buffer(tmp_path, async_save):
    tree = _tree()
    cap = 8 * MIB
    with shardsave.Saver(save_host_bytes=cap, async_save=async_save) as saver:
        path = saver.save(tree, str(tmp_path / "model"), global_step=1)
        saver.wait_until_finished()
        shardsave.CheckpointReader(path).verify()
        _assert_same(tree, saver.restore(path, tree))
    index = index_doc.read(tmp_path / "model-1")
    piece = piece_bytes(cap)
    for f in index["files"]:
        if f["nbytes"] > piece:  # parts of one buffer each, the last one the rest
            assert f["parts"][:-1] == [piece] * (len(f["parts"]) - 1) and f["parts"][-1] <= piece
        else:
            assert "parts" not in f
    assert any(f["nbytes"] > piece for f in index["files"])


def test_a_capped_save_writes_what_an_uncapped_one_writes(tmp_path):
    # The same bytes at the same offsets, with the same checksums: only the parts differ.
    tree = _tree()
    capped = shardsave.Saver(save_host_bytes=8 * MIB, async_save=False).save(tree, str(tmp_path / "a"))
    plain = shardsave.Saver(async_save=False).save(tree, str(tmp_path / "b"))
    a, b = index_doc.read(tmp_path / "a"), index_doc.read(tmp_path / "b")
    assert a["leaves"] == b["leaves"]
    assert [f["nbytes"] for f in a["files"]] == [f["nbytes"] for f in b["files"]]
    for k in range(len(a["files"])):
        name = f"data-{k:05d}-of-{len(a['files']):05d}"
        whole = (tmp_path / f"b.{name}").read_bytes()
        parts = sorted(tmp_path.glob(f"a.{name}.part-*")) or [tmp_path / f"a.{name}"]
        assert b"".join(p.read_bytes() for p in parts) == whole
    assert capped and plain


def test_checksums_fed_piece_by_piece_equal_those_of_the_whole_shard():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 3 * CRC_CHUNK_BYTES + 12345, dtype=np.uint8)
    expected = shard_checksums(data, 0, data.size, CRC_CHUNK_BYTES)
    for cuts in ([], [1], [CRC_CHUNK_BYTES], [7, CRC_CHUNK_BYTES + 3, 2 * CRC_CHUNK_BYTES + 100]):
        sums = ShardChecksums(CRC_CHUNK_BYTES)
        for a, b in zip([0, *cuts], [*cuts, data.size]):
            sums.feed(data[a:b])
        assert sums.result() == expected
    assert ShardChecksums(CRC_CHUNK_BYTES).result() == shard_checksums(data, 0, 0, CRC_CHUNK_BYTES)


def test_a_range_of_a_device_array_is_sliced_on_the_device():
    # The path accelerators take for a shard larger than a piece (run here on a CPU device).
    x = jax.device_put(np.arange(6 * 1000, dtype=np.float32).reshape(6, 1000), jax.devices()[1])
    raw = np.asarray(x).reshape(-1).view(np.uint8)
    for a, b in [(0, 4000), (4000, 24000), (12, 16), (0, raw.size)]:
        np.testing.assert_array_equal(device_range(x, a, b), raw[a:b])
    with pytest.raises(ValueError, match="does not fall on float32 elements"):
        device_range(x, 2, 8)


def test_a_capped_overwrite_replaces_the_checkpoint_whole(tmp_path):
    tree = _tree()
    doubled = jax.tree.map(lambda x: x * 2, tree)
    saver = shardsave.Saver(save_host_bytes=8 * MIB, async_save=False)
    path = saver.save(tree, str(tmp_path / "m"), global_step=1)
    saver.save(doubled, str(tmp_path / "m"), global_step=1, overwrite=True)
    _assert_same(doubled, saver.restore(path, tree))
    shardsave.CheckpointReader(path).verify()


def test_a_capped_save_that_fails_midway_leaves_nothing_behind(tmp_path):
    tree = _tree()
    saver = shardsave.Saver(save_host_bytes=8 * MIB, async_save=False)
    before = saver.save(tree, str(tmp_path / "m"), global_step=1)
    written_once = sum(p.stat().st_size for p in tmp_path.glob("m-1.data*"))
    budget = [written_once // 2]
    full = shardsave.storage.wrapping_stores(lambda store: FullDisk(store, budget))
    with full, pytest.raises(SaveFailedError, match="No space left on device"):
        saver.save(tree, str(tmp_path / "m"), global_step=2)
    assert not list(tmp_path.glob("m-2*"))
    assert shardsave.latest_checkpoint(str(tmp_path)) == before
    _assert_same(tree, saver.restore(before, tree))


def test_save_host_bytes_below_8_mib_is_refused():
    with pytest.raises(ValueError, match="save_host_bytes must be None or at least 8 MiB"):
        shardsave.Saver(save_host_bytes=1 << 20)


def test_prepare_makes_the_first_saves_memory_ahead_of_it(tmp_path):
    import time

    import psutil

    proc = psutil.Process()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    state = {
        "w": jax.device_put(
            np.arange(48 << 20, dtype=np.float32).reshape(1024, -1), NamedSharding(mesh, P("x"))
        ),
        "b": np.arange(10),
    }
    saver = shardsave.Saver(async_save=True)
    before = proc.memory_info().rss
    saver.prepare(state)
    deadline = time.monotonic() + 60
    while proc.memory_info().rss - before < 180 * MIB:  # 192 MiB of staging, faulted in
        assert time.monotonic() < deadline, "prepare() made no staging memory"
        time.sleep(0.05)
    time.sleep(0.5)
    prepared = proc.memory_info().rss
    path = saver.save(state, str(tmp_path / "m"), global_step=1)
    saver.wait_until_finished()
    assert proc.memory_info().rss - prepared < 32 * MIB  # the save used what prepare() made
    _assert_same(state, saver.restore(path, state))
    # A tree of another layout gets staging of its own; the prepared one goes.
    other = {"w": state["w"][:512], "b": state["b"]}
    saver.save(other, str(tmp_path / "m"), global_step=2)
    saver.wait_until_finished()
    _assert_same(other, saver.restore(str(tmp_path / "m-2"), other))
    saver.close()
