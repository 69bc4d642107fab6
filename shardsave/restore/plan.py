"""Plans a restore, before any byte is read: its units, their reads, and batches under a budget.

A restore is a list of units: one per unique target box of a leaf (a box several
devices need is read once and placed on each), or the whole leaf for host
targets and reshapes. Units are executed in batches whose host bytes stay within
the budget. A batch counts the checksum chunks its reads cover, each once, so
target boxes that need the same stored rows (a resharded restore) are batched
together and read them once. The next batch is read while the current one is
placed; restore_sequentially does the same with two batches of half the budget
(with less than twice its smallest budget, one batch at a time).

On CPU devices the assembled buffer (or a read that is exactly a target shard)
becomes the device buffer without a copy: it is the restored array, not
transient memory, and is not counted against the budget. Such reads hold no
transient memory, so a cap does not shrink them: a capped restore reads a stored
shard in the default restore's pieces.

A unit whose reads do not fit a batch (restore_sequentially with a small
max_host_bytes) is streamed, with the next reads in flight within the budget
(restore.engine). On accelerators a default restore streams a unit larger than
half a batch as well: each block's copy to the device then overlaps the next
reads.

Everything here is pure: it reads the index records and the target shardings,
never a store.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from shardsave.index import Box, Checksums, LeafEntry, StoredShard, box_shape, full_box
from shardsave.restore.reads import Read, exact_reads, plan_reads, unique_target_boxes

# One ranged read covers at most this many bytes, so the reads of one large file
# run in parallel and each can be released on its own.
MAX_SPAN_BYTES = 16 << 20


# A default restore's batches hold at most this many bytes, and two are in flight at
# once. Larger batches read a cold disk more slowly (docs/guides/performance.md and
# benchmarks/NOTES.md) and hold more transient memory on accelerators.
DEFAULT_BATCH_BYTES = 256 << 20


DEFAULT_INFLIGHT_BYTES = 2 * DEFAULT_BATCH_BYTES  # the most bytes a default restore reads ahead


# The smallest max_host_bytes restore_sequentially accepts (plan_restore's
# min_sequential_bytes), and the smallest batch of a default restore.
MIN_SEQUENTIAL_BYTES = 32 << 20


@dataclass(frozen=True)
class LeafRequest:
    """One leaf to restore: where it is stored and what the caller wants."""

    entry: LeafEntry
    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: jax.sharding.Sharding | None  # None: return a numpy array
    box: Box | None = None  # host requests only: read just this box of the stored array


# Whether a leaf with this sharding takes the CPU path (see Placement).
OnCpu = Callable[[jax.sharding.Sharding | None], bool]


class Placement(enum.Enum):
    """Which of the restore's two paths onto devices each leaf takes.

    On the CPU path, the host buffer a restore assembles (or reads) for a leaf
    restored as saved becomes its device buffer without a copy, and is not
    counted against the budget. On the accelerator path, host buffers are copied
    to the devices, and a unit larger than half a batch is streamed into its
    device buffer block by block, each block's copy overlapping the next reads.

    Attributes:
      BY_PLATFORM: the default. Leaves on CPU devices take the CPU path, all
        others the accelerator path.
      ACCELERATOR: every leaf takes the accelerator path, on CPU devices too.
        Its jax calls run on any device, so this exercises it where there is no
        accelerator (tests, CI); on CPU devices it costs the copies the CPU path
        avoids.
    """

    BY_PLATFORM = "by_platform"
    ACCELERATOR = "accelerator"

    def on_accelerator_path(self, sharding: jax.sharding.Sharding) -> bool:
        """Whether a leaf with this sharding takes the accelerator path.

        Args:
          sharding: the leaf's target sharding.
        """
        return not cpu_path(self)(sharding)


@functools.lru_cache(maxsize=256)
def _on_cpu(sharding: jax.sharding.Sharding | None) -> bool:
    devices: Any = sharding.device_set if sharding is not None else ()
    return any(d.platform == "cpu" for d in devices)


def _never_on_cpu(sharding: jax.sharding.Sharding | None) -> bool:
    return False


def cpu_path(placement: Placement) -> OnCpu:
    """Whether a leaf takes the CPU path, as the placement decides: the predicate the
    engine asks of each leaf, resolved once per restore so that asking costs what
    the default always cost."""
    return _on_cpu if placement is Placement.BY_PLATFORM else _never_on_cpu


@dataclass
class Unit:
    request: int
    box: Box  # in the stored array's coordinates
    reads: list[Read]
    # (devices, target box within the unit's array once reshaped; None: all of it)
    placements: list[tuple[tuple[jax.Device, ...], Box | None]] = field(default_factory=list)

    def assembly_bytes(self, itemsize: int) -> int:
        if len(self.reads) == 1 and self.reads[0].fills_target:
            return 0
        return math.prod(box_shape(self.box)) * itemsize

    def read_bytes(self) -> int:
        return sum(r.nbytes for r in self.reads)


def _plan_units(
    requests: list[LeafRequest],
    max_read_bytes: int | None,
    checks: Checksums,
    on_cpu: OnCpu,
) -> list[Unit]:
    # Reads that are not a whole stored shard are cut at MAX_SPAN_BYTES too: target
    # boxes that share stored rows (a resharded restore) then ask for identical spans,
    # which a batch reads once. Cuts fall on checksum chunks where rows allow.
    partial_read = min(max_read_bytes or MAX_SPAN_BYTES, MAX_SPAN_BYTES)
    units = []
    for i, req in enumerate(requests):
        entry, itemsize = req.entry, req.entry.dtype.itemsize
        if req.sharding is None or req.shape != entry.shape:
            # Host targets and reshapes read the whole stored array (or the box asked for) once.
            box = req.box or full_box(entry.shape)
            unit = Unit(i, box, plan_reads(entry.shards, box, itemsize, partial_read, checks.plan_unit))
            if req.sharding is not None:
                unit.placements.extend((d, tbox) for tbox, d in unique_target_boxes(req.sharding, req.shape))
            units.append(unit)
            continue
        # A target laid out as saved (the common case) finds its stored box at once.
        stored = {(s.start, s.stop): s for s in entry.shards}
        # In box order, so that boxes sharing stored rows are neighbours (and batch together).
        for tbox, devices in sorted(unique_target_boxes(req.sharding, req.shape)):
            same = stored.get((tuple(a for a, _ in tbox), tuple(b for _, b in tbox)))
            if same is not None and same.nbytes:
                # Reads that land in a buffer a CPU device adopts are the restored
                # array, not transient memory: a cap does not shrink them.
                exact = None if adopts(req, on_cpu) else max_read_bytes
                reads = _exact_reads(same, itemsize, exact, checks)
            else:
                reads = plan_reads(entry.shards, tbox, itemsize, partial_read, checks.plan_unit)
            units.append(Unit(i, tbox, reads, [(devices, None)]))
    return units


def _exact_reads(
    shard: StoredShard, itemsize: int, max_read_bytes: int | None, checks: Checksums
) -> list[Read]:
    """The reads of a target box that is exactly a stored shard.

    max_read_bytes: a capped restore's read size, for reads that hold transient
    memory (in pieces of at most that). Otherwise a shard larger than
    MAX_SPAN_BYTES is read in such pieces where they can be cut on its checksum
    chunks: each then lands in the shard's buffer directly, and the pieces of one
    file are read in parallel (one read per large file kept a cold disk well
    below its speed: docs/guides/performance.md).
    """
    if max_read_bytes is not None:
        return exact_reads(shard, itemsize, max_read_bytes, checks.plan_unit)
    if not checks.whole_shards and shard.nbytes > MAX_SPAN_BYTES:
        pieces = exact_reads(shard, itemsize, MAX_SPAN_BYTES, checks.plan_unit)
        if all(r.row_start * r.row_bytes % checks.chunk_bytes == 0 for r in pieces):
            return pieces
    return exact_reads(shard, itemsize)


def read_span(read: Read, checks: Checksums) -> tuple[int, int]:
    """The read widened to whole checksum units, relative to the shard's start."""
    rel0 = read.row_start * read.row_bytes
    return checks.widen(read.shard, rel0, rel0 + read.nbytes)


@dataclass
class RestorePlan:
    """What a restore will do, decided before any byte is read."""

    units: list[Unit]  # one per unique target box (or whole leaf), with its reads
    batches: list[list[Unit]]  # executed in order; streamed units form batches of their own
    streamed: frozenset[int]  # the indices of those batches
    budget: int  # the host bytes one batch may hold
    ahead: int  # batches read while the current one is placed (each within the budget)


def plan_restore(
    requests: list[LeafRequest],
    checks: Checksums,
    *,
    budget: int | None,
    sequential: bool,
    placement: Placement = Placement.BY_PLATFORM,
    min_sequential_bytes: int = MIN_SEQUENTIAL_BYTES,
) -> RestorePlan:
    """Plans a restore: the reads of every unit and their batches under the budget. No I/O.

    Args:
      requests: the leaves to restore.
      checks: how the checkpoint's bytes are checked (Index.checksums): the unit reads cover.
      budget: the host bytes the restore may hold (max_host_bytes); None: the default.
      sequential: restore_sequentially: keep host memory within the budget.
      placement: the path each leaf takes onto its devices.
      min_sequential_bytes: the smallest budget a sequential restore accepts (at
        least 8 checksum chunks, too), and its budget where none is given. Tests
        of tiny checkpoints lower it; below the default, reads and batches are
        small enough to make a real restore slow.

    Raises:
      ValueError: restore_sequentially with a budget it cannot keep.
    """
    on_cpu = cpu_path(placement)
    ahead = 1
    if sequential:
        # A read covers whole checksum chunks, and a batch holds reads of up to a quarter
        # of its budget: below two chunks per quarter a budget cannot be kept.
        least = max(min_sequential_bytes, 8 * checks.chunk_bytes)
        if budget is not None and budget < least:
            raise ValueError(
                f"max_host_bytes={budget} is below the {least >> 20} MiB that restore_sequentially needs "
                f"for this checkpoint: every read is verified in {checks.describe()}, and a batch holds a quarter "
                f"of the budget in reads; pass at least max_host_bytes={least}"
            )
        budget = budget or least
        ahead = 0
        if budget >= 2 * least:
            # Two batches of half the budget each: the next one is read while this one
            # is verified and placed.
            budget //= 2
            ahead = 1
        max_read: int | None = max(1, budget // 4)
    else:
        # The next batch is read while this one is verified and placed, and a batch's
        # host buffers live until jax has copied them to the devices: two batches
        # overlap. Batches of a quarter of the bytes being restored, and of at most
        # DEFAULT_BATCH_BYTES, keep transient memory below about half of them.
        restored = sum(math.prod(r.shape) * r.dtype.itemsize for r in requests)
        budget = budget or min(DEFAULT_BATCH_BYTES, max(MIN_SEQUENTIAL_BYTES, restored // 4))
        max_read = None
    units = _plan_units(requests, max_read, checks, on_cpu)
    planned = list(_batches(units, requests, budget, sequential, checks, on_cpu))
    streamed = frozenset(k for k, (_, stream) in enumerate(planned) if stream)
    return RestorePlan(units, [batch for batch, _ in planned], streamed, budget, ahead)


def _host_assembly(unit: Unit, req: LeafRequest, on_cpu: OnCpu) -> int:
    """The host bytes a unit's assembly holds beyond the result: none where a CPU
    device adopts the assembled buffer as its own (on CPU, device memory is host
    memory, and the restored arrays are not the restore's transient memory)."""
    return 0 if adopts(req, on_cpu) else unit.assembly_bytes(req.entry.dtype.itemsize)


def adopts(req: LeafRequest, on_cpu: OnCpu) -> bool:
    """Whether CPU devices adopt the buffers a restore assembles (or reads) for the
    leaf as the restored array's own: a leaf restored as saved, in its dtype."""
    return (
        req.sharding is not None
        and on_cpu(req.sharding)
        and req.dtype == req.entry.dtype
        and req.shape == req.entry.shape
    )


def _streamed(
    unit: Unit,
    requests: list[LeafRequest],
    budget: int,
    sequential: bool,
    checks: Checksums,
    chunks: dict[tuple[int, int], int] | None = None,
    on_cpu: OnCpu = _on_cpu,
) -> bool:
    """Whether the restore streams the unit through its device buffers, read by read.

    On accelerators, a default restore streams units larger than half a batch too:
    there the stream overlaps each block's copy to the device with the next reads,
    where a batch reads the whole unit into fresh host memory first and then copies
    it (3x slower for a 1 GiB leaf on an H200, measured by benchmarks/gpu_check.py).

    chunks: the unit's _chunks, where the caller has them already.
    on_cpu: whether a leaf takes the CPU path (cpu_path of the restore's placement).
    """
    req = requests[unit.request]
    if req.sharding is None or req.shape != req.entry.shape:
        return False
    if on_cpu(req.sharding):
        return sequential and sum((_chunks(unit, checks) if chunks is None else chunks).values()) > budget
    # With one checksum per shard a batch would read whole shards.
    if checks.whole_shards:
        read = sum((_chunks(unit, checks) if chunks is None else chunks).values())
    else:
        read = unit.read_bytes()
    return max(unit.assembly_bytes(req.entry.dtype.itemsize), read) > budget // 2


def _chunks(unit: Unit, checks: Checksums) -> dict[tuple[int, int], int]:
    """The checksum units the unit's reads cover (a read is widened to them): key -> bytes."""
    covered = {}
    for read in unit.reads:
        if checks.whole_shards:  # a batch reads the shard whole
            covered[read.shard.file, read.shard.offset] = read.shard.nbytes
            continue
        c = checks.chunk_bytes
        a, b = read_span(read, checks)
        for j in checks.units(read.shard, a, b):
            covered[read.shard.file, read.shard.offset + j * c] = min(c, read.shard.nbytes - j * c)
    return covered


def _batches(
    units: list[Unit],
    requests: list[LeafRequest],
    budget: int,
    sequential: bool,
    checks: Checksums,
    on_cpu: OnCpu,
) -> Iterator[tuple[list[Unit], bool]]:
    """Consecutive units whose host bytes fit the budget: what they read, each chunk
    counted once (units that share stored rows read them once), and their assembly;
    each batch with whether it is streamed.

    A unit too large for a batch is streamed; on CPU devices its neighbours of the
    same leaf that share stored rows with it stream with it, so those rows are
    read once for all of them.
    """
    batch: list[Unit] = []
    held: dict[tuple[int, int], int] = {}
    used = 0
    streaming: list[Unit] = []  # a group of streamed units
    streamed_chunks: set[tuple[int, int]] = set()
    for unit in units:
        chunks = _chunks(unit, checks)
        if _streamed(unit, requests, budget, sequential, checks, chunks, on_cpu):
            if batch:
                yield batch, False
                batch, held, used = [], {}, 0
            joins = (
                streaming
                and streaming[0].request == unit.request
                and on_cpu(requests[unit.request].sharding)
                and not streamed_chunks.isdisjoint(chunks)
            )
            if streaming and not joins:
                yield streaming, True
                streaming, streamed_chunks = [], set()
            streaming.append(unit)
            streamed_chunks.update(chunks)
            continue
        if streaming:
            yield streaming, True
            streaming, streamed_chunks = [], set()
        assembly = _host_assembly(unit, requests[unit.request], on_cpu)
        cost = assembly + sum(n for key, n in chunks.items() if key not in held)
        if batch and cost and used + cost > budget:  # a unit that adds nothing always joins
            yield batch, False
            batch, held, used = [], {}, 0
            cost = assembly + sum(chunks.values())
        batch.append(unit)
        held.update(chunks)
        used += cost
    if streaming:
        yield streaming, True
    if batch:
        yield batch, False


def held_bytes(read: Read, checks: Checksums) -> int:
    """The bytes a streamed read holds: its checksum chunks, or itself where a shard has
    one checksum (see Fetcher.stream)."""
    if checks.whole_shards:
        return read.nbytes
    a, b = read_span(read, checks)
    return b - a
