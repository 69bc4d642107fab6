"""Reads stored bytes and lands them on the target devices, under a memory budget.

A restore is a list of units: one per unique target box of a leaf (a box several
devices need is read once and placed on each), or the whole leaf for host
targets and reshapes. Units are executed in batches whose host bytes stay within
the budget: every read of a batch is issued at once (coalesced into contiguous
spans of each file) and verified (crc32c) as it lands, then the batch is
assembled and placed on its devices (one make_array_from_callback per leaf), and
its host buffers are dropped. A batch counts the checksum chunks its reads cover,
each once, so target boxes that need the same stored rows (a resharded restore)
are batched together and read them once. The next batch's reads are issued
before the current one is placed, so the storage and Python work at the same
time; restore_sequentially does the same with two batches of half the budget
(with less than twice its smallest budget, one batch at a time), reading into a
pool of buffers reused from batch to batch and never holding more than its cap
(BufferPool), whose memory returns to the system when the restore ends. On CPU
devices the assembled buffer (or a read that is exactly a target shard) becomes
the device buffer without a copy: it is the restored array, not transient
memory, and is not counted against the budget. A read of whole rows of its box
(a box that stacks stored shards, or a large shard read in pieces) lands in the
assembled buffer directly, where its checksum chunks are its own. Such reads
into an adopted buffer hold no transient memory, so a cap does not shrink
them: a capped restore reads a stored shard in the default restore's pieces,
and a unit it streams keeps up to DEFAULT_INFLIGHT_BYTES of them in flight.

A unit whose reads do not fit a batch (restore_sequentially with a small
max_host_bytes) is streamed, with the next reads in flight within the budget:
on CPU devices into its final host buffer (with the neighbouring units of its
leaf that share its stored rows, which are then read once for all of them);
on accelerators into its device buffer, filled in place row range by row range.
Host memory never holds it whole beyond the result. On accelerators a default
restore streams a unit larger than half a batch as well: each block's copy to
the device then overlaps the next reads.

restore_leaves takes what Saver.restore does not: a Placement (the accelerator
path can be taken on CPU devices), a RestoreObserver told of reads, placements
and landings as they happen, and min_sequential_bytes (the smallest cap a
sequential restore accepts). With their defaults the engine does what it always
did, and asks nothing more of each leaf.
"""

from __future__ import annotations

import enum
import functools
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardsave import _gc_pause
from shardsave.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from shardsave.index import (
    Box,
    Checksums,
    Index,
    LeafEntry,
    StoredShard,
    box_shape,
    checksum,
    full_box,
    index_box,
)
from shardsave.restore.files import DataFiles, into_region
from shardsave.restore.reads import Read, exact_reads, plan_reads, unique_target_boxes
from shardsave.storage.base import Store, join
from shardsave.storage.buffers import BufferPool, aligned_empty

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


SMALL_BUFFER_BYTES = 1 << 20  # a capped restore takes buffers below this from malloc


# A span whose checksum chunks average at least this many bytes is verified by the
# I/O thread that read it; smaller chunks are verified by the caller on first use.
MIN_THREAD_CHECK_BYTES = 1 << 20


# A read lands directly in its destination from this size: below it, the copy it
# saves costs less than the bookkeeping (restores of many small leaves).
MIN_DIRECT_BYTES = 1 << 20


@dataclass(frozen=True)
class LeafRequest:
    """One leaf to restore: where it is stored and what the caller wants."""

    entry: LeafEntry
    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: jax.sharding.Sharding | None  # None: return a numpy array
    box: Box | None = None  # host requests only: read just this box of the stored array


# Whether a leaf with this sharding takes the CPU path (see Placement).
_OnCpu = Callable[[jax.sharding.Sharding | None], bool]


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
        return not _cpu_path(self)(sharding)


@functools.lru_cache(maxsize=256)
def _on_cpu(sharding: jax.sharding.Sharding | None) -> bool:
    devices: Any = sharding.device_set if sharding is not None else ()
    return any(d.platform == "cpu" for d in devices)


def _never_on_cpu(sharding: jax.sharding.Sharding | None) -> bool:
    return False


def _cpu_path(placement: Placement) -> _OnCpu:
    """Whether a leaf takes the CPU path, as the placement decides: the predicate the
    engine asks of each leaf, resolved once per restore so that asking costs what
    the default always cost."""
    return _on_cpu if placement is Placement.BY_PLATFORM else _never_on_cpu


class RestoreObserver:
    """Hears what restore_leaves does, as it does it: reads, placements, landings.

    Subclass it, override the events wanted (each does nothing here) and pass an
    instance as restore_leaves(observer=...): for instrumentation, and for tests
    that check which path a restore took. The events run on the restoring
    thread between its steps, so a slow one slows the restore. Without an
    observer (the default) the engine calls none of them.
    """

    def on_read(self, reads: Sequence[Read], streamed: bool) -> None:
        """Reads were started together, before any of their bytes arrived.

        Args:
          reads: the reads, each of rows of one stored shard (a batch's reads
            are coalesced into fewer ranged reads of the files afterwards).
          streamed: the read of a streamed unit (one read at a time, with the
            next ones in flight), rather than a batch's reads.
        """

    def on_place(self, request: LeafRequest, last: bool) -> None:
        """Boxes of a leaf, from one batch or one streamed unit, go to their devices.

        On the CPU path, adopted buffers wait for the leaf's last boxes, and one
        call then places them all.

        Args:
          request: the leaf.
          last: no box of the leaf is left to read. A leaf with last=False on
            some call is placed over several batches.
        """

    def on_use(self, read: Read) -> None:
        """A read's bytes are about to be taken (verified, and cut to its rows) for placing.

        Between on_read and on_use a read is in flight or waiting, holding its
        memory: an observer that takes its time here stands for a host slower than
        its store (reads then finish before they are used).
        """

    def on_land(self, read: Read, in_place: bool) -> None:
        """A read's rows reached the host buffer of the box they were read for.

        Called for reads issued into that buffer (direct reads) and for the
        streamed reads of units on the CPU path, once for each box a read fills.

        Args:
          read: the read.
          in_place: the rows were read into the buffer itself (a local store
            reads into the memory it is given), so nothing copied them; otherwise
            they were copied there (a store that hands back buffers of its own,
            or a read that several boxes share).
        """


@dataclass
class _Unit:
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


def _target_index(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


@dataclass
class RestoreTimes:
    """Where a restore_leaves call spent its time; the rest is reading and verifying."""

    plan_seconds: float = 0.0  # planning units, reads and batches
    place_seconds: float = 0.0  # creating the arrays on their devices (jax)


class _Results:
    """What the batches produce, and the leaves still waiting for more of them."""

    def __init__(
        self,
        units: list[_Unit],
        on_cpu: _OnCpu,
        observer: RestoreObserver | None,
    ):
        self.on_cpu = on_cpu  # whether a leaf takes the CPU path (_cpu_path)
        self.observer = observer
        self.remaining = Counter(u.request for u in units)
        self.done: dict[int, Any] = {}  # request -> numpy array or jax.Array
        self.partial: dict[int, dict[jax.Device, jax.Array]] = {}  # leaves split over batches
        self.host: dict[int, dict[Box, np.ndarray]] = {}  # their pieces so far, on CPU devices
        self.place_seconds = 0.0

    def place(
        self,
        request: int,
        req: LeafRequest,
        pieces: dict[Box, np.ndarray],
        holders: dict[Box, tuple[jax.Device, ...]],
    ) -> None:
        """Puts a batch's boxes of one leaf on their devices."""
        assert req.sharding is not None
        if self.observer is not None:
            self.observer.on_place(req, last=self.remaining[request] == 0)
        began = time.perf_counter()
        if _adopted(req, self.on_cpu):
            # The pieces are the restored memory itself, not transient buffers: holding
            # a leaf's pieces until the last batch brings the rest costs nothing, and
            # one call then places them all.
            held = self.host.setdefault(request, {})
            held.update(pieces)
            if self.remaining[request]:
                return
            pieces = self.host.pop(request)
        if self.remaining[request] == 0 and request not in self.partial:
            # The whole leaf is here: one call places every shard (and on CPU adopts
            # aligned host buffers as device buffers, without a copy).
            def box_of(index: Any) -> np.ndarray:
                return pieces[index_box(index, req.shape)]

            self.done[request] = jax.make_array_from_callback(req.shape, req.sharding, box_of)
        else:
            arrays, devices = [], []
            for box, piece in pieces.items():
                for device in holders[box]:
                    arrays.append(piece)
                    devices.append(device)
            self.partial.setdefault(request, {}).update(zip(devices, jax.device_put(arrays, devices)))
        self.place_seconds += time.perf_counter() - began

    def finish(self, requests: list[LeafRequest]) -> list[Any]:
        began = time.perf_counter()
        for i, req in enumerate(requests):
            if i not in self.done:
                # Leaves split over batches; and leaves none of whose devices are this
                # process's (several processes), which get no local shards at all.
                assert req.sharding is not None
                arrays = list(self.partial.get(i, {}).values())
                self.done[i] = jax.make_array_from_single_device_arrays(req.shape, req.sharding, arrays)
        self.place_seconds += time.perf_counter() - began
        return [self.done[i] for i in range(len(requests))]


def _plan_units(
    requests: list[LeafRequest],
    max_read_bytes: int | None,
    checks: Checksums,
    on_cpu: _OnCpu,
) -> list[_Unit]:
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
            unit = _Unit(i, box, plan_reads(entry.shards, box, itemsize, partial_read, checks.plan_unit))
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
                exact = None if _adopted(req, on_cpu) else max_read_bytes
                reads = _exact_reads(same, itemsize, exact, checks)
            else:
                reads = plan_reads(entry.shards, tbox, itemsize, partial_read, checks.plan_unit)
            units.append(_Unit(i, tbox, reads, [(devices, None)]))
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


def _span(read: Read, checks: Checksums) -> tuple[int, int]:
    """The read widened to whole checksum units, relative to the shard's start."""
    rel0 = read.row_start * read.row_bytes
    return checks.widen(read.shard, rel0, rel0 + read.nbytes)


class Fetcher:
    """Issues reads of a checkpoint's data files and verifies what comes back against its index.

    restore_leaves makes one per restore; a test makes its own to read and verify
    chosen reads (issue or stream, then verified, then finish).

    Reads of a batch are coalesced: spans of the same file that touch or overlap
    are fetched with one ranged read (a restore onto the saved layout reads each
    data file in spans of MAX_SPAN_BYTES), and each read is a view into its span.
    Every checksum chunk a span holds is verified once: by the I/O thread that
    read it when the chunks are large (local files), so checksums run on all the
    I/O threads while the caller places arrays; otherwise when the span is first
    used.

    Where a whole stored shard has one checksum (Checksums.per_shard: a TensorFlow tensor), a
    streamed read is not widened to it: the streamed reads of a shard come in
    order, and their checksum is carried from one to the next (`stream`); what a
    restore did not read of such a shard is read at the end (`finish`) to verify it.

    Args:
      directory: the store holding the checkpoint.
      base: the checkpoint's base name in it.
      index: the checkpoint's index.
      names: id(StoredShard) -> the name of its leaf, for error messages.
      allocate: host buffers (uint8, of the size asked) for reads, and for
        assemblies that are not results.
      observer: told of each group of reads as it is started (on_read); and,
        by the engine's other steps, of placements and landings.
    """

    def __init__(
        self,
        directory: Store,
        base: str,
        index: Index,
        names: dict[int, str],
        allocate: Callable[[int], np.ndarray],
        observer: RestoreObserver | None = None,
    ):
        self.directory = directory
        self.observer = observer
        self.allocate = allocate  # host buffers of reads, and of assemblies that are not results
        self.index = index
        self.checks = index.checksums
        self.names = names  # id(StoredShard) -> leaf name, for error messages
        self.files = DataFiles(directory, base, index)
        self._running: dict[int, list[Any]] = {}  # id(shard) -> [shard, bytes verified so far, their crc]

    def absolute_span(self, read: Read) -> tuple[int, int]:
        a, b = _span(read, self.checks)
        return read.shard.offset + a, read.shard.offset + b

    def _read(
        self,
        file: int,
        start: int,
        end: int,
        reads: list[Read],
        allocate: Callable[[int], np.ndarray] | None = None,
    ) -> _Span:
        allocate = allocate or self.allocate
        chunks = {}  # (shard, chunk number) of every chunk the reads touch, once each
        for read in reads:
            a, b = _span(read, self.checks)
            for j in self.checks.units(read.shard, a, b):
                chunks[id(read.shard), j] = read.shard
        check = functools.partial(self._check, start, [(shard, j) for (_, j), shard in chunks.items()])
        if end - start < len(chunks) * MIN_THREAD_CHECK_BYTES:
            # Many small chunks: the checking loop is Python that would hold the GIL on
            # the I/O thread while the caller waits for it; check on first use instead.
            future = self.files.read(file, start, end, allocate=allocate)
            return _Span(future, start, end, check)
        future = self.files.read(file, start, end, check, allocate)
        return _Span(future, start, end)

    def _check(self, start: int, chunks: list[tuple[StoredShard, int]], data: np.ndarray) -> np.ndarray:
        """Verifies the length and crc32c of each chunk in a span's data (read from `start`)."""
        for shard, j in chunks:
            problem = self.checks.problem(data, start, shard, j)
            if problem is not None:
                raise CorruptCheckpointError(f"{self._where(shard)}: {problem}")
        return data

    def issue(
        self, reads: list[Read], destination: Callable[[Read], np.ndarray | None] | None = None
    ) -> dict[int, _Span]:
        """Starts the reads; returns, for each read's id, the span that holds it.

        destination(read): the bytes the read's rows end up in, or None. A read of
        at least MIN_DIRECT_BYTES whose span is exactly its rows (not widened to its
        checksum chunks) and shares no byte with another read lands there as it is:
        a local store reads it there, and nothing copies it afterwards.
        """
        if self.observer is not None:
            self.observer.on_read(reads, streamed=False)
        return self._start_reads(reads, destination)

    def _start_reads(
        self, reads: list[Read], destination: Callable[[Read], np.ndarray | None] | None = None
    ) -> dict[int, _Span]:
        """issue, without telling the observer (stream tells it itself)."""
        by_file: dict[int, list[tuple[int, int, Read]]] = {}
        handles: dict[int, _Span] = {}
        for read in reads:
            by_file.setdefault(read.shard.file, []).append((*self.absolute_span(read), read))
        for file, spans in by_file.items():
            spans.sort(key=lambda s: s[0])
            if destination is not None:
                spans = self._direct(file, spans, destination, handles)
            group: list[Read] = []
            start = end = -1
            for a, b, read in spans:
                if group and (a > end or max(end, b) - start > MAX_SPAN_BYTES):
                    span = self._read(file, start, end, group)
                    handles.update((id(r), span) for r in group)
                    group = []
                if not group:
                    start, end = a, b
                group.append(read)
                end = max(end, b)
            if group:  # (every read of the file may have landed directly)
                span = self._read(file, start, end, group)
                handles.update((id(r), span) for r in group)
        return handles

    def _direct(
        self,
        file: int,
        spans: list[tuple[int, int, Read]],
        destination: Callable[[Read], np.ndarray | None],
        handles: dict[int, _Span],
    ) -> list[tuple[int, int, Read]]:
        """Issues the reads of one file (spans sorted by start) that land in their
        destination (see issue); returns the others."""
        rest = []
        reach = -1  # the furthest end of the spans before
        for k, (a, b, read) in enumerate(spans):
            alone = reach <= a and (k + 1 == len(spans) or spans[k + 1][0] >= b)
            reach = max(reach, b)
            if alone and b - a == read.nbytes >= MIN_DIRECT_BYTES:
                region = destination(read)
                if region is not None:
                    span = handles[id(read)] = self._read(
                        file, a, b, [read], functools.partial(into_region, region)
                    )
                    span.direct = True
                    continue
            rest.append((a, b, read))
        return rest

    def stream(self, read: Read, into: np.ndarray | None = None) -> _Span:
        """Starts one read of a streamed unit (it holds _held(read, checks) bytes), into
        its destination's bytes where given (see issue)."""
        if self.observer is not None:
            self.observer.on_read((read,), streamed=True)
        if not self.checks.whole_shards:
            return self._start_reads([read], None if into is None else lambda _: into)[id(read)]
        rel = read.row_start * read.row_bytes
        start = read.shard.offset + rel
        allocate = self.allocate if into is None else functools.partial(into_region, into)
        future = self.files.read(read.shard.file, start, start + read.nbytes, allocate=allocate)
        span = _Span(
            future, start, start + read.nbytes, functools.partial(self._carry, read.shard, rel, read.nbytes)
        )
        span.direct = into is not None
        return span

    def _carry(self, shard: StoredShard, rel: int, nbytes: int, data: np.ndarray) -> np.ndarray:
        """Carries a whole-shard checksum over the next bytes of the shard (see stream)."""
        if data.size < nbytes:
            raise CorruptCheckpointError(f"{self._where(shard)}: the file is truncated")
        state = self._running.setdefault(id(shard), [shard, 0, 0])
        if rel <= state[1] < rel + data.size:  # new bytes follow the verified ones
            state[2] = checksum(data[state[1] - rel :], state[2])
            state[1] = rel + data.size
        return data

    def finish(self) -> None:
        """Verifies each whole-shard checksum carried over streamed reads, reading what they skipped."""
        for shard, done, crc in self._running.values():
            step = MAX_SPAN_BYTES
            for lo in range(done, shard.nbytes, step):
                hi = min(lo + step, shard.nbytes)
                data = self.files.read(shard.file, shard.offset + lo, shard.offset + hi).result()
                if data.size < hi - lo:
                    raise CorruptCheckpointError(f"{self._where(shard)}: the file is truncated")
                crc = checksum(data, crc)
            if crc != shard.crc32c[0]:
                raise CorruptCheckpointError(f"{self._where(shard)}: crc32c mismatch (the data is corrupt)")
        self._running.clear()

    def _where(self, shard: StoredShard) -> str:
        return f"{join(self.directory.path, self.files.names[shard.file])} (leaf {self.names[id(shard)]!r})"

    def verified(self, read: Read, span: _Span, dtype: np.dtype) -> np.ndarray:
        """The rows of the read, as an array of the stored dtype (read-only view)."""
        if self.observer is not None:
            self.observer.on_use(read)
        data = span.bytes(functools.partial(self._where, read.shard))  # verified by _check
        first = read.shard.offset + read.row_start * read.row_bytes - span.start
        rows = data[first : first + read.nbytes]
        return rows.view(dtype.newbyteorder("<")).reshape(read.rows_shape)


class _Span:
    """One ranged read of a data file, resolved once into a uint8 array.

    check: verifies the bytes on first use, when the read did not verify them.
    """

    def __init__(
        self, future: Any, start: int, end: int, check: Callable[[np.ndarray], np.ndarray] | None = None
    ):
        self.future, self.start, self.end, self.check = future, start, end, check
        self.direct = False  # read into the bytes of its destination (Fetcher.issue)
        self._data: np.ndarray | None = None

    def bytes(self, where: Callable[[], str]) -> np.ndarray:
        """The bytes; where() names the file and leaf in an error."""
        if self._data is None:
            try:
                data = self.future.result()
            except (CorruptCheckpointError, StorageError):
                raise
            except FileNotFoundError as e:
                raise CorruptCheckpointError(f"{where()}: the data file is missing") from e
            except Exception as e:  # tensorstore reports a short file as an out-of-range read
                raise CorruptCheckpointError(
                    f"{where()}: cannot read bytes {self.start}..{self.end}: {e}"
                ) from e
            self._data = data if self.check is None else self.check(data)
        return self._data


@functools.partial(jax.jit, donate_argnums=0)
def _write_block(buffer: jax.Array, block: jax.Array, starts: tuple[jax.Array, ...]) -> jax.Array:
    return jax.lax.dynamic_update_slice(buffer, block, starts)


@dataclass
class RestorePlan:
    """What a restore will do, decided before any byte is read."""

    units: list[_Unit]  # one per unique target box (or whole leaf), with its reads
    batches: list[list[_Unit]]  # executed in order; streamed units form batches of their own
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
    on_cpu = _cpu_path(placement)
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


@_gc_pause.pausing
def restore_leaves(
    directory: Store,
    base: str,
    index: Index,
    requests: list[LeafRequest],
    *,
    budget: int | None,
    sequential: bool,
    placement: Placement = Placement.BY_PLATFORM,
    observer: RestoreObserver | None = None,
    min_sequential_bytes: int = MIN_SEQUENTIAL_BYTES,
) -> tuple[list[Any], RestoreTimes]:
    """Restores each request: a jax.Array or numpy array per request, and the timings.

    Args:
      directory: the store holding the checkpoint.
      base: the checkpoint's base name in it.
      index: the checkpoint's index.
      requests: the leaves to restore.
      budget: the host bytes the restore may hold (max_host_bytes); None: the default.
      sequential: restore_sequentially: keep host memory within the budget.
      placement: the path each leaf takes onto its devices (see Placement).
      observer: told of the restore's reads, placements and landings as they
        happen (see RestoreObserver); None: nothing is told.
      min_sequential_bytes: see plan_restore.

    Raises:
      ValueError: restore_sequentially with a budget it cannot keep.
      CorruptCheckpointError: stored bytes disagree with the index.
      CheckpointNotFoundError: the checkpoint was deleted while it was read.
    """
    began = time.perf_counter()
    plan = plan_restore(
        requests,
        index.checksums,
        budget=budget,
        sequential=sequential,
        placement=placement,
        min_sequential_bytes=min_sequential_bytes,
    )
    on_cpu = _cpu_path(placement)
    names = {id(s): req.entry.name for req in requests for s in req.entry.shards}
    units, batches, budget = plan.units, plan.batches, plan.budget
    # A capped restore reuses its read buffers from batch to batch, within its cap.
    pool = BufferPool(budget * (plan.ahead + 1)) if sequential else None
    allocate = aligned_empty if pool is None else _capped(pool)
    fetcher = Fetcher(directory, base, index, names, allocate, observer)
    times = RestoreTimes(plan_seconds=time.perf_counter() - began)

    results = _Results(units, on_cpu, observer)
    issued: deque[_Issued] = deque()
    try:
        for k, batch in enumerate(batches):
            if k in plan.streamed:
                while issued:  # the batches in flight first: the stream has the whole budget
                    _run_batch(issued.popleft(), requests, fetcher, results)
                _stream_units(batch, requests, fetcher, results, budget * (plan.ahead + 1))
                continue
            issued.append(_issue(batch, requests, fetcher, on_cpu))
            if len(issued) > plan.ahead:
                _run_batch(issued.popleft(), requests, fetcher, results)
        while issued:
            _run_batch(issued.popleft(), requests, fetcher, results)
        fetcher.finish()
    except CorruptCheckpointError as e:
        gone = index.commit_key is not None and not directory.exists(index.commit_key)
        if isinstance(e.__cause__, FileNotFoundError) and gone:
            # The index was there when the restore began: a Saver's retention deleted
            # this checkpoint while it was being read (an evaluator trailing a trainer).
            raise CheckpointNotFoundError(
                f"{join(directory.path, base)} was deleted while it was being read (the retention of "
                "the Saver writing this directory removed it); restore a newer checkpoint "
                "(latest_checkpoint), or keep more with a larger max_to_keep"
            ) from e
        raise
    finally:
        if pool is not None:
            pool.close()
    values = results.finish(requests)
    times.place_seconds = results.place_seconds
    return values, times


def _capped(pool: BufferPool) -> Callable[[int], np.ndarray]:
    """The read buffers of a capped restore: from the pool, whose buffers are reused
    and never held beyond the cap; small ones from malloc, which reuses them too
    (a mapping per small buffer cost a system call each)."""

    def allocate(nbytes: int) -> np.ndarray:
        return aligned_empty(nbytes) if nbytes < SMALL_BUFFER_BYTES else pool.take(nbytes)

    return allocate


def _host_assembly(unit: _Unit, req: LeafRequest, on_cpu: _OnCpu) -> int:
    """The host bytes a unit's assembly holds beyond the result: none where a CPU
    device adopts the assembled buffer as its own (on CPU, device memory is host
    memory, and the restored arrays are not the restore's transient memory)."""
    return 0 if _adopted(req, on_cpu) else unit.assembly_bytes(req.entry.dtype.itemsize)


def _adopted(req: LeafRequest, on_cpu: _OnCpu) -> bool:
    """Whether CPU devices adopt the buffers a restore assembles (or reads) for the
    leaf as the restored array's own: a leaf restored as saved, in its dtype."""
    return (
        req.sharding is not None
        and on_cpu(req.sharding)
        and req.dtype == req.entry.dtype
        and req.shape == req.entry.shape
    )


def _streamed(
    unit: _Unit,
    requests: list[LeafRequest],
    budget: int,
    sequential: bool,
    checks: Checksums,
    chunks: dict[tuple[int, int], int] | None = None,
    on_cpu: _OnCpu = _on_cpu,
) -> bool:
    """Whether the restore streams the unit through its device buffers, read by read.

    On accelerators, a default restore streams units larger than half a batch too:
    there the stream overlaps each block's copy to the device with the next reads,
    where a batch reads the whole unit into fresh host memory first and then copies
    it (3x slower for a 1 GiB leaf on an H200, measured by benchmarks/gpu_check.py).

    chunks: the unit's _chunks, where the caller has them already.
    on_cpu: whether a leaf takes the CPU path (_cpu_path of the restore's placement).
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


def _chunks(unit: _Unit, checks: Checksums) -> dict[tuple[int, int], int]:
    """The checksum units the unit's reads cover (a read is widened to them): key -> bytes."""
    covered = {}
    for read in unit.reads:
        if checks.whole_shards:  # a batch reads the shard whole
            covered[read.shard.file, read.shard.offset] = read.shard.nbytes
            continue
        c = checks.chunk_bytes
        a, b = _span(read, checks)
        for j in checks.units(read.shard, a, b):
            covered[read.shard.file, read.shard.offset + j * c] = min(c, read.shard.nbytes - j * c)
    return covered


def _batches(
    units: list[_Unit],
    requests: list[LeafRequest],
    budget: int,
    sequential: bool,
    checks: Checksums,
    on_cpu: _OnCpu,
) -> Iterator[tuple[list[_Unit], bool]]:
    """Consecutive units whose host bytes fit the budget: what they read, each chunk
    counted once (units that share stored rows read them once), and their assembly;
    each batch with whether it is streamed.

    A unit too large for a batch is streamed; on CPU devices its neighbours of the
    same leaf that share stored rows with it stream with it, so those rows are
    read once for all of them.
    """
    batch: list[_Unit] = []
    held: dict[tuple[int, int], int] = {}
    used = 0
    streaming: list[_Unit] = []  # a group of streamed units
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


def _aligned_array(
    shape: tuple[int, ...], dtype: np.dtype, allocate: Callable[[int], np.ndarray]
) -> np.ndarray:
    return allocate(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)


def _assembly(unit: _Unit, req: LeafRequest, fetcher: Fetcher, on_cpu: _OnCpu) -> np.ndarray:
    """An empty buffer for the unit's box, in the stored dtype. One that becomes the
    restored array is the result's memory, from malloc (which reuses what earlier
    arrays freed); the others are transient."""
    allocate = aligned_empty if _adopted(req, on_cpu) else fetcher.allocate
    return _aligned_array(box_shape(unit.box), req.entry.dtype, allocate)


@dataclass
class _Issued:
    """A batch whose reads are in flight."""

    units: list[_Unit]
    spans: dict[int, _Span]  # id(read) -> the span that holds it
    outs: dict[int, np.ndarray]  # id(unit) -> its assembly, where reads land in it directly


def _issue(batch: list[_Unit], requests: list[LeafRequest], fetcher: Fetcher, on_cpu: _OnCpu) -> _Issued:
    """Starts a batch's reads. A read of whole rows of its unit's box that lands
    there as it is (see Fetcher.issue) is read into the unit's assembly, allocated
    now, so that nothing copies it there afterwards."""
    owner = {id(r): unit for unit in batch for r in unit.reads}
    outs: dict[int, np.ndarray] = {}

    def destination(read: Read) -> np.ndarray | None:
        unit = owner[id(read)]
        if not _whole_rows(read) or (len(unit.reads) == 1 and read.fills_target):  # the read is the array
            return None
        if id(unit) not in outs:
            outs[id(unit)] = _assembly(unit, requests[unit.request], fetcher, on_cpu)
        return outs[id(unit)][read.dst].reshape(-1).view(np.uint8)

    spans = fetcher.issue([r for unit in batch for r in unit.reads], destination)
    return _Issued(batch, spans, outs)


def _whole_rows(read: Read) -> bool:
    """Whether the read lands, as it is, in whole consecutive rows of its box (a
    contiguous part of it)."""
    return bool(read.dst) and read.nbytes > 0 and all(s == slice(None) for s in (*read.src, *read.dst[1:]))


def _assemble(
    unit: _Unit,
    req: LeafRequest,
    fetcher: Fetcher,
    spans: dict[int, _Span],
    on_cpu: _OnCpu,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The unit's box from its verified reads (into `out`, where _issue made it)."""
    dtype = req.entry.dtype
    if len(unit.reads) == 1 and unit.reads[0].fills_target:
        read = unit.reads[0]
        rows = fetcher.verified(read, spans[id(read)], dtype)
        if not on_cpu(req.sharding) or rows.ctypes.data % 64 == 0:
            # An accelerator copies it to the device anyway; a CPU device adopts an
            # aligned buffer as it is (local reads land aligned: shards start at
            # multiples of 64 bytes in their files).
            return rows
        # Otherwise one copy into an aligned buffer that becomes the device buffer is
        # cheaper than letting jax copy into freshly allocated device memory.
        out = _assembly(unit, req, fetcher, on_cpu)
        np.copyto(out, rows)
        return out
    if out is None:
        out = _assembly(unit, req, fetcher, on_cpu)
    for read in unit.reads:
        span = spans[id(read)]
        rows = fetcher.verified(read, span, dtype)[read.src]
        if span.direct:
            _land(out[read.dst], rows, read, fetcher.observer)
        else:
            out[read.dst] = rows
    return out


def _land(target: np.ndarray, rows: np.ndarray, read: Read, observer: RestoreObserver | None) -> None:
    """Copies a read's rows into their place, unless they were read there (a direct read)."""
    in_place = rows.ctypes.data == target.ctypes.data
    if not in_place:
        target[...] = rows
    if observer is not None:
        observer.on_land(read, in_place)


def _run_batch(issued: _Issued, requests: list[LeafRequest], fetcher: Fetcher, results: _Results) -> None:
    pieces: dict[int, dict[Box, np.ndarray]] = {}
    holders: dict[int, dict[Box, tuple[jax.Device, ...]]] = {}
    for unit in issued.units:
        req = requests[unit.request]
        array = _assemble(unit, req, fetcher, issued.spans, results.on_cpu, issued.outs.get(id(unit)))
        if req.shape != req.entry.shape and req.box is None:
            array = array.reshape(req.shape)
        if req.dtype != req.entry.dtype:
            array = array.astype(req.dtype)
        results.remaining[unit.request] -= 1
        if req.sharding is None:
            results.done[unit.request] = array if array.flags.writeable else array.copy()
            continue
        for devices, tbox in unit.placements:
            box = unit.box if tbox is None else tbox
            pieces.setdefault(unit.request, {})[box] = array if tbox is None else array[_target_index(tbox)]
            holders.setdefault(unit.request, {})[box] = devices
    for request, by_box in pieces.items():
        results.place(request, requests[request], by_box, holders[request])


def _read_ahead(
    reads: list[Read],
    fetcher: Fetcher,
    dtype: np.dtype,
    limit: int,
    into: dict[int, np.ndarray] | None = None,
    adopted: bool = False,
) -> Iterator[tuple[Read, np.ndarray]]:
    """Each read's verified rows, in order, with the next reads in flight meanwhile:
    as many as `limit` bytes hold (at least one), so a cold disk keeps working.

    into: read id -> the bytes of its destination, where it lands directly (see issue).
    adopted: those destinations are the restored arrays (a CPU device adopts them), so
    a read landing there holds no transient memory; DEFAULT_INFLIGHT_BYTES of them
    are in flight, as in a default restore.
    """
    waiting = deque(reads)
    # (read, span, its transient bytes, its bytes landing in a restored array)
    in_flight: deque[tuple[Read, _Span, int, int]] = deque()
    held = landing = 0

    def lands(read: Read) -> bool:  # as Fetcher.issue decides
        return adopted and into is not None and id(read) in into and read.nbytes >= MIN_DIRECT_BYTES

    def room(read: Read) -> bool:
        if lands(read):
            return landing + read.nbytes <= DEFAULT_INFLIGHT_BYTES
        return held + _held(read, fetcher.checks) <= limit

    while waiting or in_flight:
        while waiting and (not in_flight or room(waiting[0])):
            read = waiting.popleft()
            span = fetcher.stream(read, None if into is None else into.get(id(read)))
            if adopted and span.direct:
                in_flight.append((read, span, 0, read.nbytes))
            else:
                in_flight.append((read, span, _held(read, fetcher.checks), 0))
            held += in_flight[-1][2]
            landing += in_flight[-1][3]
        read, span, transient, landed = in_flight.popleft()
        yield read, fetcher.verified(read, span, dtype)
        del span
        held -= transient
        landing -= landed


def _held(read: Read, checks: Checksums) -> int:
    """The bytes a streamed read holds: its checksum chunks, or itself where a shard has
    one checksum (see Fetcher.stream)."""
    if checks.whole_shards:
        return read.nbytes
    a, b = _span(read, checks)
    return b - a


def _stream_units(
    units: list[_Unit], requests: list[LeafRequest], fetcher: Fetcher, results: _Results, budget: int
) -> None:
    """Streams units too large for a batch into their device buffers, read by read."""
    req = requests[units[0].request]
    dtype = req.entry.dtype
    if results.on_cpu(req.sharding):
        # A CPU device adopts an aligned host buffer as its own: fill the final buffers
        # in place, with the whole budget for reads in flight. Units of one leaf that
        # need the same stored rows (a group from _batches) share each read.
        adopted = _adopted(req, results.on_cpu)
        allocate = aligned_empty if adopted else fetcher.allocate
        outs = [_aligned_array(box_shape(u.box), dtype, allocate) for u in units]
        consumers: dict[tuple[int, int, int], list[tuple[int, Read]]] = {}
        for k, unit in enumerate(units):
            for read in unit.reads:
                consumers.setdefault((id(read.shard), read.row_start, read.nbytes), []).append((k, read))
        unique = [uses[0][1] for uses in consumers.values()]
        # A read that only one unit needs, of whole rows and not widened to its checksum
        # chunks, lands in that unit's buffer (streamed reads are issued one at a time).
        into = {}
        for uses in consumers.values():
            k, read = uses[0]
            a, b = fetcher.absolute_span(read)
            if len(uses) == 1 and b - a == read.nbytes and _whole_rows(read):
                into[id(read)] = outs[k][read.dst].reshape(-1).view(np.uint8)
        for read, rows in _read_ahead(unique, fetcher, dtype, budget, into, adopted=adopted):
            for k, use in consumers[id(read.shard), read.row_start, read.nbytes]:
                _land(outs[k][use.dst], rows[use.src], use, fetcher.observer)
        for unit, out in zip(units, outs):
            ((targets, _),) = unit.placements
            results.remaining[unit.request] -= 1
            results.place(
                unit.request, req, {unit.box: out.astype(req.dtype, copy=False)}, {unit.box: targets}
            )
        return
    # Blocks small enough that several are in flight while one is copied to the devices
    # (a default restore plans a stored shard as one read).
    block_bytes = min(MAX_SPAN_BYTES, max(1, budget // 4))
    # The last quarter of the budget is the blocks on their way to the devices: as many
    # copies in flight as it holds, each waited for only when that many are newer.
    in_flight = max(1, budget // 4 // block_bytes)
    for unit in units:
        ((targets, _),) = unit.placements
        reads = unit.reads
        if any(r.nbytes > block_bytes for r in reads):
            reads = plan_reads(req.entry.shards, unit.box, dtype.itemsize, block_bytes)
        buffers = {d: jnp.zeros(box_shape(unit.box), req.dtype, device=d) for d in targets}
        copies: deque[jax.Array] = deque()
        for read, rows in _read_ahead(reads, fetcher, dtype, budget * 3 // 4):
            block = np.ascontiguousarray(rows[read.src], dtype=req.dtype)
            starts = tuple(np.int32(s.start or 0) for s in read.dst)
            for d in targets:
                copies.append(jax.device_put(block, d))
                buffers[d] = _write_block(buffers[d], copies[-1], starts)
                while len(copies) > in_flight:  # bounds the host copies jax holds for them
                    copies.popleft().block_until_ready()
            del rows, block
        jax.block_until_ready(list(buffers.values()))
        results.remaining[unit.request] -= 1
        results.partial.setdefault(unit.request, {}).update(buffers)
        if results.observer is not None:
            results.observer.on_place(req, last=results.remaining[unit.request] == 0)
