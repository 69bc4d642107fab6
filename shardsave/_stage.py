"""The blocking half of a save: copy the shards this process writes off the devices.

Each data file becomes one bytes object, built by a single join over views of the
shards: on CPU the views alias the device buffers, so the join is the only copy;
on accelerators, every transfer is started (copy_to_host_async) before the first
one is waited on, so they overlap. Once stage() returns, the caller may delete,
donate or overwrite its arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ._plan import SavePlan


def as_bytes_view(array: np.ndarray) -> np.ndarray:
    """A flat uint8 view of a C-contiguous little-endian array (no copy)."""
    return array.reshape(-1).view(np.uint8)


def host_array(leaf: Any, dtype: np.dtype) -> np.ndarray:
    """A host leaf (numpy array or scalar) as a C-contiguous little-endian array."""
    array = np.ascontiguousarray(np.asarray(leaf, dtype=dtype))
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def stage(plan: SavePlan, leaves: list[Any], process_index: int) -> dict[int, bytes]:
    """The bytes of every data file this process writes, keyed by file number."""
    local = {k: f for k, f in enumerate(plan.files) if f.process_index == process_index}
    device_data: dict[int, dict[int, jax.Array]] = {}
    for f in local.values():
        for shard in f.shards:
            leaf = leaves[shard.leaf]
            if isinstance(leaf, jax.Array) and shard.leaf not in device_data:
                device_data[shard.leaf] = {s.device.id: s.data for s in leaf.addressable_shards}

    pending = [
        data
        for per_device in device_data.values()
        for data in per_device.values()
        if next(iter(data.devices())).platform != "cpu"
    ]
    for data in pending:
        data.copy_to_host_async()

    staged: dict[int, bytes] = {}
    for k, f in local.items():
        parts: list[Any] = []  # uint8 views; bytes.join copies each once
        for shard in f.shards:
            spec = plan.leaves[shard.leaf]
            leaf = leaves[shard.leaf]
            if shard.nbytes == 0:
                continue
            if isinstance(leaf, jax.Array):
                assert shard.writer is not None
                array = np.asarray(device_data[shard.leaf][shard.writer.id])
            else:
                array = host_array(leaf, spec.dtype)
                if array.ndim:
                    array = np.ascontiguousarray(array[tuple(slice(a, b) for a, b in shard.box)])
            parts.append(as_bytes_view(array))
        staged[k] = b"".join(parts)
    return staged
