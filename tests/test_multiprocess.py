"""Several processes on jax.distributed (loopback, CPU devices, gloo collectives)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import index_doc
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave

PROGRAM = Path(__file__).parent / "programs" / "processes.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(
    n: int, devices: int, scenario: str, directory: Path, timeout: float = 180, heartbeat: int = 60
) -> list[dict]:
    """Starts n processes of `devices` CPU devices each running a scenario of PROGRAM.

    Returns each one's exit status and output.
    """
    argv = [sys.executable, str(PROGRAM), scenario, str(directory), "--processes", str(n)]
    argv += ["--port", str(_free_port()), "--heartbeat", str(heartbeat)]
    procs = []
    for pid in range(n):
        env = {
            **os.environ,
            "PID": str(pid),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",
        }
        procs.append(
            subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
            results.append({"code": proc.returncode, "out": out, "err": err})
    finally:
        for proc in procs:  # every process ends with the test, whatever happened
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _ok(results: list[dict]) -> list[str]:
    for r in results:
        assert r["code"] == 0, f"a process failed ({r['code']}):\n{r['out']}\n{r['err'][-3000:]}"
    return [r["out"] for r in results]


def test_processes_restore_a_tensorflow_checkpoint_each_onto_its_devices(tmp_path):
    outs = _ok(run_processes(2, 4, "restore_tensorflow", tmp_path, timeout=240))
    assert [json.loads(o.strip().splitlines()[-1]) for o in outs] == [
        {"pid": 0, "ok": True},
        {"pid": 1, "ok": True},
    ]


def test_processes_write_one_safetensors_set_each_its_own_shards(tmp_path):
    from safetensors.numpy import load_file

    outs = _ok(run_processes(2, 4, "safetensors_export", tmp_path, timeout=240))
    reports = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    names = [Path(p).name for p in reports[0]["written"]]
    assert reports[0]["written"] == reports[1]["written"]
    # Tree order c, h, r, w in files of at most 2048 bytes: c and w (2048 each) alone, h and r together.
    assert names == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)] + [
        "model.safetensors.index.json"
    ]
    loaded = {}
    for name in names[:-1]:
        loaded.update(load_file(str(tmp_path / "hf" / name)))
    w = np.arange(32 * 16, dtype=np.float32).reshape(32, 16)
    np.testing.assert_array_equal(loaded["w"], w)
    np.testing.assert_array_equal(loaded["c"], w)  # split by columns, written row by row
    np.testing.assert_array_equal(loaded["r"], np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8))
    np.testing.assert_array_equal(loaded["h"], np.arange(5, dtype=np.int64))
    assert not list((tmp_path / "hf").glob("*.tmp*"))
    index = json.loads((tmp_path / "hf" / names[-1]).read_text())
    assert index["weight_map"] == {"c": names[0], "h": names[1], "r": names[1], "w": names[2]}


@pytest.mark.parametrize("processes, devices", [(2, 4), (8, 1)])
def test_processes_save_async_and_restore(tmp_path, processes, devices):
    outs = _ok(run_processes(processes, devices, "save_and_restore", tmp_path, timeout=240))
    reports = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    assert all(r["latest"] == str(tmp_path / "model-3") for r in reports)
    assert sorted(p.name for p in tmp_path.glob("*.index")) == ["model-2.index", "model-3.index"]
    index = index_doc.read(tmp_path / "model-3")
    # Each process wrote only its own devices' files; replicated data is stored once.
    by_process: dict[int, int] = {}
    for leaf in index["leaves"]:
        for file, _, nbytes, *_ in leaf["shards"]:
            pid = index["files"][file]["process_index"]
            by_process[pid] = by_process.get(pid, 0) + nbytes
    assert sorted(by_process) == list(range(processes))
    assert sum(by_process.values()) == VALUES_BYTES
    assert max(by_process.values()) - min(by_process.values()) <= 8 * 8 * 4 + 5 * 8  # balanced by bytes
    # And the checkpoint restores in this single process (8 devices) onto another mesh.
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    target = {
        "w": jax.ShapeDtypeStruct((32, 16), np.float32, sharding=NamedSharding(mesh, P("b", "a"))),
        "r": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=NamedSharding(mesh, P("a"))),
        "h": np.zeros(5, np.int64),
    }
    restored = shardsave.Saver().restore(str(tmp_path / "model-3"), target)
    np.testing.assert_array_equal(
        np.asarray(restored["w"]), np.arange(32 * 16, dtype=np.float32).reshape(32, 16)
    )


VALUES_BYTES = 32 * 16 * 4 + 8 * 8 * 4 + 5 * 8


def test_processes_save_under_caps_of_their_own(tmp_path):
    outs = _ok(run_processes(2, 4, "capped_save", tmp_path, timeout=240))
    reports = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    assert all(r["latest"] == str(tmp_path / "model-2") for r in reports)
    index = index_doc.read(tmp_path / "model-2")
    # Each process wrote its files in parts of its own buffers' size (an eighth of its cap),
    # and process 0 recorded them all in the index.
    piece = {0: 1 << 20, 1: 2 << 20}
    for f in index["files"]:
        if f["nbytes"] > piece[f["process_index"]]:
            assert f["parts"][0] == piece[f["process_index"]], f
    assert {f["process_index"] for f in index["files"] if "parts" in f} == {0, 1}
    # What each process holds once the saves are done is its own cap (the staging ring).
    for r in reports:
        assert r["held"] < r["cap"] + 64 * (1 << 20), r
    np.testing.assert_array_equal(
        shardsave.CheckpointReader(str(tmp_path / "model-2")).get("big"),
        np.arange(6 * (1 << 20), dtype=np.float32).reshape(48, -1),
    )


def test_four_processes_restore_onto_two_and_onto_one(tmp_path):
    _ok(run_processes(4, 2, "save_only", tmp_path))
    index = index_doc.read(tmp_path / "model-7")
    assert sorted({f["process_index"] for f in index["files"]}) == [0, 1, 2, 3]
    outs = _ok(run_processes(2, 2, "restore_only", tmp_path))
    assert all('"restored": 4' in o for o in outs)
    alone = subprocess.run(
        [sys.executable, str(PROGRAM), "restore_only", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"},
    )
    assert '"restored": 1' in alone.stdout, alone.stderr[-3000:]


def test_a_compressed_save_of_two_processes_restores_onto_one(tmp_path, monkeypatch):
    """Each process compresses its own files and reports where its frames lie; process 0's
    index records them all."""
    monkeypatch.setenv("COMPRESSION", "zstd")
    _ok(run_processes(2, 2, "save_only", tmp_path))
    index = index_doc.read(tmp_path / "model-7")
    assert sorted({f["process_index"] for f in index["files"]}) == [0, 1]
    assert all(len(s) == 7 for leaf in index["leaves"] for s in leaf["shards"])
    alone = subprocess.run(
        [sys.executable, str(PROGRAM), "restore_only", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"},
    )
    assert '"restored": 1' in alone.stdout, alone.stderr[-3000:]
    assert shardsave.CheckpointReader(str(tmp_path / "model-7")).verify() == []


def test_eight_processes_restore_onto_four(tmp_path):
    _ok(run_processes(8, 1, "save_only", tmp_path, timeout=240))
    index = index_doc.read(tmp_path / "model-7")
    assert sorted({f["process_index"] for f in index["files"]}) == list(range(8))
    outs = _ok(run_processes(4, 1, "restore_only", tmp_path, timeout=240))
    assert all('"restored": 4' in o for o in outs)


def test_one_process_checkpoint_restores_on_two(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    w = np.arange(32 * 16, dtype=np.float32).reshape(32, 16)
    tree = {
        "w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
        "r": jax.device_put(np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), NamedSharding(mesh, P())),
        "h": np.arange(5, dtype=np.int64),
    }
    shardsave.Saver(async_save=False).save(tree, str(tmp_path / "model"), global_step=7)
    outs = _ok(run_processes(2, 4, "restore_only", tmp_path))
    assert all('"restored": 8' in o for o in outs)


def test_a_killed_process_makes_the_survivor_raise_in_time(tmp_path):
    results = run_processes(2, 4, "killed", tmp_path, timeout=120)
    assert results[1]["code"] == -9  # killed itself mid-save
    assert results[0]["code"] == 0, results[0]["err"][-3000:]
    report = json.loads(results[0]["out"].strip().splitlines()[-1])
    assert report["raised"] == "CoordinationTimeoutError"
    assert "model-2" in report["message"] and "[1]" in report["message"]
    assert report["after"] < 8 + 10
    # Step 2 never committed; step 1 is intact and restores.
    assert not (tmp_path / "model-2.index").exists()
    assert shardsave.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model-1")
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    target = {"w": jax.ShapeDtypeStruct((32, 16), np.float32, sharding=NamedSharding(mesh, P("x")))}
    restored = shardsave.Saver().restore(str(tmp_path / "model-1"), target)
    np.testing.assert_array_equal(
        np.asarray(restored["w"]), np.arange(32 * 16, dtype=np.float32).reshape(32, 16)
    )


def test_every_survivor_names_exactly_the_dead_process(tmp_path, monkeypatch):
    """Process 5 of 8 dies mid-save: process 0 and every other survivor name [5], and only it."""
    monkeypatch.setenv("VICTIM", "5")
    results = run_processes(8, 1, "killed", tmp_path, timeout=240)
    assert results[5]["code"] == -9
    reports = {}
    for pid in (0, 1, 2, 3, 4, 6, 7):
        assert results[pid]["code"] == 0, results[pid]["err"][-3000:]
        reports[pid] = json.loads(results[pid]["out"].strip().splitlines()[-1])
    for pid, report in reports.items():
        assert report["raised"] == "CoordinationTimeoutError", (pid, report)
        assert "processes [5] did not report" in report["message"], (pid, report["message"])
        assert "process 0" not in report["message"]  # nobody blames process 0
        assert report["after"] < 8 + 10 + 5
    # Every survivor raised the same message.
    assert len({r["message"].split(": ", 1)[1] for r in reports.values()}) == 1
    assert not (tmp_path / "model-2.index").exists()
    assert shardsave.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model-1")


def test_shardsave_names_the_dead_process_before_jax_aborts(tmp_path, monkeypatch):
    """With jax's heartbeat at 10 s and timeout_s=5, the survivor raises first, naming process 1."""
    monkeypatch.setenv("TIMEOUT_S", "5")
    results = run_processes(2, 4, "killed", tmp_path, timeout=120, heartbeat=10)
    assert results[1]["code"] == -9
    assert results[0]["code"] == 0, results[0]["err"][-3000:]  # not aborted by jax: it exited first
    report = json.loads(results[0]["out"].strip().splitlines()[-1])
    assert report["raised"] == "CoordinationTimeoutError" and "processes [1]" in report["message"]
    assert report["after"] < 10


def test_when_process_0_dies_jax_ends_the_others_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    """Process 0 hosts jax's coordination service: its death ends the job (documented)."""
    monkeypatch.setenv("VICTIM", "0")
    results = run_processes(8, 1, "killed", tmp_path, timeout=240, heartbeat=10)
    assert results[0]["code"] == -9
    # Each survivor loses the coordination service at once: either jax aborts it, or
    # its next call to the service fails first and shardsave raises naming process 0.
    for result in results[1:]:
        if result["code"] == 0:
            report = json.loads(result["out"].strip().splitlines()[-1])
            assert report["raised"] == "CoordinationTimeoutError", report
            assert "process 0 did not reach the commit" in report["message"], report
        else:
            assert result["code"] == -signal.SIGABRT, result["err"][-2000:]
    assert not (tmp_path / "model-2.index").exists()
    assert shardsave.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model-1")
    restored = shardsave.Saver().restore(str(tmp_path / "model-1"), {"h": np.zeros(5, np.int64)})
    assert restored["h"].tolist() == [0, 1, 2, 3, 4]


def test_a_timeout_not_below_jaxs_heartbeat_is_warned_about_once():
    from shardsave.save.coordination import Coordinator

    coordinator = Coordinator(timeout_s=300)
    with pytest.warns(RuntimeWarning, match="not below jax.distributed's default heartbeat timeout"):
        coordinator.check_timeout()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coordinator.check_timeout()  # once per Saver
        Coordinator(timeout_s=shardsave.Saver().timeout_s).check_timeout()  # the default is below it
    assert caught == []


def test_replicated_data_is_read_once_across_processes(tmp_path):
    outs = _ok(run_processes(8, 1, "shared_reads", tmp_path, timeout=240))
    reports = [json.loads(line) for out in outs for line in out.strip().splitlines() if line.startswith("{")]
    read = {share: sum(r["read"] for r in reports if r["share"] is share) for share in (True, False)}
    big, w = 2048 * 4096 * 4, 32 * 16 * 4
    # Shared: each stored byte of the replicated leaf is read by one process (each
    # reads its 4 MiB of rows, one checksum chunk); not shared: by each of the eight.
    assert big <= read[True] <= big + 8 * w, read
    assert read[False] >= 8 * big, read


def _records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.mark.parametrize(
    "lockstep, step_s, victim, other_savers",
    [
        (False, ("0.002", "0.03"), 1, 0),
        (False, ("0.03", "0.002"), 1, 0),
        (True, ("0.01", "0.01"), 0, 0),
        (False, ("0.01", "0.01"), 1, 1),
    ],
    ids=["victim-behind", "victim-ahead", "lockstep", "process-0-made-another-saver-first"],
)
def test_a_sigterm_to_one_process_makes_both_save_the_same_step(
    tmp_path, lockstep, step_s, victim, other_savers
):
    """A real SIGTERM reaches one of two processes; both save one agreed step and exit 0.

    Without lockstep the processes run at different speeds (no collectives), so they
    are many steps apart when the notice arrives; with lockstep a global sum ties
    every step of one process to the other's. Process 0 may have made another Saver
    before its preemption-watching one: the processes still agree.
    """
    argv = [sys.executable, str(PROGRAM), "preempted", str(tmp_path), "--processes", "2"]
    argv += ["--port", str(_free_port())]
    procs, outs = [], []
    for pid in range(2):
        env = {
            **os.environ,
            "PID": str(pid),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_PLATFORMS": "cpu",
            "STEP_S": step_s[pid],
            "LOCKSTEP": "1" if lockstep else "0",
            "OTHER_SAVERS": str(other_savers if pid == 0 else 0),
        }
        outs.append(tmp_path / f"out-{pid}")
        with open(outs[-1], "w") as out, open(tmp_path / f"err-{pid}", "w") as err:
            procs.append(subprocess.Popen(argv, stdout=out, stderr=err, env=env))
    try:
        deadline = time.monotonic() + 120
        while not any(r.get("step", 0) >= 10 for r in _records(outs[victim])):
            # A guard against a hung program, not a speed check.
            assert time.monotonic() < deadline, (tmp_path / f"err-{victim}").read_text()[-3000:]
            assert all(p.poll() is None for p in procs), [
                (tmp_path / f"err-{i}").read_text()[-2000:] for i in (0, 1)
            ]
            time.sleep(0.05)
        procs[victim].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0], [(tmp_path / f"err-{i}").read_text()[-3000:] for i in (0, 1)]
    records = [_records(out) for out in outs]
    saved = [next(r for r in rs if "saved" in r) for rs in records]
    assert saved[0]["saved"] == saved[1]["saved"], saved
    step = saved[0]["saved"]
    assert [s["notices"] for s in saved] == [1 if pid == victim else 0 for pid in (0, 1)]
    # Neither process ran past the agreed step, and it is after the notice reached the victim.
    assert all(max(r["step"] for r in rs if "step" in r) == step for rs in records)
    assert step >= 10
    if step_s[victim] > step_s[1 - victim]:
        # The other process was far ahead (15 times faster): the victim trained on to its step.
        assert step > 20, step
    assert shardsave.latest_checkpoint(str(tmp_path)) == str(tmp_path / f"model-{step}")
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    target = {
        "w": jax.ShapeDtypeStruct((32, 16), np.float32, sharding=NamedSharding(mesh, P("x"))),
        "step": 0,
    }
    restored = shardsave.Saver().restore(str(tmp_path / f"model-{step}"), target)
    expected = np.arange(32 * 16, dtype=np.float32).reshape(32, 16) + step
    np.testing.assert_array_equal(np.asarray(restored["w"]), expected)
    assert restored["step"] == step


def test_the_sigterm_handler_chains_jaxs_own_preemption_notifier(tmp_path):
    """jax.distributed installs a SIGTERM handler below Python; the Saver's calls it after recording."""
    (out,) = _ok(run_processes(1, 1, "jax_notice", tmp_path, timeout=120))
    assert json.loads(out.strip().splitlines()[-1]) == {"jax_reached": True, "notices": 1}
