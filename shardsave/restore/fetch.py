"""Verified reads of a checkpoint's data files: what a restore and CheckpointReader.verify read.

Every byte read is checked against the index (crc32c per checksum chunk, or one
checksum per stored shard) before anything uses it; a mismatch raises
CorruptCheckpointError naming the file and the leaf.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from shardsave.errors import CorruptCheckpointError, StorageError
from shardsave.index import Index, StoredShard, checksum
from shardsave.restore.files import DataFiles, into_region
from shardsave.restore.plan import MAX_SPAN_BYTES, LeafRequest, read_span
from shardsave.restore.reads import Read
from shardsave.storage.base import Store, join

# CheckpointReader.verify reads a shard in pieces of at most this many bytes.
VERIFY_READ_BYTES = 64 << 20


# A span whose checksum chunks average at least this many bytes is verified by the
# I/O thread that read it; smaller chunks are verified by the caller on first use.
MIN_THREAD_CHECK_BYTES = 1 << 20


# A read lands directly in its destination from this size: below it, the copy it
# saves costs less than the bookkeeping (restores of many small leaves).
MIN_DIRECT_BYTES = 1 << 20


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
      name_shards: errors name the stored shard's box beside its leaf.
    """

    def __init__(
        self,
        directory: Store,
        base: str,
        index: Index,
        names: dict[int, str],
        allocate: Callable[[int], np.ndarray],
        observer: RestoreObserver | None = None,
        name_shards: bool = False,
    ):
        self.directory = directory
        self.observer = observer
        self.allocate = allocate  # host buffers of reads, and of assemblies that are not results
        self.index = index
        self.checks = index.checksums
        self.names = names  # id(StoredShard) -> leaf name, for error messages
        self.name_shards = name_shards  # errors name each shard's box too (verify: a line per shard)
        self.files = DataFiles(directory, base, index)
        self._running: dict[int, list[Any]] = {}  # id(shard) -> [shard, bytes verified so far, their crc]

    def absolute_span(self, read: Read) -> tuple[int, int]:
        a, b = read_span(read, self.checks)
        return read.shard.offset + a, read.shard.offset + b

    def _read(
        self,
        file: int,
        start: int,
        end: int,
        reads: list[Read],
        allocate: Callable[[int], np.ndarray] | None = None,
    ) -> Span:
        allocate = allocate or self.allocate
        chunks = {}  # (shard, chunk number) of every chunk the reads touch, once each
        for read in reads:
            a, b = read_span(read, self.checks)
            for j in self.checks.units(read.shard, a, b):
                chunks[id(read.shard), j] = read.shard
        check = functools.partial(self._check, start, [(shard, j) for (_, j), shard in chunks.items()])
        if end - start < len(chunks) * MIN_THREAD_CHECK_BYTES:
            # Many small chunks: the checking loop is Python that would hold the GIL on
            # the I/O thread while the caller waits for it; check on first use instead.
            future = self.files.read(file, start, end, allocate=allocate)
            return Span(future, start, end, check)
        future = self.files.read(file, start, end, check, allocate)
        return Span(future, start, end)

    def _check(self, start: int, chunks: list[tuple[StoredShard, int]], data: np.ndarray) -> np.ndarray:
        """Verifies the length and crc32c of each chunk in a span's data (read from `start`)."""
        for shard, j in chunks:
            problem = self.checks.problem(data, start, shard, j)
            if problem is not None:
                raise CorruptCheckpointError(f"{self._where(shard)}: {problem}")
        return data

    def issue(
        self, reads: list[Read], destination: Callable[[Read], np.ndarray | None] | None = None
    ) -> dict[int, Span]:
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
    ) -> dict[int, Span]:
        """issue, without telling the observer (stream tells it itself)."""
        by_file: dict[int, list[tuple[int, int, Read]]] = {}
        handles: dict[int, Span] = {}
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
        handles: dict[int, Span],
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

    def stream(self, read: Read, into: np.ndarray | None = None) -> Span:
        """Starts one read of a streamed unit (it holds held_bytes(read, checks) bytes), into
        its destination's bytes where given (see issue)."""
        if self.observer is not None:
            self.observer.on_read((read,), streamed=True)
        if not self.checks.whole_shards:
            return self._start_reads([read], None if into is None else lambda _: into)[id(read)]
        rel = read.row_start * read.row_bytes
        start = read.shard.offset + rel
        allocate = self.allocate if into is None else functools.partial(into_region, into)
        future = self.files.read(read.shard.file, start, start + read.nbytes, allocate=allocate)
        span = Span(
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
        while self._running:  # each shard is checked once, also when one fails
            _, (shard, done, crc) = self._running.popitem()
            step = MAX_SPAN_BYTES
            for lo in range(done, shard.nbytes, step):
                hi = min(lo + step, shard.nbytes)
                data = self.files.read(shard.file, shard.offset + lo, shard.offset + hi).result()
                if data.size < hi - lo:
                    raise CorruptCheckpointError(f"{self._where(shard)}: the file is truncated")
                crc = checksum(data, crc)
            if crc != shard.crc32c[0]:
                raise CorruptCheckpointError(f"{self._where(shard)}: crc32c mismatch (the data is corrupt)")

    def _where(self, shard: StoredShard) -> str:
        path = join(self.directory.path, self.files.names[shard.file])
        box = f", shard {shard.start}..{shard.stop}" if self.name_shards else ""
        return f"{path} (leaf {self.names[id(shard)]!r}{box})"

    def verify_shard(self, shard: StoredShard, progress: Callable[[int], None] | None = None) -> None:
        """Reads every byte of a stored shard, piece by piece, and verifies it as a restore does.

        Pieces of at most VERIFY_READ_BYTES end on checksum chunks; where the shard
        has one checksum, it is carried from piece to piece (see stream).

        Args:
          shard: the shard (one whose leaf `names` knows).
          progress: called with the bytes checked after each piece.

        Raises:
          CorruptCheckpointError: naming the file and the leaf.
          StorageError: the store did not answer within its deadline.
        """
        checks, where = self.checks, functools.partial(self._where, shard)
        if checks.whole_shards:
            step = VERIFY_READ_BYTES
            self._running[id(shard)] = [shard, 0, 0]  # an empty shard is checked too
        else:
            step = max(checks.chunk_bytes, VERIFY_READ_BYTES // checks.chunk_bytes * checks.chunk_bytes)
        try:
            for lo in range(0, shard.nbytes, step):
                hi = min(lo + step, shard.nbytes)
                start, end = shard.offset + lo, shard.offset + hi
                if checks.whole_shards:
                    check = functools.partial(self._carry, shard, lo, hi - lo)
                else:
                    units = checks.units(shard, lo, hi)
                    check = functools.partial(self._check, start, [(shard, j) for j in units])
                Span(self.files.read(shard.file, start, end), start, end, check).bytes(where)
                if progress is not None:
                    progress(hi - lo)
        except BaseException:
            self._running.pop(id(shard), None)  # the next shard's finish() must not see it
            raise
        self.finish()

    def verified(self, read: Read, span: Span, dtype: np.dtype) -> np.ndarray:
        """The rows of the read, as an array of the stored dtype (read-only view)."""
        if self.observer is not None:
            self.observer.on_use(read)
        data = span.bytes(functools.partial(self._where, read.shard))  # verified by _check
        first = read.shard.offset + read.row_start * read.row_bytes - span.start
        rows = data[first : first + read.nbytes]
        return rows.view(dtype.newbyteorder("<")).reshape(read.rows_shape)


class Span:
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
