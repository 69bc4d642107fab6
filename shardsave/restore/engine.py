"""Runs a restore's plan: reads stored bytes and lands them on the target devices, under a memory budget.

restore.plan decides the units, their reads and the batches; restore.fetch reads
and verifies; restore.place assembles and places. This module orders them.
Every read of a batch is issued at once (coalesced into contiguous spans of each
file) and verified (crc32c) as it lands, then the batch is assembled and placed
on its devices (one make_array_from_callback per leaf), and its host buffers
are dropped. The next batch's reads are issued before the current one is
placed, so the storage and Python work at the same time. A capped restore reads
into a pool of buffers reused from batch to batch and never holds more than its
cap (BufferPool), whose memory returns to the system when the restore ends. A
read of whole rows of its box (a box that stacks stored shards, or a large
shard read in pieces) lands in the assembled buffer directly, where its checksum
chunks are its own, and a unit the plan streams keeps up to
DEFAULT_INFLIGHT_BYTES of them in flight.

A streamed unit is read with the next reads in flight within the budget: on CPU
devices into its final host buffer (with the neighbouring units of its leaf that
share its stored rows, which are then read once for all of them); on
accelerators into its device buffer, filled in place row range by row range.
Host memory never holds it whole beyond the result.

restore_leaves takes what Saver.restore does not: a Placement (the accelerator
path can be taken on CPU devices), a RestoreObserver told of reads, placements
and landings as they happen, and min_sequential_bytes (the smallest cap a
sequential restore accepts). With their defaults the engine does what it always
did, and asks nothing more of each leaf.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardsave import _gc_pause
from shardsave.errors import CheckpointNotFoundError, CorruptCheckpointError
from shardsave.index import Box, Index, box_shape
from shardsave.restore.fetch import MIN_DIRECT_BYTES, Fetcher, RestoreObserver, Span
from shardsave.restore.place import (
    Results,
    aligned_array,
    assemble,
    assembly,
    land,
    target_index,
    whole_rows,
    write_block,
)
from shardsave.restore.plan import (
    DEFAULT_INFLIGHT_BYTES,
    MAX_SPAN_BYTES,
    MIN_SEQUENTIAL_BYTES,
    LeafRequest,
    OnCpu,
    Placement,
    Unit,
    adopts,
    cpu_path,
    held_bytes,
    plan_restore,
)
from shardsave.restore.reads import Read, plan_reads
from shardsave.storage.base import Store, join
from shardsave.storage.buffers import BufferPool, aligned_empty

SMALL_BUFFER_BYTES = 1 << 20  # a capped restore takes buffers below this from malloc


@dataclass
class RestoreTimes:
    """Where a restore_leaves call spent its time; the rest is reading and verifying."""

    plan_seconds: float = 0.0  # planning units, reads and batches
    place_seconds: float = 0.0  # creating the arrays on their devices (jax)


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
    on_cpu = cpu_path(placement)
    names = {id(s): req.entry.name for req in requests for s in req.entry.shards}
    units, batches, budget = plan.units, plan.batches, plan.budget
    # A capped restore reuses its read buffers from batch to batch, within its cap.
    pool = BufferPool(budget * (plan.ahead + 1)) if sequential else None
    allocate = aligned_empty if pool is None else _capped(pool)
    fetcher = Fetcher(directory, base, index, names, allocate, observer)
    times = RestoreTimes(plan_seconds=time.perf_counter() - began)

    results = Results(units, on_cpu, observer)
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


@dataclass
class _Issued:
    """A batch whose reads are in flight."""

    units: list[Unit]
    spans: dict[int, Span]  # id(read) -> the span that holds it
    outs: dict[int, np.ndarray]  # id(unit) -> its assembly, where reads land in it directly


def _issue(batch: list[Unit], requests: list[LeafRequest], fetcher: Fetcher, on_cpu: OnCpu) -> _Issued:
    """Starts a batch's reads. A read of whole rows of its unit's box that lands
    there as it is (see Fetcher.issue) is read into the unit's assembly, allocated
    now, so that nothing copies it there afterwards."""
    owner = {id(r): unit for unit in batch for r in unit.reads}
    outs: dict[int, np.ndarray] = {}

    def destination(read: Read) -> np.ndarray | None:
        unit = owner[id(read)]
        if not whole_rows(read) or (len(unit.reads) == 1 and read.fills_target):  # the read is the array
            return None
        if id(unit) not in outs:
            outs[id(unit)] = assembly(unit, requests[unit.request], fetcher, on_cpu)
        return outs[id(unit)][read.dst].reshape(-1).view(np.uint8)

    spans = fetcher.issue([r for unit in batch for r in unit.reads], destination)
    return _Issued(batch, spans, outs)


def _run_batch(issued: _Issued, requests: list[LeafRequest], fetcher: Fetcher, results: Results) -> None:
    pieces: dict[int, dict[Box, np.ndarray]] = {}
    holders: dict[int, dict[Box, tuple[jax.Device, ...]]] = {}
    for unit in issued.units:
        req = requests[unit.request]
        array = assemble(unit, req, fetcher, issued.spans, results.on_cpu, issued.outs.get(id(unit)))
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
            pieces.setdefault(unit.request, {})[box] = array if tbox is None else array[target_index(tbox)]
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
    in_flight: deque[tuple[Read, Span, int, int]] = deque()
    held = landing = 0

    def lands(read: Read) -> bool:  # as Fetcher.issue decides
        return adopted and into is not None and id(read) in into and read.nbytes >= MIN_DIRECT_BYTES

    def room(read: Read) -> bool:
        if lands(read):
            return landing + read.nbytes <= DEFAULT_INFLIGHT_BYTES
        return held + held_bytes(read, fetcher.checks) <= limit

    while waiting or in_flight:
        while waiting and (not in_flight or room(waiting[0])):
            read = waiting.popleft()
            span = fetcher.stream(read, None if into is None else into.get(id(read)))
            if adopted and span.direct:
                in_flight.append((read, span, 0, read.nbytes))
            else:
                in_flight.append((read, span, held_bytes(read, fetcher.checks), 0))
            held += in_flight[-1][2]
            landing += in_flight[-1][3]
        read, span, transient, landed = in_flight.popleft()
        yield read, fetcher.verified(read, span, dtype)
        del span
        held -= transient
        landing -= landed


def _stream_units(
    units: list[Unit], requests: list[LeafRequest], fetcher: Fetcher, results: Results, budget: int
) -> None:
    """Streams units too large for a batch into their device buffers, read by read."""
    req = requests[units[0].request]
    dtype = req.entry.dtype
    if results.on_cpu(req.sharding):
        # A CPU device adopts an aligned host buffer as its own: fill the final buffers
        # in place, with the whole budget for reads in flight. Units of one leaf that
        # need the same stored rows (a group from _batches) share each read.
        adopted = adopts(req, results.on_cpu)
        allocate = aligned_empty if adopted else fetcher.allocate
        outs = [aligned_array(box_shape(u.box), dtype, allocate) for u in units]
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
            if len(uses) == 1 and b - a == read.nbytes and whole_rows(read):
                into[id(read)] = outs[k][read.dst].reshape(-1).view(np.uint8)
        for read, rows in _read_ahead(unique, fetcher, dtype, budget, into, adopted=adopted):
            for k, use in consumers[id(read.shard), read.row_start, read.nbytes]:
                land(outs[k][use.dst], rows[use.src], use, fetcher.observer)
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
                buffers[d] = write_block(buffers[d], copies[-1], starts)
                while len(copies) > in_flight:  # bounds the host copies jax holds for them
                    copies.popleft().block_until_ready()
            del rows, block
        jax.block_until_ready(list(buffers.values()))
        results.remaining[unit.request] -= 1
        results.partial.setdefault(unit.request, {}).update(buffers)
        if results.observer is not None:
            results.observer.on_place(req, last=results.remaining[unit.request] == 0)
