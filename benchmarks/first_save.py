"""How long the first save of a process blocks, against the next ones.

    python benchmarks/first_save.py              # the matrix: 1 and 2 GiB, 1 and 16 leaves,
                                                 # uncapped (with and without prepare) and capped
    python benchmarks/first_save.py 2 16 1024    # one row: GiB, leaves, cap in MiB (0: none)

Each row runs in a fresh process on 8 CPU devices: the state is made on the
devices, a Saver(async_save=True) is made (and prepare(state) called, for the
prepared rows), GAP_S seconds pass (the training steps before a first save,
in which prepare() or a capped Saver makes its buffers in the background),
then four saves to tmpfs, each waited for before the next. Prints each save's
blocking time and the first's ratio to the median of the later ones.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

GAP_S = 3.0
ROOT = "/dev/shm/shardsave-first-save"


def one(gib: float, leaves: int, cap_mib: int, prepare: bool) -> list[float]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import shardsave

    total = int(gib * 2**30)
    if leaves == 1:  # one leaf on one device
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shapes = [(total // 4,)]
    else:
        sharding = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P("x"))
        shapes = [(total // 4 // leaves,)] * leaves
    state = {
        f"l{i}": jax.jit(lambda i=i, s=s: jnp.full(s, i, jnp.float32), out_shardings=sharding)()
        for i, s in enumerate(shapes)
    }
    jax.block_until_ready(state)
    saver = shardsave.Saver(max_to_keep=1, save_host_bytes=cap_mib << 20 if cap_mib else None)
    if prepare:
        saver.prepare(state)
    time.sleep(GAP_S)
    times = []
    for step in range(4):
        began = time.perf_counter()
        saver.save(state, f"{ROOT}/model", global_step=step)
        times.append(time.perf_counter() - began)
        saver.wait_until_finished()
    saver.close()
    shutil.rmtree(ROOT, ignore_errors=True)
    return times


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(one(float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1")))
        return
    if len(sys.argv) == 4:
        rows = [(float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), True)]
    else:
        rows = [
            (gib, leaves, cap, prepare)
            for gib in (1, 2)
            for leaves in (1, 16)
            for cap, prepare in ((0, False), (0, True), (256, False), (1024, False))
        ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    print(f"{'state':>6} {'leaves':>6} {'cap':>8} {'prepare':>7} {'first s':>8} {'later s':>8} {'ratio':>6}")
    for gib, leaves, cap, prepare in rows:
        argv = [sys.executable, __file__, "--one", str(gib), str(leaves), str(cap), str(int(prepare))]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
        times = json.loads(out.strip().splitlines()[-1])
        later = statistics.median(times[1:])
        cap_s = f"{cap} MiB" if cap else "none"
        print(
            f"{gib:>4} GiB {leaves:>6} {cap_s:>8} {'yes' if prepare else 'no':>7} "
            f"{times[0]:>8.3f} {later:>8.3f} {times[0] / later:>5.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
