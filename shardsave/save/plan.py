"""Who writes what on save, with no I/O.

Every unique stored box of every leaf is assigned one writer device among the
devices holding a replica of it, greedily by bytes so replicated data spreads
evenly; each writer device gets one data file (sharded=True) or all go into one
(sharded=False). The plan depends only on the leaves' shapes, dtypes and
shardings, so the Saver caches it across saves.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from shardsave import tree as _tree
from shardsave.formats.shardsave import ZSTD
from shardsave.formats.zstd_chunks import DEFAULT_LEVEL, check_available
from shardsave.index import Box, box_shape, device_boxes, dtype_name, full_box
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


def leaf_spec(name: str, leaf: Any) -> tuple[_tree.LeafSpec, Any]:
    """What the planner needs of a leaf, and the leaf as it is stored."""
    try:
        kind = _tree.leaf_kind(leaf)
    except TypeError:
        raise TypeError(
            f"leaf {name!r} is a {type(leaf).__name__}, which shardsave cannot store; "
            "leaves must be jax.Array, numpy arrays or numbers"
        ) from None
    key_impl = None
    if kind in (_tree.KIND_ARRAY, _tree.KIND_KEY) and leaf.is_deleted():
        raise ValueError(f"leaf {name!r} is a deleted jax.Array (was it donated?)")
    if kind == _tree.KIND_KEY:
        # A typed PRNG key array is stored as its key data (uint32, the key shape
        # appended) with the implementation's name, and rebuilt from them.
        key_impl = str(jax.random.key_impl(leaf))
        leaf = jax.random.key_data(leaf)
    if kind in (_tree.KIND_ARRAY, _tree.KIND_KEY):
        shape, dtype, sharding = tuple(leaf.shape), np.dtype(leaf.dtype), leaf.sharding
    else:
        try:
            array = np.asarray(leaf)
        except OverflowError as e:
            raise ValueError(f"leaf {name!r}: {e}") from e
        shape, dtype, sharding = array.shape, array.dtype.newbyteorder("="), None
    try:
        dtype_name(dtype)
    except TypeError as e:
        raise TypeError(f"leaf {name!r}: {e}") from None
    return _tree.LeafSpec(name, shape, dtype, kind, sharding, key_impl), leaf


# The index holds steps in this range (FORMAT.md): a larger one is refused before
# anything is written, never committed into an index that its reader refuses.
MAX_STEP = 1 << 62


def step_number(global_step: Any) -> int:
    """global_step as an int: a Python int or a numpy/jax integer scalar, nothing else."""
    dtype = getattr(global_step, "dtype", None)
    if isinstance(global_step, bool) or (dtype is not None and not np.issubdtype(dtype, np.integer)):
        raise TypeError(
            f"global_step must be an integer, found {global_step!r} ({type(global_step).__name__})"
        )
    try:
        step = operator.index(global_step)
    except TypeError:
        raise TypeError(
            f"global_step must be an integer (a Python int or a numpy/jax integer scalar), found "
            f"{global_step!r} ({type(global_step).__name__}); a float step would be truncated"
        ) from None
    if not -MAX_STEP <= step <= MAX_STEP:
        raise ValueError(f"global_step {step} is outside what the index holds (-2**62 .. 2**62)")
    return step


class PlanCache:
    """Plans and structures of the trees a Saver saves, kept across saves.

    Both depend only on the tree's structure and its leaves' shapes, dtypes and
    shardings; building them again for each save of a tree of thousands of leaves
    would sit on the blocking path.
    """

    def __init__(self, size: int = 8):
        self._size = size
        self._plans: dict[Any, SavePlan] = {}
        self._structures: dict[Any, Any] = {}

    def structure(self, tree: Any, treedef: Any) -> Any:
        """tree's JSON structure (tree.encode_structure), by its treedef."""
        structure = self._structures.get(treedef)
        if structure is None:
            if len(self._structures) >= self._size:
                self._structures.pop(next(iter(self._structures)))
            structure = self._structures[treedef] = _tree.encode_structure(tree)
        return structure

    def plan(self, specs: list[LeafSpec], sharded: bool) -> SavePlan:
        """plan_save's plan of these leaves over this process's view of every device."""
        key = (sharded, tuple((s.name, s.shape, s.dtype, s.kind, s.sharding, s.key_impl) for s in specs))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self._size:
                self._plans.pop(next(iter(self._plans)))
            plan = self._plans[key] = plan_save(specs, sharded, jax.devices())
        return plan


def compression_level(compression: str | int | None, save_host_bytes: int | None) -> int | None:
    """The zstd level Saver(compression=...) asks for, or None; refuses what cannot be honoured."""
    if compression is None:
        return None
    if compression == ZSTD:
        level = DEFAULT_LEVEL
    elif isinstance(compression, int) and not isinstance(compression, bool) and 1 <= compression <= 22:
        level = compression
    else:
        raise ValueError(f'compression must be None, "zstd" or a zstd level 1..22, found {compression!r}')
    if save_host_bytes is not None:
        raise ValueError(
            "compression with save_host_bytes is not supported: a capped save writes each buffer as "
            "it fills, before its frames' sizes are known; pass one of them"
        )
    check_available()
    return level
