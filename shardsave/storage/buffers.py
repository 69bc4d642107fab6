"""Host buffers for reads: page-aligned (for O_DIRECT and for CPU devices to adopt), and a pool
that a capped restore reuses from batch to batch."""

from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np

# A local read of at least this many bytes that the page cache holds none of is read
# with O_DIRECT, straight from the disk into its buffer, where offset, length and
# buffer allow: no CPU copies it out of the page cache (docs/guides/storage.md).
MIN_UNCACHED_READ_BYTES = 1 << 20


DIRECT_IO_ALIGNMENT = 4096  # what O_DIRECT asks of offsets, lengths and memory on common file systems


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialized uint8 buffer whose start is 64-byte aligned, or page-aligned
    from MIN_UNCACHED_READ_BYTES (a read can then land in it from the disk directly).

    jax adopts such a host buffer as a CPU device buffer without copying it, and
    numpy backs large allocations with transparent huge pages.
    """
    alignment = DIRECT_IO_ALIGNMENT if nbytes >= MIN_UNCACHED_READ_BYTES else 64
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes]


def mapped_empty(nbytes: int) -> np.ndarray:
    """A zeroed, page-aligned uint8 buffer in a mapping of its own.

    Its memory goes back to the system as soon as the last view of it is dropped,
    where malloc (behind aligned_empty) keeps freed blocks of up to 32 MiB for
    reuse, outside any budget (a capped restore takes its buffers from a
    BufferPool, which reuses them within its cap).
    """
    if nbytes == 0:
        return np.empty(0, np.uint8)
    return np.frombuffer(_mapping(nbytes), np.uint8)


def _mapping(nbytes: int) -> mmap.mmap:
    block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= 4 << 20:
        block.madvise(mmap.MADV_HUGEPAGE)  # as numpy asks for its own large buffers
    return block


class BufferPool:
    """Mappings that a capped restore reuses for its reads, from batch to batch.

    A fresh mapping is faulted in and zeroed by the kernel on first touch, which
    costs about as much as the read that fills it. A buffer goes back to the pool
    when the last view of it is dropped (a weakref finalizer on the array), so a
    buffer that anything still holds (jax copying it to a device, or a CPU device
    that adopted it as its own) is never handed out again while in use.

    The pool maps a new buffer only when none of the free ones fits, and first
    unmaps free buffers until what it has mapped, in use and free, plus the new
    one is within `limit` (or none is left); a buffer given back is kept only
    within the limit. So it holds no more than `limit`, or what its caller had in
    use at once where that is more. close() unmaps the free buffers and makes
    buffers given back later go back to the system.
    """

    def __init__(self, limit: int):
        self.limit = limit
        # Reentrant: a garbage collection inside take() may drop a buffer and give it back.
        self._lock = threading.RLock()
        self._free: list[mmap.mmap] = []
        self._free_bytes = 0
        self._in_use = 0  # bytes of buffers handed out and not given back yet
        self._closed = False

    def take(self, nbytes: int) -> np.ndarray:
        """A page-aligned uint8 buffer of nbytes, its contents undefined."""
        if nbytes == 0:
            return np.empty(0, np.uint8)
        block = None
        with self._lock:
            # A free buffer up to twice the size asked for fits (reads are whole
            # checksum chunks, so their sizes repeat).
            fits = [b for b in self._free if nbytes <= len(b) <= 2 * nbytes]
            if fits:
                block = min(fits, key=len)
                self._free.remove(block)
                self._free_bytes -= len(block)
            else:
                self._free.sort(key=len)
                while self._free and self._in_use + self._free_bytes + nbytes > self.limit:
                    self._free_bytes -= len(self._free.pop())  # unmapped once unreferenced
            self._in_use += len(block) if block is not None else nbytes
        if block is None:
            block = _mapping(nbytes)
        array = np.frombuffer(block, np.uint8, count=nbytes)
        weakref.finalize(array, self._give_back, block)
        return array

    def _give_back(self, block: mmap.mmap) -> None:
        with self._lock:
            self._in_use -= len(block)
            # Kept only within the limit (a buffer given back late may not fit any more).
            if not self._closed and self._in_use + self._free_bytes + len(block) <= self.limit:
                self._free.append(block)
                self._free_bytes += len(block)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._free.clear()
            self._free_bytes = 0
