"""Assembles verified reads into target boxes and puts them on their devices.

On the CPU path the assembled host buffer (or a read that is exactly a target
shard) becomes the device buffer without a copy; on the accelerator path host
buffers are copied to the devices (restore.plan.Placement).
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from shardsave.index import Box, box_shape, index_box
from shardsave.restore.fetch import Fetcher, RestoreObserver, Span
from shardsave.restore.plan import LeafRequest, OnCpu, Unit, adopts
from shardsave.restore.reads import Read
from shardsave.storage.buffers import aligned_empty


def target_index(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


class Results:
    """What the batches produce, and the leaves still waiting for more of them."""

    def __init__(
        self,
        units: list[Unit],
        on_cpu: OnCpu,
        observer: RestoreObserver | None,
    ):
        self.on_cpu = on_cpu  # whether a leaf takes the CPU path (cpu_path)
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
        if adopts(req, self.on_cpu):
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


@functools.partial(jax.jit, donate_argnums=0)
def write_block(buffer: jax.Array, block: jax.Array, starts: tuple[jax.Array, ...]) -> jax.Array:
    return jax.lax.dynamic_update_slice(buffer, block, starts)


def aligned_array(
    shape: tuple[int, ...], dtype: np.dtype, allocate: Callable[[int], np.ndarray]
) -> np.ndarray:
    return allocate(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)


def assembly(unit: Unit, req: LeafRequest, fetcher: Fetcher, on_cpu: OnCpu) -> np.ndarray:
    """An empty buffer for the unit's box, in the stored dtype. One that becomes the
    restored array is the result's memory, from malloc (which reuses what earlier
    arrays freed); the others are transient."""
    allocate = aligned_empty if adopts(req, on_cpu) else fetcher.allocate
    return aligned_array(box_shape(unit.box), req.entry.dtype, allocate)


def whole_rows(read: Read) -> bool:
    """Whether the read lands, as it is, in whole consecutive rows of its box (a
    contiguous part of it)."""
    return bool(read.dst) and read.nbytes > 0 and all(s == slice(None) for s in (*read.src, *read.dst[1:]))


def assemble(
    unit: Unit,
    req: LeafRequest,
    fetcher: Fetcher,
    spans: dict[int, Span],
    on_cpu: OnCpu,
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
        out = assembly(unit, req, fetcher, on_cpu)
        np.copyto(out, rows)
        return out
    if out is None:
        out = assembly(unit, req, fetcher, on_cpu)
    for read in unit.reads:
        span = spans[id(read)]
        rows = fetcher.verified(read, span, dtype)[read.src]
        if span.direct:
            land(out[read.dst], rows, read, fetcher.observer)
        else:
            out[read.dst] = rows
    return out


def land(target: np.ndarray, rows: np.ndarray, read: Read, observer: RestoreObserver | None) -> None:
    """Copies a read's rows into their place, unless they were read there (a direct read)."""
    in_place = rows.ctypes.data == target.ctypes.data
    if not in_place:
        target[...] = rows
    if observer is not None:
        observer.on_land(read, in_place)
