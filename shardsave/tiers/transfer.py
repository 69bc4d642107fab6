"""Moving byte ranges of data files between processes, through jax's collectives.

A restore from the local tier may need bytes of files that a process does not
hold (a replaced host's own files, which its peer holds as a replica; a
replicated leaf's stored rows, written by one process). Each such range goes
from a process that holds its file to the one that needs it as uint8 blocks, one
per device, through a
collective permute (a jitted ppermute over a mesh of just the devices taking
part). In one round each device sends at most one piece and receives at most
one; pieces are at most PIECE_BYTES, so the device memory a round holds is
bounded. Every process computes the same schedule from the same moves and takes
part in the rounds that involve its devices, in order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from shardsave.save.replicas import devices_by_process

PIECE_BYTES = 256 << 20

_AXIS = "shardsave_files"


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
    move: Move
    start: int
    stop: int
    src: jax.Device
    dst: jax.Device


def schedule(moves: list[Move], piece_bytes: int = PIECE_BYTES) -> list[list[_Piece]]:
    """The rounds of pieces that carry the moves: a device sends and receives at most one piece per round."""
    by_process = devices_by_process()
    rounds: list[list[_Piece]] = []
    busy: list[tuple[set[int], set[int]]] = []  # per round: the devices sending, and receiving
    for move in sorted(moves, key=lambda m: (m.file, m.start, m.dest)):
        for start in range(move.start, move.stop, piece_bytes):
            stop = min(move.stop, start + piece_bytes)
            for r, (sending, receiving) in enumerate([*busy, (set(), set())]):
                src = next((d for d in by_process[move.source] if d.id not in sending), None)
                dst = next((d for d in by_process[move.dest] if d.id not in receiving), None)
                if src is not None and dst is not None:
                    if r == len(rounds):
                        rounds.append([])
                        busy.append((set(), set()))
                    rounds[r].append(_Piece(move, start, stop, src, dst))
                    busy[r][0].add(src.id)
                    busy[r][1].add(dst.id)
                    break
    return rounds


def move_files(
    moves: list[Move],
    read: Callable[[int, int, int], bytes],
    write: Callable[[int, int, memoryview], None],
    piece_bytes: int = PIECE_BYTES,
) -> None:
    """Carries the moves: this process reads the ranges it sends and writes those it receives.

    Collective: every process calls it with the same moves.

    Args:
      read: bytes [start, stop) of data file k, which this process holds: read(k, start, stop).
      write: stores bytes this process received, at their offset in data file k: write(k, start, data).
    """
    pid = jax.process_index()
    for pieces in schedule(moves, piece_bytes):
        devices = sorted({d for p in pieces for d in (p.src, p.dst)}, key=lambda d: d.id)
        local = [d for d in devices if d.process_index == pid]
        if not local:
            continue
        width = max(p.stop - p.start for p in pieces)
        blocks = {}
        for p in pieces:
            if p.src.process_index == pid:
                block = np.zeros((1, width), np.uint8)
                block[0, : p.stop - p.start] = np.frombuffer(read(p.move.file, p.start, p.stop), np.uint8)
                blocks[p.src.id] = block
        mesh = jax.sharding.Mesh(np.array(devices, dtype=object), (_AXIS,))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(_AXIS))
        arrays = [jax.device_put(blocks.get(d.id, np.zeros((1, width), np.uint8)), d) for d in local]
        stacked = jax.make_array_from_single_device_arrays((len(devices), width), sharding, arrays)
        position = {d.id: k for k, d in enumerate(devices)}
        perm = tuple((position[p.src.id], position[p.dst.id]) for p in pieces)
        out = _permute(mesh, perm)(stacked)
        got = {s.device.id: s.data for s in out.addressable_shards}
        for p in pieces:
            if p.dst.process_index == pid:
                data = np.asarray(got[p.dst.id])[0, : p.stop - p.start]
                write(p.move.file, p.start, data.data)


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
