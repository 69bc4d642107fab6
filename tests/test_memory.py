"""Host memory during restore, measured in a fresh process (peak RSS minus RSS after)."""

from __future__ import annotations

import json

from conftest import run_python

MIB = 1 << 20

# Builds a checkpoint, then restores it in the same fresh process while a thread samples
# RSS. The result stays alive, so "after" counts it out (on CPU, device memory is host
# memory); what remains is the transient host memory of the restore itself.
MEASURE = """
import json, threading, time, gc, numpy as np, psutil, jax, jax.numpy as jnp, shardsave
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
MIB = 1 << 20
devices = np.array(jax.devices())
mesh = Mesh(devices.reshape(2, 4), ("d", "m"))
other = Mesh(devices.reshape(4, 2), ("d", "m"))
total, big = {total_mib} * MIB, {big_mib} * MIB
rows = 1024
tree = {{}}
n_sharded = (total - big) // (64 * MIB)
for i in range(n_sharded):
    x = jnp.full((rows, 64 * MIB // 4 // rows), i, jnp.float32)
    tree[f"layer{{i}}"] = jax.device_put(x, NamedSharding(mesh, P("d", "m")))
# One leaf stored as a single shard larger than the cap (it lives on one device).
tree["big"] = jax.device_put(jnp.arange(big // 4, dtype=jnp.float32).reshape(rows, -1), devices[3])
path = shardsave.Saver(async_save=False).save(tree, "{directory}/m")
target = {{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(other, P("m", "d")))
          for k, v in tree.items() if k != "big"}}
target["big"] = jax.ShapeDtypeStruct(tree["big"].shape, jnp.float32, sharding=tree["big"].sharding)
expected = {{k: float(v[-1, -1]) for k, v in tree.items()}}
del tree, x
gc.collect()
proc = psutil.Process()
peak, stop = [0], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.0005)
before = proc.memory_info().rss
thread = threading.Thread(target=sample); thread.start()
restored = shardsave.Saver().restore(path, target, restore_sequentially={sequential}, max_host_bytes={cap})
jax.block_until_ready(restored)
stop.set(); thread.join()
gc.collect()
after = proc.memory_info().rss
ok = all(float(restored[k][-1, -1]) == v for k, v in expected.items())
print(json.dumps({{"transient": peak[0] - after, "before": before, "after": after, "ok": ok}}))
"""


def _measure(tmp_path, total_mib, big_mib, sequential, cap):
    out = run_python(
        MEASURE.format(
            directory=tmp_path, total_mib=total_mib, big_mib=big_mib, sequential=sequential, cap=cap
        ),
        timeout=600,
    )
    return json.loads(out.strip().splitlines()[-1])


def test_restore_sequentially_holds_the_cap(tmp_path):
    cap = 32 * MIB
    result = _measure(tmp_path, total_mib=512, big_mib=128, sequential=True, cap=cap)
    assert result["ok"]
    bound = max(cap, 64 * MIB) + 64 * MIB
    assert result["transient"] < bound, (
        f"transient {result['transient'] / MIB:.0f} MiB >= {bound / MIB:.0f} MiB"
    )


def test_default_restore_stays_near_the_bytes_restored(tmp_path):
    result = _measure(tmp_path, total_mib=512, big_mib=64, sequential=False, cap=None)
    assert result["ok"]
    assert result["transient"] < 512 * MIB * 1.05


def test_buffers_of_a_capped_restore_return_their_memory_when_dropped():
    # restore_sequentially reads into mapped_empty buffers on the I/O threads and drops
    # them on the caller's. Buffers from malloc (aligned_empty) stay resident after
    # that: 64 MiB of them here, outside the restore's budget.
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    from shardsave._storage import mapped_empty

    def filled(nbytes):
        buffer = mapped_empty(nbytes)
        buffer.fill(1)
        return buffer

    proc = psutil.Process()
    kept = []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(6):
            base = proc.memory_info().rss
            buffers = list(pool.map(filled, [16 * MIB] * 4))
            assert proc.memory_info().rss > base + 56 * MIB
            del buffers
            kept.append(proc.memory_info().rss - base)
    assert max(kept) < 8 * MIB, f"{max(kept) / MIB:.0f} MiB stayed resident after the buffers were dropped"
