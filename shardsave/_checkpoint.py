"""A checkpoint as stored: its index built from a save plan, and its data files by offset.

The index is built from the plan and the checksums the processes computed, and
is checked by the reader's own validation before anything commits. A data file
is one object, `P.data-KKKKK-of-NNNNN`, or, when it is larger than the part
size, numbered parts `P.data-KKKKK-of-NNNNN.part-JJJJJ` holding its consecutive
byte ranges (FORMAT.md). Offsets in the index are offsets in the logical file;
this module maps them onto the objects, for writing and reading.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from functools import partial
from itertools import accumulate
from typing import Any

import numpy as np

from . import _format, _gc_pause
from ._format import DataFile, Index, LeafEntry, StoredShard
from ._plan import SavePlan
from ._storage import Store, aligned_empty, temp_target
from .errors import CorruptCheckpointError, SaveFailedError


@_gc_pause.pausing
def build_index(
    plan: SavePlan,
    crcs: dict[int, list[tuple[int, ...]]],
    step: int | None,
    created: float,
    structure: Any,
    chunk: int,
    part_bytes: int,
    metrics: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    recorded: bool = True,
) -> Index:
    """The index of a saved plan: each planned shard with its file, offset and checksums."""
    shards: list[list[StoredShard]] = [[] for _ in plan.leaves]
    for k, f in enumerate(plan.files):
        for shard, crc in zip(f.shards, crcs[k]):
            start = tuple(a for a, _ in shard.box)
            stop = tuple(b for _, b in shard.box)
            shards[shard.leaf].append(StoredShard(k, shard.offset, shard.nbytes, start, stop, crc))
    leaves = tuple(
        LeafEntry(
            name=spec.name,
            dtype=spec.dtype,
            shape=spec.shape,
            kind=spec.kind,
            sharding=None if spec.sharding is None else _format.encode_sharding(spec.sharding),
            shards=tuple(s),
            key_impl=spec.key_impl,
        )
        for spec, s in zip(plan.leaves, shards)
    )
    files = tuple(
        DataFile(f.nbytes, f.device_id, f.process_index, _format.split_parts(f.nbytes, part_bytes))
        for f in plan.files
    )
    return Index(
        step, created, chunk, files, structure, leaves, metrics=metrics, metadata=metadata, recorded=recorded
    )


def encode_checked(index: Index, where: str) -> bytes:
    """The index's bytes, checked by the reader's own validation: never commit what it refuses."""
    raw = _format.encode_index(index)
    try:
        _format.decode_index(raw, where)
    except CorruptCheckpointError as e:
        raise SaveFailedError(
            f"{where}: shardsave built an index that its own reader refuses, so nothing was "
            f"committed (please report this as a bug, with the tree's structure): {e}"
        ) from e
    return raw


class Listing:
    """A directory's keys grouped by the checkpoint they belong to: the one place that reads names.

    Attributes:
      keys: every key, sorted.
      committed: checkpoint names with an index (committed checkpoints).
      data: checkpoint name -> its data objects (files and parts), whether committed or not.
      temps: checkpoint name -> temporary files of interrupted writes of its index or data.
    """

    def __init__(self, keys: list[str]):
        self.keys = keys
        self.committed: set[str] = set()
        self.data: dict[str, list[str]] = {}
        self.temps: dict[str, list[str]] = {}
        for key in keys:
            written = temp_target(key)
            if written is not None:
                parsed = _format.parse_data_key(written)
                base = parsed[0] if parsed else written.removesuffix(_format.INDEX_SUFFIX)
                if base != written:  # a data file's or an index's, not another file's
                    self.temps.setdefault(base, []).append(key)
            elif (parsed := _format.parse_data_key(key)) is not None:
                self.data.setdefault(parsed[0], []).append(key)
            elif key.endswith(_format.INDEX_SUFFIX):
                self.committed.add(key[: -len(_format.INDEX_SUFFIX)])

    @classmethod
    def of(cls, store: Store) -> Listing:
        return cls(store.list())

    def checkpoints(self) -> list[str]:
        """Every checkpoint name that has an index or data objects, sorted."""
        return sorted(self.committed | set(self.data))

    def files_of(self, base: str) -> list[str]:
        """Every data object and temporary file of checkpoint base (not its index)."""
        return self.data.get(base, []) + self.temps.get(base, [])

    def leftovers(self, names: re.Pattern[str]) -> list[str]:
        """Data objects of uncommitted checkpoints whose names match, and temporary files of any."""
        out = [
            k
            for base, keys in self.data.items()
            if base not in self.committed and names.fullmatch(base)
            for k in keys
        ]
        out += [k for base, keys in self.temps.items() if names.fullmatch(base) for k in keys]
        return sorted(out)


def write_data_file(
    directory: Store, base: str, k: int, n: int, data: bytes, parts: tuple[int, ...] | None, publish: bool
) -> list[Any]:
    """Starts writing data file k (its parts, if any); returns one future per object."""
    if parts is None:
        return [directory.write(_format.data_key(base, k, n), data, publish=publish)]
    view = memoryview(data)
    keys = _format.data_keys(base, k, n, parts)
    starts = [0, *accumulate(parts)]
    return [directory.write(key, view[a:b], publish=publish) for key, a, b in zip(keys, starts, starts[1:])]


def into_region(region: np.ndarray, nbytes: int) -> np.ndarray:
    """An `allocate` for reads that land in a given buffer: partial(into_region, buffer)."""
    return region[:nbytes]


class _JoinedRead:
    """Reads of consecutive parts landing in one buffer, seen as one future."""

    def __init__(
        self,
        futures: list[Any],
        regions: list[np.ndarray],
        buffer: np.ndarray,
        then: Callable[[np.ndarray], np.ndarray] | None,
    ):
        self._futures, self._regions, self._buffer, self._then = futures, regions, buffer, then

    def result(self) -> np.ndarray:
        done = 0
        for future, region in zip(self._futures, self._regions):
            data = future.result()
            if data.size and data.ctypes.data != region.ctypes.data:  # stores that return new buffers
                region[: data.size] = data
            done += data.size
            if data.size < region.size:  # a short part: the data stops here, as in a short file
                break
        data = self._buffer[:done]
        return data if self._then is None else self._then(data)


class DataFiles:
    """The data files of one committed checkpoint, read by logical offset."""

    def __init__(self, directory: Store, base: str, index: Index):
        self.directory = directory
        n = len(index.files)
        self._keys = [
            [f.key] if f.key else _format.data_keys(base, k, n, f.parts) for k, f in enumerate(index.files)
        ]
        self._starts = [[0, *accumulate(f.parts)] if f.parts else [0] for f in index.files]
        # For messages: the file names, a foreign format's own (safetensors) where it has them.
        self.names = [f.key or _format.data_key(base, k, n) for k, f in enumerate(index.files)]

    def read(
        self,
        k: int,
        start: int,
        stop: int,
        then: Callable[[np.ndarray], np.ndarray] | None = None,
        allocate: Callable[[int], np.ndarray] = aligned_empty,
    ) -> Any:
        """A future of bytes [start, stop) of data file k (see Store.read_range)."""
        keys, starts = self._keys[k], self._starts[k]
        if len(keys) == 1:
            return self.directory.read_range(keys[0], start, stop, then, allocate)
        last_part = len(keys) - 1
        first = min(bisect.bisect_right(starts, start) - 1, last_part)
        last = min(max(bisect.bisect_right(starts, stop - 1) - 1, first), last_part)
        if first == last:
            offset = starts[first]
            return self.directory.read_range(keys[first], start - offset, stop - offset, then, allocate)
        # The range crosses parts: each part's read lands in its place in one buffer.
        buffer = allocate(stop - start)
        futures, regions = [], []
        for j in range(first, last + 1):
            a, b = max(start, starts[j]), min(stop, starts[j + 1])
            region = buffer[a - start : b - start]
            futures.append(
                self.directory.read_range(
                    keys[j], a - starts[j], b - starts[j], allocate=partial(into_region, region)
                )
            )
            regions.append(region)
        return _JoinedRead(futures, regions, buffer, then)
