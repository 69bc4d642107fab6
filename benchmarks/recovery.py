"""Recovery from the local tier against the persistent tier, and what a local save blocks.

    python benchmarks/recovery.py                 # 8 processes, 1 GiB in all, S3 at 200 MB/s
    python benchmarks/recovery.py --processes 4 --mib 64 --reps 1 --out DIR   # a quick run

A job of N processes on loopback (jax.distributed, gloo, one CPU device each)
holds a state of MIB in all: 16 matrices sharded by rows over every device, and
their biases replicated. It runs in two phases, each a fresh job:

- save: each repetition makes a plain asynchronous save to tmpfs and a local-tier
  save (Saver(local_directory=/dev/shm/..., replicas=1)) of the same state, and
  records what each blocked (SaveInfo.blocking_seconds) and how long its background
  half took to commit (SaveInfo.commit_seconds: for the local save, the replicas'
  transfer and the writes of both copies); then the state is saved
  once more to each tier: tmpfs (step 100), the local tier (step 100) and moto's S3
  behind a throttling proxy at --mb-per-s (step 90, the persistent tier).
- restore: one process's local directory is emptied first (a replaced host). Each
  repetition times, across all processes (from a barrier to the last process done):
  a plain restore of the tmpfs checkpoint (the uncapped local restore of the same
  state), restore_latest() from the tiers (the local step, the replaced host's
  shards sent by its peer), and a restore of the S3 checkpoint.

Prints a table and writes OUT/recovery.json (medians, minimum and maximum).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = "/dev/shm/shardsave-recovery"
BUCKET = "bench"  # stores.BUCKET, made by stores.s3_server


def _state(mib: int) -> tuple[dict, dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("d",))
    n = len(jax.devices())
    cols = 1024
    rows = max(n, (mib << 20) // 16 // (cols * 4) // n * n)
    shardings = {
        **{f"w{i:02d}": NamedSharding(mesh, P("d")) for i in range(16)},
        **{f"b{i:02d}": NamedSharding(mesh, P()) for i in range(16)},
    }
    shapes = {**{f"w{i:02d}": (rows, cols) for i in range(16)}, **{f"b{i:02d}": (cols,) for i in range(16)}}

    def make() -> dict:
        return {k: jax.random.normal(jax.random.key(i), shapes[k], jnp.float32) for i, k in enumerate(shapes)}

    state = jax.jit(make, out_shardings=shardings)()
    target = {k: jax.ShapeDtypeStruct(shapes[k], jnp.float32, sharding=shardings[k]) for k in shapes}
    return state, target


def _timed(name: str, fn) -> float:
    """fn's time on this process, from a barrier of every process to its result on the devices."""
    import jax
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"before {name}")
    began = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    seconds = time.perf_counter() - began
    multihost_utils.sync_global_devices(f"after {name}")
    return seconds


def worker(phase: str, args: argparse.Namespace) -> None:
    import jax

    pid = int(os.environ["PID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.processes, pid, heartbeat_timeout_seconds=120)
    import shardsave

    state, target = _state(args.mib)
    local = f"{ROOT}/local-{pid}"
    saver = shardsave.Saver(
        max_to_keep=None, local_directory=local, local_max_to_keep=2, replicas=1, timeout_s=90
    )
    records: dict[str, list[float]] = {}
    if phase == "save":
        for rep in range(args.warmup + args.reps):
            saver.save(state, f"{ROOT}/plain/model", global_step=rep)
            saver.wait_until_finished()
            plain = saver.last_save
            saver.save(state, f"{ROOT}/plain/model", global_step=rep, tier="local")
            saver.wait_until_finished()
            tiered = saver.last_save
            assert plain is not None and tiered is not None
            assert plain.commit_seconds is not None and tiered.commit_seconds is not None
            if rep >= args.warmup:
                records.setdefault("plain save blocking", []).append(plain.blocking_seconds)
                records.setdefault("local save blocking", []).append(tiered.blocking_seconds)
                # The background half, from save() returning to the commit: where the replicas' transfer went.
                records.setdefault("plain save commit", []).append(plain.commit_seconds)
                records.setdefault("local save commit", []).append(tiered.commit_seconds)
        saver.save(state, f"{ROOT}/plain/model", global_step=100)
        saver.save(state, f"{ROOT}/plain/model", global_step=100, tier="local")
        saver.save(state, f"s3://{BUCKET}/recovery/model", global_step=90)
        saver.wait_until_finished()
    else:
        for rep in range(args.warmup + args.reps):
            times = {
                "uncapped local restore": _timed(
                    f"plain {rep}", lambda: saver.restore(f"{ROOT}/plain/model-100", target)
                ),
                "recovery from the local tier": _timed(
                    f"tiers {rep}", lambda: saver.restore_latest(f"s3://{BUCKET}/recovery/model", target)
                ),
            }
            info = saver.last_restore
            assert info is not None and info.tier == "local", info
            times["restore from throttled S3"] = _timed(
                f"s3 {rep}", lambda: saver.restore(f"s3://{BUCKET}/recovery/model-90", target)
            )
            if rep >= args.warmup:
                for name, seconds in times.items():
                    records.setdefault(name, []).append(seconds)
    print(json.dumps({"pid": pid, "records": records}), flush=True)
    saver.close()
    jax.distributed.shutdown()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_phase(phase: str, args: argparse.Namespace) -> list[dict]:
    argv = [sys.executable, __file__, "--worker", phase, "--port", str(_port())]
    argv += ["--processes", str(args.processes), "--mib", str(args.mib), "--reps", str(args.reps)]
    argv += ["--warmup", str(args.warmup)]
    with contextlib.ExitStack() as files:
        procs = []
        for pid in range(args.processes):
            env = {**os.environ, "PID": str(pid), "JAX_PLATFORMS": "cpu"}
            env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
            # jax's and gloo's logs, to read where a process failed
            err = files.enter_context(open(os.path.join(args.out, f"recovery-{phase}-{pid}.err"), "w"))
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=err, text=True))
        out = []
        for proc in procs:
            stdout, _ = proc.communicate(timeout=1800)
            if proc.returncode:
                raise RuntimeError(
                    f"a {phase} process failed ({proc.returncode}): see {args.out}/recovery-{phase}-*.err"
                )
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--mib", type=int, default=1024, help="the state's size in all")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mb-per-s", type=float, default=200)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return 0
    sys.path.insert(0, str(HERE))
    import stores

    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, list[float]] = {}
    try:
        with stores.s3_server(args.mb_per_s):
            for phase in ("save", "restore"):
                if phase == "restore":  # a replaced host: its local directory is empty
                    shutil.rmtree(f"{ROOT}/local-{args.processes // 2}")
                per_process = run_phase(phase, args)
                for name in per_process[0]["records"]:
                    # The job goes on when its slowest process does.
                    columns = zip(*(p["records"][name] for p in per_process))
                    results[name] = [max(c) for c in columns]
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)
    summary = {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in results.items()
    }
    local = summary["recovery from the local tier"]["median"]
    ratios = {
        "recovery / uncapped local restore": local / summary["uncapped local restore"]["median"],
        "throttled S3 / recovery": summary["restore from throttled S3"]["median"] / local,
        "local save blocking / plain": summary["local save blocking"]["median"]
        / summary["plain save blocking"]["median"],
    }
    print(
        f"{args.processes} processes, {args.mib} MiB in all, S3 behind {args.mb_per_s:g} MB/s, medians of {args.reps}"
    )
    for name, s in summary.items():
        print(f"  {name:34s} {s['median']:8.3f} s  (min {s['min']:.3f}, max {s['max']:.3f})")
    for name, r in ratios.items():
        print(f"  {name:34s} {r:8.2f}x")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "recovery.json"), "w") as f:
        json.dump({"args": vars(args), "summary": summary, "ratios": ratios, "runs": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
