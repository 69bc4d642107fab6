"""Several processes: stored bytes that several processes need are read once, then shared.

A restore makes each process read the byte ranges its own devices need. A leaf
replicated across processes (a bias under P(), an optimizer step, every leaf of
a data-parallel model) would be read from storage once per process: with
hundreds of hosts on an object store, that is most of a restore's traffic.

Such a leaf is restored instead onto a row sharding over every device of every
process, so that each stored byte is read by exactly one process, and jax then
lays it out as the target asks: one jitted identity with the target shardings,
whose cross-process collectives (all-gather) carry the rows to every process
that needs them. Leaves whose rows do not divide evenly among the devices, or
that no two processes share, or whose target leaves out some devices, are
read as before.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from shardsave.restore.plan import LeafRequest

_AXIS = "shardsave_rows"


@functools.lru_cache(maxsize=256)
def _shared_by_processes(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> bool:
    """Whether some part of the array is needed by devices of two or more processes."""
    needers: dict[Any, set[int]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        key = tuple((s.start, s.stop) for s in index)
        needers.setdefault(key, set()).add(device.process_index)  # type: ignore[attr-defined]
    return any(len(p) > 1 for p in needers.values())


@functools.cache
def _row_sharding(ndim: int) -> jax.sharding.NamedSharding:
    mesh = jax.sharding.Mesh(np.array(jax.devices(), dtype=object), (_AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(_AXIS, *[None] * (ndim - 1)))


def plan_shared_reads(requests: Sequence[LeafRequest]) -> tuple[list[LeafRequest], list[int]]:
    """The requests with shared leaves moved onto the row sharding, and which ones moved."""
    if jax.process_count() == 1:
        return list(requests), []
    devices = jax.device_count()
    out, moved = [], []
    for i, req in enumerate(requests):
        sharding = req.sharding
        if (
            sharding is not None
            and req.shape
            and req.shape == req.entry.shape
            and req.shape[0] % devices == 0
            and math.prod(req.shape) > 0
            and len(sharding.device_set) == devices  # one jit needs one device set
            and _shared_by_processes(sharding, req.shape)
        ):
            out.append(LeafRequest(req.entry, req.shape, req.dtype, _row_sharding(len(req.shape)), req.box))
            moved.append(i)
        else:
            out.append(req)
    return out, moved


def lay_out(values: list[Any], requests: Sequence[LeafRequest], moved: list[int]) -> list[Any]:
    """Moves the row-sharded leaves onto their target shardings (collectively, in one call)."""
    if not moved:
        return values
    shardings = tuple(requests[i].sharding for i in moved)
    relaid = _identity(shardings)(*[values[i] for i in moved])
    out = list(values)
    for i, value in zip(moved, relaid):
        out[i] = value
    return out


@functools.lru_cache(maxsize=32)
def _identity(shardings: tuple[Any, ...]) -> Any:
    # Not donated: a row block never has a target shard's shape, so XLA could not
    # reuse it (and would warn); the rows are freed when lay_out returns.
    return jax.jit(lambda *xs: xs, out_shardings=shardings)
