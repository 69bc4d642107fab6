"""CheckpointReader, the shardsave command, and the demo."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
from shardsave.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def ckpt_dir(tmp_path, mesh24):
    tree = {
        "params": {
            "kernel": jax.device_put(
                jnp.arange(512.0).reshape(32, 16), NamedSharding(mesh24, P("data", "model"))
            ),
            "bias": jax.device_put(jnp.ones(16), NamedSharding(mesh24, P())),
        },
        "step": 3,
    }
    saver = shardsave.Saver(max_to_keep=2, async_save=False)
    for step in (1, 2, 3):
        saver.save(tree, str(tmp_path / "model"), global_step=step)
    return tmp_path, tree


def run(*argv):
    out = io.StringIO()
    status = main(list(argv), out=out)
    return status, out.getvalue()


def test_reader_lists_and_reads_only_what_is_asked(ckpt_dir, io_stats):
    directory, _ = ckpt_dir
    with shardsave.CheckpointReader(str(directory / "model-3")) as reader:
        info = {v.name: v for v in reader.variables()}
        assert info["params/kernel"].shape == (32, 16) and info["params/kernel"].nbytes == 512 * 4
        assert info["params/kernel"].sharding == "P(data, model) on mesh(data=2,model=4)"
        assert info["step"].sharding == "host" and info["params/bias"].num_shards == 1
        io_stats.reset()
        np.testing.assert_array_equal(reader.get("params/kernel"), np.arange(512.0).reshape(32, 16))
        assert io_stats.bytes_read == 512 * 4  # the whole leaf, nothing else
        io_stats.reset()
        # Rows 17..18, columns 4..7: inside one stored shard (rows 16..31, columns 4..7).
        part = reader.get("params/kernel", (slice(17, 19), slice(4, 8)))
        np.testing.assert_array_equal(part, np.arange(512.0).reshape(32, 16)[17:19, 4:8])
        # Verification needs whole checksum chunks; this shard (256 bytes) is one chunk.
        assert io_stats.bytes_read == 16 * 4 * 4
        assert reader.get("params/kernel", (5, 3)) == 5 * 16 + 3
        np.testing.assert_array_equal(reader.get("params/kernel", (slice(0, 32, 8), 0)), [0, 128, 256, 384])
        assert int(reader.get("step")) == 3
        with pytest.raises(KeyError, match="closest saved: 'params/bias'"):
            reader.get("params/bais")
        with pytest.raises(IndexError):
            reader.get("params/kernel", (40,))


def test_reader_reads_whole_checksum_chunks_not_whole_shards(tmp_path, io_stats):
    from shardsave.formats.shardsave import CRC_CHUNK_BYTES

    rows, cols = 4 * CRC_CHUNK_BYTES // 4096, 1024  # 16 MiB of float32 in one stored shard
    value = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    path = shardsave.Saver(async_save=False).save({"big": value}, str(tmp_path / "m"))
    reader = shardsave.CheckpointReader(path)  # reads the index
    io_stats.reset()
    got = reader.get("big", (slice(rows // 2, rows // 2 + 3),))
    np.testing.assert_array_equal(got, value[rows // 2 : rows // 2 + 3])
    assert io_stats.bytes_read == CRC_CHUNK_BYTES  # one chunk of four


def test_ls_shows_committed_uncommitted_and_latest(ckpt_dir):
    directory, _ = ckpt_dir
    (directory / "model-4.data-00000-of-00008").write_bytes(b"partial")
    status, out = run("ls", str(directory))
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["CHECKPOINT", "STEP", "SAVED", "SIZE", "FILES", "STATE"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"model-2", "model-3", "model-4"}
    assert "committed (latest)" in rows["model-3"] and "(latest)" not in rows["model-2"]
    assert "UNCOMMITTED" in rows["model-4"] and "7 B" in rows["model-4"]
    assert " 8 " in rows["model-3"]  # data files


def test_inspect_table_and_json(ckpt_dir):
    directory, _ = ckpt_dir
    status, out = run("inspect", str(directory / "model-3"))
    assert status == 0
    assert any(line.split()[:2] == ["params/kernel", "float32"] for line in out.splitlines())
    assert "3 leaves, 2.1 KiB in 8 data files, step 3" in out
    status, out = run("inspect", "--json", str(directory / "model-3"))
    doc = json.loads(out)
    assert doc["global_step"] == 3 and doc["total_bytes"] == 512 * 4 + 16 * 4 + 8
    assert {leaf["name"]: leaf["shape"] for leaf in doc["leaves"]}["params/kernel"] == [32, 16]


def test_verify_finds_a_corrupted_byte(ckpt_dir):
    directory, _ = ckpt_dir
    status, out = run("verify", str(directory / "model-3"))
    assert status == 0 and out.startswith("OK")
    victim = directory / "model-3.data-00005-of-00008"
    data = bytearray(victim.read_bytes())
    data[3] ^= 0x10
    victim.write_bytes(bytes(data))
    status, out = run("verify", str(directory / "model-3"))
    assert status == 1
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and "model-3.data-00005-of-00008" in bad[0] and "crc32c mismatch" in bad[0]


def test_bad_input_exits_non_zero_and_modifies_nothing(ckpt_dir, capsys):
    directory, _ = ckpt_dir
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert run("inspect", str(directory / "model-9"))[0] == 2
    assert "no committed checkpoint" in capsys.readouterr().err
    assert run("ls", str(directory / "nope"))[0] == 2
    assert run("ls", str(REPO / "configs"))[0] == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert run("frobnicate")[0] == 2
    assert "invalid choice" in capsys.readouterr().err
    (directory / "model-3.index").write_bytes(b"{broken")
    assert run("inspect", str(directory / "model-3"))[0] == 1
    err = capsys.readouterr().err
    assert err.startswith("shardsave: error:") and "not valid JSON" in err and "Traceback" not in err
    before["model-3.index"] = b"{broken"
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_demo_is_preempted_crashes_resumes_on_other_meshes_and_matches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the settings come with the package, not from the working directory
    (tmp_path / "c" / "runs").mkdir(parents=True)
    (tmp_path / "c" / "runs" / "notes.txt").write_text("mine")
    (tmp_path / "c" / "run-1").mkdir()  # a folder of the user's that happens to have the demo's name
    status, out = run(
        "demo",
        "--steps",
        "24",
        "--save-every",
        "5",
        "--preempt-at",
        "8",
        "--crash-at",
        "16",
        "--directory",
        str(tmp_path / "c"),
    )
    assert status == 0, out
    # The demo wrote only inside the run folder it created, and deleted nothing.
    assert (tmp_path / "c" / "runs" / "notes.txt").read_text() == "mine"
    assert list((tmp_path / "c" / "run-1").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["run-1", "run-2", "runs"]
    assert f"checkpoints in {tmp_path / 'c' / 'run-2' / 'ckpt'}" in out
    # The SIGTERM after step 8 is seen at step 8 or a little later; the step after is saved
    # and the process exits 0, having lost nothing.
    saved = int(re.search(r"SIGTERM after step 8; saved step (\d+) and exited 0", out).group(1))
    assert 9 <= saved < 16, out
    assert (
        f"restored model-{saved} (step {saved}) onto 4 devices, mesh [2, 2], killed with SIGKILL after step 16"
        in out
    )
    assert f"preemption (SIGTERM)     0 steps lost (trained to {saved}, resumed from {saved})" in out
    # The crash resumes from the newest save that committed before the kill: the resumed run's
    # periodic saves at 10 (if after the preempted one) and 15, or the preempted one.
    crash = re.search(r"crash \(SIGKILL\) +(\d+) steps? lost \(trained to 16, resumed from (\d+)\)", out)
    assert crash is not None and int(crash.group(2)) in {saved} | {s for s in (10, 15) if s > saved}, out
    assert int(crash.group(1)) == 16 - int(crash.group(2))
    assert "onto 8 devices, mesh [2, 4], trained to step 24" in out
    assert "MATCH the uninterrupted run" in out
    kept = next(line for line in out.splitlines() if "checkpoints kept" in line)
    assert "model-5" not in kept.split() and os.path.exists(tmp_path / "c" / "run-2" / "ckpt" / "checkpoint")


def test_demo_runs_from_an_installed_wheel(tmp_path):
    """Built as a wheel and run from outside the repository: its settings travel with it."""
    dist, site = tmp_path / "dist", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("shardsave-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardsave",
            "demo",
            "--steps",
            "6",
            "--save-every",
            "2",
            "--preempt-at",
            "2",
            "--crash-at",
            "5",
            "--directory",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        str(site / "shardsave" / "demo.yaml")
        in subprocess.run(
            [sys.executable, "-c", "import shardsave.demo as d; print(d.DEFAULT_CONFIG)"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert "MATCH the uninterrupted run" in proc.stdout


def test_inspect_takes_the_index_file_or_a_directory(ckpt_dir, capsys, tmp_path_factory):
    directory, _ = ckpt_dir
    by_prefix = run("inspect", "--json", str(directory / "model-3"))
    assert by_prefix[0] == 0
    assert (
        run("inspect", "--json", str(directory / "model-3.index")) == by_prefix
    )  # what tab completion gives
    assert run("inspect", "--json", str(directory)) == by_prefix  # a directory: its latest checkpoint
    assert run("verify", str(directory / "model-3.index"))[0] == 0
    empty = tmp_path_factory.mktemp("empty")
    assert run("inspect", str(empty))[0] == 2
    assert "shardsave ls" in capsys.readouterr().err


def test_version_and_help_say_what_is_accepted(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"shardsave {shardsave.__version__}"
    assert main(["inspect", "--help"]) == 0
    text = capsys.readouterr().out
    assert "s3://bucket/path" in text and ".index" in text
