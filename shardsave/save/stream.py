"""A save under a host-memory cap (Saver(save_host_bytes=...)): shards stream from
the devices through a ring of bounded host buffers into storage.

Each local data file is written as numbered parts (FORMAT.md), one part per
buffer-sized piece of it, so a piece goes to storage as soon as it is filled and
its buffer is refilled once that write has completed; a shard larger than a
piece streams through in several. The format is unchanged: the parts are those
any large data file may have, and each shard's chunk checksums are computed
piece by piece, continuing across pieces, so they equal those of the whole shard.

What a capped save holds at once is the ring, made when the Saver is, and on
accelerators one piece per filling thread more (jax's own host copy of what it
transfers). A store that copies what it writes before write() returns
(tensorstore's kvstores: object stores, memory://) keeps only one buffer per
filling thread, refilled at once, and the rest of the cap is its copies in
flight. The ring's pages are touched once, in the background, when the Saver is
made: a fresh allocation first faults in every page, which costs more than the
copy that fills it, and would make the first save much slower than the next.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import jax
import numpy as np

from shardsave.errors import SaveFailedError
from shardsave.formats.shardsave import MAX_PARTS, data_keys, split_parts
from shardsave.index import checksum
from shardsave.save.plan import PlannedFile, PlannedShard, SavePlan
from shardsave.save.stage import (
    COPIES,
    DeviceShards,
    StagingBuffer,
    allocate,
    device_shards,
    host_array,
    touch,
)
from shardsave.storage.base import Pending, Store
from shardsave.storage.buffers import DIRECT_IO_ALIGNMENT

MIN_SAVE_HOST_BYTES = 8 << 20  # room for 8 pieces of 1 MiB


_MIN_PIECE = 1 << 20


_MAX_PIECE = 256 << 20


def piece_bytes(cap: int) -> int:
    """The size of one buffer of a ring holding at most cap bytes: an eighth of it
    (several writes in flight), page-aligned (shards of 1 MiB or more stay
    page-aligned within their part), within [1 MiB, 256 MiB]."""
    piece = min(_MAX_PIECE, max(_MIN_PIECE, cap // 8))
    return piece - piece % DIRECT_IO_ALIGNMENT


class Ring:
    """The host buffers of capped saves: `count` buffers of `piece` bytes, kept between saves.

    warm() allocates and touches them; the Saver runs it on a thread of its own
    when it is made, and a save first waits for it (warming is what a save
    would otherwise do itself, on the first fill).
    """

    def __init__(self, cap: int):
        self.cap = cap
        self.piece = piece_bytes(cap)
        self.count = cap // self.piece
        self._buffers: list[StagingBuffer] = []
        self._ready = threading.Event()
        self._lock = threading.Lock()

    def warm(self) -> None:
        try:
            with self._lock:
                self._top_up(self.count)
        finally:
            self._ready.set()

    def _top_up(self, count: int) -> None:
        """Allocates buffers until there are count, each page faulted in now, not during a save."""
        while len(self._buffers) < count:
            buffer = allocate(self.piece)
            touch(buffer)
            self._buffers.append(buffer)

    def start_warming(self) -> None:
        threading.Thread(target=self.warm, name="shardsave-ring", daemon=True).start()

    def buffers(self, timeout_s: float, keep: int) -> list[StagingBuffer]:
        """`keep` buffers (at most count); the others are freed (a save to a store that copies
        what it writes needs fewer, and the cap is then the store's)."""
        if not self._ready.wait(timeout_s):
            raise SaveFailedError(f"the save's host buffers were not ready within {timeout_s:.0f} s")
        keep = min(keep, self.count)
        with self._lock:
            del self._buffers[keep:]
            self._top_up(keep)  # after close(), or after a save that needed fewer
            return list(self._buffers)

    def close(self) -> None:
        with self._lock:
            self._buffers.clear()


@dataclass
class ShardChecksums:
    """The chunk checksums of one shard, fed its bytes in order, piece by piece.

    A capped save fills a shard through several buffers; the checksums carry on
    across them, so they equal index.shard_checksums of the whole shard (the
    format has one CRC-32C per `chunk` bytes of a shard, the last chunk shorter).

    Attributes:
      chunk: the bytes per checksum (CRC_CHUNK_BYTES in a checkpoint's index).
    """

    chunk: int
    done: list[int] = field(default_factory=list)
    running: int = 0  # the checksum of the bytes of the current chunk so far
    filled: int = 0  # how many bytes of the current chunk

    def feed(self, data: np.ndarray) -> None:
        """Adds the shard's next bytes (a contiguous uint8 array)."""
        at = 0
        while at < data.size:
            take = min(self.chunk - self.filled, data.size - at)
            self.running = checksum(data[at : at + take], self.running)
            self.filled += take
            at += take
            if self.filled == self.chunk:
                self.done.append(self.running)
                self.running = self.filled = 0

    def result(self) -> tuple[int, ...]:
        """The checksums of the bytes fed so far, the last one of a partial chunk if any."""
        return (*self.done, self.running) if self.filled else tuple(self.done)


@functools.cache
def _slicer(count: int) -> Callable[[jax.Array, int], jax.Array]:
    # One compiled program per piece length (pieces of a save have one or two lengths),
    # the start a traced argument.
    return jax.jit(lambda x, start: jax.lax.dynamic_slice(x.reshape(-1), (start,), (count,)))


def device_range(data: jax.Array, start: int, stop: int) -> np.ndarray:
    """Bytes [start, stop) of a single-device array's C-order bytes, as a host uint8 array.

    Only that range crosses to the host: it is sliced on the device first. start
    and stop must fall on element boundaries.
    """
    itemsize = np.dtype(data.dtype).itemsize
    if start % itemsize or stop % itemsize:
        raise ValueError(f"byte range {start}..{stop} does not fall on {data.dtype} elements")
    piece = _slicer((stop - start) // itemsize)(data, start // itemsize)
    return np.asarray(piece).reshape(-1).view(np.uint8)


class _Source:
    """The C-order bytes of one planned shard, read range by range."""

    def __init__(self, shard: PlannedShard, leaf: Any, dtype: np.dtype, device_data: DeviceShards):
        self.flat: np.ndarray | None = None
        self.device: jax.Array | None = None
        if shard.leaf in device_data:
            assert shard.writer is not None
            data = device_data[shard.leaf][shard.writer.id]
            if next(iter(data.devices())).platform == "cpu":
                self.flat = np.asarray(data).reshape(-1).view(np.uint8)  # the device's own memory
            else:
                self.device = data
        else:
            array = host_array(leaf, dtype)
            if array.ndim:
                array = np.ascontiguousarray(array[tuple(slice(a, b) for a, b in shard.box)])
            self.flat = array.reshape(-1).view(np.uint8)

    def range(self, start: int, stop: int) -> np.ndarray:
        if self.flat is not None:
            return self.flat[start:stop]
        assert self.device is not None
        if start == 0 and stop == self.device.nbytes:
            return np.asarray(self.device).reshape(-1).view(np.uint8)
        return device_range(self.device, start, stop)


# A compressed data file's stored size, and where each of its shards' frames are:
# (offset, the size of each frame), in the planned file's shard order.
Layout: TypeAlias = tuple[int, list[tuple[int, tuple[int, ...]]]]


@dataclass
class Streamed:
    """The data writes of one save, started: what commit() waits on and records."""

    keys: list[str]  # every object written, in order (removed again if the save fails)
    parts: dict[int, tuple[int, ...] | None]  # file number -> its part sizes (None: one object)
    crcs: dict[int, list[tuple[int, ...]]]
    writes: list[Pending[Any]]  # every write started (the last ones still in flight)
    # Compressed files: file number -> (its stored size, each shard's (offset, frame sizes)).
    layouts: dict[int, Layout] = field(default_factory=dict)

    def wait(self) -> list[Any]:
        return [w.result() for w in self.writes]


def file_parts(f: PlannedFile, piece: int, part_bytes: int) -> tuple[int, ...] | None:
    """The parts of a capped save's data file: pieces of the ring's size (or of part_bytes)."""
    size = min(piece, part_bytes)
    if f.nbytes and math.ceil(f.nbytes / size) > MAX_PARTS:
        size = math.ceil(f.nbytes / MAX_PARTS)
    return split_parts(f.nbytes, size)


def stream(
    plan: SavePlan,
    leaves: list[Any],
    process_index: int,
    directory: Store,
    base: str,
    ring: Ring,
    chunk: int,
    part_bytes: int,
    publish: bool,
    device_data: DeviceShards | None = None,
) -> Streamed:
    """Fills this process's data files piece by piece through the ring, writing each piece.

    Returns once every piece is filled: the arrays may then change. Up to the
    ring's buffers of writes are still in flight (Streamed.writes). On failure,
    what it wrote is removed before the error is raised.
    """
    if device_data is None:
        device_data = device_shards(plan, leaves, process_index)
    local = {k: f for k, f in enumerate(plan.files) if f.process_index == process_index}
    n = len(plan.files)
    # Accelerators hand back a host copy of each range they transfer: a piece per filling thread.
    on_device = any(
        next(iter(d.devices())).platform != "cpu" for per in device_data.values() for d in per.values()
    )
    threads = max(1, min(len(local), 2, ring.count // 2))
    room = max(threads, ring.count - (threads if on_device else 0))  # pieces the cap leaves
    copying = directory.copies_writes
    if copying:
        # write() copies a piece before it returns, so one buffer per thread is refilled
        # at once; the rest of the cap is the store's copies in flight, less a piece per
        # thread for a file's last, shorter piece (copied once more into bytes of its size).
        buffers = ring.buffers(directory.timeout_s, keep=threads)
        window = max(1, (room - 2 * threads) // threads)
    else:
        buffers = ring.buffers(directory.timeout_s, keep=room)
        window = len(buffers) // threads
    parts = {k: file_parts(f, ring.piece, part_bytes) for k, f in local.items()}
    streamed = Streamed([], parts, {}, [])
    lock = threading.Lock()

    # Files go to threads largest first, each to the one with the fewest bytes so far;
    # each thread owns its share of the buffers and keeps its own writes in flight.
    work: list[list[int]] = [[] for _ in range(threads)]
    load = [0] * threads
    for k in sorted(local, key=lambda k: -local[k].nbytes):
        t = load.index(min(load))
        work[t].append(k)
        load[t] += local[k].nbytes
    shares = [buffers[t::threads] for t in range(threads)]

    def fill(files: list[int], own: list[StagingBuffer]) -> None:
        free = deque(own)
        flight: deque[tuple[Pending[Any], StagingBuffer]] = deque()  # oldest first
        for k in files:
            f = local[k]
            keys = data_keys(base, k, n, parts[k])
            sizes = parts[k] or (f.nbytes,)
            shards = sorted(f.shards, key=lambda s: s.offset)
            sources = [_Source(s, leaves[s.leaf], plan.leaves[s.leaf].dtype, device_data) for s in shards]
            sums = [ShardChecksums(chunk) for _ in shards]
            at, first = 0, 0  # the piece's start in the file; the first shard not yet written whole
            for key, size in zip(keys, sizes):
                while len(flight) >= window or not free:
                    write, done = flight.popleft()
                    write.result()
                    if not copying:
                        free.append(done)
                buffer = free.popleft()
                view = buffer.view[:size]
                end = at + size
                covered = at
                j = first
                while j < len(shards) and shards[j].offset < end:
                    s = shards[j]
                    lo, hi = max(at, s.offset), min(end, s.offset + s.nbytes)
                    if lo > covered:
                        view[covered - at : lo - at] = 0  # alignment padding between shards
                    if hi > lo:
                        target = view[lo - at : hi - at]
                        np.copyto(target, sources[j].range(lo - s.offset, hi - s.offset))
                        sums[j].feed(target)
                    covered = max(covered, hi)
                    if s.offset + s.nbytes <= end:
                        first = j + 1
                    j += 1
                if covered < end:
                    view[covered - at :] = 0
                data = buffer.data if size == len(buffer.data) else memoryview(buffer.data)[:size]
                with lock:
                    streamed.keys.append(key)
                    write = directory.write(key, data, publish=publish)
                    streamed.writes.append(write)
                flight.append((write, buffer))
                if copying:
                    free.append(buffer)  # the store has its own copy already
                at = end
            with lock:
                streamed.crcs[k] = [s.result() for s in sums]

    try:
        for future in [COPIES.submit(fill, work[t], shares[t]) for t in range(threads)]:
            future.result()
    except BaseException:
        _remove(directory, streamed)
        raise
    return streamed


def _remove(directory: Store, streamed: Streamed) -> None:
    """Waits for a failed stream's writes, then removes every object it wrote."""
    deadline = time.monotonic() + directory.timeout_s
    for write in streamed.writes:
        with contextlib.suppress(Exception):
            write.result()
        if time.monotonic() > deadline:
            break
    for key in streamed.keys:
        with contextlib.suppress(Exception):
            directory.delete(key).result()
