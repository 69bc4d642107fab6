"""Saving and restoring in a process with another number of devices than the tests' eight.

    python tests/programs/other_devices.py restore PATH OUT.npz   # onto a 1-D mesh of all devices
    python tests/programs/other_devices.py save-one PATH         # one array on device 0, one host leaf

`restore` prints first which saved shardings load_structure could rebuild here,
then whether a restore without a target refused the saved layout, and writes
the restored values to OUT.npz.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave


def restore(path: str, out: str) -> None:
    n = len(jax.devices())
    mesh = Mesh(np.array(jax.devices()).reshape(n), ("x",))
    structure = shardsave.load_structure(path)
    # The saved devices do not all exist here: load_structure drops the shardings it cannot rebuild.
    print(json.dumps({k: v.sharding is not None for k, v in structure.items()}))
    try:
        shardsave.Saver().restore(path)
        print("no error")
    except shardsave.errors.ShardingMismatchError as e:
        print("error:", str(e).splitlines()[0][:60])
    target = {
        k: jax.ShapeDtypeStruct(
            v.shape, v.dtype, sharding=NamedSharding(mesh, P("x") if v.shape[0] % n == 0 else P())
        )
        for k, v in structure.items()
    }
    restored = shardsave.Saver().restore(path, target)
    arrays = {k: np.asarray(v) for k, v in restored.items()}
    # numpy's stubs take the first keyword for allow_pickle
    np.savez(out, **arrays)  # type: ignore[arg-type]


def save_one(path: str) -> None:
    x = jax.device_put(np.arange(64, dtype=np.float32).reshape(8, 8))
    shardsave.Saver(async_save=False).save({"x": x, "y": np.ones(3)}, path)


if __name__ == "__main__":
    if sys.argv[1] == "restore":
        restore(sys.argv[2], sys.argv[3])
    else:
        save_one(sys.argv[2])
