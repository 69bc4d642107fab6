"""Moving byte ranges of data files between processes, through jax's collectives.

A restore from the local tier may need bytes of files that a process does not
hold (a replaced host's own files, which its peer holds as a replica; a
replicated leaf's stored rows, written by one process). The ranges one process
sends another are packed, in the moves' order, into one payload per pair, cut
into pieces of at most PIECE_BYTES. In a round each device sends at most one
piece and receives at most one, as uint8 blocks of a collective permute over a
mesh of just the devices taking part (a device that only receives holds its
block, nothing more). Every process computes the same schedule from the same
moves and takes part in the rounds that involve its devices, in order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

PIECE_BYTES = 256 << 20

_AXIS = "shardsave_files"


def devices_by_process() -> dict[int, list[jax.Device]]:
    """Every process's devices, by id: the local index of a device is its place in its list."""
    out: dict[int, list[jax.Device]] = {}
    for device in sorted(jax.devices(), key=lambda d: d.id):
        out.setdefault(device.process_index, []).append(device)
    return out


@dataclass(frozen=True)
class Move:
    """Bytes [start, stop) of data file `file` go from process `source` to process `dest`."""

    file: int
    start: int
    stop: int
    source: int
    dest: int


@dataclass(frozen=True)
class _Piece:
    pair: tuple[int, int]  # (source, dest) processes
    start: int  # within the pair's payload
    stop: int
    src: jax.Device
    dst: jax.Device


def _payloads(moves: list[Move]) -> dict[tuple[int, int], list[Move]]:
    pairs: dict[tuple[int, int], list[Move]] = {}
    for move in moves:
        pairs.setdefault((move.source, move.dest), []).append(move)
    return pairs


def schedule(moves: list[Move], piece_bytes: int = PIECE_BYTES) -> list[list[_Piece]]:
    """The rounds of pieces that carry the moves: a device sends and receives at most one piece per round.

    A round's blocks are as wide as its widest piece, so pieces go into rounds with
    others of their size class (powers of two): a replicated leaf's few rows never
    make every device of a round hold a block as large as a replaced host's file.
    """
    by_process = devices_by_process()
    pieces: list[tuple[tuple[int, int], int, int]] = []
    for pair, ranges in sorted(_payloads(moves).items()):
        size = sum(m.stop - m.start for m in ranges)
        pieces += [(pair, start, min(size, start + piece_bytes)) for start in range(0, size, piece_bytes)]
    rounds: list[tuple[int, list[_Piece], set[int], set[int]]] = []  # size class, pieces, sending, receiving
    for pair, start, stop in sorted(pieces, key=lambda p: (-(p[2] - p[1]), p[0], p[1])):
        size_class = (stop - start - 1).bit_length()
        for r in range(len(rounds) + 1):
            if r == len(rounds):
                rounds.append((size_class, [], set(), set()))
            cls, placed, sending, receiving = rounds[r]
            if cls != size_class:
                continue
            src = next((d for d in by_process[pair[0]] if d.id not in sending), None)
            dst = next((d for d in by_process[pair[1]] if d.id not in receiving), None)
            if src is not None and dst is not None:
                placed.append(_Piece(pair, start, stop, src, dst))
                sending.add(src.id)
                receiving.add(dst.id)
                break
    return [placed for _, placed, _, _ in rounds if placed]


def _segments(ranges: list[Move], start: int, stop: int) -> list[tuple[Move, int, int, int]]:
    """(move, start, stop within its file, offset in the piece) of a piece [start, stop) of a pair's payload."""
    out, at = [], 0
    for m in ranges:
        size = m.stop - m.start
        a, b = max(start, at), min(stop, at + size)
        if a < b:
            out.append((m, m.start + a - at, m.start + b - at, a - start))
        at += size
    return out


def move_files(
    moves: list[Move],
    read_into: Callable[[int, int, np.ndarray], None],
    write: Callable[[int, int, memoryview], None],
    piece_bytes: int = PIECE_BYTES,
) -> BaseException | None:
    """Carries the moves: this process reads the ranges it sends and writes those it receives.

    Collective: every process calls it with the same moves. Each round is one
    collective permute over a mesh of just its devices. A read or a write that
    fails does not stop this process from taking part in the rounds that follow
    (its peers would wait for it, with no deadline): what it could not read is
    sent as zeros, which fail the receiver's checksums, and the first error is
    returned once every round is done.

    Args:
      read_into: fills a uint8 buffer with bytes of data file k from an offset,
        which this process holds: read_into(k, start, buffer).
      write: stores bytes this process received, at their offset in data file k:
        write(k, start, data).
    """
    pid = jax.process_index()
    pairs = _payloads(moves)
    error: BaseException | None = None
    for pieces in schedule(moves, piece_bytes):
        devices = sorted({d for p in pieces for d in (p.src, p.dst)}, key=lambda d: d.id)
        local = [d for d in devices if d.process_index == pid]
        if not local:
            continue
        width = max(p.stop - p.start for p in pieces)
        blocks = {}
        for p in pieces:
            if p.src.process_index == pid:
                block = np.empty((1, width), np.uint8)
                for m, a, b, at in _segments(pairs[p.pair], p.start, p.stop):
                    try:
                        read_into(m.file, a, block[0, at : at + b - a])
                    except Exception as e:
                        block[0, at : at + b - a] = 0
                        error = error or e
                blocks[p.src.id] = block
        mesh = jax.sharding.Mesh(np.array(devices, dtype=object), (_AXIS,))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(_AXIS))
        arrays = [jax.device_put(blocks.get(d.id, np.empty((1, width), np.uint8)), d) for d in local]
        stacked = jax.make_array_from_single_device_arrays((len(devices), width), sharding, arrays)
        position = {d.id: k for k, d in enumerate(devices)}
        out = _permute(mesh, tuple((position[p.src.id], position[p.dst.id]) for p in pieces))(stacked)
        got = {s.device.id: s.data for s in out.addressable_shards}
        for p in pieces:
            if p.dst.process_index == pid:
                block = np.asarray(got[p.dst.id])[0]
                for m, a, b, at in _segments(pairs[p.pair], p.start, p.stop):
                    try:
                        write(m.file, a, block[at : at + b - a].data)
                    except Exception as e:
                        error = error or e
    return error


@functools.lru_cache(maxsize=32)
def _permute(mesh: Any, perm: tuple[tuple[int, int], ...]) -> Callable[..., Any]:
    spec = jax.sharding.PartitionSpec(_AXIS)
    return jax.jit(
        jax.shard_map(
            lambda b: jax.lax.ppermute(b, _AXIS, perm),
            mesh=mesh,
            in_specs=spec,
            out_specs=spec,
            check_vma=False,
        )
    )
