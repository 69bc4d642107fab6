"""tf.train.Saver's contract, held against TensorFlow's own tests.

Each test ports a case of tensorflow/python/training/saver_test.py or
tensorflow/python/checkpoint/checkpoint_management_test.py (named in its
docstring) to shardsave's API. Where shardsave differs on purpose, the port
says so and the README's "Differences from tf.train.Saver" table has the row.
The `checkpoint` state file is held to protobuf's own text_format parser with
checkpoint_state.proto, and state files written by TensorFlow itself
(tests/golden/tf, made by make_state_files.py there) are read.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from hypothesis import given, settings
from hypothesis import strategies as st

import shardsave
from shardsave.errors import StateFileWarning
from shardsave.lifecycle.state import CheckpointState, format_state_text, parse_state_text

TF_GOLDEN = Path(__file__).parent / "golden" / "tf"
TREE = {"v": np.array([10.0], np.float32)}


def _checkpoint_state_class():
    """tensorflow.CheckpointState, built from checkpoint_state.proto's four fields."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="checkpoint_state.proto", package="tensorflow", syntax="proto3"
    )
    message = proto.message_type.add(name="CheckpointState")
    field = descriptor_pb2.FieldDescriptorProto
    for number, (name, kind, label) in enumerate(
        [
            ("model_checkpoint_path", field.TYPE_STRING, field.LABEL_OPTIONAL),
            ("all_model_checkpoint_paths", field.TYPE_STRING, field.LABEL_REPEATED),
            ("all_model_checkpoint_timestamps", field.TYPE_DOUBLE, field.LABEL_REPEATED),
            ("last_preserved_timestamp", field.TYPE_DOUBLE, field.LABEL_OPTIONAL),
        ],
        start=1,
    ):
        message.field.add(name=name, number=number, type=kind, label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.CheckpointState"))


ProtoCheckpointState = _checkpoint_state_class()


def _proto_state(directory) -> object:
    message = ProtoCheckpointState()
    text_format.Merge((Path(directory) / "checkpoint").read_text(), message)
    return message


def _assert_checkpoint_state(save_dir, model_checkpoint_path, all_model_checkpoint_paths):
    """saver_test's assertCheckpointState, through shardsave's reader and protobuf's."""
    state = shardsave.get_checkpoint_state(str(save_dir))
    assert state.model_checkpoint_path == model_checkpoint_path
    assert list(state.all_model_checkpoint_paths) == all_model_checkpoint_paths
    proto = _proto_state(save_dir)
    assert os.path.join(save_dir, proto.model_checkpoint_path) == model_checkpoint_path
    assert [os.path.join(save_dir, p) for p in proto.all_model_checkpoint_paths] == all_model_checkpoint_paths


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------- the state file itself


def test_the_state_file_is_read_by_protobufs_text_format(tmp_path):
    """checkpoint_management_test CheckpointStateTest.testUpdateCheckpointStateSaveRelativePaths."""
    clock = Clock(1000.5)
    saver = shardsave.Saver(max_to_keep=2, clock=clock, async_save=False)
    for step in (1, 2, 3):
        clock.t += 10
        saver.save(TREE, str(tmp_path / "model"), global_step=step)
    proto = _proto_state(tmp_path)
    assert proto.model_checkpoint_path == "model-3"  # relative paths in the file
    assert list(proto.all_model_checkpoint_paths) == ["model-2", "model-3"]
    assert list(proto.all_model_checkpoint_timestamps) == [1020.5, 1030.5]
    assert proto.last_preserved_timestamp == 1000.5  # the Saver's start: nothing preserved yet
    # get_checkpoint_state returns them joined to the directory.
    state = shardsave.get_checkpoint_state(str(tmp_path))
    assert state.all_model_checkpoint_paths == (str(tmp_path / "model-2"), str(tmp_path / "model-3"))
    absolute = tmp_path / "abs"
    shardsave.Saver(save_relative_paths=False, async_save=False).save(TREE, str(absolute / "m"))
    assert _proto_state(absolute).model_checkpoint_path == str(absolute / "m")


@settings(max_examples=200, deadline=None)
@given(
    paths=st.lists(
        st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), min_size=1), max_size=4
    ),
    stamps=st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=4),
    preserved=st.floats(allow_nan=False, allow_infinity=False),
)
def test_state_text_agrees_with_protobuf_both_ways(paths, stamps, preserved):
    state = CheckpointState(paths[-1] if paths else "", tuple(paths), tuple(stamps), preserved)
    ours = format_state_text(state)
    theirs = ProtoCheckpointState()
    text_format.Parse(ours, theirs)  # protobuf reads what shardsave writes, strictly
    assert theirs.model_checkpoint_path == state.model_checkpoint_path
    assert list(theirs.all_model_checkpoint_paths) == list(paths)
    assert list(theirs.all_model_checkpoint_timestamps) == list(stamps)
    assert theirs.last_preserved_timestamp == preserved
    for as_utf8 in (False, True):  # and shardsave reads what protobuf writes
        assert parse_state_text(text_format.MessageToString(theirs, as_utf8=as_utf8)) == state


def test_state_text_rejects_what_protobuf_rejects():
    for bad in ("model_checkpoint_path: 3\n", 'unknown_field: "x"\n', 'model_checkpoint_path "x"\n', '"x"'):
        with pytest.raises(text_format.ParseError):
            text_format.Parse(bad, ProtoCheckpointState())
        with pytest.raises(ValueError):
            parse_state_text(bad)
    # What protobuf's Merge takes, shardsave takes: comments, lists, adjacent strings, ';'.
    text = '# a comment\nall_model_checkpoint_paths: ["a", "b"]; model_checkpoint_path: "b" "c"\n'
    merged = ProtoCheckpointState()
    text_format.Merge(text, merged)
    ours = parse_state_text(text)
    assert ours.model_checkpoint_path == merged.model_checkpoint_path == "bc"
    assert list(ours.all_model_checkpoint_paths) == list(merged.all_model_checkpoint_paths) == ["a", "b"]


@pytest.mark.parametrize(
    "name, newest, paths, stamps, preserved",
    [
        ("checkpoint", "ckpt-4", ["ckpt-3", "ckpt-4"], (14330.0, 17940.0), 13610.0),
        (
            "checkpoint-escaped",
            'we"ird\\ name ü-4',
            ['we"ird\\ name ü-3', 'we"ird\\ name ü-4'],
            (14330.0, 17940.0),
            13610.0,
        ),
    ],
)
def test_state_files_written_by_tensorflow_are_read(name, newest, paths, stamps, preserved):
    """State files of tf.train.CheckpointManager (TensorFlow 2.21), read with latest_filename."""
    state = shardsave.get_checkpoint_state(str(TF_GOLDEN), latest_filename=name)
    assert state.model_checkpoint_path == str(TF_GOLDEN / newest)
    assert state.all_model_checkpoint_paths == tuple(str(TF_GOLDEN / p) for p in paths)
    assert state.all_model_checkpoint_timestamps == stamps
    assert state.last_preserved_timestamp == preserved
    # TensorFlow's file and shardsave's writing of the same state are the same bytes.
    raw = parse_state_text((TF_GOLDEN / name).read_text())
    assert format_state_text(raw) == (TF_GOLDEN / name).read_text()


def test_a_tf1_saver_state_file_with_absolute_paths_is_read():
    state = shardsave.get_checkpoint_state(str(TF_GOLDEN), latest_filename="checkpoint-tf1")
    assert state.model_checkpoint_path.endswith("/model.ckpt-3") and os.path.isabs(
        state.model_checkpoint_path
    )
    assert len(state.all_model_checkpoint_paths) == 2 and state.all_model_checkpoint_timestamps == ()
    # Its checkpoints are not here (TensorFlow's own format): latest_checkpoint names none.
    assert shardsave.latest_checkpoint(str(TF_GOLDEN), latest_filename="checkpoint-tf1") is None


def test_state_files_of_shardsave_0_1_json_are_still_read(tmp_path):
    (tmp_path / "checkpoint").write_text(
        '{"model_checkpoint_path": "m-2", "all_model_checkpoint_paths": ["m-1", "m-2"],'
        ' "all_model_checkpoint_timestamps": [1.0, 2.0], "last_preserved_timestamp": 0.5}'
    )
    state = shardsave.get_checkpoint_state(str(tmp_path))
    assert state.model_checkpoint_path == str(tmp_path / "m-2") and state.last_preserved_timestamp == 0.5


def test_check_point_completes_relative_paths(tmp_path):
    """CheckpointStateTest.testCheckPointCompletesRelativePaths."""
    (tmp_path / "checkpoint").write_text(
        """
        model_checkpoint_path: "./model.ckpt-687529"
        all_model_checkpoint_paths: "./model.ckpt-687500"
        all_model_checkpoint_paths: "./model.ckpt-687529"
        """
    )
    ckpt = shardsave.get_checkpoint_state(str(tmp_path))
    assert ckpt.model_checkpoint_path == os.path.join(tmp_path, "./model.ckpt-687529")
    assert ckpt.all_model_checkpoint_paths[0] == os.path.join(tmp_path, "./model.ckpt-687500")
    assert ckpt.all_model_checkpoint_paths[1] == os.path.join(tmp_path, "./model.ckpt-687529")


def test_check_point_state_when_incomplete(tmp_path):
    """CheckpointStateTest.testCheckPointStateFailsWhenIncomplete: a difference.

    TensorFlow raises ValueError for an empty state file; shardsave warns and
    treats it as absent, because a torn state file must never block a restart.
    """
    (tmp_path / "checkpoint").write_text("")
    with pytest.warns(StateFileWarning, match="names no checkpoint"):
        assert shardsave.get_checkpoint_state(str(tmp_path)) is None


def test_relative_path(tmp_path, monkeypatch):
    """LatestCheckpointWithRelativePaths.testRelativePath."""
    monkeypatch.chdir(tmp_path)
    os.mkdir("train")
    filepath = os.path.join("train", "snapshot")
    save = shardsave.Saver(async_save=False)
    for step in range(3):
        assert save.save({"v0": np.float32(step)}, filepath, global_step=step) == f"{filepath}-{step}"
    name = shardsave.latest_checkpoint("train")
    assert name is not None
    assert shardsave.Saver().restore(name, {"v0": np.float32(-1.0)})["v0"] == 2.0


# ---------------------------------------------------------------- saver_test.py


def test_allow_empty(tmp_path):
    """SaverTest.testAllowEmpty."""
    save_path = str(tmp_path / "allow_empty")
    save = shardsave.Saver(allow_empty=True)
    assert save.save({}, save_path) is None
    assert shardsave.Saver(allow_empty=True).restore(save_path, {}) == {}


def test_save_to_nonexisting_path(tmp_path):
    """SaverTest.testSaveToNonexistingPath: missing directories are made; a file in the way is a ValueError."""
    (tmp_path / "actually_a_file").write_text("")
    for save_path in (
        tmp_path / "nonexisting_dir" / "path",
        tmp_path / "other_nonexisting_dir" / "path1" / "path2",
    ):
        path = shardsave.Saver(async_save=False).save(TREE, str(save_path))
        assert shardsave.Saver().restore(path)["v"] == 10.0
    with pytest.raises(ValueError, match=r"actually_a_file' is not a directory"):
        shardsave.Saver(async_save=False).save(TREE, str(tmp_path / "actually_a_file" / "path"))


def test_max_to_keep_non_sharded(tmp_path):
    """MaxToKeepTest.testNonSharded (and testSharded: with sharded=True the same holds).

    As TensorFlow's test, three helpers live at once in one process and each writes
    the same save paths in turn: a Saver made later takes a save path over from the
    earlier one when it first saves there (test_safety's test_7 has what the earlier
    one may do then). One difference: saving over a committed checkpoint takes
    overwrite=True.
    """
    for sharded, save_dir in ((False, tmp_path / "non_sharded"), (True, tmp_path / "sharded")):
        save = shardsave.Saver(max_to_keep=2, sharded=sharded, async_save=False)
        assert save.last_checkpoints == []
        s1 = save.save(TREE, str(save_dir / "s1"))
        assert save.last_checkpoints == [s1] and shardsave.checkpoint_exists(s1)
        _assert_checkpoint_state(save_dir, s1, [s1])
        s2 = save.save(TREE, str(save_dir / "s2"))
        assert save.last_checkpoints == [s1, s2]
        _assert_checkpoint_state(save_dir, s2, [s1, s2])
        s3 = save.save(TREE, str(save_dir / "s3"))
        assert save.last_checkpoints == [s2, s3]
        assert not shardsave.checkpoint_exists(s1) and not glob.glob(f"{s1}*")  # no file of s1 left
        assert shardsave.checkpoint_exists(s2) and shardsave.checkpoint_exists(s3)
        _assert_checkpoint_state(save_dir, s3, [s2, s3])

        # A second helper that knows the first one's checkpoints, and a third that does not.
        save2 = shardsave.Saver(max_to_keep=2, sharded=sharded, async_save=False)
        save2.set_last_checkpoints(save.last_checkpoints)
        save3 = shardsave.Saver(max_to_keep=2, sharded=sharded, async_save=False)

        # The first helper: s2 again (removed from the list first, then appended), then s1.
        s2 = save.save(TREE, str(save_dir / "s2"), overwrite=True)
        assert save.last_checkpoints == [s3, s2]
        assert not shardsave.checkpoint_exists(s1) and shardsave.checkpoint_exists(s3)
        _assert_checkpoint_state(save_dir, s2, [s3, s2])
        s1 = save.save(TREE, str(save_dir / "s1"), overwrite=True)  # s3 goes, oldest in the list
        assert save.last_checkpoints == [s2, s1]
        assert not shardsave.checkpoint_exists(s3) and shardsave.checkpoint_exists(s2)
        _assert_checkpoint_state(save_dir, s1, [s2, s1])

        # The second helper.
        s2 = save2.save(TREE, str(save_dir / "s2"), overwrite=True)
        assert save2.last_checkpoints == [s3, s2]
        assert shardsave.checkpoint_exists(s1)  # created by the first helper
        assert not shardsave.checkpoint_exists(s3)  # deleted by the first helper
        _assert_checkpoint_state(save_dir, s2, [s3, s2])
        s1 = save2.save(TREE, str(save_dir / "s1"), overwrite=True)
        assert save2.last_checkpoints == [s2, s1]
        assert shardsave.checkpoint_exists(s2) and shardsave.checkpoint_exists(s1)
        _assert_checkpoint_state(save_dir, s1, [s2, s1])

        # The third helper: unaware of the previous s2.
        s2 = save3.save(TREE, str(save_dir / "s2"), overwrite=True)
        assert save3.last_checkpoints == [s2]
        assert shardsave.checkpoint_exists(s1) and not shardsave.checkpoint_exists(s3)
        # Even though s1 exists, this Saver is unaware of it: not in the state file.
        _assert_checkpoint_state(save_dir, s2, [s2])
        s1 = save3.save(TREE, str(save_dir / "s1"), overwrite=True)
        assert save3.last_checkpoints == [s2, s1]
        assert shardsave.checkpoint_exists(s2) and shardsave.checkpoint_exists(s1)
        _assert_checkpoint_state(save_dir, s1, [s2, s1])
        for helper in (save, save2, save3):
            helper.close()


@pytest.mark.parametrize("keep", [None, 0])
def test_no_max_to_keep(tmp_path, keep):
    """MaxToKeepTest.testNoMaxToKeep: nothing recorded, nothing deleted, the state names the newest."""
    save = shardsave.Saver(max_to_keep=keep, async_save=False)
    assert save.last_checkpoints == []
    s1 = save.save(TREE, str(tmp_path / "s1"))
    assert save.last_checkpoints == [] and shardsave.checkpoint_exists(s1)
    s2 = save.save(TREE, str(tmp_path / "s2"))
    assert save.last_checkpoints == [] and shardsave.checkpoint_exists(s2) and shardsave.checkpoint_exists(s1)
    _assert_checkpoint_state(tmp_path, s2, [s2])


def test_keep_checkpoint_every_n_hours(tmp_path):
    """KeepCheckpointEveryNHoursTest.testNonSharded."""
    start = 1_000_000.0
    clock = Clock(start)
    save = shardsave.Saver(
        max_to_keep=2, keep_checkpoint_every_n_hours=0.7 / 3600, clock=clock, async_save=False
    )
    assert save.last_checkpoints == []
    clock.t = start + 1.0  # s1 is old enough to keep
    s1 = save.save(TREE, str(tmp_path / "s1"))
    assert save.last_checkpoints == [s1]
    s2 = save.save(TREE, str(tmp_path / "s2"))
    assert save.last_checkpoints == [s1, s2]
    s3 = save.save(TREE, str(tmp_path / "s3"))  # s1 leaves the list but is kept
    assert save.last_checkpoints == [s2, s3]
    s4 = save.save(TREE, str(tmp_path / "s4"))  # s2 is too close to s1: deleted
    assert save.last_checkpoints == [s3, s4]
    assert shardsave.checkpoint_exists(s1) and not shardsave.checkpoint_exists(s2)
    assert shardsave.checkpoint_exists(s3) and shardsave.checkpoint_exists(s4)


def test_recover_last_checkpoints(tmp_path):
    """RecoverLastCheckpointsTest.test_recover_last_checkpoints."""
    save = shardsave.Saver(max_to_keep=10, async_save=False)
    assert save.last_checkpoints == []
    s1 = save.save(TREE, str(tmp_path / "ckpt-1"))
    s2 = save.save(TREE, str(tmp_path / "ckpt-2"))
    s3 = save.save(TREE, str(tmp_path / "ckpt-3"))
    assert save.last_checkpoints == [s1, s2, s3]
    save2 = shardsave.Saver(max_to_keep=10)
    assert save2.last_checkpoints == []
    save2.recover_last_checkpoints([s1, s2, s3])
    assert save2.last_checkpoints == [s1, s2, s3]
    for name in glob.glob(f"{s1}.*"):  # removed by hand: dropped on recovery
        os.remove(name)
    assert not shardsave.checkpoint_exists(s1)
    save3 = shardsave.Saver(max_to_keep=10, async_save=False)
    assert save3.last_checkpoints == []
    save3.recover_last_checkpoints([s1, s2, s3])
    assert save3.last_checkpoints == [s2, s3]
    s4 = save3.save(TREE, str(tmp_path / "ckpt-4"))
    _assert_checkpoint_state(tmp_path, s4, [s2, s3, s4])


def test_recover_idiom_after_a_restart(tmp_path):
    """The TF1 restart idiom works as written."""
    first = shardsave.Saver(max_to_keep=2, async_save=False)
    for step in (1, 2):
        first.save(TREE, str(tmp_path / "model"), global_step=step)
    first.close()
    saver = shardsave.Saver(max_to_keep=2, async_save=False)
    ckpt = shardsave.get_checkpoint_state(str(tmp_path))
    saver.recover_last_checkpoints(ckpt.all_model_checkpoint_paths)
    assert saver.last_checkpoints == [str(tmp_path / "model-1"), str(tmp_path / "model-2")]
    saver.save(TREE, str(tmp_path / "model"), global_step=3)
    assert not shardsave.checkpoint_exists(str(tmp_path / "model-1"))


def test_write_state_false_commits_without_recording(tmp_path):
    save = shardsave.Saver(max_to_keep=1, async_save=False)
    s1 = save.save(TREE, str(tmp_path / "m"), global_step=1)
    s2 = save.save(TREE, str(tmp_path / "m"), global_step=2, write_state=False)
    assert shardsave.checkpoint_exists(s2) and save.last_checkpoints == [s1]
    assert shardsave.get_checkpoint_state(str(tmp_path)).model_checkpoint_path == s1
    s3 = save.save(TREE, str(tmp_path / "m"), global_step=3, latest_filename="other_state")
    assert shardsave.latest_checkpoint(str(tmp_path), latest_filename="other_state") == s3
    with pytest.raises(ValueError, match="latest_filename"):
        save.save(TREE, str(tmp_path / "m"), global_step=4, latest_filename="sub/x")


def test_write_state_false_is_never_the_latest_checkpoint(tmp_path):
    """tf.train.Saver.save(write_state=False), as TensorFlow's checkpoint_management reads it.

    In TensorFlow, saver.save(sess, path, write_state=False) is how an export or an
    evaluation copy stays out of latest_checkpoint: the state file keeps naming
    model-1, and latest_checkpoint returns it.
    """
    save = shardsave.Saver(max_to_keep=1, async_save=False)
    s1 = save.save(TREE, str(tmp_path / "model"), global_step=1)
    other = save.save(TREE, str(tmp_path / "saver0.ckpt"), write_state=False)  # another save path
    own = save.save(TREE, str(tmp_path / "model"), global_step=2, write_state=False)  # the same one
    assert shardsave.latest_checkpoint(str(tmp_path)) == s1
    state = shardsave.get_checkpoint_state(str(tmp_path))
    assert state.model_checkpoint_path == s1 and state.all_model_checkpoint_paths == (s1,)
    # Restorable, and never retention's to delete (max_to_keep=1 after two more saves).
    s3 = save.save(TREE, str(tmp_path / "model"), global_step=3)
    save.save(TREE, str(tmp_path / "model"), global_step=4)
    assert shardsave.checkpoint_exists(own) and shardsave.checkpoint_exists(other)
    assert not shardsave.checkpoint_exists(s3)
    np.testing.assert_array_equal(save.restore(own)["v"], TREE["v"])
    save.close()
    # A restarted Saver does not adopt it into retention either.
    restarted = shardsave.Saver(max_to_keep=1, async_save=False)
    restarted.save(TREE, str(tmp_path / "model"), global_step=5)
    assert shardsave.checkpoint_exists(own) and shardsave.latest_checkpoint(str(tmp_path)).endswith("model-5")


def test_write_state_false_without_any_state_file(tmp_path):
    """No state file at all (TensorFlow: latest_checkpoint is None): not made the latest."""
    save = shardsave.Saver(async_save=False)
    path = save.save(TREE, str(tmp_path / "model"), global_step=1, write_state=False)
    assert not (tmp_path / "checkpoint").exists()
    assert shardsave.latest_checkpoint(str(tmp_path)) is None
    assert shardsave.get_checkpoint_state(str(tmp_path)) is None
    assert shardsave.checkpoint_exists(path)


def test_a_commit_the_state_file_missed_is_still_recovered_beside_write_state_false(tmp_path):
    """A kill between a commit and its state file still finds the commit; an unrecorded one is not."""
    save = shardsave.Saver(async_save=False)
    save.save(TREE, str(tmp_path / "model"), global_step=1)
    state = (tmp_path / "checkpoint").read_bytes()
    missed = save.save(TREE, str(tmp_path / "model"), global_step=2)
    (tmp_path / "checkpoint").write_bytes(state)  # as if killed before the state file was written
    save.save(TREE, str(tmp_path / "model"), global_step=3, write_state=False)
    save.save(TREE, str(tmp_path / "export"), global_step=9)  # records itself in the same state file
    (tmp_path / "checkpoint").write_bytes(state)
    assert shardsave.latest_checkpoint(str(tmp_path)) == missed


def test_save_returns_what_last_checkpoints_holds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save = shardsave.Saver(max_to_keep=2, async_save=False)
    assert save.save(TREE, "s1") == "s1"
    assert save.last_checkpoints == ["s1"]


def test_checkpoint_exists_mtimes_and_remove(tmp_path):
    """SaverUtilsTest.testCheckpointExists, testGetCheckpointMtimes, testRemoveCheckpoint."""
    prefixes = []
    for sharded in (False, True):
        path = str(tmp_path / f"{sharded}")
        assert not shardsave.checkpoint_exists(path)  # not saved yet
        prefix = shardsave.Saver(sharded=sharded, async_save=False).save(TREE, path)
        assert shardsave.checkpoint_exists(prefix)
        assert shardsave.checkpoint_exists(shardsave.latest_checkpoint(str(tmp_path)))
        prefixes.append(prefix)
    mtimes = shardsave.get_checkpoint_mtimes(prefixes)
    assert len(mtimes) == 2 and mtimes[1] >= mtimes[0]
    assert shardsave.get_checkpoint_mtimes([str(tmp_path / "absent"), prefixes[0]]) == mtimes[:1]
    for prefix in prefixes:
        shardsave.remove_checkpoint(prefix)
        assert not shardsave.checkpoint_exists(prefix) and not glob.glob(f"{prefix}.*")


# ---------------------------------------------------------------- checkpoint_management_test.py


def test_save_restore_state(tmp_path):
    """CheckpointManagerTest.testSaveRestoreState: last_preserved_timestamp as the proto defines it."""
    clock = Clock(3.0)
    first = shardsave.Saver(max_to_keep=2, clock=clock, async_save=False)
    names = [str(tmp_path / f"ckpt-{n}") for n in range(1, 7)]
    first_time = 10000.0
    clock.t = first_time
    first.save(TREE, str(tmp_path / "ckpt"), global_step=1)
    second_time = first_time + 3610.0
    clock.t = second_time
    first.save(TREE, str(tmp_path / "ckpt"), global_step=2)
    state = shardsave.get_checkpoint_state(str(tmp_path))
    assert list(state.all_model_checkpoint_timestamps) == [first_time, second_time]
    assert first.last_checkpoints == names[:2]
    assert shardsave.latest_checkpoint(str(tmp_path)) == names[1]
    first.close()

    second = shardsave.Saver(max_to_keep=2, keep_checkpoint_every_n_hours=1.5, clock=clock, async_save=False)
    third_time = second_time + 3600.0 * 0.2
    clock.t = third_time
    second.save(TREE, str(tmp_path / "ckpt"), global_step=3)
    assert shardsave.checkpoint_exists(names[0]) and shardsave.checkpoint_exists(names[1])
    assert second.last_checkpoints == names[1:3]
    assert shardsave.get_checkpoint_state(str(tmp_path)).last_preserved_timestamp == first_time
    fourth_time = third_time + 3600.0 * 0.5
    clock.t = fourth_time
    second.save(TREE, str(tmp_path / "ckpt"), global_step=4)
    assert shardsave.checkpoint_exists(names[0]) and not shardsave.checkpoint_exists(names[1])
    assert second.last_checkpoints == names[2:4]
    clock.t = fourth_time + 3600.0 * 0.5
    second.save(TREE, str(tmp_path / "ckpt"), global_step=5)
    assert second.last_checkpoints == names[3:5]
    assert shardsave.get_checkpoint_state(str(tmp_path)).last_preserved_timestamp == first_time
    second.close()

    third = shardsave.Saver(max_to_keep=2, keep_checkpoint_every_n_hours=1.5, clock=clock, async_save=False)
    assert shardsave.latest_checkpoint(str(tmp_path)) == names[4]
    clock.t += 10.0
    third.save(TREE, str(tmp_path / "ckpt"), global_step=6)
    assert shardsave.get_checkpoint_state(str(tmp_path)).last_preserved_timestamp == fourth_time
    for n in (0, 3, 4, 5):
        assert shardsave.checkpoint_exists(names[n])
    assert not shardsave.checkpoint_exists(names[1]) and not shardsave.checkpoint_exists(names[2])
    assert third.last_checkpoints == names[4:6]


def test_clock_reset(tmp_path):
    """CheckpointManagerTest.testClockReset."""
    clock = Clock(10000.0)
    first = shardsave.Saver(max_to_keep=1, keep_checkpoint_every_n_hours=1.0, clock=clock, async_save=False)
    paths = []
    for step in (1, 2, 3):
        paths.append(first.save(TREE, str(tmp_path / "ckpt"), global_step=step))
        clock.t += 3600.0
    clock.t -= 3600.0
    assert not shardsave.checkpoint_exists(paths[0])
    assert shardsave.checkpoint_exists(paths[1]) and shardsave.checkpoint_exists(paths[2])
    assert first.last_checkpoints == [paths[2]]
    assert shardsave.get_checkpoint_state(str(tmp_path)).last_preserved_timestamp == 13600.0
    first.close()
    clock.t = 5000.0  # the clock set back in time
    second = shardsave.Saver(
        max_to_keep=1, keep_checkpoint_every_n_hours=10000.0, clock=clock, async_save=False
    )
    clock.t += 10.0
    with pytest.warns(RuntimeWarning, match="behind the last preserved checkpoint timestamp"):
        fourth = second.save(TREE, str(tmp_path / "ckpt"), global_step=4)
    # Err on the side of keeping checkpoints when unsure whether they were preserved.
    assert shardsave.checkpoint_exists(paths[1]) and shardsave.checkpoint_exists(paths[2])
    assert second.last_checkpoints == [fourth]
    clock.t += 10.0
    fifth = second.save(TREE, str(tmp_path / "ckpt"), global_step=5)
    assert shardsave.checkpoint_exists(paths[1]) and shardsave.checkpoint_exists(paths[2])
    assert second.last_checkpoints == [fifth]
    state = shardsave.get_checkpoint_state(str(tmp_path))
    assert state.last_preserved_timestamp == 5000.0
    assert list(state.all_model_checkpoint_timestamps) == [5020.0]
