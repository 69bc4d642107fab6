"""One process of a two-process Orbax save, then shardsave's restore of it on each process.

    python tests/programs/orbax_processes.py DIRECTORY --processes N --port P

The process id comes from the PID environment variable. Every process saves its
shards of one tree with Orbax's StandardCheckpointer (each writes an OCDBT
database of its own, which Orbax merges before it commits); then each restores
the checkpoint with shardsave onto a mesh of all devices, checks its own
shards, and prints one JSON line. It leaves through os._exit after
jax.distributed's shutdown barrier, as tests/programs/processes.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

VALUES: dict[str, np.ndarray] = {
    "w": np.arange(32 * 16, dtype=np.float32).reshape(32, 16) / 3,
    "r": np.arange(8, dtype=np.int32) * 5,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.processes,
        process_id=int(os.environ["PID"]),
        heartbeat_timeout_seconds=60,
        shutdown_timeout_seconds=10,
    )
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import shardsave

    mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ("data", "model"))
    shardings = {"w": NamedSharding(mesh, P("data", "model")), "r": NamedSharding(mesh, P("data"))}
    tree = {k: jax.make_array_from_callback(v.shape, shardings[k], v.__getitem__) for k, v in VALUES.items()}
    path = os.path.join(args.directory, "orbax")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    # Another layout than the saved one: every process reads only its devices' boxes.
    flat = Mesh(np.array(jax.devices()), ("x",))
    target = {
        "w": jax.ShapeDtypeStruct((32, 16), np.float32, sharding=NamedSharding(flat, P(None, "x"))),
        "r": jax.ShapeDtypeStruct((8,), np.int32, sharding=NamedSharding(flat, P("x"))),
    }
    restored = shardsave.Saver().restore(path, target)
    for name, array in restored.items():
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), VALUES[name][shard.index])
    print(json.dumps({"pid": jax.process_index(), "restored": sorted(restored)}), flush=True)
    sys.stdout.flush()
    jax.distributed.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
