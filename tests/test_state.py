"""The state file and retention, as tf.train.Saver defines them."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import shardsave
from shardsave.errors import StateFileWarning
from shardsave.lifecycle.state import parse_state_text


class Clock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def _committed(directory):
    return sorted(f[: -len(".index")] for f in os.listdir(directory) if f.endswith(".index"))


def test_max_to_keep_and_state_file(tmp_path):
    saver = shardsave.Saver(max_to_keep=3)
    for step in range(1, 7):
        saver.save({"a": np.full(2, step)}, str(tmp_path / "m"), global_step=step)
    saver.wait_until_finished()
    assert _committed(tmp_path) == ["m-4", "m-5", "m-6"]
    assert saver.last_checkpoints == [str(tmp_path / f"m-{s}") for s in (4, 5, 6)]
    state = parse_state_text((tmp_path / "checkpoint").read_text())
    assert state.model_checkpoint_path == "m-6"  # relative by default
    assert state.all_model_checkpoint_paths == ("m-4", "m-5", "m-6")
    assert len(state.all_model_checkpoint_timestamps) == 3
    ckpt = shardsave.get_checkpoint_state(str(tmp_path))
    assert ckpt.model_checkpoint_path == str(tmp_path / "m-6")
    assert not [
        f for f in os.listdir(tmp_path) if ".data-" in f and f.split(".")[0] not in _committed(tmp_path)
    ]


@pytest.mark.parametrize("keep", [None, 0])
def test_max_to_keep_none_or_zero_keeps_all(tmp_path, keep):
    saver = shardsave.Saver(max_to_keep=keep, async_save=False)
    for step in range(4):
        saver.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=step)
    assert _committed(tmp_path) == [f"m-{s}" for s in range(4)]


def test_keep_checkpoint_every_n_hours(tmp_path):
    clock = Clock()
    saver = shardsave.Saver(max_to_keep=2, keep_checkpoint_every_n_hours=1.0, clock=clock, async_save=False)
    for step in range(8):
        clock.t += 25 * 60  # a save every 25 minutes
        saver.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=step)
    # Two newest kept by max_to_keep; of the ones pushed out, a checkpoint made at least
    # an hour after the last one preserved (at first: the Saver's start) is preserved,
    # as tf.train.CheckpointManager does: step 2 (75 min), then step 5 (150 min, 75
    # after step 2); step 4 (125 min) is only 50 minutes after step 2.
    assert _committed(tmp_path) == ["m-2", "m-5", "m-6", "m-7"]
    assert shardsave.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths == (
        str(tmp_path / "m-6"),
        str(tmp_path / "m-7"),
    )


def test_a_new_saver_continues_retention(tmp_path):
    clock = Clock()
    first = shardsave.Saver(max_to_keep=2, clock=clock, async_save=False)
    for step in range(3):
        clock.t += 1
        first.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=step)
    assert _committed(tmp_path) == ["m-1", "m-2"]
    first.close()  # the job ends (a killed one lets go of the save path too)
    second = shardsave.Saver(max_to_keep=2, clock=clock, async_save=False)  # a restarted job
    for step in range(3, 5):
        clock.t += 1
        second.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=step)
    assert _committed(tmp_path) == ["m-3", "m-4"]


def test_moved_directory_still_restores(tmp_path):
    saver = shardsave.Saver(async_save=False)
    saver.save({"a": np.arange(3)}, str(tmp_path / "old" / "m"), global_step=1)
    shutil.move(tmp_path / "old", tmp_path / "new")
    latest = shardsave.latest_checkpoint(str(tmp_path / "new"))
    assert latest == str(tmp_path / "new" / "m-1")
    np.testing.assert_array_equal(shardsave.Saver().restore(latest)["a"], np.arange(3))


def test_absolute_paths_when_asked(tmp_path):
    saver = shardsave.Saver(save_relative_paths=False, async_save=False)
    saver.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=1)
    state = parse_state_text((tmp_path / "checkpoint").read_text())
    assert state.model_checkpoint_path == str(tmp_path / "m-1")


def test_no_state_file_and_a_corrupt_one(tmp_path):
    assert shardsave.latest_checkpoint(str(tmp_path)) is None
    assert shardsave.get_checkpoint_state(str(tmp_path / "absent")) is None
    (tmp_path / "checkpoint").write_text("{not json")
    with pytest.warns(StateFileWarning, match="checkpoint"):
        assert shardsave.latest_checkpoint(str(tmp_path)) is None


def test_a_commit_the_state_file_missed_is_adopted_by_retention(tmp_path):
    clock = Clock()
    saver = shardsave.Saver(max_to_keep=2, clock=clock, async_save=False)
    for step in (1, 2):
        clock.t += 1
        saver.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=step)
    state = (tmp_path / "checkpoint").read_bytes()
    clock.t += 1
    saver.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=3)
    # As if killed after m-3's index was written but before the state file was updated:
    (tmp_path / "checkpoint").write_bytes(state)
    # The commit is newer than anything the state file names: it is the latest.
    assert shardsave.latest_checkpoint(str(tmp_path)).endswith("m-3")
    saver.close()
    restarted = shardsave.Saver(max_to_keep=2, clock=clock, async_save=False)
    clock.t += 1
    restarted.save({"a": np.ones(1)}, str(tmp_path / "m"), global_step=4)
    assert _committed(tmp_path) == ["m-3", "m-4"]  # m-3 adopted, so m-1 and m-2 went first
