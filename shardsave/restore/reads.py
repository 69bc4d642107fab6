"""Which stored bytes a restore reads, with no I/O.

For every unique target box (a box that several devices need is read once and
placed on each of them), the stored shards that overlap it, and for each
overlap the contiguous byte span to read: the rows (along axis 0) of the stored
shard that the overlap touches. Reads can be split into smaller row ranges to
respect a memory cap.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax

from shardsave.index import Box, StoredShard, box_shape, index_box

_ALL = slice(None)


@dataclass(slots=True)  # not frozen: a restore of thousands of leaves builds one per shard
class Read:
    """Rows [row_start, row_stop) of one stored shard, copied into a target box.

    src indexes the rows read (shape (rows, *stored.shape[1:])) to select the
    overlap; dst indexes the target box's array where the overlap goes.
    fills_target: the rows read are exactly the target box, in its memory order.
    """

    shard: StoredShard
    row_start: int
    row_stop: int
    row_bytes: int
    src: tuple[slice, ...]
    dst: tuple[slice, ...]
    fills_target: bool

    @property
    def nbytes(self) -> int:
        return (self.row_stop - self.row_start) * self.row_bytes

    @property
    def rows_shape(self) -> tuple[int, ...]:
        return (self.row_stop - self.row_start, *self.shard.shape[1:]) if self.shard.shape else ()


def exact_reads(
    shard: StoredShard, itemsize: int, max_read_bytes: int | None = None, align: int = 0
) -> list[Read]:
    """The reads of a target box that is exactly one stored shard (a target laid out as
    saved): one, or row ranges of at most max_read_bytes (see plan_reads)."""
    shape = shard.shape
    if not shape:
        return [Read(shard, 0, 1, itemsize, (), (), True)]
    row_bytes = math.prod(shape[1:]) * itemsize
    if max_read_bytes is not None and row_bytes and shape[0] * row_bytes > max_read_bytes:
        return plan_reads((shard,), tuple(zip(shard.start, shard.stop)), itemsize, max_read_bytes, align)
    full = (slice(None),) * len(shape)
    return [Read(shard, 0, shape[0], row_bytes, full, full, True)]


def plan_reads(
    shards: tuple[StoredShard, ...],
    target: Box,
    itemsize: int,
    max_read_bytes: int | None = None,
    align: int = 0,
) -> list[Read]:
    """The reads that fill the target box from the stored shards overlapping it.

    Each read is a contiguous byte span: whole rows (along axis 0) of one stored
    shard. With max_read_bytes, a span is cut into row ranges no larger than that
    (but at least one row), so a stored shard larger than a memory cap is still read.
    With align (the checksum chunk), the cuts fall on multiples of that many bytes
    of the shard where whole rows of at most max_read_bytes allow it: each piece is
    then its own checksum chunks, read and verified alone (and landing in place).
    """
    target_shape = box_shape(target)
    if math.prod(target_shape) == 0:
        return []
    if not target:  # 0-d: one element, one shard
        return [Read(shards[0], 0, 1, itemsize, (), (), True)]
    reads = []
    for shard in shards:
        lo = [max(a, s) for (a, _), s in zip(target, shard.start)]
        hi = [min(b, s) for (_, b), s in zip(target, shard.stop)]
        if any(h <= low for low, h in zip(lo, hi)):
            continue
        row_bytes = math.prod(shard.shape[1:]) * itemsize
        row0, row1 = lo[0] - shard.start[0], hi[0] - shard.start[0]
        step, cuts = row1 - row0, 0  # cuts: at multiples of this many rows of the shard
        if max_read_bytes is not None and row_bytes:
            step = max(1, min(step, max_read_bytes // row_bytes))
            rows_aligned = align // math.gcd(align, row_bytes) if align else 0  # rows per aligned cut
            if rows_aligned and rows_aligned * row_bytes <= max_read_bytes and row1 - row0 > step:
                step = cuts = max_read_bytes // (rows_aligned * row_bytes) * rows_aligned
        src_rest = tuple(
            slice(None) if (low, h) == (a, b) else slice(low - a, h - a)
            for low, h, a, b in zip(lo[1:], hi[1:], shard.start[1:], shard.stop[1:])
        )
        dst_rest = tuple(
            slice(None) if (low, h) == (a, b) else slice(low - a, h - a)
            for low, h, (a, b) in zip(lo[1:], hi[1:], target[1:])
        )
        r = row0
        while r < row1:
            r_end = min(row1, (r // cuts + 1) * cuts if cuts else r + step)
            t0, t1 = r + shard.start[0] - target[0][0], r_end + shard.start[0] - target[0][0]
            dst0 = slice(None) if (t0, t1) == (0, target_shape[0]) else slice(t0, t1)
            src, dst = (slice(None), *src_rest), (dst0, *dst_rest)
            fills = all(s == _ALL for s in (*src, *dst))
            reads.append(Read(shard, r, r_end, row_bytes, src, dst, fills))
            r = r_end
    return reads


@functools.lru_cache(maxsize=4096)
def unique_target_boxes(
    sharding: jax.sharding.Sharding, shape: tuple[int, ...]
) -> tuple[tuple[Box, tuple[jax.Device, ...]], ...]:
    """Each box the process's devices need, with the devices that need it.

    Cached: the layers of a model share a handful of (sharding, shape) pairs.
    """
    out: dict[Box, list[jax.Device]] = {}
    for device, idx in sharding.addressable_devices_indices_map(shape).items():
        if idx is None:
            continue
        out.setdefault(index_box(idx, shape), []).append(device)
    return tuple((box, tuple(devices)) for box, devices in out.items())
