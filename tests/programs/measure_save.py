"""Host memory of capped saves, measured in a fresh process (peak RSS minus RSS before).

    python tests/programs/measure_save.py LOCATION TOTAL_MIB LAYOUT CAP_MIB MODES

Builds a state of TOTAL_MIB on the 8 CPU devices (made on the devices, so no host
copy of it exists), in LAYOUT "sharded" (16 leaves over all devices, and one leaf
on one device larger than the cap) or "small" (1024 small leaves). Then, for each
of MODES ("sync,async"), a Saver(save_host_bytes=CAP_MIB) saves it to LOCATION
while a thread samples RSS. The state is the arrays themselves (on CPU, device
memory is host memory), so it is counted out: "before" is RSS with the state
alive and no Saver made yet, and the Saver's buffers count against the cap. A
tiny save to the same store first opens what a store opens once per process
(clients, thread pools), which no cap of a save covers. After the last save,
every leaf is restored, one at a time, and the CRC-32C of each of its shards
compared with the original's. Prints {"modes": {mode: {"peak", "kept", "blocking", "seconds"}}, "ok"}
as JSON ("kept": RSS after the save committed, the Saver still open, minus "before").
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import threading
import time
from typing import Any

import crc32c
import jax
import jax.numpy as jnp
import numpy as np
import psutil
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave

MIB = 1 << 20


def make_state(total: int, layout: str, cap: int) -> dict[str, Any]:
    """Distinct values in every leaf, computed on the devices."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    sharded = NamedSharding(mesh, P("x", "y"))

    def leaf(shape: tuple[int, ...], seed: int, sharding: Any) -> jax.Array:
        def fill() -> jax.Array:
            i = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
            j = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
            return (i * np.uint32(2654435761) + j * np.uint32(40503) + np.uint32(seed)).view(jnp.float32)

        return jax.jit(fill, out_shardings=sharding)()

    state: dict[str, Any] = {}
    if layout == "sharded":
        big = 2 * cap  # stored as one shard of one device, larger than the cap
        state["big"] = leaf((1024, big // 4096), 7, jax.sharding.SingleDeviceSharding(jax.devices()[5]))
        per = (total - big) // 16
        for k in range(16):
            state[f"layer{k:02d}"] = leaf((1024, per // 4096), k, sharded)
    else:
        per = total // 1024
        for k in range(1024):
            state[f"p{k:04d}"] = leaf((per // 4,), k, jax.sharding.SingleDeviceSharding(jax.devices()[k % 8]))
    state["step"] = np.int64(12)
    return jax.block_until_ready(state)


def crc(x: Any) -> int:
    """The CRC-32C of an array's bytes, to compare the restored bytes with the saved ones."""
    return int(crc32c.crc32c(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data))


def crcs(x: Any) -> dict[str, int]:
    """The CRC-32C of each shard of a leaf, by the box it covers. Shard by shard: np.asarray
    of a whole jax.Array would keep a host copy of it on the array (its cached value)."""
    if not isinstance(x, jax.Array):
        return {"": crc(np.asarray(x))}
    out = {}
    for shard in x.addressable_shards:
        box = tuple((s.start or 0, s.stop if s.stop is not None else n) for s, n in zip(shard.index, x.shape))
        out[json.dumps(box)] = crc(np.asarray(shard.data))
    return out


def restored_crcs(value: np.ndarray, boxes: dict[str, int]) -> dict[str, int]:
    if list(boxes) == [""]:
        return {"": crc(value)}
    return {box: crc(value[tuple(slice(a, b) for a, b in json.loads(box))]) for box in boxes}


def main() -> None:
    location, total, layout = sys.argv[1], int(sys.argv[2]) * MIB, sys.argv[3]
    cap, modes = int(sys.argv[4]) * MIB, sys.argv[5].split(",")
    started = time.perf_counter()
    state = make_state(total, layout, cap)
    expected = {name: crcs(x) for name, x in state.items()}
    shardsave.Saver(async_save=False).save({"x": np.zeros(4)}, f"{location}/warmup")
    proc = psutil.Process()
    results: dict[str, dict[str, float]] = {}
    path = None
    for step, mode in enumerate(modes):
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        peak, stop = [0], threading.Event()

        def sample(peak: list[int] = peak, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.001)

        before = proc.memory_info().rss
        thread = threading.Thread(target=sample)
        thread.start()
        began = time.perf_counter()
        saver = shardsave.Saver(async_save=mode == "async", save_host_bytes=cap, max_to_keep=1)
        path = saver.save(state, f"{location}/m", global_step=step)
        blocking = time.perf_counter() - began
        saver.wait_until_finished()
        seconds = time.perf_counter() - began
        stop.set()
        thread.join()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        kept = proc.memory_info().rss - before
        saver.close()
        results[mode] = {"peak": peak[0] - before, "kept": kept, "blocking": blocking, "seconds": seconds}
    assert path is not None
    del state
    gc.collect()
    reader = shardsave.CheckpointReader(path)
    ok = sorted(v.name for v in reader.variables()) == sorted(expected)
    for name, value in expected.items():
        ok &= restored_crcs(reader.get(name), value) == value
    print(json.dumps({"modes": results, "ok": bool(ok), "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
