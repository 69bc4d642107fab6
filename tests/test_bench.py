"""The benchmark suite runs end to end at a tiny size (timings are never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_runs_and_writes_its_outputs(tmp_path):
    bench = REPO / "benchmarks" / "bench.py"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, str(bench), "--profile", "tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "bench.json").read_text())
    tools = {(r["tool"], r["op"]) for r in doc["rows"]}
    assert {("d2h", "save_blocking"), ("raw", "save"), ("raw", "restore"), ("shardsave", "save")} <= tools
    assert {("shardsave-async", "save_blocking"), ("shardsave", "restore_resharded")} <= tools
    assert {("shardsave", "restore_sequential"), ("orbax", "save"), ("orbax-nocomp", "restore")} <= tools
    assert all(r["median_s"] > 0 and r["n"] == 1 for r in doc["rows"])
    on_s3 = {(r["tool"], r["op"]) for r in doc["rows"] if r["storage"] == "s3"}  # moto's server
    assert {
        ("raw", "save"),
        ("raw", "restore"),
        ("raw-placed", "restore"),
        ("shardsave", "save"),
        ("shardsave", "restore"),
    } <= on_s3
    # fake-gcs-server behind the throttling proxy, with and without compression
    throttled = {(r["tool"], r["op"]) for r in doc["rows"] if r["storage"] == "gcs@200MB/s"}
    assert {
        (t, op) for t in ("raw", "shardsave", "shardsave-zstd") for op in ("save", "restore")
    } <= throttled, throttled
    safetensors = {(r["tool"], r["op"]) for r in doc["rows"] if r["storage"] == "safetensors"}
    assert safetensors == {
        (t, "restore") for t in ("raw", "raw-fresh", "shardsave", "shardsave-64MiB", "safetensors")
    }
    capped = {(r["tool"], r["op"]) for r in doc["rows"] if r["storage"] == "capped"}
    assert {
        (t, op)
        for t in ("shardsave-async", "shardsave-8MiB", "orbax", "orbax-capped")
        for op in ("save_blocking", "save", "save_held")
    } | {("raw", "save")} == capped
    cold = {r["tool"] for r in doc["rows"] if r["storage"] == "cold"}  # page cache dropped: root only
    if os.access("/proc/sys/vm/drop_caches", os.W_OK):
        expected = {
            "raw",
            "raw-fresh",
            "shardsave",
            "raw-64MiB",
            "shardsave-64MiB",
            "raw-256MiB",
            "shardsave-256MiB",
            "orbax",
            "orbax-nocomp",
        }
        assert cold == expected
        capped = {r["tool"]: r for r in doc["rows"] if r["storage"] == "cold"}["shardsave-64MiB"]
        assert capped["x_limit"] is not None  # against raw-64MiB, the disk with as much in flight
    else:
        assert not cold and "skipping the cold case" in done.stderr
    assert (tmp_path / "bench.png").stat().st_size > 1000
    table = (tmp_path / "table.txt").read_text()
    assert "shardsave" in table and "index of 100 leaves" in table
    assert doc["index"]["leaves"] == 100 and doc["index"]["read_s"] > 0


def test_the_recovery_benchmark_runs_at_a_tiny_size(tmp_path):
    tiny = ["--processes", "2", "--mib", "8", "--reps", "1", "--warmup", "0", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "recovery.py"), *tiny],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "recovery.json").read_text())
    assert set(doc["summary"]) == {
        "plain save blocking",
        "local save blocking",
        "plain save commit",
        "local save commit",
        "uncapped local restore",
        "recovery from the local tier",
        "restore from throttled S3",
    }
    assert all(s["median"] > 0 for s in doc["summary"].values())
