"""Multi-tier checkpoints: a local tier every 2 steps with replicas on peers, the persistent every 10.

The multi-process tests run tests/programs/tiers.py (an optax training loop) on
4 and 8 processes (1 or 2 CPU devices each) on loopback, kill processes with SIGKILL, and
restart the job: every process must resume from the step the tiers say, bit for
bit (each restored shard against the global values process 0 gathered at that
step), with that step's data position.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
from shardsave.errors import CorruptCheckpointError
from shardsave.save.replicas import replica_shifts
from shardsave.tiers.recover import choose, plan_moves

PROGRAM = Path(__file__).parent / "programs" / "tiers.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(
    directory: Path, n: int, *args: str, devices: int = 1, timeout: float = 150, kill: int | None = None
) -> list[dict]:
    """Runs the training job on n processes; returns each one's exit code and JSON records.

    With kill (the job runs with --stop-at), once every process has reported that it
    stopped (or has died), process `kill` is SIGKILLed, then the others: the job is
    restarted the way a scheduler restarts it.
    """
    argv = [
        sys.executable,
        str(PROGRAM),
        str(directory),
        "--processes",
        str(n),
        "--port",
        str(_port()),
        *args,
    ]
    procs = []
    for pid in range(n):
        env = {
            **os.environ,
            "PID": str(pid),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",
        }
        procs.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        )
    deadline = time.monotonic() + timeout
    # Both pipes are drained as the processes run, so that none blocks on a full pipe.
    lines: list[list[str]] = [[] for _ in procs]
    errs: list[list[str]] = [[] for _ in procs]
    readers = [
        threading.Thread(target=lambda pipe=pipe, out=out: out.extend(pipe), daemon=True)
        for proc, out, err in zip(procs, lines, errs)
        for pipe, out in ((proc.stdout, out), (proc.stderr, err))
    ]
    for reader in readers:
        reader.start()
    try:
        if kill is not None:
            # Until every process has stopped, or died (a victim of --kill-during-copy).
            while time.monotonic() < deadline and not all(
                proc.poll() is not None or any('"stopped"' in x for x in list(out))
                for proc, out in zip(procs, lines)
            ):
                time.sleep(0.1)
            for pid in [kill, *(p for p in range(n) if p != kill)]:
                procs[pid].send_signal(signal.SIGKILL)
                procs[pid].wait()
        results = []
        for proc, out, reader in zip(procs, lines, readers):
            assert proc.stderr is not None
            err = (
                proc.stderr.read()
                if proc.wait(timeout=max(1, deadline - time.monotonic())) is not None
                else ""
            )
            reader.join(timeout=10)
            records = [json.loads(x) for x in out if x.startswith("{")]
            results.append({"code": proc.returncode, "records": records, "err": err[-3000:]})
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _record(result: dict, key: str) -> dict:
    found = [r for r in result["records"] if key in r]
    assert found, f"no {key!r} record (exit {result['code']}):\n{result['records']}\n{result['err']}"
    return found[0]


@pytest.fixture(scope="module")
def killed_at_17(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job of 4 processes trained to step 17, where process 2 was SIGKILLed (local step 16 committed)."""
    directory = tmp_path_factory.mktemp("job")
    results = run_job(directory, 4, "--stop-at", "17", kill=2)
    for result in results:
        assert _record(result, "stopped")["error"] is None
        assert result["code"] == -signal.SIGKILL
    return directory


def _restart(source: Path, target: Path, lost: list[int]) -> Path:
    shutil.copytree(source, target)
    for pid in lost:  # a replaced host: its local directory is empty
        shutil.rmtree(target / f"local-{pid}")
    return target


def test_a_replaced_host_resumes_every_process_from_the_newest_local_step(killed_at_17, tmp_path):
    directory = _restart(killed_at_17, tmp_path / "job", lost=[2])
    results = run_job(directory, 4, "--last", "18")
    for result in results:
        resumed = _record(result, "resumed")
        assert (resumed["resumed"], resumed["tier"], resumed["position"], resumed["exact"]) == (
            16,
            "local",
            16,
            True,
        )
        assert "newer than the persistent tier's newest (step 10)" in resumed["reason"]
        assert result["code"] == 0


def test_two_adjacent_hosts_lost_resume_from_the_persistent_tier_and_say_why(killed_at_17, tmp_path):
    directory = _restart(killed_at_17, tmp_path / "job", lost=[1, 2])
    results = run_job(directory, 4, "--last", "12")
    for result in results:
        resumed = _record(result, "resumed")
        assert (resumed["resumed"], resumed["tier"], resumed["position"], resumed["exact"]) == (
            10,
            "persistent",
            10,
            True,
        )
        # Process 1's files were on process 1 and on its replica holder, process 2.
        assert "local step 16 lacks the data files of process(es) [1]" in resumed["reason"]
        assert resumed["reason"].endswith("restoring " + str(directory / "ckpt" / "model-10"))
        # Steps 14 and 16 belong to the timeline the job left: gone, so that retention
        # keeps step 12, saved after the resume.
        listing = _record(result, "finished")["listing"]
        assert [f for f in listing if f.endswith(".index")] == ["model-12.index"], listing


def test_with_two_replicas_two_adjacent_hosts_lost_resume_from_the_local_tier(tmp_path):
    # replicas=2: process p's files are also on p + 1 and p + 2, so losing processes 1
    # and 2 leaves a copy of every file (process 1's on 3, process 2's on 3 and 0).
    first = tmp_path / "first"
    for result in run_job(first, 4, "--stop-at", "17", "--replicas", "2", kill=2):
        assert _record(result, "stopped")["error"] is None
    held = sorted(f for f in os.listdir(first / "local-3") if f.startswith("model-16.data"))
    assert held == [f"model-16.data-{k:05d}-of-00004" for k in (1, 2, 3)]  # its own, and 1's and 2's
    directory = _restart(first, tmp_path / "job", lost=[1, 2])
    for result in run_job(directory, 4, "--last", "18", "--replicas", "2"):
        resumed = _record(result, "resumed")
        assert (resumed["resumed"], resumed["tier"], resumed["position"], resumed["exact"]) == (
            16,
            "local",
            16,
            True,
        )
        assert result["code"] == 0


def test_the_local_tier_restores_onto_half_the_processes(killed_at_17, tmp_path):
    # Two processes of two devices each, on the local directories of old processes 0
    # and 2: between them (own files and replicas) they hold every file of step 16.
    directory = _restart(killed_at_17, tmp_path / "job", lost=[])
    results = run_job(directory, 2, "--last", "18", "--local", "0,2", devices=2)
    for result in results:
        resumed = _record(result, "resumed")
        assert (resumed["resumed"], resumed["tier"], resumed["exact"]) == (16, "local", True)
        assert "the 2 processes' local tiers hold all its 4 data files" in resumed["reason"]


def test_a_damaged_local_file_is_restored_from_its_replica(killed_at_17, tmp_path):
    directory = _restart(killed_at_17, tmp_path / "job", lost=[])
    damaged = directory / "local-1" / "model-16.data-00001-of-00004"  # process 1's own file
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    results = run_job(directory, 4, "--last", "18")
    for result in results:
        resumed = _record(result, "resumed")
        assert (resumed["resumed"], resumed["tier"], resumed["exact"]) == (16, "local", True)
        assert (
            "local step 16 failed to restore on process(es) [1] (CorruptCheckpointError" in resumed["reason"]
        )
        assert str(damaged) in resumed["reason"]


def test_a_peer_killed_while_copying_fails_the_local_save_everywhere_and_both_tiers_keep_their_rules(
    tmp_path,
):
    results = run_job(
        tmp_path, 4, "--stop-at", "18", "--kill", "2", "--kill-during-copy", "--timeout", "10", kill=2
    )
    assert not [r for r in results[2]["records"] if "stopped" in r]  # it died in the save
    for pid in (0, 1, 3):
        error = _record(results[pid], "stopped")["error"]
        assert error is not None, pid
        # Every survivor names process 2: at the reports' deadline, or (process 3, which
        # pulls process 2's files for its replica) when that pull breaks off, if it had not ended.
        named = ["processes [2] did not report within 10 s"]
        if pid == 3:
            named.append("pulling process 2's data files for this process's replica from")
        assert any(n in error for n in named), error
        local = sorted(os.listdir(tmp_path / f"local-{pid}"))
        assert "model-16.index" in local and "model-18.index" not in local
    assert "model-10.index" in os.listdir(tmp_path / "ckpt")

    # The job restarts, resumes from step 16 and trains on to step 50.
    results = run_job(tmp_path, 4, "--last", "50")
    for pid, result in enumerate(results):
        resumed = _record(result, "resumed")
        assert (resumed["resumed"], resumed["tier"], resumed["position"], resumed["exact"]) == (
            16,
            "local",
            16,
            True,
        )
        # Retention: the 2 newest local steps (46 and 48; 50 went to the persistent tier),
        # each this process's own file and its replica of its predecessor's, and nothing else.
        listing = _record(result, "finished")["listing"]
        files = sorted(f"model-{s}.data-{k:05d}-of-00004" for s in (46, 48) for k in (pid, (pid - 1) % 4))
        assert listing == sorted([".shardsave-domain", *files, "model-46.index", "model-48.index"])
    persistent = sorted(p for p in os.listdir(tmp_path / "ckpt") if p.endswith(".index"))
    assert persistent == ["model-30.index", "model-40.index", "model-50.index"]  # max_to_keep=3


def test_a_host_value_that_differs_between_processes_fails_the_local_save_on_every_process(tmp_path):
    # A numpy leaf is stored from one process; its replica holder checks it against
    # its own value, which differs: that process refuses to commit, and every process raises.
    results = run_job(tmp_path, 4, "--stop-at", "2", "--host-leaf-per-process", kill=0)
    errors = [_record(result, "stopped")["error"] for result in results]
    assert all(e is not None and "could not commit it" in e for e in errors), errors
    assert all("leaf 'host'" in e and "must be the same on every process" in e for e in errors), errors
    # One process refused; the others took their commits back: the step is committed nowhere.
    assert all(not (tmp_path / f"local-{pid}" / "model-2.index").exists() for pid in range(4))
    assert all("no process keeps it" in e for e in errors), errors
    refused = {e.split("process(es) ")[1].split("]")[0] + "]" for e in errors}
    assert len(refused) == 1 and len(json.loads(next(iter(refused)))) == 1, refused


def test_eight_processes_two_per_host_resume_from_the_local_tier_after_a_host_is_replaced(tmp_path):
    # Processes 2h and 2h+1 share host h's local directory (one failure domain), so
    # each one's replica goes to the next host, not to its neighbour on the same one.
    hosts = "--local", "0,0,1,1,2,2,3,3"
    for result in run_job(tmp_path, 8, "--stop-at", "13", *hosts, kill=5):
        assert _record(result, "stopped")["error"] is None
    held = sorted(os.listdir(tmp_path / "local-2"))
    assert [f for f in held if f.startswith("model-12.data")] == [
        f"model-12.data-{k:05d}-of-00008"
        for k in (2, 3, 4, 5)  # host 2's own files, and host 1's
    ]
    shutil.rmtree(tmp_path / "local-2")  # host 2 (processes 4 and 5) replaced
    for result in run_job(tmp_path, 8, "--last", "14", *hosts):
        resumed = _record(result, "resumed")
        assert (resumed["resumed"], resumed["tier"], resumed["position"], resumed["exact"]) == (
            12,
            "local",
            12,
            True,
        )
        assert "the 8 processes' local tiers hold all its 8 data files" in resumed["reason"]


# ---------------------------------------------------------------- one process, and the pure parts


def _state() -> dict:
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("a", "b")))
    return {"w": w, "n": np.int64(3)}


def test_one_process_saves_locally_and_restores_the_newest_tier(tmp_path):
    saver = shardsave.Saver(
        save_interval_steps=10, local_directory=str(tmp_path / "local"), local_interval_steps=2, replicas=0
    )
    state = _state()
    for step in range(1, 16):
        if saver.should_save(step):
            saver.save({**state, "n": np.int64(step)}, str(tmp_path / "model"), global_step=step)
        elif saver.should_save(step, tier="local"):
            saver.save(
                {**state, "n": np.int64(step)}, str(tmp_path / "model"), global_step=step, tier="local"
            )
    saver.wait_until_finished()
    local = sorted(p for p in os.listdir(tmp_path / "local") if p.endswith(".index"))
    assert local == ["model-12.index", "model-14.index"]  # local_max_to_keep=2
    assert shardsave.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model-10")  # the persistent tier

    fresh = shardsave.Saver(local_directory=str(tmp_path / "local"), local_interval_steps=2, replicas=0)
    restored = fresh.restore_latest(str(tmp_path / "model"), {"w": jnp.zeros((8, 8)), "n": np.int64(0)})
    assert int(restored["n"]) == 14
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    assert fresh.last_restore is not None and fresh.last_restore.tier == "local"
    assert not fresh.should_save(14, tier="local") and fresh.should_save(16, tier="local")

    # The local tier lost: the persistent tier, and the reason.
    shutil.rmtree(tmp_path / "local")
    restored = fresh.restore_latest(str(tmp_path / "model"), {"w": jnp.zeros((8, 8)), "n": np.int64(0)})
    assert int(restored["n"]) == 10
    assert fresh.last_restore is not None and fresh.last_restore.tier == "persistent"
    assert (
        fresh.last_restore.reason
        == f"no local tier holds a committed step; restoring {tmp_path / 'model-10'}"
    )


def test_restore_latest_finds_nothing_in_either_tier(tmp_path):
    saver = shardsave.Saver(local_directory=str(tmp_path / "local"), replicas=0)
    assert saver.restore_latest(str(tmp_path / "model"), {"w": jnp.zeros(3)}) is None


def test_a_local_step_that_will_not_restore_is_never_a_silent_fresh_start(tmp_path):
    saver = shardsave.Saver(local_directory=str(tmp_path / "local"), replicas=0)
    saver.save(_state(), str(tmp_path / "model"), global_step=2, tier="local")
    saver.wait_until_finished()
    damaged = tmp_path / "local" / "model-2.data-00003-of-00008"
    data = bytearray(damaged.read_bytes())
    data[0] ^= 0xFF
    damaged.write_bytes(bytes(data))
    target = {"w": jnp.zeros((8, 8)), "n": np.int64(0)}
    with pytest.raises(CorruptCheckpointError, match="local step 2 failed to restore on process"):
        saver.restore_latest(str(tmp_path / "model"), target)


def test_with_nothing_restorable_the_job_starts_afresh_and_retention_keeps_its_new_steps(tmp_path):
    saver = shardsave.Saver(local_directory=str(tmp_path / "local"), replicas=0)
    for step in (6, 8):
        saver.save(_state(), str(tmp_path / "model"), global_step=step, tier="local")
    saver.wait_until_finished()
    for step in (6, 8):  # a data file of each lost (as a lost host's)
        (tmp_path / "local" / f"model-{step}.data-00001-of-00008").unlink()
    assert saver.restore_latest(str(tmp_path / "model"), {"w": jnp.zeros((8, 8)), "n": np.int64(0)}) is None

    # Kept (a directory missing by mistake may come back), until the new timeline's
    # steps replace them: retention goes by the time of each commit, not by step.
    def indexes() -> list[str]:
        return sorted(f for f in os.listdir(tmp_path / "local") if f.endswith(".index"))

    assert indexes() == ["model-6.index", "model-8.index"]
    for step in (2, 4):
        saver.save(_state(), str(tmp_path / "model"), global_step=step, tier="local")
        saver.wait_until_finished()
    assert indexes() == ["model-2.index", "model-4.index"]


def test_local_saves_are_refused_where_they_cannot_be_kept(tmp_path):
    state = _state()
    with pytest.raises(ValueError, match="needs a local tier"):
        shardsave.Saver().save(state, str(tmp_path / "m"), global_step=1, tier="local")
    with pytest.raises(ValueError, match="needs global_step"):
        shardsave.Saver(local_directory=str(tmp_path / "l"), replicas=0).save(
            state, str(tmp_path / "m"), tier="local"
        )
    with pytest.raises(ValueError, match='tier must be "persistent" or "local"'):
        shardsave.Saver().save(state, str(tmp_path / "m"), global_step=1, tier="nvme")
    # One process has no peer in another failure domain to hold a replica.
    with pytest.raises(ValueError, match="replicas=1 needs every process's shards on 2 failure domains"):
        shardsave.Saver(local_directory=str(tmp_path / "l")).save(
            state, str(tmp_path / "m"), global_step=1, tier="local"
        )
    with pytest.raises(ValueError, match="replicas with save_host_bytes are not supported"):
        shardsave.Saver(local_directory=str(tmp_path / "l"), save_host_bytes=64 << 20)
    with pytest.raises(ValueError, match="must be a path on this host"):
        shardsave.Saver(local_directory="s3://bucket/local")


def test_replicas_go_to_other_failure_domains_by_a_shift_of_the_process_index():
    assert replica_shifts(["a", "b", "c", "d"], 1) == [1]
    assert replica_shifts(["a", "b", "c", "d"], 2) == [1, 2]
    # Two processes per host: the copy goes to the next host, not the neighbour on the same one.
    assert replica_shifts(["h0", "h0", "h1", "h1"], 1) == [2]
    assert replica_shifts(["h0", "h1", "h0", "h1"], 1) == [1]
    with pytest.raises(ValueError, match="write to 2"):
        replica_shifts(["h0", "h0", "h1", "h1"], 2)


def _report(step_files: dict[int, list[int]], owners: list[int]) -> dict:
    return {
        "steps": {str(s): {"base": f"model-{s}", "files": f, "owners": owners} for s, f in step_files.items()}
    }


def test_the_choice_of_tier_is_the_newest_complete_local_step_newer_than_the_persistent():
    owners = [0, 1, 2]
    whole = {0: _report({8: [0, 2], 6: [0, 2]}, owners), 1: _report({8: [1, 0], 6: [1, 0]}, owners)}
    choice = choose(whole, ["ckpt/model-5", 5])
    assert (choice.tier, choice.step, choice.base) == ("local", 8, "model-8")
    # Step 8 lacks file 1 (process 1's) once process 1's directory is lost; step 6 does not.
    partial = {0: _report({8: [0, 2], 6: [0, 1, 2]}, owners), 1: _report({}, owners)}
    choice = choose(partial, ["ckpt/model-5", 5])
    assert (choice.tier, choice.step) == ("local", 6)
    # Nothing newer than the persistent step: the persistent tier.
    choice = choose(whole, ["ckpt/model-8", 8])
    assert (choice.tier, choice.step, choice.path) == ("persistent", 8, "ckpt/model-8")
    assert choice.reason == "no local step is newer than the persistent tier's step 8; restoring ckpt/model-8"
    choice = choose({0: _report({8: [0]}, owners)}, None)
    assert (choice.tier, choice.step, choice.path) == ("persistent", None, None)
    assert "lacks the data files of process(es) [1, 2]" in choice.reason


def test_moves_bring_each_process_the_ranges_it_lacks_from_the_holder_that_sends_least():
    needs = {
        0: {0: [(0, 10)], 1: [(0, 4), (8, 20)], 2: [(0, 30)]},
        1: {1: [(0, 20)]},
        2: {0: [(2, 6)], 2: [(0, 30)]},
    }
    moves = plan_moves({0: {0, 2}, 1: {1, 0}, 2: {2, 1}}, needs)
    assert [(m.file, m.start, m.stop, m.source, m.dest) for m in moves] == [
        (1, 0, 4, 1, 0),
        (1, 8, 20, 2, 0),  # process 1 sent 4 bytes already
        (0, 2, 6, 0, 2),
    ]
