"""Nothing lost, nothing unrestorable: one test per case of the data-safety issue.

Each test names the case it holds shardsave to; every one of them failed before
the fix (commits that could not be read, other Savers' checkpoints deleted, an
overwrite that lost both checkpoints, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import index_doc
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
import shardsave.storage
from shardsave.cli import main
from shardsave.errors import (
    CheckpointNotFoundError,
    ConcurrentSaveError,
    CorruptCheckpointError,
    SaveFailedError,
    StateFileWarning,
    StructureMismatchError,
)
from shardsave.storage.testing import BeforeFirstRead


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _committed(directory: Path) -> list[str]:
    return sorted(p.name[: -len(".index")] for p in directory.glob("*.index"))


def _cli(*argv: str) -> tuple[int, str]:
    import io

    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


# ---------------------------------------------------------------- 1, 2: what the writer commits, its reader reads


def test_1_empty_nodes_round_trip_and_retention_keeps_a_restorable_latest(tmp_path):
    tree = {"a": jnp.ones(3), "e": {}, "t": (), "l": [], "opt": optax.EmptyState(), "deep": {"x": [{}]}}
    saver = shardsave.Saver(max_to_keep=2, async_save=False)
    for step in (1, 2, 3):
        saver.save(tree, str(tmp_path / "m"), global_step=step)
    latest = shardsave.latest_checkpoint(str(tmp_path))
    assert latest == str(tmp_path / "m-3") and _committed(tmp_path) == ["m-2", "m-3"]
    restored = saver.restore(latest)  # no target: containers come back as themselves, nodes as dicts
    assert restored["e"] == {} and restored["t"] == () and restored["l"] == [] and restored["opt"] == {}
    assert restored["deep"] == {"x": [{}]}
    with_target = saver.restore(latest, tree)
    assert isinstance(with_target["opt"], optax.EmptyState)
    np.testing.assert_array_equal(np.asarray(with_target["a"]), np.ones(3))
    assert _cli("inspect", latest)[0] == 0 and _cli("verify", latest)[0] == 0
    assert [v.name for v in shardsave.CheckpointReader(latest).variables()] == ["a"]


def test_1_an_optax_adam_state_is_restorable(tmp_path):
    params = {"w": jnp.arange(4.0)}
    state = {"params": params, "opt": optax.adam(1e-3).init(params)}
    path = shardsave.Saver(async_save=False).save(state, str(tmp_path / "m"))
    restored = shardsave.Saver().restore(path, jax.eval_shape(lambda: state))
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)


def test_2_a_bare_array_is_a_tree(tmp_path):
    path = shardsave.Saver(async_save=False).save(jnp.arange(5), str(tmp_path / "m"))
    np.testing.assert_array_equal(np.asarray(shardsave.Saver().restore(path)), np.arange(5))
    np.testing.assert_array_equal(
        np.asarray(shardsave.Saver().restore(path, jnp.zeros(5, jnp.int32))), np.arange(5)
    )
    assert shardsave.CheckpointReader(path).get("").tolist() == list(range(5))


def test_2_a_step_the_index_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    saver = shardsave.Saver(async_save=False)
    with pytest.raises(ValueError, match="outside what the index holds"):
        saver.save({"a": np.ones(1)}, str(tmp_path / "d" / "m"), global_step=2**62 + 1)
    assert not (tmp_path / "d").exists()
    path = saver.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=-(2**62))
    assert shardsave.CheckpointReader(path).global_step == -(2**62)


@pytest.mark.parametrize("async_save", [False, True])
def test_2_an_index_the_reader_would_refuse_is_never_committed_and_its_data_files_go(tmp_path, async_save):
    # A NUL in a key is a name the reader refuses; the writer checks its index with the
    # reader's validation (while the data writes are still in flight) and commits nothing.
    saver = shardsave.Saver(async_save=async_save, max_to_keep=None)
    good = saver.save({"a": jnp.ones(8)}, str(tmp_path / "m"), global_step=1)
    saver.wait_until_finished()
    with pytest.raises(SaveFailedError, match=r"m-2\.index.*its own reader refuses.*without NUL"):
        saver.save({"a\0b": jnp.ones((64, 1024))}, str(tmp_path / "m"), global_step=2)
        saver.wait_until_finished()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("m-2"))
    assert left == [], left  # neither an index nor a data file of the refused save
    assert shardsave.latest_checkpoint(str(tmp_path)) == good
    np.testing.assert_array_equal(saver.restore(good)["a"], np.ones(8))


# Arbitrary pytrees: every container jax flattens, empty ones at any depth, bare leaves.
class _Pair(tuple):  # a namedtuple made by hand keeps hypothesis' strategy small
    pass


from collections import namedtuple  # noqa: E402
from dataclasses import dataclass  # noqa: E402

Point = namedtuple("Point", ["x", "y"])


@jax.tree_util.register_dataclass
@dataclass
class Box:
    lo: object
    hi: object


_leaves = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, width=32),
    st.booleans(),
    st.builds(
        lambda n, d: np.arange(n, dtype=d),
        st.integers(0, 6),
        st.sampled_from([np.float32, np.int8, np.uint64]),
    ),
    st.builds(lambda n: jnp.arange(n, dtype=jnp.bfloat16), st.integers(0, 4)),
    st.builds(lambda seed: jax.random.key(seed), st.integers(0, 100)),
)
_trees = st.recursive(
    _leaves | st.none(),
    lambda children: st.one_of(
        st.dictionaries(st.text("abcxyz", min_size=1, max_size=3), children, max_size=3),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.builds(Point, children, children),
        st.builds(Box, children, children),
    ),
    max_leaves=8,
)


def _same(a, b) -> None:
    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
        return
    assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array)), (a, b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).dtype == np.asarray(b).dtype


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_trees)
def test_1_2_arbitrary_pytrees_round_trip_with_and_without_a_target(tmp_path_factory, tree):
    directory = tmp_path_factory.mktemp("tree")
    saver = shardsave.Saver(async_save=False, allow_empty=True)
    path = saver.save(tree, str(directory / "m"))
    if not jax.tree_util.tree_leaves(tree):
        assert path is None
        return
    restored = saver.restore(path, tree)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(tree)):
        _same(a, b)
    untargeted = saver.restore(path)
    assert len(jax.tree_util.tree_leaves(untargeted)) == len(jax.tree_util.tree_leaves(tree))
    saver.close()


# ---------------------------------------------------------------- 3: typed keys name their leaf


def test_3_typed_keys_of_an_nnx_model_round_trip(tmp_path):
    from flax import nnx

    model = nnx.Dropout(0.5, rngs=nnx.Rngs(3))
    state = nnx.state(model)
    path = shardsave.Saver(async_save=False).save(state, str(tmp_path / "m"))
    restored = shardsave.Saver().restore(path, state)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        _same(a, b)


def test_3_a_key_target_for_plain_data_is_an_error_naming_the_leaf(tmp_path):
    path = shardsave.Saver(async_save=False).save({"k": jnp.zeros(2, jnp.uint32)}, str(tmp_path / "m"))
    with pytest.raises(StructureMismatchError, match=r"leaf 'k'.*PRNG key"):
        shardsave.Saver().restore(path, {"k": jax.random.key(0)})


# ---------------------------------------------------------------- 4, 5: retention touches only its own


def test_4_a_second_saver_with_another_prefix_keeps_the_first_savers_checkpoints(tmp_path):
    tree = {"w": np.arange(4.0)}
    model = shardsave.Saver(max_to_keep=5, async_save=False)
    for step in (1, 2, 3):
        model.save(tree, str(tmp_path / "model"), global_step=step)
    best = shardsave.Saver(max_to_keep=1, async_save=False)
    best.save(tree, str(tmp_path / "best"), global_step=3)
    best.save(tree, str(tmp_path / "best"), global_step=4)
    assert _committed(tmp_path) == ["best-4", "model-1", "model-2", "model-3"]
    for name in ("model-1", "model-2", "model-3"):
        np.testing.assert_array_equal(best.restore(str(tmp_path / name))["w"], tree["w"])
    data = [p.name.split(".data-")[0] for p in tmp_path.glob("*.data-*")]
    assert sorted(set(data)) == ["best-4", "model-1", "model-2", "model-3"]  # no orphans
    model.save(tree, str(tmp_path / "model"), global_step=4)  # and the first goes on as before
    assert "best-4" in _committed(tmp_path)


def test_5_deleted_checkpoints_leave_no_file_with_or_without_a_step(tmp_path):
    # TF's MaxToKeepTest.testSharded: after s3 and s4, nothing of s1 or s2 is left.
    saver = shardsave.Saver(max_to_keep=2, async_save=False)
    for name in ("s1", "s2", "s3", "s4"):
        saver.save({"w": np.ones(3)}, str(tmp_path / name))
    for step in (-3, -2, -1):
        saver.save({"w": np.ones(3)}, str(tmp_path / "neg"), global_step=step)
    saver.close()
    remaining = {p.name.split(".")[0] for p in tmp_path.iterdir() if p.name != "checkpoint"}
    assert remaining == {"neg--2", "neg--1"}


# ---------------------------------------------------------------- 6: a failed overwrite keeps the old one


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` mounted at path (root only), unmounted afterwards."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and sys.platform.startswith("linux")):
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("mount refused here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_6_a_failed_overwrite_on_a_full_disk_leaves_the_old_checkpoint(tmp_path):
    with _small_tmpfs(tmp_path / "small", "2m") as mount, shardsave.Saver(async_save=False) as saver:
        old = {"w": np.arange(1000, dtype=np.float32)}
        path = saver.save(old, str(mount / "m"), global_step=1)
        with pytest.raises(SaveFailedError, match="m-1"):
            saver.save(
                {"w": np.ones((1024, 1024), np.float32)}, str(mount / "m"), global_step=1, overwrite=True
            )
        np.testing.assert_array_equal(saver.restore(path)["w"], old["w"])
        assert shardsave.latest_checkpoint(str(mount)) == path
        assert not [p for p in mount.iterdir() if shardsave.storage.temp_target(p.name)]
        # A successful overwrite replaces it.
        new = {"w": np.arange(10, dtype=np.float32)}
        saver.save(new, str(mount / "m"), global_step=1, overwrite=True)
        np.testing.assert_array_equal(saver.restore(path)["w"], new["w"])


def test_6_an_overwrite_with_fewer_data_files_removes_the_old_ones(tmp_path, mesh24):
    saver = shardsave.Saver(async_save=False)
    sharded = {"w": jax.device_put(jnp.arange(64.0), NamedSharding(mesh24, P(("data", "model"))))}
    path = saver.save(sharded, str(tmp_path / "m"))
    assert len(list(tmp_path.glob("m.data-*"))) == 8
    saver.save({"w": np.arange(3.0)}, str(tmp_path / "m"), overwrite=True)
    assert [p.name for p in tmp_path.glob("m.data-*")] == ["m.data-00000-of-00001"]
    np.testing.assert_array_equal(saver.restore(path)["w"], np.arange(3.0))


# ---------------------------------------------------------------- 7: two writers of one save path

WRITER = Path(__file__).parent / "programs" / "writer.py"


def test_7_a_newer_saver_in_the_process_takes_the_save_path_over_from_the_first(tmp_path):
    first = shardsave.Saver(max_to_keep=2)  # asynchronous: its save is in flight at the takeover
    first.save({"w": np.ones(2)}, str(tmp_path / "model"), global_step=1)
    second = shardsave.Saver(max_to_keep=2, async_save=False)
    second.save({"w": np.ones(2)}, str(tmp_path / "model"), global_step=2)  # after model-1 committed
    with pytest.raises(ConcurrentSaveError, match=r"a newer Saver in this process holds the save path"):
        first.save({"w": np.ones(2)}, str(tmp_path / "model"), global_step=3)
    assert _committed(tmp_path) == ["model-1", "model-2"]
    first.save({"w": np.ones(2)}, str(tmp_path / "other"), global_step=3)  # another save path is fine
    first.wait_until_finished()
    second.close()  # the newer one is done: the path is free again, for the first too
    first.save({"w": np.ones(2)}, str(tmp_path / "model"), global_step=4)
    first.wait_until_finished()
    assert _committed(tmp_path) == ["model-2", "model-4", "other-3"]  # max_to_keep=2 went on


def test_7_a_saver_that_is_garbage_collected_lets_its_save_paths_go(tmp_path):
    import gc

    shardsave.Saver(async_save=False).save({"w": np.ones(2)}, str(tmp_path / "model"), global_step=1)
    gc.collect()
    assert not (tmp_path / ".model.lock").exists()  # released, and its file removed
    shardsave.Saver(async_save=False).save({"w": np.ones(2)}, str(tmp_path / "model"), global_step=2)
    assert _committed(tmp_path) == ["model-1", "model-2"]
    # A Saver in a reference cycle is freed by the cyclic collector, which clears weak
    # references before __del__ runs: its claim must still let the flock go.
    saver = shardsave.Saver(async_save=False)
    saver.cycle = [saver]  # type: ignore[attr-defined]
    saver.save({"w": np.ones(2)}, str(tmp_path / "model"), global_step=3)
    del saver
    gc.collect()
    assert not (tmp_path / ".model.lock").exists()


def test_7_two_processes_writing_one_save_path(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, str(WRITER), str(tmp_path), str(first), "25"], stdout=subprocess.PIPE, text=True
        )
        for first in (1, 1000)
    ]
    outcomes = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    saved = [o for o in outcomes if "saved" in o]
    refused = [o for o in outcomes if "refused" in o]
    # Whoever came second was refused at once (or both ran one after the other).
    assert saved and len(saved) + len(refused) == 2
    for o in refused:
        assert "another writer holds the save path" in o["refused"] and "pid" in o["refused"]
    for name in _committed(tmp_path):
        step = int(name.rsplit("-", 1)[1])
        np.testing.assert_array_equal(
            shardsave.Saver().restore(str(tmp_path / name))["w"], np.full(50_000, step)
        )
    assert not [
        p
        for p in tmp_path.iterdir()
        if ".data-" in p.name and p.name.split(".data-")[0] not in _committed(tmp_path)
    ]


# ---------------------------------------------------------------- 8, 9: crashes and torn state files


def test_8_a_commit_without_any_state_file_is_the_latest(tmp_path):
    saver = shardsave.Saver(async_save=False)
    path = saver.save({"w": np.ones(2)}, str(tmp_path / "m"), global_step=5)
    saver.close()
    os.remove(
        tmp_path / "checkpoint"
    )  # as a kill between the first commit and the first state file leaves it
    assert shardsave.latest_checkpoint(str(tmp_path)) == path
    restarted = shardsave.Saver(max_to_keep=1, async_save=False)
    restarted.save({"w": np.ones(2)}, str(tmp_path / "m"), global_step=6)
    assert _committed(tmp_path) == ["m-6"]  # adopted, then retired by retention


@pytest.mark.parametrize("content", [b"", b'{"model_checkpoint_path": "m-', b"\x00\xff garbage", b"[]"])
def test_9_a_torn_state_file_is_rebuilt_and_blocks_nothing(tmp_path, content):
    saver = shardsave.Saver(max_to_keep=2, async_save=False)
    saver.save({"w": np.ones(2)}, str(tmp_path / "m"), global_step=1)
    saver.close()
    (tmp_path / "checkpoint").write_bytes(content)
    with pytest.warns(StateFileWarning, match="rewrites it"):
        assert shardsave.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-1")
    with pytest.warns(StateFileWarning):
        status, out = _cli("ls", str(tmp_path))
    assert status == 0 and "m-1" in out and "(latest)" in out
    restarted = shardsave.Saver(max_to_keep=2, async_save=False)
    with pytest.warns(StateFileWarning):
        restarted.save({"w": np.ones(2)}, str(tmp_path / "m"), global_step=2)
    assert shardsave.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths == (
        str(tmp_path / "m-1"),
        str(tmp_path / "m-2"),
    )


# ---------------------------------------------------------------- 10: the index has a checksum


def test_10_a_flipped_bit_in_the_index_is_detected(tmp_path):
    path = shardsave.Saver(async_save=False).save({"w": np.ones(2)}, str(tmp_path / "m"), global_step=1000)
    raw = Path(path + ".index").read_bytes()
    assert raw.count(b'"global_step":1000') == 1
    Path(path + ".index").write_bytes(raw.replace(b'"global_step":1000', b'"global_step":1001'))
    with pytest.raises(CorruptCheckpointError, match="index's crc32c does not match"):
        shardsave.Saver().restore(path)
    status, _ = _cli("verify", path)
    assert status != 0


def test_10_format_version_1_stays_readable(tmp_path):
    golden_v1 = Path(__file__).parent / "golden" / "v1" / "model-7"
    assert shardsave.CheckpointReader(str(golden_v1)).index.format_version == 1
    assert index_doc.read(Path(__file__).parent / "golden" / "v2" / "model-7")["global_step"] == 7


# ---------------------------------------------------------------- 12: the smaller ones


@pytest.mark.parametrize("step", [3.9, True, np.float32(2), "7", jnp.float32(1)])
def test_12_a_step_that_is_not_an_integer_is_refused_before_writing(tmp_path, step):
    with pytest.raises(TypeError, match="global_step must be an integer"):
        shardsave.Saver(async_save=False).save({"a": np.ones(1)}, str(tmp_path / "d" / "m"), global_step=step)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("step", [np.int64(5), jnp.int32(5), np.uint8(5), 5])
def test_12_integer_steps_of_any_kind(tmp_path, step):
    path = shardsave.Saver(async_save=False).save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=step)
    assert path == str(tmp_path / "m-5")


def test_12_saving_under_a_regular_file_says_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        shardsave.Saver(async_save=False).save({"a": np.ones(1)}, str(tmp_path / "file" / "sub" / "m"))


def test_12_overwrite_on_a_read_only_file_system_is_a_save_failure(tmp_path):
    with _small_tmpfs(tmp_path / "ro", "1m") as mount:
        saver = shardsave.Saver(async_save=False)
        path = saver.save({"a": np.ones(2)}, str(mount / "m"))
        saver.close()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with pytest.raises(SaveFailedError, match="Read-only file system"):
            shardsave.Saver(async_save=False).save({"a": np.zeros(2)}, str(mount / "m"), overwrite=True)
        np.testing.assert_array_equal(shardsave.Saver().restore(path)["a"], np.ones(2))


def test_12_a_python_int_restores_into_any_integer_target_that_holds_it(tmp_path, mesh24):
    path = shardsave.Saver(async_save=False).save({"step": 70_000, "small": 3}, str(tmp_path / "m"))
    target = jax.eval_shape(lambda: {"step": 70_000, "small": 3})  # int32, weakly typed
    restored = shardsave.Saver().restore(path, target)
    assert int(restored["step"]) == 70_000 and restored["step"].dtype == jnp.int32
    sharded = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh24, P()))}
    assert shardsave.Saver().restore(path, sharded)["step"].sharding == NamedSharding(mesh24, P())
    with pytest.raises(StructureMismatchError, match=r"leaf 'step'.*70000.*int16"):
        shardsave.Saver().restore(path, {"step": np.zeros((), np.int16)})
    assert int(shardsave.Saver().restore(path, {"small": np.zeros((), np.int8)})["small"]) == 3


def test_12_a_cap_below_what_a_capped_restore_needs_is_refused_with_the_reason(tmp_path):
    path = shardsave.Saver(async_save=False).save({"a": np.ones(10)}, str(tmp_path / "m"))
    with pytest.raises(ValueError, match=r"max_host_bytes=1048576 is below the 32 MiB.*checksum chunks"):
        shardsave.Saver().restore(path, restore_sequentially=True, max_host_bytes=1 << 20)
    shardsave.Saver().restore(path, restore_sequentially=True, max_host_bytes=32 << 20)


def test_12_a_restore_racing_retention_says_the_checkpoint_was_deleted(tmp_path):
    saver = shardsave.Saver(max_to_keep=1, async_save=False)
    path = saver.save({"a": np.ones(1000)}, str(tmp_path / "m"), global_step=1)
    retired = threading.Event()

    def next_save() -> None:  # the trainer's next save retires m-1 after the evaluator read its index
        saver.save({"a": np.ones(1000)}, str(tmp_path / "m"), global_step=2)

    with (
        shardsave.storage.wrapping_stores(lambda store: BeforeFirstRead(store, next_save, retired)),
        pytest.raises(CheckpointNotFoundError, match="was deleted while it was being read"),
    ):
        shardsave.Saver().restore(path)
    assert retired.is_set()


def test_64_bit_values_are_never_narrowed_into_jax_arrays_without_x64(tmp_path):
    """jax holds int64 and float64 as 32-bit unless jax_enable_x64 is set: a restore
    that would narrow them (values above 2**31 wrapped) is refused, naming the fix."""
    from conftest import run_python

    from shardsave.errors import StructureMismatchError

    path = str(tmp_path / "m")
    # Saved by a process with x64 on, as jax.Array leaves of 64-bit dtypes.
    run_python(
        "import jax; jax.config.update('jax_enable_x64', True)\n"
        "import jax.numpy as jnp, shardsave\n"
        f"shardsave.Saver(async_save=False).save({{'i': jnp.arange(3, dtype=jnp.int64) + 2**40, "
        f"'f': jnp.full(2, 1 / 3, jnp.float64)}}, {path!r})\n",
        devices=1,
    )
    with pytest.raises(StructureMismatchError, match=r"leaf 'f'.*float64 as float32 unless jax_enable_x64"):
        shardsave.Saver().restore(path)  # onto the saved layout, as jax arrays
    target = {
        "i": jax.ShapeDtypeStruct(
            (3,), np.int64, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
    }
    with pytest.raises(StructureMismatchError, match=r"cast=True"):
        shardsave.Saver().restore(path, target)
    exact = shardsave.Saver().restore(path, {"i": np.zeros(3, np.int64), "f": np.zeros(2, np.float64)})
    assert exact["i"].tolist() == [2**40, 2**40 + 1, 2**40 + 2] and exact["f"][0] == 1 / 3


def test_a_save_refused_before_it_writes_leaves_nothing_in_the_directory(tmp_path):
    """A tree nested deeper than a checkpoint holds; a committed prefix without overwrite."""
    deep: dict = {"w": np.ones(2)}
    for _ in range(330):
        deep = {"x": deep}
    with pytest.raises(ValueError, match="nests containers more than 100 deep"):
        shardsave.Saver().save(deep, str(tmp_path / "m"))
    assert list(tmp_path.iterdir()) == []  # no data, no index, no lock file
    path = shardsave.Saver(async_save=False).save({"w": np.ones(2)}, str(tmp_path / "a" / "m"))
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    with pytest.raises(shardsave.errors.CheckpointExistsError):
        shardsave.Saver(async_save=False).save({"w": np.ones(2)}, path)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before
