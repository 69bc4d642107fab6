"""A checkpoint's data files read by logical offset, across a file's numbered parts."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from functools import partial
from itertools import accumulate
from typing import Any

import numpy as np

from shardsave.index import Index
from shardsave.storage.base import Store
from shardsave.storage.buffers import aligned_empty


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
        if any(f.key is None for f in index.files):
            raise ValueError(f"{base}: the index names no data files; open it with formats.open_checkpoint")
        self._keys = [list(f.part_keys) if f.part_keys else [str(f.key)] for f in index.files]
        self._starts = [[0, *accumulate(f.parts)] if f.parts else [0] for f in index.files]
        self.names = [str(f.key) for f in index.files]  # for messages

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
