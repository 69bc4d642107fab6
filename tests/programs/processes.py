"""One process of a multi-process test: jax.distributed on loopback, then one scenario.

    python tests/programs/processes.py SCENARIO DIRECTORY [--processes N --port P --heartbeat S]

The process id comes from the PID environment variable (as a launcher sets it);
with no --processes the scenario runs alone, without jax.distributed. Each
scenario prints what the test checks (JSON lines) and leaves through os._exit,
so that no process waits in jax's shutdown for a peer that a test killed. Where
every peer lives, each process first shuts jax.distributed down as a normal exit
would: its barrier keeps process 0, which hosts the coordination service, alive
until the others have made their last call to it (without it a peer still
reading the last step's reports is aborted by jax when the service goes away).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from shardsave.storage.testing import Counts, Hooked

VALUES: dict[str, np.ndarray] = {
    "w": np.arange(32 * 16, dtype=np.float32).reshape(32, 16),
    "r": np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8),
    "h": np.arange(5, dtype=np.int64),
}


def global_array(value: np.ndarray, sharding: Any) -> jax.Array:
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def check(array: jax.Array, value: np.ndarray) -> None:
    for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])


def make_tree() -> dict[str, Any]:
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ("data", "model"))
    return {
        "w": global_array(VALUES["w"], NamedSharding(mesh, P("data", "model"))),
        "r": global_array(VALUES["r"], NamedSharding(mesh, P())),
        "h": VALUES["h"],
    }


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def save_and_restore(directory: str) -> None:
    """Three asynchronous saves with max_to_keep=2, then a restore onto the same layout."""
    import shardsave

    tree = make_tree()
    saver = shardsave.Saver(max_to_keep=2, timeout_s=60)
    path = None
    for step in (1, 2, 3):
        path = saver.save(tree, directory + "/model", global_step=step)
    saver.wait_until_finished()
    assert path is not None
    restored = saver.restore(path, tree)
    check(restored["w"], VALUES["w"])
    check(restored["r"], VALUES["r"])
    assert (restored["h"] == VALUES["h"]).all()
    emit(pid=jax.process_index(), last=saver.last_checkpoints, latest=shardsave.latest_checkpoint(directory))


def capped_save(directory: str) -> None:
    """Two async saves under a cap of each process's own (8 MiB on process 0, 16 MiB on
    the others), with a 24 MiB leaf sharded over every device; then a restore."""
    import psutil
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import shardsave

    tree = make_tree()
    big = np.arange(6 * (1 << 20), dtype=np.float32).reshape(48, -1)
    mesh = Mesh(np.array(jax.devices()), ("all",))
    tree["big"] = global_array(big, NamedSharding(mesh, P("all")))
    cap = (8 if jax.process_index() == 0 else 16) << 20
    proc = psutil.Process()
    before = proc.memory_info().rss
    saver = shardsave.Saver(max_to_keep=1, timeout_s=60, save_host_bytes=cap)
    path = None
    for step in (1, 2):
        path = saver.save(tree, directory + "/model", global_step=step)
    saver.wait_until_finished()
    held = proc.memory_info().rss - before
    assert path is not None
    restored = saver.restore(path, tree)
    check(restored["big"], big)
    check(restored["w"], VALUES["w"])
    emit(pid=jax.process_index(), cap=cap, held=held, latest=shardsave.latest_checkpoint(directory))


def save_only(directory: str) -> None:
    """Saves model-7 (compressed with COMPRESSION=zstd)."""
    import shardsave

    saver = shardsave.Saver(async_save=False, timeout_s=60, compression=os.environ.get("COMPRESSION") or None)
    saver.save(make_tree(), directory + "/model", global_step=7)
    emit(saved=True)


def restore_only(directory: str) -> None:
    """Restores model-7 onto however many devices this run has, on a 1-D mesh."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import shardsave

    n = len(jax.devices())
    mesh = Mesh(np.array(jax.devices()).reshape(n), ("x",))
    target = {
        "w": jax.ShapeDtypeStruct((32, 16), np.float32, sharding=NamedSharding(mesh, P("x"))),
        "r": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=NamedSharding(mesh, P(None, "x"))),
        "h": np.zeros(5, np.int64),
    }
    restored = shardsave.Saver().restore(directory + "/model-7", target)
    check(restored["w"], VALUES["w"])
    check(restored["r"], VALUES["r"])
    assert (restored["h"] == VALUES["h"]).all()
    emit(restored=n)


def killed(directory: str) -> None:
    """Saves step 1; then process VICTIM dies in the middle of writing step 2."""
    import shardsave
    from shardsave.errors import SaveFailedError

    tree = make_tree()
    saver = shardsave.Saver(max_to_keep=1, timeout_s=float(os.environ.get("TIMEOUT_S", "8")))
    saver.save(tree, directory + "/model", global_step=1)
    saver.wait_until_finished()
    dying: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if jax.process_index() == int(os.environ.get("VICTIM", "1")):

        def die(key: str) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        dying = shardsave.storage.wrapping_stores(lambda store: Hooked(store, die, lambda key: None))
    began = time.monotonic()
    with dying:  # the store is opened by save(): the victim dies writing step 2
        saver.save(tree, directory + "/model", global_step=2)
    try:
        saver.wait_until_finished()
        emit(raised=None)
    except SaveFailedError as e:
        emit(raised=type(e.__cause__).__name__, message=str(e), after=time.monotonic() - began)


def shared_reads(directory: str) -> None:
    """A replicated 32 MiB leaf restored with and without shared reads; bytes read per process."""
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import shardsave

    mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ("data", "model"))
    big = np.arange(2048 * 4096, dtype=np.float32).reshape(2048, 4096)
    tree = {
        "big": global_array(big, NamedSharding(mesh, P())),
        "w": global_array(VALUES["w"], NamedSharding(mesh, P("data", "model"))),
    }
    path = shardsave.Saver(async_save=False).save(tree, directory + "/model", global_step=1)
    assert path is not None
    for share in (True, False):
        counts = Counts()
        began = time.perf_counter()
        with shardsave.storage.wrapping_stores(counts.wrap):
            restored = shardsave.Saver(share_reads=share).restore(path, tree)
        check(restored["big"], big)
        check(restored["w"], VALUES["w"])
        assert restored["big"].sharding == tree["big"].sharding
        emit(share=share, read=counts.bytes_read, seconds=time.perf_counter() - began)
    multihost_utils.sync_global_devices("done")  # process 0 hosts jax's service: it leaves last


def should_save(directory: str) -> None:
    """Clocks half an interval apart: every process must still answer alike, step by step."""
    import shardsave

    offset = 0.5 * jax.process_index()  # process 1's clock runs half an interval ahead
    ticks = [0.0]

    def clock() -> float:
        return ticks[0] + offset

    saver = shardsave.Saver(save_interval_secs=1.0, clock=clock)
    due = []
    for step in range(1, 12):
        ticks[0] += 0.3
        answer = saver.should_save(step)
        due.append(answer)
        if answer:
            saver.save({"h": np.full(2, step)}, directory + "/model", global_step=step)
    saver.wait_until_finished()
    emit(due=due)


def preempted(directory: str) -> None:
    """Trains until SIGTERM reaches some process, then every process saves the agreed step.

    STEP_S sets this process's seconds per step (processes apart by many steps when
    they differ); LOCKSTEP=1 adds a collective (a global sum) to every step;
    OTHER_SAVERS=N makes N other Savers first.
    """
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import shardsave

    mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ("data", "model"))
    sharding = NamedSharding(mesh, P("data", "model"))
    lockstep = os.environ.get("LOCKSTEP") == "1"
    step_s = float(os.environ.get("STEP_S", "0.01"))
    # Savers made before this one (process 0's evaluator, say), in some processes only:
    # the agreement's keys must not depend on how many Savers a process made.
    others = [shardsave.Saver() for _ in range(int(os.environ.get("OTHER_SAVERS", "0")))]
    saver = shardsave.Saver(save_on_preemption=True, timeout_s=60)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
    for step in range(1, 100_000):
        time.sleep(step_s)
        if lockstep:  # every process takes part in this sum before its next step
            float(total(global_array(VALUES["w"] + step, sharding)))
        emit(pid=jax.process_index(), step=step)
        if saver.should_save(step):
            tree = {"w": global_array(VALUES["w"] + step, sharding), "step": step}
            saver.save(tree, directory + "/model", global_step=step)
        if saver.reached_preemption(step):
            saver.wait_until_finished()
            emit(pid=jax.process_index(), saved=step, notices=saver.preemption_notices)
            for other in others:
                other.close()
            return
    raise AssertionError("no preemption notice arrived")


def jax_notice(directory: str) -> None:
    """A SIGTERM handled by the Saver still reaches jax's own preemption notifier (chained)."""
    from jax.experimental import multihost_utils

    import shardsave

    saver = shardsave.Saver(save_on_preemption=True)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 30
    step = 0
    while not multihost_utils.reached_preemption_sync_point(step) and time.monotonic() < deadline:
        step += 1
        time.sleep(0.02)
    emit(jax_reached=time.monotonic() < deadline, notices=saver.preemption_notices)
    saver.close()


def safetensors_export(directory: str) -> None:
    """Every process writes its shards of a tree into one sharded safetensors set."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import shardsave

    tree = make_tree()
    mesh = tree["w"].sharding.mesh
    tree["c"] = global_array(VALUES["w"], NamedSharding(mesh, P(None, "model")))  # columns: strided runs
    written = shardsave.save_safetensors(tree, directory + "/hf", max_shard_bytes=2048, timeout_s=60)
    emit(pid=jax.process_index(), written=written)


def restore_tensorflow(directory: str) -> None:
    """Every process restores its devices' part of a checkpoint TensorFlow wrote."""
    from pathlib import Path

    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import shardsave

    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "tf"
    expected = json.loads((fixtures / "expected.json").read_text())["v1"]["variables"]
    mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ("data", "model"))
    specs = {"part": P("data", "model"), "dense/kernel": P(None, "model"), "ints/i32": P("data")}
    target: dict[str, Any] = {"dense": {}, "ints": {}}  # paths are TF's names: "dense/kernel"
    for name, spec in specs.items():
        entry = expected[name]
        leaf = jax.ShapeDtypeStruct(tuple(entry["shape"]), entry["dtype"], sharding=NamedSharding(mesh, spec))
        *outer, last = name.split("/")
        (target[outer[0]] if outer else target)[last] = leaf
    restored = shardsave.Saver(timeout_s=60).restore(str(fixtures / "v1" / "model.ckpt-7"), target)
    for name in specs:
        *outer, last = name.split("/")
        array = (restored[outer[0]] if outer else restored)[last]
        check(array, np.array(expected[name]["values"], expected[name]["dtype"]))
    emit(pid=jax.process_index(), ok=True)


SCENARIOS: dict[str, Callable[[str], None]] = {
    "jax_notice": jax_notice,
    "preempted": preempted,
    "should_save": should_save,
    "save_and_restore": save_and_restore,
    "save_only": save_only,
    "capped_save": capped_save,
    "restore_tensorflow": restore_tensorflow,
    "safetensors_export": safetensors_export,
    "restore_only": restore_only,
    "killed": killed,
    "shared_reads": shared_reads,
}

# Scenarios in which a process is killed: the survivors cannot pass a shutdown barrier.
PEER_DIES = {"killed"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("directory")
    parser.add_argument("--processes", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--heartbeat", type=int, default=60)
    args = parser.parse_args()
    if args.processes:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.processes,
            process_id=int(os.environ["PID"]),
            heartbeat_timeout_seconds=args.heartbeat,
            shutdown_timeout_seconds=10,
        )
    SCENARIOS[args.scenario](args.directory)
    sys.stdout.flush()
    if args.processes and args.scenario not in PEER_DIES:
        jax.distributed.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
