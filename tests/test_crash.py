"""Faults done for real: SIGKILL at every phase of an async save, a full disk, hostile names.

The SIGKILL loop runs 20 kills by default; SHARDSAVE_KILLS=500 runs more (the extra
ones at random moments), e.g.:  SHARDSAVE_KILLS=500 pytest tests/test_crash.py -k sigkill
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import shardsave
import shardsave.formats.shardsave
import shardsave.storage
from shardsave.errors import SaveFailedError, StateFileWarning
from shardsave.storage.testing import FullDisk

CHILD = Path(__file__).parent / "programs" / "crash_child.py"

PHASES = ["stage", "data", "fsync", "index", "state", "delete"]


def _committed(directory: Path) -> dict[str, int]:
    return {p.name[: -len(".index")]: int(p.name[:-6].rsplit("-", 1)[1]) for p in directory.glob("*.index")}


def _check_latest_restores(directory: Path) -> int | None:
    state = shardsave.get_checkpoint_state(str(directory))  # parses, or raises
    latest = shardsave.latest_checkpoint(str(directory))
    if latest is None:
        assert state is None or not _committed(directory)
        return None
    step = int(latest.rsplit("-", 1)[1])
    restored = shardsave.Saver().restore(latest)
    assert restored["step"] == step
    assert np.all(np.asarray(restored["sharded"]) == step)
    assert np.all(np.asarray(restored["replicated"]) == step)
    assert np.all(restored["host"] == step)
    if "big" in restored:
        assert np.all(np.asarray(restored["big"]) == step)
    # Metadata lives in the index: committed with its checkpoint, or not at all.
    assert shardsave.CheckpointReader(latest).metadata == {"loader": {"position": step}}
    return step


def _kill_once(directory: Path, pause_at: str, delay: float | None, cap_mib: int | None = None) -> list[str]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, str(CHILD), str(directory), pause_at]
    argv += [] if cap_mib is None else [str(cap_mib)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, f"the saving child died by itself: {seen[-5:]}"
                continue
            seen.append(line)
            if delay is not None and line == "ready":
                time.sleep(delay)
                break
            if line == "paused":
                break
        else:
            raise AssertionError(f"the child never reached {pause_at or 'ready'}: {seen[-5:]}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return seen


def test_sigkill_at_every_phase_of_async_saves(tmp_path):
    kills = int(os.environ.get("SHARDSAVE_KILLS", "20"))
    rng = random.Random(1234)
    # Half the kills pause the child inside a chosen phase (each phase at least twice),
    # the rest land at random moments. With the default 20, 8 are random.
    plan = [(f"{phase}:{n}", None) for n in (1, 3) for phase in PHASES]
    plan += [("", rng.uniform(0.0, 0.6)) for _ in range(kills - len(plan))]
    rng.shuffle(plan)
    directory = tmp_path / "ckpt"
    phases_hit = set()
    committed_before = _committed(directory)
    for pause_at, delay in plan:
        seen = _kill_once(directory, pause_at, delay)
        last_phase = next((line.split()[1] for line in reversed(seen) if line.startswith("phase")), "start")
        phases_hit.add(last_phase)
        if pause_at.startswith("fsync"):  # killed before the rename: the value is not visible
            assert any(shardsave.storage.temp_target(p.name) for p in directory.iterdir())
        _check_latest_restores(directory)
        committed_now = _committed(directory)
        # A committed checkpoint disappears only through retention: three newer ones exist.
        for gone, step in committed_before.items():
            if gone not in committed_now:
                assert sum(s > step for s in committed_now.values()) >= 3, (gone, committed_now)
        committed_before = committed_now
    assert set(PHASES) <= phases_hit

    # A new Saver continues here; its first commit cleans up what the kills left.
    latest_step = _check_latest_restores(directory) or 0
    saver = shardsave.Saver(max_to_keep=3, async_save=False)
    tree = shardsave.Saver().restore(shardsave.latest_checkpoint(str(directory)))
    tree["step"] = latest_step + 1
    saver.save(tree, str(directory / "model"), global_step=latest_step + 1)
    leftovers = [
        p.name
        for p in directory.iterdir()
        if (parsed := shardsave.formats.shardsave.parse_data_key(p.name))
        and not (directory / f"{parsed[0]}.index").exists()
    ]
    assert leftovers == []
    # Interrupted writes leave temporary files; those of checkpoints are removed too (a
    # state file's may stay: another Saver of the directory could be writing it now).
    temporary = [
        p.name
        for p in directory.iterdir()
        if shardsave.storage.temp_target(p.name) not in (None, "checkpoint")
    ]
    assert temporary == []
    assert len(_committed(directory)) == 3
    for name in _committed(directory):
        assert shardsave.Saver().restore(str(directory / name))["step"] == int(name.rsplit("-", 1)[1])


def test_sigkill_in_the_middle_of_capped_saves(tmp_path):
    # An 8 MiB cap streams each save through 1 MiB pieces, one part each: the paused kills
    # land between parts of one data file, some parts of it written and the rest not.
    directory = tmp_path / "ckpt"
    plan = [("data:12", None), ("fsync:20", None), ("data:40", None), ("", 0.4), ("", 0.9)]
    steps = []
    for pause_at, delay in plan:
        seen = _kill_once(directory, pause_at, delay, cap_mib=8)
        if pause_at:
            assert "paused" in seen
            uncommitted = {
                parsed[0]
                for p in directory.iterdir()
                if (parsed := shardsave.formats.shardsave.parse_data_key(p.name))
                and not (directory / f"{parsed[0]}.index").exists()
            }
            assert uncommitted, f"killed at {pause_at}, yet no save was left half-written"
        steps.append(_check_latest_restores(directory))
    # Each restart went on from the latest checkpoint: the steps only grow.
    known = [s for s in steps if s is not None]
    assert known and known == sorted(known), steps


def test_sigkill_between_the_first_commit_and_the_first_state_file(tmp_path):
    directory = tmp_path / "ckpt"
    seen = _kill_once(directory, "state:1", None)
    assert "phase index 1" in seen and not (directory / "checkpoint").exists()
    # No state file at all: the commit is found from the listing and restores.
    assert _check_latest_restores(directory) == 1
    # The restarted job resumes after it instead of starting over and colliding with model-1.
    seen = _kill_once(directory, "state:1", None)
    assert _check_latest_restores(directory) == 2


def _full_disk_checks(
    directory: Path, saver: shardsave.Saver, big: dict, small: dict, async_save: bool
) -> None:
    good = saver.save(small, str(directory / "m"), global_step=1)
    saver.wait_until_finished()
    state_before = (directory / "checkpoint").read_bytes()
    files_before = sorted(p.name for p in directory.iterdir())
    if async_save:
        saver.save(big, str(directory / "m"), global_step=2)
        with pytest.raises(SaveFailedError, match="m-2") as info:
            saver.wait_until_finished()
    else:
        with pytest.raises(SaveFailedError, match="m-2") as info:
            saver.save(big, str(directory / "m"), global_step=2)
    assert (
        "No space left" in str(info.value) or "ENOSPC" in str(info.value) or info.value.__cause__ is not None
    )
    assert (directory / "checkpoint").read_bytes() == state_before
    assert sorted(p.name for p in directory.iterdir() if not p.name.endswith(".__lock")) == files_before
    assert shardsave.latest_checkpoint(str(directory)) == good
    np.testing.assert_array_equal(saver.restore(good)["w"], small["w"])


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and sys.platform.startswith("linux")


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_on_a_small_tmpfs(tmp_path, async_save):
    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root; test_full_disk_injected covers the same checks")
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(
            f"mount refused here ({result.stderr.decode().strip()}); test_full_disk_injected covers it"
        )
    saver = shardsave.Saver(max_to_keep=1, async_save=async_save)
    try:
        big = {"w": np.ones((1024, 1024), np.float32)}  # 4 MiB: cannot fit
        small = {"w": np.arange(1000, dtype=np.float32)}
        _full_disk_checks(mount, saver, big, small, async_save)
    finally:
        saver.close()  # it holds the save path's lock file open on the mount
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_injected(tmp_path, async_save):
    """The storage layer fails writes with ENOSPC once 64 KiB have been written."""
    budget = [64 << 10]
    with shardsave.storage.wrapping_stores(lambda store: FullDisk(store, budget)):
        saver = shardsave.Saver(max_to_keep=1, async_save=async_save)
        _full_disk_checks(
            tmp_path, saver, {"w": np.ones(1 << 16, np.float32)}, {"w": np.arange(10.0)}, async_save
        )


@pytest.mark.parametrize("with_nul", [False, True])
def test_hostile_state_file_cannot_steer_deletion(tmp_path, with_nul):
    victim = tmp_path / "victim.index"
    victim.write_text("keep me")
    directory = tmp_path / "ckpt"
    directory.mkdir()
    paths = ["../victim", str(tmp_path / "victim"), ".."] + (["a\\000b"] if with_nul else [])
    (directory / "checkpoint").write_text(
        'model_checkpoint_path: "../victim"\n'
        + "".join(f'all_model_checkpoint_paths: "{p}"\n' for p in paths)
        + "".join(f"all_model_checkpoint_timestamps: {t}.0\n" for t in range(1, len(paths) + 1))
        + f"last_preserved_timestamp: {time.time()}\n"
    )
    saver = shardsave.Saver(max_to_keep=1, async_save=False)
    with contextlib.ExitStack() as stack:
        if with_nul:  # a NUL makes the whole file unreadable: it is ignored, with a warning
            stack.enter_context(pytest.warns(StateFileWarning, match="NUL"))
        for step in range(3):
            saver.save({"a": np.ones(2)}, str(directory / "m"), global_step=step)
    saver.close()
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["checkpoint", "m-2.index", *(f"m-2.data-{k:05d}-of-00001" for k in range(1))]
    )
