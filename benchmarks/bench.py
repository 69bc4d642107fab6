"""shardsave against Orbax and the raw I/O limits, side by side in one process.

    python benchmarks/bench.py                      # configs/bench.yaml, profile "default"
    python benchmarks/bench.py --profile full       # every size and leaf count
    python benchmarks/bench.py --profile quick      # two tmpfs cases, a few minutes
    python benchmarks/bench.py --profile tiny       # seconds; what the tests run
    python benchmarks/bench.py --profile full --only cold   # a profile's cases on one storage

Every case builds one pytree (mixed shardings on a 2x4 mesh of 8 simulated CPU
devices, or of the real devices when there are 8 of them) and runs every tool on
it, interleaved within each repetition so machine noise hits all of them alike.
Each figure is the median of `reps` repetitions after `warmup` ones, with min and
max. Before every timed operation the benchmark touches and frees twice the
case's bytes (`warm_memory`), so no tool pays at random for memory the VM has
handed back to its host. Memory is transient host memory: peak RSS during the operation minus the
larger of the RSS before it and right after it (results still alive), sampled
every millisecond. save_stall is the longest time the sampling thread, a
stand-in for the training loop, could not run while an asynchronous save
committed in the background.

Breakdowns (not operations of their own): save_stage and save_commit split a
synchronous shardsave save; restore_index, restore_plan and restore_place split
its same-layout restore (reading and validating the index, planning, and jax's
array creation), and raw's restore_place is the time the raw restore spends in
jax.make_array_from_callback: jax's own cost per leaf, which no checkpointer avoids.

Tools and what they measure:
  d2h            the bare device-to-host copy of the unique shards into preallocated
                 buffers: the floor for a save's blocking time
  raw            Python writes of exactly the bytes shardsave stores (the unique
                 shards, after the bare copy) from preallocated buffers, fsync'd on
                 disk; raw restore: read those bytes into fresh buffers and place
                 every target shard on its device (jax.make_array_from_callback)
  raw-ts         the raw restore, but reading each file with one tensorstore
                 KvStore.read: what tensorstore's Python binding costs by itself
  orbax          orbax-checkpoint with its defaults (zstd), StandardCheckpointer
  orbax-nocomp   PyTreeCheckpointHandler(use_compression=False), async
  shardsave      Saver(async_save=False); restore, resharded restore, and
                 restore_sequentially with a 64 MiB cap
  shardsave-async  Saver(async_save=True): blocking time and time to commit
  shardsave-device Saver(snapshot_on_device=True), on accelerators only

Storages "s3" and "gcs" are object stores on loopback, started for each case
(benchmarks/stores.py): moto's S3 server and fake-gcs-server. There "raw" PUTs
and GETs the same bytes in parallel, one value per data file (on S3 boto3, one
thread per file; on GCS tensorstore's gcs driver, shardsave's own client, under
its concurrency limit), "raw-ranged" GETs them in ranges of 16 MiB (shardsave's
requests), "raw-placed" GETs them whole and places every target shard on its
devices (what a restore does with the bytes; the other limits place nothing).
shardsave-zstd is Saver(compression="zstd"), skipped with a note where this
shardsave has no such argument. Orbax (its defaults) runs on GCS only: its
s3:// paths cannot name another endpoint. A case may name a state (random, or
benchmarks/states.py's adamw-0 and adamw-100: a small transformer's optax.adamw
state before its first step and after 100) and a rate: gcs@200MB/s puts the
throttling proxy of benchmarks/throttle.py between every client and the server.

Storage "cold" (op restore_cold) restores from disk_dir with the kernel's page
cache dropped before every restore, as a job resuming on a fresh host reads it
(needs root; the case is skipped otherwise). "raw" is the parallel read of
shardsave's data files (8 threads, 16 MiB blocks, into reused buffers, as
parallel `dd bs=16M of=/dev/null`), and raw-fresh the same into new memory kept
until the end, as a restore's results must be; shardsave-64MiB and -256MiB are
restore_sequentially with those caps, and their limits raw-64MiB and -256MiB the
parallel read with at most as many bytes in flight (8 threads, blocks of an
eighth of the cap: the size of a capped restore's reads); every restore lands
on the saved layout. Every leaf is split over all devices (COLD_SPECS), none
replicated. A case with 1 leaf holds one leaf larger than any cap. Before each
restore the benchmark touches and frees twice the case's bytes (touch_free_memory),
so that every tool's new memory is memory the VM's host backs.

Storage "adamw" is the realistic case, on tmpfs: a decoder-only transformer's
optax.adamw state (LEAVES layers of width 1024, a 32k vocabulary; bf16
parameters, fp32 first and bf16 second moments after one update, FSDP-sharded
over every device): save_blocking (d2h: the bare device-to-host copy of its
shards, the floor) and save of an asynchronous save, restore,
and restore_fresh, a restore in a new process (the wait of a resumed job, page
faults included; Orbax's StandardCheckpointer there reads both Orbax variants,
so only its default is run).

Storage "orbax" restores Orbax's own checkpoints (StandardCheckpointer with its
defaults: OCDBT, zarr, zstd), written once to disk_dir: shardsave (formats/orbax.py)
beside Orbax, same targets (restore: the saved layout; restore_resharded: the
other mesh), warm, and cold (restore_cold, the page cache dropped before each
restore: root only).

Outputs: a table on the terminal, OUT/bench.json, OUT/bench.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

if "jax" not in sys.modules:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import fresh_memory  # benchmarks/, beside this file
import jax
import jax.numpy as jnp
import numpy as np
import psutil
import yaml
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
import shardsave.formats.shardsave
import shardsave.index
import shardsave.save.commit
import shardsave.save.plan
import shardsave.storage
import shardsave.tree
from shardsave.restore import MAX_SPAN_BYTES

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
SPECS = [P("data", "model"), P("model"), P(None, "model"), P(), P("data")]
# The cold cases split every leaf over all devices: on CPU devices a replicated leaf
# is a host copy per device, which no disk read involves (SPECS make a tree 3.4x its
# bytes there, and 4 GiB in 1024 leaves, or 8 GiB, did not fit this 24 GiB VM).
COLD_SPECS = [P("data", "model"), P(("data", "model")), P(None, ("data", "model"))]
# Lines a case adds below the table (what each tool stored on an object store).
NOTES: list[str] = []


def parse_case(entry: list[Any]) -> dict[str, Any]:
    """A profile's case: [storage, MiB, leaves], and on an object store optionally the
    state (random, adamw-STEPS) and the throttle in MB/s (storage becomes gcs@200MB/s)."""
    storage, size, leaves, *rest = entry
    case: dict[str, Any] = {"storage": storage, "store": storage, "bytes": size * MIB, "leaves": leaves}
    if storage in ("s3", "gcs"):
        case["state"] = rest[0] if rest else "random"
        if len(rest) > 1 and rest[1]:
            rate = rest[1]
            case["mb_per_s"] = rate
            case["storage"] = f"{storage}@" + (f"{rate / 1000:g}GB/s" if rate >= 1000 else f"{rate:g}MB/s")
    return case


def case_key(r: dict[str, Any]) -> tuple[str, str, int, int]:
    """What tells one case from another in the results (two training states share a size)."""
    return (r["storage"], r.get("state", ""), r["bytes"], r["leaves"])


def case_label(case: dict[str, Any]) -> str:
    if case.get("state", "random") != "random" and not case["bytes"]:  # its size is measured
        return f"{case['storage']} {case['state']}"
    state = f" {case['state']}" if case.get("state", "random") != "random" else ""
    return f"{case['storage']}{state} {case['bytes'] / MIB:.0f} MiB, {case['leaves']} leaves"


# ---------------------------------------------------------------- measurement


class Sampler:
    """Peak RSS of this process while an operation runs, and the longest stall of a thread.

    The sampling thread is a stand-in for a training loop: the longest gap between
    two of its samples (`stall`, seconds) is the longest time another Python thread
    could not run, because the operation held the GIL (or the CPU) that long.
    """

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.stall = 0.0
        self.warm_bytes = 0  # touched and freed before each operation (warm_memory)

    def run(self, fn: Callable[[], Any], warm: bool = True) -> tuple[float, int, Any]:
        """Times fn; warm=False for the second half of an operation (waiting on an async save)."""
        if warm:
            warm_memory(self.warm_bytes)
        before = self.proc.memory_info().rss
        peak = [before]
        stop = threading.Event()
        gaps = [0.0]

        def sample() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                peak[0] = max(peak[0], self.proc.memory_info().rss)
                time.sleep(0.001)
                now = time.perf_counter()
                gaps[0] = max(gaps[0], now - last)
                last = now

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        began = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - began
        stop.set()
        thread.join()
        self.stall = gaps[0]
        after = self.proc.memory_info().rss
        if os.environ.get("BENCH_DEBUG"):
            print(
                f"  {getattr(fn, 'func', fn)!r:.60} peak {peak[0] >> 20} MiB after {after >> 20} MiB",
                file=sys.stderr,
            )
        # Memory in use before the operation (including buffers of earlier results that
        # are freed during it) and memory its results keep are not transient.
        return seconds, max(0, peak[0] - max(before, after)), result


def warm_memory(nbytes: int) -> None:
    """Touches nbytes of fresh anonymous memory (huge pages where the kernel has them), then frees it.

    Run right before every timed operation, for every tool alike. On a VM with
    free page reporting (this benchmark's Firecracker VM reports free 8 MiB
    blocks back to its host about 2 s after they are freed) the first touch of
    reported memory faults into the host: 0.5-2 s per GiB with huge pages,
    against 0.05 s for memory freed moments before. Without this step,
    whichever tool allocated after an idle moment paid that, at random (a 1 GiB
    restore took 0.18 s or 0.92 s, for every tool). Memory freed just before an
    operation is handed out again first, so the operation finds host-backed
    pages, as it would on a machine without page reporting.
    """
    if nbytes > 0:
        shardsave.storage.mapped_empty(nbytes)[::4096] = 1  # its own mapping, unmapped when dropped


def meshes() -> tuple[Mesh, Mesh]:
    """The saving mesh and the resharding target: 2x4 and 4x2 on 8 devices (1xN and Nx1 on fewer)."""
    devices = jax.devices()
    if len(devices) >= 8:
        grid = np.array(devices[:8])
        return Mesh(grid.reshape(2, 4), ("data", "model")), Mesh(grid.reshape(4, 2), ("data", "model"))
    grid = np.array(devices)
    return Mesh(grid.reshape(1, -1), ("data", "model")), Mesh(grid.reshape(-1, 1), ("data", "model"))


def build_tree(total_bytes: int, leaves: int, mesh: Mesh, specs: list[P] = SPECS) -> dict[str, jax.Array]:
    per_leaf = total_bytes // leaves
    cols = 256 if per_leaf >= 256 * 4 * 8 else 8
    rows = max(8, per_leaf // 4 // cols // 8 * 8)
    tree = {}
    key = jax.random.PRNGKey(0)
    for i in range(leaves):
        # Random values, as trained weights are: a compressor gains nothing on them.
        value = jax.random.normal(jax.random.fold_in(key, i), (rows, cols), jnp.float32)
        tree[f"layer{i:05d}"] = jax.device_put(value, NamedSharding(mesh, specs[i % len(specs)]))
    jax.block_until_ready(tree)
    return tree


def abstract(tree: dict[str, jax.Array], mesh: Mesh | None) -> dict[str, jax.ShapeDtypeStruct]:
    def target(x: jax.Array, i: int) -> jax.ShapeDtypeStruct:
        sharding = x.sharding if mesh is None else NamedSharding(mesh, SPECS[i % len(SPECS)])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return {k: target(v, i) for i, (k, v) in enumerate(tree.items())}


# ---------------------------------------------------------------- raw limits


class Raw:
    """The practical limits: bare copies and plain Python file I/O of the same bytes."""

    def __init__(self, tree: dict[str, jax.Array], durable: bool):
        specs = [
            shardsave.tree.LeafSpec(k, tuple(v.shape), np.dtype(v.dtype), "jax", v.sharding)
            for k, v in tree.items()
        ]
        self.plan = shardsave.save.plan.plan_save(specs, True, jax.devices())
        self.leaves = list(tree.values())
        self.names = list(tree)
        self.durable = durable
        self.place_seconds = 0.0
        self.buffers = [np.empty(f.nbytes, np.uint8) for f in self.plan.files]
        for b in self.buffers:
            b.fill(0)  # touch every page once, outside any timing

    def d2h(self) -> None:
        shards = {
            i: {s.device.id: s.data for s in leaf.addressable_shards} for i, leaf in enumerate(self.leaves)
        }
        for f, buf in zip(self.plan.files, self.buffers):
            for s in f.shards:
                array = np.asarray(shards[s.leaf][s.writer.id])
                np.copyto(buf[s.offset : s.offset + s.nbytes].view(array.dtype).reshape(array.shape), array)

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for k, buf in enumerate(self.buffers):
            with open(directory / f"raw.data-{k:05d}", "wb") as f:
                f.write(memoryview(buf))
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
        if self.durable:
            fd = os.open(directory, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    def restore(
        self, directory: Path, target: dict[str, jax.ShapeDtypeStruct], via_tensorstore: bool = False
    ) -> dict[str, jax.Array]:
        """Reads the stored bytes into fresh buffers and places every target shard.

        via_tensorstore: read each file with one tensorstore KvStore.read instead of
        Python's readinto, to show what tensorstore's Python binding costs by itself.
        """
        stored: dict[int, list[tuple[shardsave.index.Box, np.ndarray]]] = {}
        if via_tensorstore:
            import tensorstore as ts

            kv = ts.KvStore.open({"driver": "file", "path": str(directory) + "/"}).result()
            futures = [kv.read(f"raw.data-{k:05d}") for k in range(len(self.plan.files))]
            stored = self.fetched([np.frombuffer(future.result().value, np.uint8) for future in futures])
        for k, f in enumerate(self.plan.files if not via_tensorstore else []):
            with open(directory / f"raw.data-{k:05d}", "rb", buffering=0) as fh:
                for s in f.shards:
                    buf = np.empty(s.nbytes, np.uint8)
                    fh.seek(s.offset)
                    fh.readinto(memoryview(buf))
                    stored.setdefault(s.leaf, []).append((s.box, buf))
        return self.place(stored, target)

    def fetched(self, payloads: list[np.ndarray]) -> dict[int, list[tuple[shardsave.index.Box, np.ndarray]]]:
        """Each leaf's stored shards as views into the bytes of the data files (fetched whole)."""
        stored: dict[int, list[tuple[shardsave.index.Box, np.ndarray]]] = {}
        for f, data in zip(self.plan.files, payloads):
            for s in f.shards:
                stored.setdefault(s.leaf, []).append((s.box, data[s.offset : s.offset + s.nbytes]))
        return stored

    def place(
        self,
        stored: dict[int, list[tuple[shardsave.index.Box, np.ndarray]]],
        target: dict[str, jax.ShapeDtypeStruct],
    ) -> dict[str, jax.Array]:
        """Every target shard from the stored shards (assembling a leaf first where the layout differs)."""
        out = {}
        self.place_seconds = 0.0  # in make_array_from_callback: jax's own cost per leaf
        for i, name in enumerate(self.names):
            t = target[name]
            boxes = {box: buf.view(t.dtype).reshape(shardsave.index.box_shape(box)) for box, buf in stored[i]}
            whole: list[np.ndarray] = []

            def piece(index: tuple[slice, ...], boxes=boxes, whole=whole, t=t) -> np.ndarray:
                box = tuple(sl.indices(d)[:2] for sl, d in zip(index, t.shape))
                if box in boxes:
                    return boxes[box]
                if not whole:  # another layout: assemble the leaf once, then slice
                    array = np.empty(t.shape, t.dtype)
                    for b, data in boxes.items():
                        array[tuple(slice(a, z) for a, z in b)] = data
                    whole.append(array)
                return whole[0][index]

            began = time.perf_counter()
            out[name] = jax.make_array_from_callback(t.shape, t.sharding, piece)
            self.place_seconds += time.perf_counter() - began
        return jax.block_until_ready(out)


# ---------------------------------------------------------------- the tools


def orbax_tools() -> dict[str, Any]:
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        print("orbax-checkpoint is not installed (pip install -e '.[bench]'): skipping it", file=sys.stderr)
        return {}
    return {
        "orbax": lambda: ocp.StandardCheckpointer(),
        "orbax-nocomp": lambda: ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(use_compression=False)),
        "_ocp": ocp,
    }


def _ready(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return jax.block_until_ready(fn(*args, **kwargs))


def run_case(
    case: dict[str, Any], config: dict[str, Any], root: Path, sampler: Sampler
) -> list[dict[str, Any]]:
    mesh, other = meshes()
    tree = build_tree(case["bytes"], case["leaves"], mesh)
    same, resharded = abstract(tree, None), abstract(tree, other)
    durable = case["storage"] == "disk"
    base = root / f"{case['storage']}-{case['bytes'] // MIB}MiB-{case['leaves']}"
    shutil.rmtree(base, ignore_errors=True)
    raw = Raw(tree, durable)
    # Every tool saves each repetition into a fresh directory and the previous one is
    # removed outside the timings, as for Orbax: no tool pays for deleting old data.
    saver = shardsave.Saver(async_save=False, max_to_keep=None)
    async_saver = shardsave.Saver(async_save=True, max_to_keep=None)
    async_savers = {"shardsave-async": async_saver}
    if jax.devices()[0].platform != "cpu":  # on-device snapshots only matter on accelerators
        async_savers["shardsave-device"] = shardsave.Saver(max_to_keep=None, snapshot_on_device=True)
    orbax = orbax_tools() if config.get("orbax", True) else {}
    ocp = orbax.pop("_ocp", None)
    checkpointers = {name: make() for name, make in orbax.items()}
    records: list[dict[str, Any]] = []
    reps = config["warmup"] + config["reps"]
    sampler.warm_bytes = int(config["warm_memory"] * case["bytes"])

    def record(tool: str, op: str, rep: int, seconds: float, transient: int) -> None:
        if rep >= config["warmup"]:
            records.append({**case, "tool": tool, "op": op, "seconds": seconds, "transient_bytes": transient})

    for rep in range(reps):
        step = rep
        # Save side, interleaved tool by tool.
        record("d2h", "save_blocking", rep, *sampler.run(raw.d2h)[:2])
        raw.d2h()
        for name in ("raw", "shardsave", *async_savers):
            shutil.rmtree(base / name, ignore_errors=True)
        record("raw", "save", rep, *sampler.run(partial(raw.write, base / "raw"))[:2])

        ss_path = str(base / "shardsave" / "model")
        t, m, path = sampler.run(partial(saver.save, tree, ss_path, global_step=step))
        record("shardsave", "save", rep, t, m)
        info = saver.last_save  # the stage breakdown of that save
        record("shardsave", "save_stage", rep, info.blocking_seconds, 0)
        record("shardsave", "save_commit", rep, info.commit_seconds or float("nan"), 0)

        for name, a_saver in async_savers.items():
            as_path = str(base / name / "model")
            t_block, m_block, _ = sampler.run(partial(a_saver.save, tree, as_path, global_step=step))
            t_rest, m_rest, _ = sampler.run(a_saver.wait_until_finished, warm=False)
            record(name, "save_stall", rep, sampler.stall, 0)
            record(name, "save_blocking", rep, t_block, m_block)
            record(name, "save", rep, t_block + t_rest, max(m_block, m_rest))

        for name, ckptr in checkpointers.items():
            target_dir = base / name / f"{step}"
            shutil.rmtree(target_dir.parent, ignore_errors=True)
            if name == "orbax":
                t_block, m_block, _ = sampler.run(partial(ckptr.save, target_dir, tree))
            else:
                t_block, m_block, _ = sampler.run(
                    partial(ckptr.save, target_dir, args=ocp.args.PyTreeSave(tree))
                )
            t_rest, m_rest, _ = sampler.run(ckptr.wait_until_finished, warm=False)
            record(name, "save_stall", rep, sampler.stall, 0)
            record(name, "save_blocking", rep, t_block, m_block)
            record(name, "save", rep, t_block + t_rest, max(m_block, m_rest))

        # Restore side.
        for label, target in (("restore", same), ("restore_resharded", resharded)):
            t, m, out = sampler.run(partial(raw.restore, base / "raw", target))
            del out
            record("raw", label, rep, t, m)
            if label == "restore":
                record("raw", "restore_place", rep, raw.place_seconds, 0)
            if case["bytes"] <= config["raw_ts_max_mib"] * MIB:  # it holds two copies at once
                t, m, out = sampler.run(partial(raw.restore, base / "raw", target, via_tensorstore=True))
                del out
                record("raw-ts", label, rep, t, m)
            t, m, out = sampler.run(partial(_ready, saver.restore, path, target))
            del out
            record("shardsave", label, rep, t, m)
            if label == "restore":  # where the time went
                info = saver.last_restore
                record("shardsave", "restore_index", rep, info.index_seconds, 0)
                record("shardsave", "restore_plan", rep, info.plan_seconds, 0)
                record("shardsave", "restore_place", rep, info.place_seconds, 0)
            for name, ckptr in checkpointers.items():
                target_dir = base / name / f"{step}"
                if name == "orbax":
                    fn = partial(_ready, ckptr.restore, target_dir, target)
                else:
                    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
                    args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
                    fn = partial(_ready, ckptr.restore, target_dir, args=args)
                t, m, out = sampler.run(fn)
                del out
                record(name, label, rep, t, m)
        cap = config["sequential_cap_mib"] * MIB
        t, m, out = sampler.run(
            partial(_ready, saver.restore, path, resharded, restore_sequentially=True, max_host_bytes=cap)
        )
        del out
        record("shardsave", "restore_sequential", rep, t, m)
        gc.collect()

    for ckptr in checkpointers.values():
        ckptr.close()
    saver.close()
    for a_saver in async_savers.values():
        a_saver.close()
    shutil.rmtree(base, ignore_errors=True)
    return records


# ---------------------------------------------------------------- a realistic training state


def adamw_state(
    layers: int, mesh: Mesh, width: int = 1024, vocab: int = 32768, abstract: bool = False
) -> Any:
    """A decoder-only transformer's optax.adamw state, FSDP-sharded over every device.

    bf16 parameters, fp32 first moments (mu_dtype), bf16 second moments, after one
    update with random gradients (so the moments are not the zeros a compressor
    writes for nothing, as they are only before the first step).
    """
    import optax

    spec = P(tuple(mesh.axis_names))  # the first axis split over all devices

    def shapes() -> dict[str, tuple[int, ...]]:
        out = {"embed": (vocab, width), "unembed": (width, vocab), "final_norm": (width,)}
        for i in range(layers):
            for name, shape in (
                ("attn_norm", (width,)),
                ("q", (width, width)),
                ("k", (width, width)),
                ("v", (width, width)),
                ("o", (width, width)),
                ("mlp_norm", (width,)),
                ("mlp_in", (width, 4 * width)),
                ("mlp_out", (4 * width, width)),
            ):
                out[f"layer{i:02d}/{name}"] = shape
        return out

    optimizer = optax.adamw(1e-4, mu_dtype=jnp.float32)

    def make() -> Any:
        key = jax.random.PRNGKey(0)
        params = {
            k: (jax.random.normal(jax.random.fold_in(key, i), shape) * 0.02).astype(jnp.bfloat16)
            for i, (k, shape) in enumerate(shapes().items())
        }
        state = optimizer.init(params)
        grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params)
        _, state = optimizer.update(grads, state, params)
        return {"params": params, "opt_state": state}

    shaped = jax.eval_shape(make)

    def sharding(x: Any) -> NamedSharding:
        return NamedSharding(mesh, spec if x.ndim >= 1 and x.shape[0] % mesh.size == 0 else P())

    shardings = jax.tree.map(sharding, shaped)
    if abstract:
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shaped, shardings
        )
    return jax.block_until_ready(jax.jit(make, out_shardings=shardings)())


FRESH_RESTORE = """
import json, sys, time
sys.path.insert(0, {bench_dir!r})
import bench, jax
mesh, _ = bench.meshes()
target = bench.adamw_state({layers}, mesh, abstract=True)
tool, path = sys.argv[1], sys.argv[2]
began = time.perf_counter()
if tool == "shardsave":
    import shardsave
    out = shardsave.Saver().restore(path, target)
else:
    import orbax.checkpoint as ocp
    out = ocp.StandardCheckpointer().restore(path, target)
jax.block_until_ready(out)
print(json.dumps(time.perf_counter() - began))
"""


def run_adamw_case(
    case: dict[str, Any], config: dict[str, Any], root: Path, sampler: Sampler
) -> list[dict[str, Any]]:
    """The realistic case: an adamw state of case["leaves"] transformer layers on tmpfs.

    Blocking time and time to commit of an asynchronous save, a restore, and a
    restore in a fresh process (the time a resumed job waits, page faults included),
    for shardsave, Orbax's defaults and Orbax without compression.
    """
    import subprocess

    mesh, _ = meshes()
    layers = case["leaves"]
    state = adamw_state(layers, mesh)
    target = adamw_state(layers, mesh, abstract=True)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    count = len(jax.tree.leaves(state))
    case = {**case, "bytes": nbytes}
    print(f"  adamw state: {layers} layers, {count} leaves, {nbytes / 2**30:.2f} GiB", file=sys.stderr)
    base = root / f"adamw-{layers}"
    shutil.rmtree(base, ignore_errors=True)
    orbax = orbax_tools() if config.get("orbax", True) else {}
    ocp = orbax.pop("_ocp", None)
    checkpointers = {name: make() for name, make in orbax.items()}
    saver = shardsave.Saver(max_to_keep=1)
    fresh = FRESH_RESTORE.format(bench_dir=str(REPO / "benchmarks"), layers=layers)
    # On CPU the fresh process must take the CPU too; elsewhere jax picks the accelerator
    # (its platform name, "gpu", is not a backend JAX_PLATFORMS accepts).
    on_cpu = jax.devices()[0].platform == "cpu"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | (
        {"JAX_PLATFORMS": "cpu"} if on_cpu else {}
    )
    records: list[dict[str, Any]] = []
    sampler.warm_bytes = int(config["warm_memory"] * nbytes)

    def record(tool: str, op: str, rep: int, seconds: float, transient: int) -> None:
        if rep >= config["warmup"]:
            records.append({**case, "tool": tool, "op": op, "seconds": seconds, "transient_bytes": transient})

    # The floor of a save's blocking time: the bare device-to-host copy of the shards.
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    raw = Raw(flat, durable=False)
    for rep in range(config["warmup"] + config["reps"]):
        shutil.rmtree(base, ignore_errors=True)
        record("d2h", "save_blocking", rep, *sampler.run(raw.d2h)[:2])
        saves: dict[str, tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any], str]] = {}
        path = str(base / "shardsave" / "model")
        saves["shardsave"] = (
            partial(saver.save, state, path, global_step=rep),
            saver.wait_until_finished,
            partial(_ready, saver.restore, f"{path}-{rep}", target),
            f"{path}-{rep}",
        )
        for name, ckptr in checkpointers.items():
            where = base / name / str(rep)
            if name == "orbax":
                start = partial(ckptr.save, where, state)
                restore = partial(_ready, ckptr.restore, where, target)
            else:
                start = partial(ckptr.save, where, args=ocp.args.PyTreeSave(state))
                args = ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
                )
                restore = partial(_ready, ckptr.restore, where, args=args)
            saves[name] = (start, ckptr.wait_until_finished, restore, str(where))
        for tool, (start, finish, restore, where) in saves.items():
            t_block, m_block, _ = sampler.run(start)
            t_rest, m_rest, _ = sampler.run(finish, warm=False)
            record(tool, "save_blocking", rep, t_block, m_block)
            record(tool, "save", rep, t_block + t_rest, max(m_block, m_rest))
            t, m, out = sampler.run(restore)
            del out
            record(tool, "restore", rep, t, m)
            if tool != "orbax-nocomp":  # Orbax's StandardCheckpointer reads either
                done = subprocess.run(
                    [sys.executable, "-c", fresh, tool, where], capture_output=True, text=True, env=env
                )
                if done.returncode != 0:
                    raise RuntimeError(f"fresh-process restore ({tool}) failed:\n{done.stderr[-3000:]}")
                record(tool, "restore_fresh", rep, json.loads(done.stdout.strip().splitlines()[-1]), 0)
        gc.collect()
    for ckptr in checkpointers.values():
        ckptr.close()
    saver.close()
    shutil.rmtree(base, ignore_errors=True)
    return records


# ---------------------------------------------------------------- cold restores from disk


def drop_page_cache() -> bool:
    """Writes back and drops the kernel's page cache (root only); whether it could."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def touch_free_memory(nbytes: int) -> None:
    """Touches nbytes of new memory and frees it, so that the allocations right after
    find memory the host backs.

    A VM with free page reporting (virtio-balloon; this project's Firecracker VMs)
    hands memory that is free when the reporting runs (every few seconds) back to
    its host, and faulting it in again costs the guest many times what memory
    freed just before does (benchmarks/fresh_memory.py; docs/guides/performance.md).
    Without this, a restore's time depended on how long before it the previous
    one had freed its results: on the order of the rows, not on the tool.
    """
    nbytes = max(0, min(nbytes, psutil.virtual_memory().available - (2 << 30)))
    if nbytes:
        fresh_memory.touch(nbytes)


def parallel_read(files: list[Path], fresh: bool = False, threads: int = 8, block: int = 16 * MIB) -> Any:
    """The raw limits of a cold restore: every byte of the files read in 16 MiB blocks
    by 8 threads, into one reused buffer per thread (as parallel `dd bs=16M
    of=/dev/null`), or, with fresh, into new memory kept until the end (as a restore
    must: its results are new arrays, and on CPU devices they are host memory)."""
    jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, block)]
    buffers = threading.local()

    def read(job: tuple[Path, int]) -> Any:
        if fresh:
            buffer: Any = shardsave.storage.mapped_empty(block)
        else:
            if not hasattr(buffers, "b"):
                buffers.b = bytearray(block)
            buffer = buffers.b
        fd = os.open(job[0], os.O_RDONLY)
        try:
            n = os.preadv(fd, [buffer], job[1])
        finally:
            os.close(fd)
        return buffer if fresh else n

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(read, jobs))


def run_cold_case(
    case: dict[str, Any], config: dict[str, Any], root: Path, sampler: Sampler
) -> list[dict[str, Any]]:
    """Restores from a disk with the page cache dropped before each one (the resume of a
    job on a fresh host): the raw parallel read of the same data files, shardsave
    (default and capped), Orbax (default and without compression). leaves == 1 is a
    single leaf, larger than any cap. Skipped where the page cache cannot be dropped."""
    if not drop_page_cache():
        print("  cannot drop the page cache (needs root): skipping the cold case", file=sys.stderr)
        return []
    mesh, _ = meshes()
    tree = build_tree(case["bytes"], case["leaves"], mesh, COLD_SPECS)
    target = abstract(tree, None)
    base = root / f"cold-{case['bytes'] // MIB}MiB-{case['leaves']}"
    shutil.rmtree(base, ignore_errors=True)
    with shardsave.Saver(async_save=False) as writer:
        path = writer.save(tree, str(base / "shardsave" / "model"))
    gc.collect()  # its staging (as large as the tree) goes before Orbax saves the tree
    orbax = orbax_tools() if config.get("orbax", True) else {}
    ocp = orbax.pop("_ocp", None)
    checkpointers = {name: make() for name, make in orbax.items()}
    for name, ckptr in checkpointers.items():
        if name == "orbax":
            ckptr.save(base / name, tree)
        else:
            ckptr.save(base / name, args=ocp.args.PyTreeSave(tree))
        ckptr.wait_until_finished()
    del tree
    gc.collect()
    files = sorted((base / "shardsave").glob("model.data-*"))
    saver = shardsave.Saver()
    restores: dict[str, Callable[[], Any]] = {
        "raw": partial(parallel_read, files),
        "raw-fresh": partial(parallel_read, files, fresh=True),
        "shardsave": partial(_ready, saver.restore, path, target),
    }
    for cap in config.get("cold_caps_mib", [64, 256]):
        # The disk's limit with at most the cap in flight: 8 reads of an eighth of it at
        # a time, the size of a capped restore's reads.
        restores[f"raw-{cap}MiB"] = partial(parallel_read, files, block=cap * MIB // 8)
        restores[f"shardsave-{cap}MiB"] = partial(
            _ready, saver.restore, path, target, restore_sequentially=True, max_host_bytes=cap * MIB
        )
    for name, ckptr in checkpointers.items():
        if name == "orbax":
            restores[name] = partial(_ready, ckptr.restore, base / name, target)
        else:
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
            args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
            restores[name] = partial(_ready, ckptr.restore, base / name, args=args)
    records: list[dict[str, Any]] = []
    for rep in range(config["warmup"] + config["reps"]):
        for tool, fn in restores.items():  # interleaved, tool by tool
            gc.collect()
            drop_page_cache()
            touch_free_memory(2 * case["bytes"])  # the results and the page cache's pages
            t, m, out = sampler.run(fn, warm=False)
            del out
            if rep >= config["warmup"]:
                records.append(
                    {**case, "tool": tool, "op": "restore_cold", "seconds": t, "transient_bytes": m}
                )
    for ckptr in checkpointers.values():
        ckptr.close()
    saver.close()
    shutil.rmtree(base, ignore_errors=True)
    return records


def run_safetensors_case(
    case: dict[str, Any], config: dict[str, Any], root: Path, sampler: Sampler
) -> list[dict[str, Any]]:
    """Restores Hugging Face safetensors (written by the safetensors package) onto 8
    devices: shardsave's load_safetensors (default and capped at 64 MiB) against the
    package's own load_file followed by device_put, and against the raw parallel read
    (into one reused buffer per thread, and into fresh memory as a restore's results are)."""
    from safetensors.numpy import load_file, save_file

    mesh, _ = meshes()
    tree = build_tree(case["bytes"], case["leaves"], mesh)
    target = abstract(tree, None)
    base = root / f"safetensors-{case['bytes'] // MIB}MiB-{case['leaves']}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    path = base / "model.safetensors"
    save_file({name: np.asarray(x) for name, x in tree.items()}, str(path))
    del tree
    gc.collect()

    def package() -> Any:
        loaded = load_file(str(path))
        return {name: jax.device_put(loaded[name], t.sharding) for name, t in target.items()}

    restores: dict[str, Callable[[], Any]] = {
        "raw": partial(parallel_read, [path]),
        "raw-fresh": partial(parallel_read, [path], fresh=True),
        "shardsave": partial(_ready, shardsave.load_safetensors, str(path), target),
        "shardsave-64MiB": partial(
            _ready, shardsave.load_safetensors, str(path), target, max_host_bytes=64 * MIB
        ),
        "safetensors": partial(_ready, package),
    }
    sampler.warm_bytes = int(config["warm_memory"] * case["bytes"])
    records: list[dict[str, Any]] = []
    for rep in range(config["warmup"] + config["reps"]):
        for tool, fn in restores.items():  # interleaved, tool by tool
            gc.collect()
            t, m, out = sampler.run(fn)
            del out
            if rep >= config["warmup"]:
                records.append({**case, "tool": tool, "op": "restore", "seconds": t, "transient_bytes": m})
    shutil.rmtree(base, ignore_errors=True)
    return records


def run_orbax_case(
    case: dict[str, Any], config: dict[str, Any], root: Path, sampler: Sampler
) -> list[dict[str, Any]]:
    """Orbax's own checkpoints (StandardCheckpointer, its defaults: OCDBT, zarr, zstd),
    restored by shardsave beside Orbax restoring them: the same checkpoint, the same
    targets (the saved layout, and resharded onto the other mesh), interleaved tool by
    tool; warm (page cache hot) and cold (dropped before each restore; root only, the
    rows are left out otherwise). On disk_dir, so that a cold read is a disk read."""
    orbax = orbax_tools() if config.get("orbax", True) else {}
    if "orbax" not in orbax:
        return []
    mesh, other = meshes()
    tree = build_tree(case["bytes"], case["leaves"], mesh)
    same, resharded = abstract(tree, None), abstract(tree, other)
    base = root / f"orbax-{case['bytes'] // MIB}MiB-{case['leaves']}"
    shutil.rmtree(base, ignore_errors=True)
    path = base / "orbax"
    writer = orbax["orbax"]()
    writer.save(path, tree)
    writer.wait_until_finished()
    del tree
    gc.collect()
    checkpointer = orbax["orbax"]()
    saver = shardsave.Saver()
    tools: dict[str, Callable[[Any], Any]] = {
        "shardsave": lambda target: saver.restore(str(path), target),
        "orbax": lambda target: checkpointer.restore(path, target),
    }
    cold = drop_page_cache()
    if not cold:
        print(
            "  cannot drop the page cache (needs root): the orbax case's cold rows are left out",
            file=sys.stderr,
        )
    runs = [("restore", same, False), ("restore_resharded", resharded, False)]
    runs += [("restore_cold", same, True)] if cold else []
    sampler.warm_bytes = int(config["warm_memory"] * case["bytes"])
    records: list[dict[str, Any]] = []
    for rep in range(config["warmup"] + config["reps"]):
        for op, target, dropped in runs:
            for tool, restore in tools.items():  # interleaved, tool by tool
                gc.collect()
                if dropped:
                    drop_page_cache()
                    touch_free_memory(2 * case["bytes"])
                t, m, out = sampler.run(partial(_ready, restore, target), warm=not dropped)
                del out
                if rep >= config["warmup"]:
                    records.append({**case, "tool": tool, "op": op, "seconds": t, "transient_bytes": m})
    checkpointer.close()
    writer.close()
    saver.close()
    shutil.rmtree(base, ignore_errors=True)
    return records


def _orbax_on_gcs() -> Any:
    """Orbax's module where it can reach gs:// (its path operations need gcsfs), else None."""
    orbax = orbax_tools()
    if "_ocp" not in orbax:
        return None
    try:
        import gcsfs  # noqa: F401  (epath's backend for gs://)
    except ImportError:
        print("  gcsfs is not installed (Orbax's gs:// paths need it): Orbax is not run", file=sys.stderr)
        return None
    import logging

    # gcsfs warns on every path that it finds no credentials: the emulator needs none.
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    return orbax["_ocp"]


def compressing_saver() -> shardsave.Saver | None:
    """Saver(compression="zstd") where this shardsave has it; None (and a note) where not."""
    try:
        return shardsave.Saver(async_save=False, max_to_keep=None, compression="zstd")
    except TypeError as e:
        print(f"  shardsave-zstd skipped: this shardsave has no compression ({e})", file=sys.stderr)
        return None


def run_object_store_case(
    case: dict[str, Any], config: dict[str, Any], root: Path, sampler: Sampler
) -> list[dict[str, Any]]:
    """shardsave against plain parallel PUTs and GETs of the same bytes, on an object store.

    case["store"]: "s3" (moto's S3 server) or "gcs" (fake-gcs-server), on loopback;
    case["mb_per_s"], where set: every client's traffic through the throttling
    proxy at that rate (benchmarks/throttle.py). case["state"]: "random" (the
    tree of build_tree) or a training state of benchmarks/states.py (adamw-0,
    adamw-100: its size and leaves are measured, not set).

    The limits (stores.py): raw, the whole-value PUTs and GETs of exactly the
    bytes shardsave stores; raw-ranged, the GETs in the ranges shardsave asks for;
    raw-placed, the whole GETs and then every target shard placed on its devices.
    Tools: shardsave; shardsave-zstd (Saver(compression="zstd"), where this
    shardsave has it); orbax with its defaults on GCS (on S3 its s3:// paths cannot
    name another endpoint). A note says what each tool stored.
    """
    import states
    import stores

    store, state_name = case["store"], case["state"]
    mesh, other = meshes()
    if state_name == "random":
        state: Any = build_tree(case["bytes"], case["leaves"], mesh)
        flat = state
        resharded: Any = abstract(state, other)
    else:
        state = states.adamw_training_state(state_name, mesh, root / "states")
        flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
        resharded = None  # its FSDP layout is the same on the other mesh: nothing to reshard
        case = {**case, "bytes": sum(x.nbytes for x in flat.values()), "leaves": len(flat)}
    same = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    same_flat = abstract(flat, None)
    raw = Raw(flat, durable=False)
    raw.d2h()
    payloads = [b.tobytes() for b in raw.buffers]  # the clients take bytes: made outside the timings
    records: list[dict[str, Any]] = []
    sampler.warm_bytes = int(config["warm_memory"] * case["bytes"])

    def record(tool: str, op: str, rep: int, seconds: float, transient: int) -> None:
        if rep >= config["warmup"]:
            records.append({**case, "tool": tool, "op": op, "seconds": seconds, "transient_bytes": transient})

    server = stores.s3_server if store == "s3" else stores.gcs_server
    scheme = "s3" if store == "s3" else "gs"
    with server(case.get("mb_per_s")) as endpoint:
        client = stores.RawS3(endpoint, len(payloads)) if store == "s3" else stores.RawGCS(endpoint)
        savers = {"shardsave": shardsave.Saver(async_save=False, max_to_keep=None)}
        if (zstd := compressing_saver()) is not None:
            savers["shardsave-zstd"] = zstd
        ocp = _orbax_on_gcs() if store == "gcs" and config.get("orbax", True) else None
        orbax = ocp.StandardCheckpointer() if ocp is not None else None
        stored: dict[str, int] = {}

        def keys(prefix: str) -> list[str]:
            return [f"{prefix}/raw/raw.data-{k:05d}" for k in range(len(payloads))]

        def ranges(prefix: str) -> list[tuple[str, int, int]]:
            # shardsave's request pattern: each file in ranges of one span (MAX_SPAN_BYTES).
            return [
                (key, a, min(a + MAX_SPAN_BYTES, len(payload)))
                for key, payload in zip(keys(prefix), payloads)
                for a in range(0, len(payload), MAX_SPAN_BYTES)
            ]

        def get_placed(prefix: str) -> dict[str, jax.Array]:
            # The GETs, then what any restore does with the bytes: each target shard
            # placed on its devices (as the local raw restore does after its reads).
            return raw.place(raw.fetched(client.get(keys(prefix))), same_flat)

        def orbax_save(where: str) -> None:
            assert orbax is not None
            orbax.save(where, state)
            orbax.wait_until_finished()

        for rep in range(config["warmup"] + config["reps"]):
            prefix = f"rep{rep}"
            puts = list(zip(keys(prefix), payloads))
            record("raw", "save", rep, *sampler.run(partial(client.put, puts))[:2])
            paths = {}
            for name, saver in savers.items():
                url = f"{scheme}://{stores.BUCKET}/{prefix}/{name}/model"
                t, m, paths[name] = sampler.run(partial(saver.save, state, url, global_step=rep))
                record(name, "save", rep, t, m)
            orbax_at = f"gs://{stores.BUCKET}/{prefix}/orbax"
            if orbax is not None:
                record("orbax", "save", rep, *sampler.run(partial(orbax_save, orbax_at))[:2])
            restores: dict[tuple[str, str], Callable[[], Any]] = {
                ("raw", "restore"): partial(client.get, keys(prefix)),
                ("raw-ranged", "restore"): partial(client.get_ranges, ranges(prefix)),
                ("raw-placed", "restore"): partial(get_placed, prefix),
            }
            for name, saver in savers.items():
                restores[(name, "restore")] = partial(_ready, saver.restore, paths[name], same)
                if resharded is not None and name == "shardsave":
                    restores[(name, "restore_resharded")] = partial(
                        _ready, saver.restore, paths[name], resharded
                    )
            if orbax is not None:
                restores[("orbax", "restore")] = partial(_ready, orbax.restore, orbax_at, same)
            for (tool, op), restore in restores.items():
                t, m, out = sampler.run(restore)
                del out
                record(tool, op, rep, t, m)
            if rep == 0:  # what each tool stored (the same every repetition)
                stored = {tool: client.stored(f"{prefix}/{tool}/") for tool in ("raw", *savers, "orbax")}
            client.delete(f"{prefix}/")
            gc.collect()
        for saver in savers.values():
            saver.close()
        if orbax is not None:
            orbax.close()
        client.close()
    sizes = ", ".join(f"{tool} {n / MIB:.1f} MiB" for tool, n in stored.items() if n)
    NOTES.append(f"{case_label(case)}: stored {sizes}")
    return records


def _trimmed_rss(proc: Any) -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(proc.memory_info().rss)


def run_capped_case(
    case: dict[str, Any], config: dict[str, Any], root: Path, sampler: Sampler
) -> list[dict[str, Any]]:
    """Async saves of one state under host-memory caps, beside Orbax's memory options.

    Tools: shardsave-async (uncapped, its staging prepared), shardsave-<cap> for each
    of config["save_caps_mib"], orbax (StandardCheckpointer, its defaults),
    orbax-capped (PyTreeCheckpointHandler with save_concurrent_gb and
    save_device_host_concurrent_gb at 1, its smallest setting), and raw, the bare
    write of the same bytes straight from the arrays (the limit of save). Each
    tool runs its repetitions in a row and is closed before the next is made.
    Ops: save_blocking, save (to the commit), and save_held: the most host memory
    the tool held during a save, what it keeps between saves (a Saver's staging)
    included: the save's transient memory plus the RSS the tool added from before
    it was made to after its first save.
    """
    mesh, _ = meshes()
    # Every leaf split over all devices (COLD_SPECS): replicated leaves would hold 8 copies
    # in device memory, which on CPU is host memory (4 GiB stored took 13 GiB of RSS).
    tree = build_tree(case["bytes"], case["leaves"], mesh, COLD_SPECS)
    base = root / f"capped-{case['bytes'] // MIB}MiB-{case['leaves']}"
    shutil.rmtree(base, ignore_errors=True)
    proc = psutil.Process()
    records: list[dict[str, Any]] = []
    reps = config["warmup"] + config["reps"]
    sampler.warm_bytes = int(config["warm_memory"] * case["bytes"])
    orbax = orbax_tools() if config.get("orbax", True) else {}
    ocp = orbax.get("_ocp")

    def record(tool: str, op: str, rep: int, seconds: float, transient: int) -> None:
        if rep >= config["warmup"]:
            records.append({**case, "tool": tool, "op": op, "seconds": seconds, "transient_bytes": transient})

    makers: dict[str, Callable[[], Any]] = {
        "shardsave-async": lambda: shardsave.Saver(max_to_keep=1),
        **{
            f"shardsave-{mib // 1024}GiB" if mib >= 1024 else f"shardsave-{mib}MiB": partial(
                shardsave.Saver, max_to_keep=1, save_host_bytes=mib * MIB
            )
            for mib in config.get("save_caps_mib", [8])
        },
    }
    if ocp is not None:
        makers["orbax"] = orbax["orbax"]
        makers["orbax-capped"] = lambda: ocp.AsyncCheckpointer(
            ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, save_device_host_concurrent_gb=1)
        )
    # The raw limit writes straight from the arrays (on CPU devices their memory is host
    # memory): a host copy of 4 GiB more would not leave room for Orbax's beside it.
    plan = shardsave.save.plan.plan_save(
        [
            shardsave.tree.LeafSpec(k, tuple(v.shape), np.dtype(v.dtype), "jax", v.sharding)
            for k, v in tree.items()
        ],
        True,
        jax.devices(),
    )
    leaves = list(tree.values())

    def raw_write(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        shards = {i: {s.device.id: s.data for s in leaf.addressable_shards} for i, leaf in enumerate(leaves)}
        for k, f in enumerate(plan.files):
            with open(directory / f"raw.data-{k:05d}", "wb") as out:
                for s in sorted(f.shards, key=lambda s: s.offset):
                    out.seek(s.offset)
                    out.write(memoryview(np.asarray(shards[s.leaf][s.writer.id]).reshape(-1).view(np.uint8)))

    for rep in range(reps):
        shutil.rmtree(base, ignore_errors=True)
        record("raw", "save", rep, *sampler.run(partial(raw_write, base / "raw"))[:2])
        shutil.rmtree(base, ignore_errors=True)
    # One tool at a time, each closed before the next is made, so that the uncapped
    # staging (4 GiB) is not held beside Orbax's copies; its repetitions in a row.
    for name, make in makers.items():
        baseline = _trimmed_rss(proc)
        tool = make()
        if name == "shardsave-async":
            tool.prepare(tree)
        kept = None  # what the tool keeps between its saves (a Saver's staging)
        for rep in range(reps):
            if name.startswith("shardsave"):
                save = partial(tool.save, tree, str(base / name / "model"), global_step=rep)
            elif name == "orbax":
                save = partial(tool.save, base / name / f"{rep}", tree)
            else:
                save = partial(tool.save, base / name / f"{rep}", args=ocp.args.PyTreeSave(tree))
            t_block, m_block, _ = sampler.run(save)
            t_rest, m_rest, _ = sampler.run(tool.wait_until_finished, warm=False)
            record(name, "save_blocking", rep, t_block, m_block)
            record(name, "save", rep, t_block + t_rest, max(m_block, m_rest))
            if kept is None:
                kept = max(0, _trimmed_rss(proc) - baseline)
            # The sampler's transient is its peak above the larger of the RSS before and after.
            record(name, "save_held", rep, t_block + t_rest, max(m_block, m_rest) + kept)
            shutil.rmtree(base / name, ignore_errors=True)
        tool.close()
        del tool
        gc.collect()
    shutil.rmtree(base, ignore_errors=True)
    leaves.clear()  # the state goes before the first-save processes build their own
    del tree
    gc.collect()
    firsts = ["shardsave", "shardsave-prepared", *(n for n in makers if n != "shardsave-async")]
    for name in firsts if config.get("capped_first_saves", False) else []:
        first = first_save(case, root, name, config["first_save_gap_s"], "COLD_SPECS")
        records.append(
            {**case, "tool": name, "op": "first_save", "seconds": first["first"], "transient_bytes": 0}
        )
        records.append(
            {**case, "tool": name, "op": "later_save", "seconds": first["later"], "transient_bytes": 0}
        )
    return records


_FIRST_SAVE_TOOLS = {
    "shardsave": "shardsave.Saver(max_to_keep=1)",
    "shardsave-prepared": "shardsave.Saver(max_to_keep=1); saver.prepare(tree)",
    "orbax": "ocp.StandardCheckpointer()",
    "orbax-capped": "ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler("
    "save_concurrent_gb=1, save_device_host_concurrent_gb=1))",
}


def first_save(
    case: dict[str, Any], root: Path, tool: str = "shardsave", gap_s: float = 0, specs: str = "SPECS"
) -> dict[str, float]:
    """The first save of a fresh process against its later ones (blocking time), of one tool.

    specs: the name of the partition specs the state's leaves take in turn (bench.SPECS).
    tool: shardsave (no prepare), shardsave-prepared (Saver.prepare once the state
    exists), shardsave-<cap> (save_host_bytes), orbax or orbax-capped. gap_s: the
    seconds between making the tool and its first save (the training steps before
    it), in which prepare() or a capped Saver makes its buffers in the background.
    Also the limit that explains the gap: one thread writing the same number of
    bytes into fresh memory (the kernel faults in and zeroes every 4 KiB page)
    against writing them again into the same, already mapped memory.
    """
    import subprocess

    if tool in _FIRST_SAVE_TOOLS:
        make = _FIRST_SAVE_TOOLS[tool]
    else:  # shardsave-1GiB, shardsave-256MiB
        size = tool.removeprefix("shardsave-")
        nbytes = int(size[:-3]) * (1024 * MIB if size.endswith("GiB") else MIB)
        make = f"shardsave.Saver(max_to_keep=1, save_host_bytes={nbytes})"
    target = str(root / "first" / "model")
    save = (
        f"saver.save(tree, {target!r}, global_step=step)"
        if tool.startswith("shardsave")
        else f"saver.save(pathlib.Path({target!r}) / str(step), args=ocp.args.PyTreeSave(tree))"
        if tool == "orbax-capped"
        else f"saver.save(pathlib.Path({target!r}) / str(step), tree)"
    )
    # A Saver keeps max_to_keep=1; Orbax's step folders are removed before the next save.
    clear = (
        "pass"
        if tool.startswith("shardsave")
        else f"shutil.rmtree({str(root / 'first')!r}, ignore_errors=True)"
    )
    code = f"""
import mmap, os, pathlib, shutil, sys, time, json
sys.path.insert(0, {str(REPO / "benchmarks")!r})
import bench, jax, numpy as np, shardsave
import orbax.checkpoint as ocp
mesh, _ = bench.meshes()
tree = bench.build_tree({case["bytes"]}, {case["leaves"]}, mesh, bench.{specs})
# Fresh private anonymous memory in 4 KiB pages, as the staging buffers get (numpy's
# own large allocations ask for huge pages).
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
buf = np.frombuffer(mmap.mmap(-1, {case["bytes"]}, flags=flags), np.uint8)
began = time.perf_counter(); buf.fill(1); fresh = time.perf_counter() - began
began = time.perf_counter(); buf.fill(2); again = time.perf_counter() - began
del buf
saver = {make}
time.sleep({gap_s})
times = []
for step in range(4):
    {clear}
    began = time.perf_counter()
    {save}
    times.append(time.perf_counter() - began)
    saver.wait_until_finished()
print(json.dumps([times, fresh, again]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    times, fresh, again = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(root / "first", ignore_errors=True)
    return {
        "first": times[0],
        "later": statistics.median(times[1:]),
        "fill_fresh": fresh,
        "fill_again": again,
    }


def index_speed(leaves: int, reps: int) -> dict[str, float]:
    """Encode and decode the index of a checkpoint of `leaves` leaves (mixed shardings)."""
    import shardsave

    mesh, _ = meshes()
    specs = [
        shardsave.tree.LeafSpec(
            f"layer{i:05d}/w",
            (64, 64),
            np.dtype(np.float32),
            "jax",
            NamedSharding(mesh, SPECS[i % len(SPECS)]),
        )
        for i in range(leaves)
    ]
    plan = shardsave.save.plan.plan_save(specs, True, jax.devices())
    # The index a save builds (one placeholder crc per shard: the encoding is what is timed).
    crcs = {k: [(12345,)] * len(f.shards) for k, f in enumerate(plan.files)}
    structure = {"dict": [[spec.name, i] for i, spec in enumerate(specs)]}
    index = shardsave.save.commit.build_index(
        plan, crcs, 1, time.time(), structure, shardsave.formats.shardsave.CRC_CHUNK_BYTES, 1 << 40
    )
    write, read = [], []
    for _ in range(reps):
        began = time.perf_counter()
        raw = shardsave.formats.shardsave.encode_index(index)
        write.append(time.perf_counter() - began)
        began = time.perf_counter()
        shardsave.formats.shardsave.decode_index(raw, "bench")
        read.append(time.perf_counter() - began)
    return {
        "leaves": leaves,
        "bytes": len(raw),
        "write_s": statistics.median(write),
        "read_s": statistics.median(read),
    }


# ---------------------------------------------------------------- report


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((*case_key(r), r["op"], r["tool"]), []).append(r)
    rows = []
    for (storage, state, nbytes, leaves, op, tool), rs in groups.items():
        secs = [r["seconds"] for r in rs]
        mems = [r["transient_bytes"] for r in rs]
        rows.append(
            {
                "storage": storage,
                **({"state": state} if state else {}),
                "bytes": nbytes,
                "leaves": leaves,
                "op": op,
                "tool": tool,
                "median_s": statistics.median(secs),
                "min_s": min(secs),
                "max_s": max(secs),
                "median_transient_bytes": statistics.median(mems),
                "max_transient_bytes": max(mems),
                "n": len(rs),
            }
        )
    return rows


def ratios(rows: list[dict[str, Any]]) -> None:
    """Adds each row's time relative to the limit and to the tools it competes with."""
    index = {(*case_key(r), r["op"], r["tool"]): r for r in rows}
    for r in rows:
        key = (*case_key(r), r["op"])
        limit = index.get((*key, "d2h" if r["op"] in ("save_blocking", "save_stage") else "raw"))
        if r["op"] == "save_stage":
            limit = index.get((*case_key(r), "save_blocking", "d2h"))
        if r["op"] == "save_commit":
            limit = index.get((*case_key(r), "save", "raw"))
        if r["op"] == "restore_sequential":
            limit = index.get((*case_key(r), "restore_resharded", "raw"))
        if r["op"] == "restore_cold" and r["tool"].startswith("shardsave-"):
            # A capped restore against the disk's limit with as much in flight.
            limit = index.get((*key, "raw-" + r["tool"].removeprefix("shardsave-")))
        r["x_limit"] = r["median_s"] / limit["median_s"] if limit else None
        for other in ("orbax", "orbax-nocomp"):
            o = index.get((*key, other))
            r[f"x_{other}"] = r["median_s"] / o["median_s"] if o else None
        r["transient_x_bytes"] = r["median_transient_bytes"] / r["bytes"]


def print_table(rows: list[dict[str, Any]], out: Any = None) -> list[str]:
    """The table's lines, also printed to out when given."""
    # The state column only where a case names one (the object-store cases).
    with_state = any("state" in r for r in rows)
    state_head = f" {'state':10}" if with_state else ""
    lines = [
        f"{'storage':11}{state_head} {'size':>8} {'leaves':>6} {'op':18} {'tool':15} {'median s':>9} "
        f"{'[min-max]':>17} {'x limit':>8} {'x orbax':>8} {'x nocomp':>8} {'transient':>10}"
    ]
    order = {
        "d2h": 0,
        "raw": 1,
        "raw-ts": 1.5,
        "raw-fresh": 1.6,
        "raw-ranged": 1.7,
        "raw-placed": 1.8,
        "shardsave": 2,
        "shardsave-zstd": 2.2,
        "shardsave-async": 3,
        "shardsave-device": 4,
        "raw-64MiB": 4.45,
        "shardsave-64MiB": 4.5,
        "raw-256MiB": 4.55,
        "shardsave-256MiB": 4.6,
        "shardsave-1GiB": 4.58,
        "shardsave-prepared": 2.5,
        "shardsave-8MiB": 4.4,
        "orbax": 5,
        "orbax-capped": 5.5,
        "orbax-nocomp": 6,
        "safetensors": 7,
    }
    ops = {
        "save_blocking": 0,
        "save": 1,
        "save_stage": 2,
        "save_commit": 3,
        "save_stall": 3.5,
        "save_held": 3.6,
        "first_save": 3.7,
        "later_save": 3.8,
        "restore": 4,
        "restore_index": 4.1,
        "restore_plan": 4.2,
        "restore_place": 4.3,
        "restore_resharded": 5,
        "restore_sequential": 6,
        "restore_cold": 7,
        "restore_fresh": 8,
    }
    for r in sorted(rows, key=lambda r: (*case_key(r), ops[r["op"]], order.get(r["tool"], 9))):

        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"

        spread = f"[{r['min_s']:.3f}-{r['max_s']:.3f}]"
        state = f" {r.get('state', ''):10}" if with_state else ""
        lines.append(
            f"{r['storage']:11}{state} {r['bytes'] // MIB:>5}MiB {r['leaves']:>6} {r['op']:18} {r['tool']:15} "
            f"{r['median_s']:>9.3f} {spread:>17} {fmt(r['x_limit']):>8} "
            f"{fmt(r['x_orbax']):>8} {fmt(r['x_orbax-nocomp']):>8} {r['median_transient_bytes'] / MIB:>7.0f}MiB"
        )
    if out is not None:
        for line in lines:
            print(line, file=out)
    return lines


def compression_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Each case's compressed shardsave against its uncompressed save and restore
    (the issue's bound: never more than 1.1x slower on random data)."""
    index = {(*case_key(r), r["op"], r["tool"]): r for r in rows}
    lines = []
    for key in sorted({case_key(r) for r in rows if r["tool"] == "shardsave-zstd"}):
        parts = []
        for op in ("save", "restore"):
            zstd, plain = index.get((*key, op, "shardsave-zstd")), index.get((*key, op, "shardsave"))
            if zstd and plain:
                parts.append(f"{op} {zstd['median_s'] / plain['median_s']:.2f}x")
        case = {"storage": key[0], "state": key[1], "bytes": key[2], "leaves": key[3]}
        lines.append(f"{case_label(case)}: shardsave-zstd over shardsave: {', '.join(parts)}")
    return lines


# Breakdowns of an operation and the stall of a thread beside a save: in the table,
# not in the chart's bars of whole operations.
CHART_LEAVES_OUT = {
    "save_stage",
    "save_commit",
    "save_stall",
    "restore_index",
    "restore_plan",
    "restore_place",
}


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({case_key(r) for r in rows})
    fig, axes = plt.subplots(len(cases), 2, figsize=(14, 3.2 * len(cases)), squeeze=False)
    index = {(*case_key(r), r["op"], r["tool"]): r for r in rows}
    for row, case in enumerate(cases):
        # Each case's own operations and tools (a cold case has only restore_cold, and
        # tools of its own), in the order measured; not the breakdowns of an operation.
        mine = [r for r in rows if case_key(r) == case]
        ops = [op for op in dict.fromkeys(r["op"] for r in mine) if op not in CHART_LEAVES_OUT]
        tools = list(dict.fromkeys(r["tool"] for r in mine if r["op"] in ops))
        width = 0.8 / max(1, len(tools))
        for col, (metric, label) in enumerate(
            (("median_s", "seconds"), ("median_transient_bytes", "transient MiB"))
        ):
            ax = axes[row][col]
            for t, tool in enumerate(tools):
                values = []
                for op in ops:
                    r = index.get((*case, op, tool))
                    v = r[metric] if r else 0.0
                    values.append(v / MIB if metric != "median_s" else v)
                ax.bar([i + t * width for i in range(len(ops))], values, width, label=tool)
            ax.set_xticks([i + (len(tools) - 1) * width / 2 for i in range(len(ops))], ops, fontsize=8)
            ax.set_ylabel(label)
            state = f" {case[1]}" if case[1] else ""
            ax.set_title(f"{case[0]}{state}, {case[2] // MIB} MiB, {case[3]} leaves")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


ISOLATED = "bench-case-results: "


def run_one(
    case: dict[str, Any], config: dict[str, Any], roots: dict[str, Path], sampler: Sampler
) -> list[dict[str, Any]]:
    if case["store"] in ("s3", "gcs"):
        return run_object_store_case(case, config, roots["shm"], sampler)
    if case["storage"] == "cold":
        return run_cold_case(case, config, roots["disk"], sampler)
    if case["storage"] == "adamw":
        return run_adamw_case(case, config, roots["shm"], sampler)
    if case["storage"] == "safetensors":
        return run_safetensors_case(case, config, roots["shm"], sampler)
    if case["storage"] == "capped":
        return run_capped_case(case, config, roots["shm"], sampler)
    if case["storage"] == "orbax":
        return run_orbax_case(case, config, roots["disk"], sampler)
    return run_case(case, config, roots[case["storage"]], sampler)


def _wants_first(i: int, cases: list[dict[str, Any]], config: dict[str, Any]) -> bool:
    return i == 1 and config.get("first_save", True) and cases[0]["storage"] in ("shm", "disk")


def run_isolated(i: int, args: argparse.Namespace) -> dict[str, Any]:
    """Runs case i in a process of its own: what one case leaves allocated (malloc's
    arenas, Orbax's and jax's caches) no longer counts against the next, and a
    4 GiB cold case after seven others no longer runs this 24 GiB VM out of memory
    (it was killed twice in one process)."""
    argv = [
        sys.executable,
        __file__,
        "--config",
        args.config,
        "--profile",
        args.profile,
        "--one-case",
        str(i),
    ] + (["--only", args.only] if args.only else [])
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(ISOLATED)]
    if done.returncode != 0 or not lines:
        print(f"  case {i} failed (exit status {done.returncode}); its rows are missing", file=sys.stderr)
        return {"records": [], "first": None, "notes": []}
    result: dict[str, Any] = json.loads(lines[-1][len(ISOLATED) :])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "bench.yaml"))
    parser.add_argument("--profile", default="default")
    parser.add_argument("--out", default=None, help="output folder (default: the config's)")
    parser.add_argument("--only", default=None, help="run only the profile's cases on this storage")
    parser.add_argument("--one-case", type=int, default=None, help=argparse.SUPPRESS)  # see run_isolated
    args = parser.parse_args(argv)
    settings = yaml.safe_load(Path(args.config).read_text())
    config = {**settings["common"], **settings["profiles"][args.profile]}
    out = Path(args.out or config["out"])
    out.mkdir(parents=True, exist_ok=True)
    roots = {"shm": Path(config["shm_dir"]).resolve(), "disk": Path(config["disk_dir"]).resolve()}
    sampler = Sampler()
    records: list[dict[str, Any]] = []
    cases = [parse_case(entry) for entry in config["cases"]]
    cases = [case for case in cases if args.only in (None, case["store"])]
    if not cases:
        parser.error(f"profile {args.profile} has no case on storage {args.only}")
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "devices": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "versions": {name: _version(name) for name in ("orbax-checkpoint", "tensorstore", "crc32c")},
        "profile": args.profile,
    }
    if args.one_case is not None:  # a child of run_isolated: one case, its results to stdout
        i = args.one_case
        records = run_one(cases[i - 1], config, roots, sampler)
        first = first_save(cases[0], roots[cases[0]["storage"]]) if _wants_first(i, cases, config) else None
        print(ISOLATED + json.dumps({"records": records, "first": first, "notes": NOTES}))
        return 0
    first = None
    notes: list[str] = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case_label(case)}", file=sys.stderr)
        done = run_isolated(i, args)
        records += done["records"]
        notes += done.get("notes", [])
        first = done["first"] or first
        # Written after every case, so a run cut short still leaves its results.
        rows = summarize(records)
        ratios(rows)
        lines = print_table(rows, out=sys.stdout if i == len(cases) else None)
        doc = {"machine": machine, "rows": rows, "first_save": first, "records": records, "notes": notes}
        (out / "bench.json").write_text(json.dumps(doc, indent=1))
        (out / "table.txt").write_text("\n".join(lines) + "\n")

    def note(line: str) -> None:
        print(line)
        with open(out / "table.txt", "a") as f:
            f.write(line + "\n")

    for line in notes + compression_notes(rows):
        note(line)
    if first:
        note(
            f"first save of a process (blocking): {first['first']:.3f} s, later saves: {first['later']:.3f} s "
            f"({first['first'] / first['later']:.1f}x), {cases[0]['bytes'] // MIB} MiB, {cases[0]['leaves']} leaves; "
            f"one thread writes as many bytes into fresh memory in {first['fill_fresh']:.3f} s, "
            f"into the same memory again in {first['fill_again']:.3f} s"
        )
    speed = index_speed(config["index_leaves"], config["reps"])
    note(
        f"index of {speed['leaves']} leaves ({speed['bytes'] / MIB:.1f} MiB of JSON): "
        f"written in {speed['write_s']:.3f} s, read and validated in {speed['read_s']:.3f} s"
    )
    doc = json.loads((out / "bench.json").read_text())
    doc["index"] = speed
    (out / "bench.json").write_text(json.dumps(doc, indent=1))
    if rows:  # (a run whose every case failed has nothing to draw)
        chart(rows, out / "bench.png")
    print(f"wrote {out / 'bench.json'}, {out / 'table.txt'}, {out / 'bench.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
