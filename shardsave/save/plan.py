"""Who writes what on save, with no I/O.

Every unique stored box of every leaf is assigned one writer device among the
devices holding a replica of it, greedily by bytes so replicated data spreads
evenly; each writer device gets one data file (sharded=True) or all go into one
(sharded=False). The plan depends only on the leaves' shapes, dtypes and
shardings, so the Saver caches it across saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax

from shardsave.index import Box, box_shape, device_boxes, full_box
from shardsave.storage.buffers import DIRECT_IO_ALIGNMENT, MIN_UNCACHED_READ_BYTES
from shardsave.tree import LeafSpec

# Each shard starts at a multiple of this in its data file, so a reader that reads it
# into an aligned buffer can hand it to a CPU device without copying it again.
SHARD_ALIGNMENT = 64


@dataclass(frozen=True)
class PlannedShard:
    leaf: int
    box: Box
    nbytes: int
    writer: jax.Device | None  # the device whose copy is written; None: a host leaf
    offset: int = 0


@dataclass
class PlannedFile:
    device_id: int | None
    process_index: int
    shards: list[PlannedShard] = field(default_factory=list)
    nbytes: int = 0


@dataclass(frozen=True)
class SavePlan:
    leaves: tuple[LeafSpec, ...]
    files: tuple[PlannedFile, ...]


def _by_id(devices: Any) -> list[jax.Device]:
    return sorted(devices, key=lambda d: d.id)


def plan_save(leaves: list[LeafSpec], sharded: bool, all_devices: list[jax.Device]) -> SavePlan:
    """Assigns every unique box to one writer and lays out the data files.

    Host leaves (numpy arrays, scalars) hold the same value on every process and
    are written by the least-loaded of all devices.
    """
    items: list[tuple[int, Box, int, list[jax.Device]]] = []
    for i, leaf in enumerate(leaves):
        itemsize = leaf.dtype.itemsize
        if leaf.sharding is None or math.prod(leaf.shape) == 0:
            # Host leaves and empty arrays: one box for the whole array.
            holders = _by_id(leaf.sharding.device_set) if leaf.sharding else all_devices
            items.append((i, full_box(leaf.shape), math.prod(leaf.shape) * itemsize, holders))
            continue
        replicas: dict[Box, list[jax.Device]] = {}
        for device, box in device_boxes(leaf.sharding, leaf.shape).items():
            if math.prod(box_shape(box)):
                replicas.setdefault(box, []).append(device)
        for box, devices in replicas.items():
            nbytes = math.prod(box_shape(box)) * itemsize
            items.append((i, box, nbytes, _by_id(devices)))

    # Largest first, then the least-loaded replica: balances bytes across writers.
    load: dict[int, int] = {}
    assigned: list[PlannedShard] = []
    for i, box, nbytes, holders in sorted(items, key=lambda t: (-t[2], t[0], t[1])):
        writer = min(holders, key=lambda d: (load.get(d.id, 0), d.id))
        load[writer.id] = load.get(writer.id, 0) + nbytes
        assigned.append(PlannedShard(i, box, nbytes, writer))
    assigned.sort(key=lambda s: (s.leaf, s.box))

    files: dict[int | None, PlannedFile] = {}
    for shard in assigned:
        device = shard.writer
        key = device.id if sharded and device is not None else None
        if key not in files:
            files[key] = PlannedFile(
                device_id=key,
                process_index=device.process_index if sharded and device is not None else 0,
            )
        f = files[key]
        # A shard large enough to be read past the page cache (O_DIRECT, see _storage)
        # starts where such a read may begin.
        alignment = DIRECT_IO_ALIGNMENT if shard.nbytes >= MIN_UNCACHED_READ_BYTES else SHARD_ALIGNMENT
        offset = -(-f.nbytes // alignment) * alignment if shard.nbytes else f.nbytes
        f.shards.append(PlannedShard(shard.leaf, shard.box, shard.nbytes, shard.writer, offset))
        f.nbytes = offset + shard.nbytes
    ordered = [files[k] for k in sorted(files, key=lambda k: -1 if k is None else k)]
    return SavePlan(tuple(leaves), tuple(ordered))
