"""One process of a multi-tier test: an optax training loop with a local and a persistent tier.

    python tests/programs/tiers.py DIRECTORY --processes N --port P [--local NAME]
        [--last STEP] [--stop-at STEP --kill PID [--kill-during-copy]] [--replicas R]

Each process trains a small model with optax's adam on a mesh of every device of
every process, saving to the local tier every 2 steps (DIRECTORY/local-NAME,
NAME being the process id unless --local gives each process's), to the
persistent tier DIRECTORY/ckpt every 10, with a data position in the metadata.
It starts with Saver.restore_latest and prints, as JSON lines, what it resumed
from (tier, step, reason, data position) and a digest of each restored shard
against DIRECTORY/reference-STEP.npz, which process 0 writes at every local step
(the global values, gathered). With --stop-at, every process stops after that
training step, reports what its wait_until_finished raised and waits for the test
to SIGKILL it (the job being restarted: process --kill first); with
--kill-during-copy, process --kill SIGKILLs itself while it writes its replica in
the local save of that step. Leaves through os._exit: a peer may be dead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
from shardsave.errors import ShardsaveError
from shardsave.storage import wrapping_stores
from shardsave.storage.testing import Hooked
from shardsave.tree import flatten


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def batch(position: int, rows: int) -> jax.Array:
    """The data at a position of the stream (deterministic, the same on every process)."""
    return jnp.asarray(np.random.default_rng(position).normal(size=(rows, 16)).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--local", default=None, help="each process's local directory names, comma-separated")
    parser.add_argument("--last", type=int, default=20)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--kill", type=int, default=None)
    parser.add_argument("--kill-during-copy", action="store_true")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=20)
    parser.add_argument("--host-leaf-per-process", action="store_true", help="save a numpy leaf that differs")
    args = parser.parse_args()
    pid = int(os.environ["PID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.processes,
        process_id=pid,
        heartbeat_timeout_seconds=60,
        shutdown_timeout_seconds=10,
    )
    directory = args.directory
    local_name = args.local.split(",")[pid] if args.local else str(pid)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rows = 4 * len(jax.devices())
    optimizer = optax.adam(1e-2)

    def fresh() -> dict[str, Any]:
        params = {"w": jnp.full((rows, 16), 0.5, jnp.float32), "b": jnp.zeros((16,), jnp.float32)}
        return {"params": params, "opt": optimizer.init(params), "step": jnp.int32(0)}

    def spec(x: Any) -> P:
        return P("d") if getattr(x, "ndim", 0) == 2 else P()

    shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), jax.eval_shape(fresh))
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), jax.eval_shape(fresh), shardings
    )

    @functools.partial(jax.jit, donate_argnums=0)  # as training loops do: saves must not hold the old state
    def train_step(state: dict[str, Any], x: jax.Array) -> dict[str, Any]:
        def loss(params: dict[str, Any]) -> jax.Array:
            return jnp.mean((x @ params["w"].T[:, :rows] + params["b"].sum()) ** 2)

        grads = jax.grad(loss)(state["params"])
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        return {
            "params": optax.apply_updates(state["params"], updates),
            "opt": opt,
            "step": state["step"] + 1,
        }

    if args.kill == pid and args.kill_during_copy:
        # The local save of --stop-at writes this process's own data files first, then its
        # replica of another's: die at the first replica file.
        writes = []
        own_files = len(jax.local_devices())

        def die_at_replica(key: str) -> None:
            if f"model-{args.stop_at}.data-" in key:
                writes.append(key)
                if len(writes) > own_files:
                    os.kill(os.getpid(), signal.SIGKILL)

        hooked = contextlib.ExitStack()  # kept for the process's life: closing it unhooks
        hooked.enter_context(wrapping_stores(lambda store: Hooked(store, die_at_replica, lambda key: None)))

    saver = shardsave.Saver(
        max_to_keep=3,
        save_interval_steps=10,
        local_directory=f"{directory}/local-{local_name}",
        local_interval_steps=2,
        local_max_to_keep=2,
        replicas=args.replicas,
        timeout_s=args.timeout,
    )
    save_path = f"{directory}/ckpt/model"
    state = saver.restore_latest(save_path, target)
    position = 0
    if state is None:
        state = jax.jit(fresh, out_shardings=shardings)()
        emit(pid=pid, resumed=None)
    else:
        info = saver.last_restore
        assert info is not None
        metadata = shardsave.CheckpointReader(info.path).metadata
        assert metadata is not None
        position = metadata["data"]
        step = int(np.asarray(state["step"].addressable_shards[0].data))
        reference = np.load(f"{directory}/reference-{step}.npz")
        names, leaves, _ = flatten(state)
        exact = all(
            np.array_equal(np.asarray(shard.data), reference[name][shard.index])
            for name, leaf in zip(names, leaves)
            for shard in leaf.addressable_shards
        )
        emit(pid=pid, resumed=step, tier=info.tier, reason=info.reason, position=position, exact=exact)

    start = int(np.asarray(state["step"].addressable_shards[0].data))
    for step in range(start + 1, args.last + 1):
        state = train_step(state, batch(position, rows))
        position += 1
        tier = (
            "persistent"
            if saver.should_save(step)
            else "local"
            if saver.should_save(step, tier="local")
            else None
        )
        if tier is not None:
            names, leaves, _ = flatten(state)  # the reference first: a process may die in the save
            gathered = multihost_utils.process_allgather(leaves, tiled=True)
            if pid == 0:
                arrays: dict[str, Any] = dict(zip(names, map(np.asarray, gathered)))
                np.savez(f"{directory}/reference-{step}.npz", **arrays)
            saved = {**state, "host": np.full(4, pid)} if args.host_leaf_per_process else state
            saver.save(saved, save_path, global_step=step, metadata={"data": position}, tier=tier)
        if step == args.stop_at:
            try:
                saver.wait_until_finished()
                emit(pid=pid, stopped=step, error=None)
            except ShardsaveError as e:
                emit(pid=pid, stopped=step, error=f"{type(e).__name__}: {e}")
            # The job is being restarted: the test kills --kill, then the others (a
            # process leaving by itself could take jax's coordination service down
            # under a peer that is still committing).
            time.sleep(120)
            os._exit(3)
    saver.wait_until_finished()
    emit(pid=pid, finished=args.last, listing=sorted(os.listdir(f"{directory}/local-{local_name}")))
    sys.stdout.flush()
    # Every peer lives: the shutdown barrier keeps process 0 (the coordination service)
    # alive until the others are done with it.
    jax.distributed.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
