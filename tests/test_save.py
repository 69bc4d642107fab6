"""What a save puts on disk, when it is visible, and what happens when it fails."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import index_doc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
import shardsave._gc_pause
import shardsave.storage
from shardsave.errors import CheckpointExistsError, CheckpointNotFoundError, SaveFailedError
from shardsave.storage.testing import GatedWrites


def _data_files(directory, base):
    return sorted(f for f in os.listdir(directory) if f.startswith(base + ".data-"))


def test_one_data_file_per_device_and_replicas_written_once(tmp_path, mesh24):
    sharded = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh24, P("data", "model")))
    replicated = [jax.device_put(jnp.full((4, 4), float(i)), NamedSharding(mesh24, P())) for i in range(8)]
    tree = {"sharded": sharded, "replicated": replicated}
    path = shardsave.Saver(async_save=False).save(tree, str(tmp_path / "m"))
    files = _data_files(tmp_path, "m")
    assert files == [f"m.data-{k:05d}-of-00008" for k in range(8)]
    sizes = [os.path.getsize(tmp_path / f) for f in files]
    # Unique bytes only: the sharded array once, each replicated array once (not 8 times).
    assert sum(sizes) == 64 * 4 + 8 * 16 * 4
    # Replicas are balanced by bytes: every device writes 8 sharded elements and one replicated array.
    assert sizes == [(8 + 16) * 4] * 8
    index = index_doc.read(tmp_path / "m")
    assert [f["device_id"] for f in index["files"]] == list(range(8))
    # The replicated arrays' bytes are on disk as saved.
    leaf = next(entry for entry in index["leaves"] if entry["name"] == "replicated/3")
    ((file, offset, nbytes, _, _, _),) = leaf["shards"]
    raw = (tmp_path / files[file]).read_bytes()[offset : offset + nbytes]
    np.testing.assert_array_equal(np.frombuffer(raw, "<f4"), np.full(16, 3.0))
    assert shardsave.Saver().restore(path)["replicated"][3].sharding == replicated[3].sharding


def test_unsharded_writes_one_file(tmp_path, mesh24):
    tree = {"a": jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh24, P("data", "model"))), "b": np.ones(3)}
    path = shardsave.Saver(sharded=False, async_save=False).save(tree, str(tmp_path / "m"))
    assert _data_files(tmp_path, "m") == ["m.data-00000-of-00001"]
    np.testing.assert_array_equal(np.asarray(shardsave.Saver().restore(path)["a"]), np.ones((8, 8)))


def test_the_index_is_the_commit_marker(tmp_path):
    saver = shardsave.Saver(async_save=False)
    first = saver.save({"a": np.ones(4)}, str(tmp_path / "m"), global_step=1)
    second = saver.save({"a": np.ones(4)}, str(tmp_path / "m"), global_step=2)
    assert shardsave.latest_checkpoint(str(tmp_path)) == second
    os.remove(tmp_path / "m-2.index")
    with pytest.raises(CheckpointNotFoundError, match="never committed"):
        saver.restore(second)
    with pytest.raises(CheckpointNotFoundError):
        shardsave.load_structure(second)
    # The state file still names m-2, but no reader may see a prefix without its index.
    assert shardsave.latest_checkpoint(str(tmp_path)) == first


class _Gate:
    """Data writes held until release is set, to observe a save in flight."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.lifted = threading.Event()  # set: writes go through again


@pytest.fixture
def gate_writes():
    """gate_writes(fail=None): every store shardsave opens during the test holds data writes."""
    with contextlib.ExitStack() as stack:

        def make(fail: Exception | None = None) -> _Gate:
            gate = _Gate()
            stack.enter_context(
                shardsave.storage.wrapping_stores(
                    lambda store: GatedWrites(store, gate.started, gate.release, fail, gate.lifted)
                )
            )
            return gate

        yield make


@pytest.mark.parametrize("on_device", [False, True], ids=["host-snapshot", "device-snapshot"])
def test_async_save_returns_before_the_writes_and_copies_the_arrays(tmp_path, gate_writes, mesh24, on_device):
    gate = gate_writes()
    x = jax.device_put(jnp.arange(16.0).reshape(8, 2), NamedSharding(mesh24, P("data")))
    host = np.arange(4)
    saver = shardsave.Saver(snapshot_on_device=on_device)
    path = saver.save({"x": x, "host": host}, str(tmp_path / "m"), global_step=1)
    assert gate.started.wait(30)
    assert not (tmp_path / "m-1.index").exists()
    assert shardsave.latest_checkpoint(str(tmp_path)) is None
    x.delete()  # the caller may drop its arrays as soon as save() returns
    host[:] = -1  # ... and change its numpy arrays
    gate.release.set()
    saver.wait_until_finished()
    assert shardsave.latest_checkpoint(str(tmp_path)) == path
    restored = saver.restore(path)
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(16.0).reshape(8, 2))
    np.testing.assert_array_equal(restored["host"], np.arange(4))


def test_background_error_surfaces_from_the_next_call(tmp_path, gate_writes):
    saver = shardsave.Saver(max_to_keep=1)
    good = saver.save({"a": np.ones(3)}, str(tmp_path / "m"), global_step=1)
    saver.wait_until_finished()
    gate = gate_writes(fail=OSError(28, "No space left on device"))
    saver.save({"a": np.zeros(3)}, str(tmp_path / "m"), global_step=2)
    gate.release.set()
    with pytest.raises(SaveFailedError, match="m-2") as info:
        saver.wait_until_finished()
    assert isinstance(info.value.__cause__, OSError)
    # Nothing of the failed save is visible, and retention deleted nothing.
    assert shardsave.latest_checkpoint(str(tmp_path)) == good
    assert not _data_files(tmp_path, "m-2")
    np.testing.assert_array_equal(saver.restore(good)["a"], np.ones(3))
    # The error is reported once; the next save works.
    gate.lifted.set()
    third = saver.save({"a": np.full(3, 3.0)}, str(tmp_path / "m"), global_step=3)
    saver.wait_until_finished()
    assert shardsave.latest_checkpoint(str(tmp_path)) == third


def test_error_is_raised_by_the_next_save(tmp_path, gate_writes):
    saver = shardsave.Saver()
    gate = gate_writes(fail=RuntimeError("disk went away"))
    saver.save({"a": np.ones(3)}, str(tmp_path / "m"), global_step=1)
    gate.release.set()
    with pytest.raises(SaveFailedError, match="disk went away"):
        saver.save({"a": np.ones(3)}, str(tmp_path / "m"), global_step=2)


def test_sync_failure_leaves_state_and_old_checkpoints(tmp_path, gate_writes):
    saver = shardsave.Saver(async_save=False, max_to_keep=1)
    good = saver.save({"a": np.ones(3)}, str(tmp_path / "m"), global_step=1)
    state_before = (tmp_path / "checkpoint").read_bytes()
    gate = gate_writes(fail=OSError(28, "No space left on device"))
    gate.release.set()
    with pytest.raises(SaveFailedError, match="m-2") as info:
        saver.save({"a": np.ones(3)}, str(tmp_path / "m"), global_step=2)
    assert isinstance(info.value.__cause__, OSError)
    assert (tmp_path / "checkpoint").read_bytes() == state_before
    assert os.path.exists(tmp_path / "m-1.index") and shardsave.latest_checkpoint(str(tmp_path)) == good


def test_saving_over_a_committed_checkpoint_needs_overwrite(tmp_path):
    saver = shardsave.Saver(async_save=False)
    path = saver.save({"a": np.ones(3)}, str(tmp_path / "m"), global_step=5)
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        saver.save({"a": np.zeros(3)}, str(tmp_path / "m"), global_step=5)
    assert saver.save({"a": np.zeros(3)}, str(tmp_path / "m"), global_step=5, overwrite=True) == path
    np.testing.assert_array_equal(saver.restore(path)["a"], np.zeros(3))


def test_naming_and_empty_trees(tmp_path):
    saver = shardsave.Saver(async_save=False, pad_step_number=True)
    assert saver.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=np.int64(42)).endswith("m-00000042")
    with pytest.raises(ValueError, match="no leaves"):
        saver.save({}, str(tmp_path / "e"))
    assert shardsave.Saver(allow_empty=True).save({"x": None}, str(tmp_path / "e")) is None
    assert not any(f.startswith("e") for f in os.listdir(tmp_path))


def test_leftovers_of_an_uncommitted_save_are_cleaned_after_the_next_commit(tmp_path):
    (tmp_path / "m-1.data-00000-of-00002").write_bytes(b"partial")
    saver = shardsave.Saver(async_save=False)
    saver.save({"a": np.ones(3)}, str(tmp_path / "m"), global_step=2)
    assert not (tmp_path / "m-1.data-00000-of-00002").exists()
    assert (tmp_path / "m-2.index").exists()


def test_a_pending_async_save_is_finished_at_interpreter_exit(tmp_path):
    program = Path(__file__).parent / "programs" / "exit_during_save.py"
    done = subprocess.run(
        [sys.executable, str(program), str(tmp_path / "m")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "returned" in done.stdout, done.stderr[-3000:]
    assert shardsave.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-1")
    np.testing.assert_array_equal(shardsave.Saver().restore(str(tmp_path / "m-1"))["a"], np.arange(1000))


def test_a_bad_leaf_with_overwrite_leaves_the_old_checkpoint_committed(tmp_path):
    saver = shardsave.Saver(async_save=False)
    path = saver.save({"a": np.ones(3)}, str(tmp_path / "m"), global_step=1)
    with pytest.raises(TypeError, match="leaf 'b'"):
        saver.save({"a": np.ones(3), "b": object()}, str(tmp_path / "m"), global_step=1, overwrite=True)
    np.testing.assert_array_equal(saver.restore(path)["a"], np.ones(3))


def test_an_async_commit_leaves_the_training_threads_garbage_collector_running(tmp_path):
    """The collector is process-wide: the commit thread never pauses it, so a loop
    that trains while a save commits keeps collecting its reference cycles."""
    import gc
    import time

    import shardsave

    # Thousands of leaves: building and encoding their index takes the commit a while.
    tree = {f"layer{i}": np.full((4,), i, np.float32) for i in range(3000)}
    saver = shardsave.Saver(async_save=True)
    looked = paused = 0
    for step in range(3):
        path = saver.save(tree, str(tmp_path / "m"), global_step=step)
        deadline = time.monotonic() + 120
        while shardsave.latest_checkpoint(str(tmp_path)) != path:  # the commit is running
            looked += 1
            paused += not gc.isenabled()
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        saver.wait_until_finished()
    assert looked > 10 and paused == 0, (looked, paused)


def test_the_garbage_collector_is_paused_only_inside_shardsave(tmp_path):
    import gc

    import shardsave

    saver = shardsave.Saver(async_save=True)
    path = saver.save({"a": np.ones(4)}, str(tmp_path / "m"))
    saver.wait_until_finished()
    assert gc.isenabled()
    assert shardsave.Saver().restore(path)["a"].sum() == 4
    assert gc.isenabled()
    # Nested and concurrent users (the caller and the commit thread): enabled again
    # only when the last one leaves, and never if the user had it disabled.
    with shardsave._gc_pause.paused():
        with shardsave._gc_pause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        saver.save({"a": np.ones(4)}, str(tmp_path / "m"), global_step=2)
        saver.wait_until_finished()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(SaveFailedError):
        saver.save({"a": np.ones(4)}, "/proc/no-such-dir/m")
        saver.wait_until_finished()
    assert gc.isenabled()
