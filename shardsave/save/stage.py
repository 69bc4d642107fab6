"""The blocking half of a save: copy the shards this process writes off the devices.

Each data file is staged in one host buffer, filled by one copy per shard; the
files are filled in parallel. The buffers are kept and refilled by the next save
of the same plan, because a fresh allocation first touches every page, which
costs more than the copy itself (docs/guides/performance.md, the first save).
Transparent huge pages are not requested. They fault in faster where memory is
plentiful, but a VM that hands free memory back to its host (free page
reporting, as on the benchmark's VM) hands out huge pages from exactly that
memory, and touching them then costs several times more than 4 KiB pages,
which cost the same whether or not the memory had been handed back.

The buffers are `bytes` objects because tensorstore's KvStore.write (used for
stores other than local files) accepts only bytes; they are filled in place,
through a writable view, before anything else sees them, and refilled only after
the write that read them has completed (a save waits for the previous one).

On accelerators, every device-to-host transfer is started (copy_to_host_async)
before the first one is waited on, so they overlap. Once stage() returns, the
caller may delete, donate or overwrite its arrays.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardsave._threads import Pool
from shardsave.save.plan import SavePlan


def host_array(leaf: Any, dtype: np.dtype) -> np.ndarray:
    """A host leaf (numpy array or scalar) as a C-contiguous little-endian array."""
    array = np.ascontiguousarray(np.asarray(leaf, dtype=dtype))
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


@dataclass
class StagingBuffer:
    """A bytes object and a writable uint8 view of its contents."""

    data: bytes
    view: np.ndarray


def allocate(nbytes: int) -> StagingBuffer:
    """A new zeroed bytes object of nbytes (pages untouched) and a writable view of it."""
    if nbytes == 0:  # b"" is a shared singleton: never write through a view of it
        return StagingBuffer(b"", np.empty(0, np.uint8))
    data = bytes(nbytes)  # a new object every call; calloc maps zero pages on first touch
    address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
    view = np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(address))
    return StagingBuffer(data, view)


def touch(buffer: StagingBuffer) -> None:
    """Faults every page of a buffer in (writing zeros to what is zero already)."""
    buffer.view[::PAGE_BYTES] = 0


PAGE_BYTES = 4096


def prepare(plan: SavePlan, process_index: int, buffers: dict[int, StagingBuffer]) -> None:
    """Allocates and touches the buffers of the files this process writes, for stage() to fill.

    Run ahead of the first save (Saver.prepare), so that it copies into memory whose
    pages exist already instead of faulting them in while the caller waits.
    """
    for k, f in _local_files(plan, process_index).items():
        if k not in buffers:
            buffer = allocate(f.nbytes)
            touch(buffer)
            buffers[k] = buffer


COPIES = Pool("shardsave-stage", min(8, os.cpu_count() or 1))


DeviceShards = dict[int, dict[int, jax.Array]]  # leaf -> device id -> that device's shard


def _local_files(plan: SavePlan, process_index: int) -> dict[int, Any]:
    return {k: f for k, f in enumerate(plan.files) if f.process_index == process_index}


def device_shards(plan: SavePlan, leaves: list[Any], process_index: int) -> DeviceShards:
    """The single-device arrays of the shards this process writes."""
    out: DeviceShards = {}
    for f in _local_files(plan, process_index).values():
        for shard in f.shards:
            leaf = leaves[shard.leaf]
            if isinstance(leaf, jax.Array) and shard.leaf not in out:
                out[shard.leaf] = {s.device.id: s.data for s in leaf.addressable_shards}
    return out


def snapshot_on_device(
    plan: SavePlan, leaves: list[Any], process_index: int
) -> tuple[DeviceShards, list[Any]]:
    """Copies of the shards to write, made on their own devices, and copies of host leaves.

    On an accelerator an on-device copy runs at device-memory bandwidth, far faster
    than the transfer to the host, which stage() can then do in the background.
    """
    shards = device_shards(plan, leaves, process_index)
    writers = {
        (s.leaf, s.writer.id)
        for f in _local_files(plan, process_index).values()
        for s in f.shards
        if s.writer
    }
    copies = {
        leaf: {d: jnp.copy(data) for d, data in per_device.items() if (leaf, d) in writers}
        for leaf, per_device in shards.items()
    }
    return copies, host_copies(leaves)


def host_copies(leaves: list[Any]) -> list[Any]:
    """The leaves with each host leaf (numpy array, number) copied, for staging after the caller
    may have changed its own; jax arrays as they are (their shards are copied apart)."""
    return [leaf if isinstance(leaf, jax.Array) else np.array(leaf, copy=True) for leaf in leaves]


def stage(
    plan: SavePlan,
    leaves: list[Any],
    process_index: int,
    buffers: dict[int, StagingBuffer],
    device_data: DeviceShards | None = None,
) -> dict[int, bytes]:
    """Copies every shard this process writes into its file's buffer.

    buffers: reused when they fit the plan, (re)allocated in place otherwise.
    device_data: the shards to read (snapshot_on_device's copies); by default the leaves'.
    Returns the bytes of each local data file, keyed by file number.
    """
    local = _local_files(plan, process_index)
    if device_data is None:
        device_data = device_shards(plan, leaves, process_index)

    for per_device in device_data.values():
        shards = list(per_device.values())  # one leaf's: its devices share a platform
        if shards and next(iter(shards[0].devices())).platform != "cpu":
            for data in shards:
                data.copy_to_host_async()

    for k in list(buffers):
        if k not in local or buffers[k].view.size != local[k].nbytes:
            del buffers[k]

    def fill(k: int, f: Any) -> None:
        view = buffers[k].view
        for shard in f.shards:
            if shard.nbytes == 0:
                continue
            leaf = leaves[shard.leaf]
            if shard.leaf in device_data:
                assert shard.writer is not None
                array = np.asarray(device_data[shard.leaf][shard.writer.id])
            else:
                array = host_array(leaf, plan.leaves[shard.leaf].dtype)
                if array.ndim:
                    array = array[tuple(slice(a, b) for a, b in shard.box)]
            target = view[shard.offset : shard.offset + shard.nbytes].view(array.dtype).reshape(array.shape)
            np.copyto(target, array)

    for k, f in local.items():
        if k not in buffers:
            buffers[k] = allocate(f.nbytes)
    for future in [COPIES.submit(fill, k, f) for k, f in local.items()]:
        future.result()
    return {k: buffers[k].data for k in local}
