"""Compressed shardsave data files: each checksum chunk of a shard a zstd frame of its own.

A save with Saver(compression="zstd") cuts every shard into its checksum chunks
(CRC_CHUNK_BYTES, the last one shorter), compresses each into one zstd frame, and
stores the frames one after another; the index records each frame's size
(StoredShard.stored) and the CRC-32C of its stored bytes (FORMAT.md, version 3).

A reader sees such a checkpoint through ZstdChunks, a read-only Store whose data
files are the shards' raw bytes at offsets of its own (the logical index that
uncompressed() returns). Reads are planned in whole chunks (Checksums.by_store with
the chunk size: the engine widens every read to them), so a ranged read fetches only
the frames it needs, each verified against its checksum before it is decoded.
Decoding runs on the store's I/O threads (zstandard releases the GIL), so the
frames of the reads in flight decode in parallel while the caller places arrays.

zstandard is an optional dependency (the `zstd` extra); only checkpoints that use
compression need it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any

import numpy as np

from shardsave._threads import Pool
from shardsave.errors import CorruptCheckpointError, StorageError
from shardsave.index import Checksums, DataFile, Index, StoredShard, checksum
from shardsave.storage.base import IOStats, Pending, Store, join
from shardsave.storage.buffers import aligned_empty

DEFAULT_LEVEL = 1  # Saver(compression="zstd"): zstd's fastest standard level

# Logical offsets of shards in a data file start at multiples of this (as the
# writer's uncompressed layout does), so a read of a whole shard lands aligned.
_ALIGN = 64

# Compresses chunks of a save in parallel (zstandard releases the GIL).
_CODEC = Pool("shardsave-zstd", 4)


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as e:
        raise ImportError(
            "zstd compression needs the zstandard package: pip install 'shardsave[zstd]'"
        ) from e
    return zstandard


def check_available() -> None:
    """Raises ImportError (naming the extra to install) where zstandard is missing."""
    _zstd()


def compress_shard(
    data: memoryview, chunk: int, level: int
) -> tuple[list[bytes], tuple[int, ...], tuple[int, ...]]:
    """A shard's raw bytes as zstd frames, one per chunk: (frames, their sizes, their crc32c)."""
    zstandard = _zstd()

    def one(j: int) -> bytes:
        return zstandard.ZstdCompressor(level=level).compress(data[j * chunk : (j + 1) * chunk])

    count = -(-len(data) // chunk)
    if count <= 1:
        frames = [one(j) for j in range(count)]
    else:
        futures = [_CODEC.submit(one, j) for j in range(count)]
        frames = [f.result() for f in futures]
    return frames, tuple(len(f) for f in frames), tuple(checksum(np.frombuffer(f, np.uint8)) for f in frames)


@dataclass(frozen=True)
class _Frame:
    logical: int  # its raw bytes' offset in the logical data file
    nbytes: int  # how many raw bytes it decodes to
    stored: int  # its offset in the stored data file
    size: int  # its stored size
    crc: int  # the CRC-32C of its stored bytes
    shard: StoredShard  # (for messages)
    j: int  # its chunk number in the shard


def uncompressed(store: Store, index: Index) -> tuple[Store, Index]:
    """A compressed checkpoint as its raw bytes: (a ZstdChunks over store, the logical index).

    The logical index lays each data file's shards out raw, one after another at
    64-byte boundaries; its checksums are Checksums.by_store(chunk): ZstdChunks
    verifies every frame it reads against the stored index's checksums.
    """
    chunk = index.checksums.chunk_bytes
    names = {id(s): leaf.name for leaf in index.leaves for s in leaf.shards}
    by_file: list[list[tuple[StoredShard, str]]] = [[] for _ in index.files]
    for leaf in index.leaves:
        for s in leaf.shards:
            by_file[s.file].append((s, leaf.name))
    frames: list[list[_Frame]] = []
    logical_files = []
    moved: dict[int, StoredShard] = {}
    for k, f in enumerate(index.files):
        listed, at = [], 0
        for s, _ in sorted(by_file[k], key=lambda x: x[0].offset):
            at = -(-at // _ALIGN) * _ALIGN
            moved[id(s)] = replace(s, offset=at, stored=None)
            stored = s.offset
            for j, size in enumerate(s.stored or ()):
                n = min(chunk, s.nbytes - j * chunk)
                listed.append(_Frame(at + j * chunk, n, stored, size, s.crc32c[j], s, j))
                stored += size
            at += s.nbytes
        frames.append(listed)
        logical_files.append(DataFile(at, f.device_id, f.process_index, None, key=f.key))
    leaves = tuple(replace(leaf, shards=tuple(moved[id(s)] for s in leaf.shards)) for leaf in index.leaves)
    logical = replace(
        index,
        files=tuple(logical_files),
        leaves=leaves,
        checksums=Checksums.by_store(chunk),
        compression=None,
    )
    return ZstdChunks(store, index, frames, names), logical


class ZstdChunks:
    """The data files of a compressed checkpoint as a read-only Store of their raw bytes.

    Keys are the data files' names (DataFile.key); a data file stored in parts is
    read across them. Other keys (the index) are the underlying store's.
    """

    is_local = False
    copies_writes = False  # (read-only)

    def __init__(self, store: Store, index: Index, frames: list[list[_Frame]], names: dict[int, str]):
        self.path = store.path
        self.timeout_s = store.timeout_s
        self.stats = IOStats()
        self._store = store
        self._keys = [str(f.key) for f in index.files]
        self._files = {key: k for k, key in enumerate(self._keys)}
        self._parts = [
            (
                list(f.part_keys) if f.part_keys else [str(f.key)],
                [0, *accumulate(f.parts)] if f.parts else [0],
            )
            for f in index.files
        ]
        self._frames = frames
        self._starts = [[fr.logical for fr in listed] for listed in frames]
        self._names = names

    def local_path(self, key: str) -> str:
        raise ValueError(f"{join(self.path, key)}: a compressed data file is not read as a local file")

    def read_range(
        self,
        key: str,
        start: int,
        stop: int,
        then: Callable[[np.ndarray], np.ndarray] | None = None,
        allocate: Callable[[int], np.ndarray] = aligned_empty,
    ) -> Pending[np.ndarray]:
        k = self._files.get(key)
        if k is None:
            return self._store.read_range(key, start, stop, then, allocate)
        listed, starts = self._frames[k], self._starts[k]
        first = max(0, bisect.bisect_right(starts, start) - 1)
        last = bisect.bisect_left(starts, stop)  # the frames from here on start at or past stop
        needed = [fr for fr in listed[first:last] if fr.logical + fr.nbytes > start]
        self.stats.add_read(stop - start)
        out = allocate(stop - start)
        if not needed:
            out[:] = 0
            return _Ready(out, then)
        # Frames lie one after another in the stored file: one read covers them all.
        lo, hi = needed[0].stored, needed[-1].stored + needed[-1].size
        decode = _Decode(self, k, needed, start, stop, out, lo, then)
        return _Joined(self._stored_reads(k, lo, hi), decode)

    def _stored_reads(self, k: int, lo: int, hi: int) -> list[Pending[np.ndarray]]:
        """Reads of stored bytes [lo, hi) of data file k, one per part it crosses."""
        keys, starts = self._parts[k]
        reads = []
        j = max(0, bisect.bisect_right(starts, lo) - 1)
        while lo < hi and j < len(keys):
            b = min(hi, starts[j + 1]) if j + 1 < len(starts) else hi  # (one object: no part ends)
            reads.append(self._store.read_range(keys[j], lo - starts[j], b - starts[j]))
            lo, j = b, j + 1
        return reads

    def where(self, k: int, frame: _Frame) -> str:
        name = self._names.get(id(frame.shard), "?")
        return f"{join(self.path, self._keys[k])} (leaf {name!r})"

    # The rest of the Store protocol: a reader reads, it never writes.
    def read_all(self, key: str) -> bytes | None:
        return self._store.read_all(key)

    def exists(self, key: str) -> bool:
        return key in self._files or self._store.exists(key)

    def mtime(self, key: str) -> float | None:
        return self._store.mtime(key)

    def list(self) -> list[str]:
        return self._store.list()

    def write(self, key: str, data: bytes | memoryview, *, publish: bool = True) -> Pending[Any]:
        raise ValueError(f"{self.path}: a compressed checkpoint is read through this store, not written")

    def delete(self, key: str) -> Pending[None]:
        raise ValueError(f"{self.path}: a compressed checkpoint is read through this store, not written")

    def check_parent(self, prefix: str) -> None:
        self._store.check_parent(prefix)

    def lock(self, stem: str, settle: Callable[[], None] | None = None) -> None:
        return None


class _Decode:
    """Verifies and decodes the frames of one read into its buffer (on an I/O thread)."""

    def __init__(
        self,
        files: ZstdChunks,
        k: int,
        frames: list[_Frame],
        start: int,
        stop: int,
        out: np.ndarray,
        stored_at: int,
        then: Callable[[np.ndarray], np.ndarray] | None,
    ):
        self.files, self.k, self.frames = files, k, frames
        self.start, self.stop, self.out, self.stored_at, self.then = start, stop, out, stored_at, then

    def __call__(self, data: np.ndarray) -> np.ndarray:
        zstandard = _zstd()
        out, start = self.out, self.start
        done = start  # logical bytes of the read filled so far
        for fr in self.frames:
            where = self.files.where(self.k, fr)
            if fr.logical > done:  # the gap between two shards
                out[done - start : fr.logical - start] = 0
            a = fr.stored - self.stored_at
            raw = data[a : a + fr.size]
            if raw.size < fr.size:
                raise CorruptCheckpointError(
                    f"{where}: expected {fr.size} bytes at offset {fr.stored}, found {raw.size} "
                    "(the file is truncated)"
                )
            if checksum(raw) != fr.crc:
                raise CorruptCheckpointError(
                    f"{where}: crc32c mismatch in bytes {fr.stored}..{fr.stored + fr.size} (the data is corrupt)"
                )
            try:
                decoded = zstandard.ZstdDecompressor().decompress(raw, max_output_size=fr.nbytes)
            except zstandard.ZstdError as e:
                raise CorruptCheckpointError(
                    f"{where}: bytes {fr.stored}..{fr.stored + fr.size} are not a zstd frame ({e})"
                ) from e
            if len(decoded) != fr.nbytes:
                raise CorruptCheckpointError(
                    f"{where}: chunk {fr.j} decodes to {len(decoded)} bytes, expected {fr.nbytes}"
                )
            lo, hi = max(start, fr.logical), min(self.stop, fr.logical + fr.nbytes)
            view = np.frombuffer(decoded, np.uint8)
            out[lo - start : hi - start] = view[lo - fr.logical : hi - fr.logical]
            done = hi
        if done < self.stop:
            out[done - start :] = 0
        return out if self.then is None else self.then(out)


class _Joined:
    """The stored reads of one logical read, decoded once all have arrived.

    The decode runs on the codec pool as soon as the last stored read is in, so
    that the caller's result() finds the bytes decoded (and verified) already.
    """

    def __init__(self, reads: list[Pending[np.ndarray]], decode: _Decode):
        self._future: Future[np.ndarray] = _CODEC.submit(self._run, reads, decode)
        self._timeout_s = decode.files.timeout_s
        self._what = f"reading {decode.files.path}"

    @staticmethod
    def _run(reads: list[Pending[np.ndarray]], decode: _Decode) -> np.ndarray:
        pieces = [r.result() for r in reads]
        data = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return decode(data)

    def result(self) -> np.ndarray:
        try:
            return self._future.result(timeout=self._timeout_s * 2)
        except TimeoutError:
            raise StorageError(f"{self._what}: no answer within {self._timeout_s * 2:g} s") from None


class _Ready:
    def __init__(self, value: np.ndarray, then: Callable[[np.ndarray], np.ndarray] | None):
        self._value, self._then = value, then

    def result(self) -> np.ndarray:
        return self._value if self._then is None else self._then(self._value)
