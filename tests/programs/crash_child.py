"""The saving process that tests/test_crash.py kills: async saves in a loop, phases announced.

    python tests/programs/crash_child.py DIRECTORY PAUSE_AT [CAP_MIB]

Each phase of a save (stage: save() blocking; data, fsync, index, state, delete:
the store's calls) prints
"phase NAME N" as it begins; the one named by PAUSE_AT ("index:1") also prints
"paused" and sleeps, so that the test kills it exactly there. An empty
PAUSE_AT never pauses (the test kills it at a random moment). The process
resumes from the directory's latest checkpoint, as a restarted job would. With
CAP_MIB, the Saver saves under that host-memory cap, and the tree has one more
leaf, 24 MiB on one device, so that each save streams through many pieces.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
import shardsave.storage
from shardsave.storage.testing import Hooked

_counts: dict[str, int] = {}
_lock = threading.Lock()


def _mark(phase: str, pause_at: str) -> None:
    """Announces a phase (from the I/O threads too: whole lines, under the lock)."""
    with _lock:
        n = _counts[phase] = _counts.get(phase, 0) + 1
        paused = pause_at == f"{phase}:{n}"
        sys.stdout.write(f"phase {phase} {n}\n" + ("paused\n" if paused else ""))
        sys.stdout.flush()
    if paused:
        time.sleep(120)


def _announce_phases(pause_at: str) -> contextlib.AbstractContextManager[None]:
    fsync = os.fsync

    def on_write(key: str) -> None:
        _mark("index" if key.endswith(".index") else "state" if key == "checkpoint" else "data", pause_at)

    def marked_fsync(fd: Any) -> None:  # a local write's temporary file is complete, not yet renamed
        if not stat.S_ISDIR(os.fstat(fd).st_mode):  # not the directory's fsync after the rename
            _mark("fsync", pause_at)
        fsync(fd)

    # The fsync of a written temporary file happens inside the local store; it is
    # announced by wrapping os.fsync (announcing only: no fault is injected this way).
    os.fsync = marked_fsync
    return shardsave.storage.wrapping_stores(
        lambda store: Hooked(store, on_write, lambda key: _mark("delete", pause_at))
    )


def main() -> None:
    directory, pause_at = sys.argv[1], sys.argv[2]
    cap = int(sys.argv[3]) << 20 if len(sys.argv) > 3 else None
    with _announce_phases(pause_at):
        _save_forever(directory, pause_at, cap)


def _save_forever(directory: str, pause_at: str, cap: int | None) -> None:
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    latest = shardsave.latest_checkpoint(directory)
    step = int(latest.rsplit("-", 1)[1]) + 1 if latest else 1
    saver = shardsave.Saver(max_to_keep=3, save_host_bytes=cap)
    print("ready", flush=True)
    while True:
        tree = {
            "sharded": jax.device_put(
                jnp.full((256, 1024), step, jnp.float32), NamedSharding(mesh, P("data", "model"))
            ),
            "replicated": jax.device_put(jnp.full((128, 256), step, jnp.int32), NamedSharding(mesh, P())),
            "host": np.full(1000, step, np.int64),
            "step": step,
        }
        if cap is not None:
            tree["big"] = jax.device_put(jnp.full((6, 1 << 20), step, jnp.float32), jax.devices()[2])
        # save() blocks while it waits for the previous commit and stages this one.
        _mark("stage", pause_at)
        saver.save(tree, f"{directory}/model", global_step=step, metadata={"loader": {"position": step}})
        step += 1


if __name__ == "__main__":
    main()
