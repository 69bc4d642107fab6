"""Host memory of one restore, measured in a fresh process (peak RSS minus RSS after).

    python tests/programs/measure_restore.py DIRECTORY TOTAL_MIB BIG_MIB SEQUENTIAL CAP [SLOW_S]
    python tests/programs/measure_restore.py --restore PATH SEQUENTIAL CAP

Builds a checkpoint of TOTAL_MIB (one leaf of BIG_MIB stored as a single shard,
larger than a small cap), then restores it onto another mesh while a thread
samples RSS. The result stays alive, so "after" counts it out (on CPU, device
memory is host memory); what remains is the transient host memory of the
restore itself. SLOW_S delays the use of every read by that many seconds.
Prints {"transient", "before", "after", "ok"} as JSON.

With --restore, it restores the checkpoint at PATH instead, in any format shardsave
reads (an Orbax or a DCP checkpoint, written beforehand by the test), onto a (4, 2)
mesh: each array's first dimension over the mesh's first axis and its second over
the second where they divide. It prints the same measures, with "restored" (the
bytes of the arrays restored) and "crc32" (each leaf's CRC-32 of its C-order
bytes, by tree path) for the caller to check the values.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import psutil
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
import shardsave.restore
from shardsave.formats import open_checkpoint
from shardsave.restore.targets import requests_for_target

MIB = 1 << 20


def trim() -> None:
    """Gives memory that malloc keeps after free (blocks below 32 MiB) back to the
    system, so that RSS counts only memory in use."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class SlowConsumer(shardsave.restore.RestoreObserver):
    """Each read's bytes are taken that much later, as on a host slower than its store:
    reads in flight then finish before they are used, and hold their memory meanwhile."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_use(self, read: Any) -> None:
        time.sleep(self.seconds)


def restore(path: str, target: Any, sequential: bool, cap: int | None, observer: Any) -> Any:
    """Saver().restore(path, target, ...); with an observer, the same steps through restore_leaves,
    which takes one."""
    if observer is None:
        return shardsave.Saver().restore(path, target, restore_sequentially=sequential, max_host_bytes=cap)
    directory, base, index = open_checkpoint(path)
    requests, finish = requests_for_target(index, target, False, False, path)
    values, _ = shardsave.restore.restore_leaves(
        directory, base, index, requests, budget=cap, sequential=sequential, observer=observer
    )
    return finish(values)


def restore_existing(path: str, sequential: bool, cap: int | None) -> None:
    """--restore: the checkpoint at path onto a (4, 2) mesh, measured as main() measures."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("d", "m"))

    def on_mesh(leaf: Any) -> Any:
        spec = [axis if n % size == 0 else None for n, axis, size in zip(leaf.shape, "dm", (4, 2))]
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, P(*spec)))

    target = jax.tree.map(on_mesh, shardsave.load_structure(path))
    gc.collect()
    trim()
    restored, measured = measure(
        lambda: shardsave.Saver().restore(path, target, restore_sequentially=sequential, max_host_bytes=cap)
    )
    leaves = jax.tree_util.tree_leaves_with_path(restored)
    crcs = {
        jax.tree_util.keystr(k, simple=True, separator="/"): zlib.crc32(np.ascontiguousarray(v).data)
        for k, v in leaves
    }
    nbytes = sum(int(v.nbytes) for _, v in leaves)
    print(json.dumps({**measured, "restored": nbytes, "crc32": crcs, "ok": True}))


def main() -> None:
    if sys.argv[1] == "--restore":
        cap = None if sys.argv[4] == "None" else int(sys.argv[4])
        restore_existing(sys.argv[2], sys.argv[3] == "True", cap)
        return
    directory, total_mib, big_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sequential, cap = sys.argv[4] == "True", None if sys.argv[5] == "None" else int(sys.argv[5])
    observer = SlowConsumer(float(sys.argv[6])) if len(sys.argv) > 6 else None
    devices = np.array(jax.devices())
    mesh = Mesh(devices.reshape(2, 4), ("d", "m"))
    other = Mesh(devices.reshape(4, 2), ("d", "m"))
    total, big = total_mib * MIB, big_mib * MIB
    rows = 1024
    tree = {}
    for i in range((total - big) // (64 * MIB)):
        x = jnp.full((rows, 64 * MIB // 4 // rows), i, jnp.float32)
        tree[f"layer{i}"] = jax.device_put(x, NamedSharding(mesh, P("d", "m")))
    # One leaf stored as a single shard larger than the cap (it lives on one device).
    tree["big"] = jax.device_put(jnp.arange(big // 4, dtype=jnp.float32).reshape(rows, -1), devices[3])
    path = shardsave.Saver(async_save=False).save(tree, f"{directory}/m")
    assert path is not None
    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(other, P("m", "d")))
        for k, v in tree.items()
        if k != "big"
    }
    target["big"] = jax.ShapeDtypeStruct(tree["big"].shape, jnp.float32, sharding=tree["big"].sharding)
    expected = {k: float(v[-1, -1]) for k, v in tree.items()}
    del tree
    gc.collect()
    trim()  # the saved tree's memory: the restore must not hide its own in it
    restored, measured = measure(lambda: restore(path, target, sequential, cap, observer))
    ok = all(float(restored[k][-1, -1]) == v for k, v in expected.items())
    print(json.dumps({**measured, "ok": ok}))


def measure(restore: Callable[[], Any]) -> tuple[Any, dict[str, int]]:
    """Runs restore() while a thread samples RSS; the result and its transient memory
    (peak RSS minus RSS once it is done, the result still alive)."""
    proc = psutil.Process()
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    before = proc.memory_info().rss
    thread = threading.Thread(target=sample, daemon=True)  # (a restore that raises must not hang)
    thread.start()
    restored = restore()
    jax.block_until_ready(restored)
    stop.set()
    thread.join()
    gc.collect()
    trim()  # what the restore freed into malloc is not the result
    after = proc.memory_info().rss
    return restored, {"transient": peak[0] - after, "before": before, "after": after}


if __name__ == "__main__":
    main()
