"""A local tier's replicas: which processes hold a copy of whose shards, and the copy itself.

Each process's shards are copied to `replicas` other processes, chosen by a shift
of the process index (process p's copy j goes to p + shift_j), so that every copy
of one round is a permutation of the processes: one collective moves all of them.
The shifts are the smallest for which no two copies of any process's shards share
a failure domain (the local directory they are written to: two processes writing
to one directory lose it together).

The copy travels between the devices, through jax's collectives: save() dispatches
one jitted collective permute per mesh (asynchronously on accelerators, so the
training thread only enqueues it; XLA's CPU client runs it in the calling
thread), in program order on every process, so it never interleaves differently
with the training step's own collectives. The received shards are new arrays
the caller cannot change; the background thread copies them to the host and
writes them as the source process's data files, byte for byte what that process
writes itself (the same plan stages them). A leaf whose copy on the receiving
process is its own already (replicated across the two) moves nothing between
processes; it is copied on its devices.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from shardsave.errors import CoordinationTimeoutError
from shardsave.index import device_boxes
from shardsave.save.plan import SavePlan
from shardsave.save.stage import DeviceShards

_POLL_S = 0.005  # how often the background thread looks whether the copies have arrived


def replica_shifts(domains: list[str], replicas: int) -> list[int]:
    """The shifts of the process index that place each process's copies.

    Args:
      domains: each process's failure domain, by process index.
      replicas: how many copies of each process's shards other processes hold.

    Raises:
      ValueError: fewer than replicas + 1 failure domains to spread them over.
    """
    n = len(domains)
    shifts: list[int] = []
    for shift in range(1, n):
        if len(shifts) == replicas:
            break
        if all(
            len({domains[p], *(domains[(p + s) % n] for s in [*shifts, shift])}) == len(shifts) + 2
            for p in range(n)
        ):
            shifts.append(shift)
    if len(shifts) < replicas:
        raise ValueError(
            f"replicas={replicas} needs every process's shards on {replicas + 1} failure domains (local "
            f"directories), but the {n} processes write to {len(set(domains))}: give each host its own "
            "local_directory, or lower replicas"
        )
    return shifts


def devices_by_process() -> dict[int, list[jax.Device]]:
    """Every process's devices, by id: the local index of a device is its place in its list."""
    out: dict[int, list[jax.Device]] = {}
    for device in sorted(jax.devices(), key=lambda d: d.id):
        out.setdefault(device.process_index, []).append(device)
    return out


@dataclass
class Replica:
    """One process's copy of another's shards, on its way: what stage() needs to write
    the source's data files once the arrays have arrived."""

    source: int  # the process whose shards these are
    device_data: DeviceShards  # leaf -> the source's device id -> the copy on this process
    arriving: list[jax.Array]  # the arrays the collective fills

    def wait(self, deadline: float, what: str) -> DeviceShards:
        """The copies, once they have arrived; raises naming the source if they do not in time."""
        while not all(x.is_ready() for x in self.arriving):  # type: ignore[attr-defined]
            if time.monotonic() >= deadline:
                raise CoordinationTimeoutError(
                    f"{what}: process {self.source} did not send its shards for this process's replica "
                    "in time (did it die or stall?); the local checkpoint stays uncommitted"
                )
            time.sleep(_POLL_S)
        return self.device_data


@dataclass(frozen=True)
class ReplicaPlan:
    """How this process receives its copy of process `source`'s shards, for one save plan.

    It depends only on the plan (shapes and shardings) and the shift, so the Saver
    keeps it across saves, like the plan.
    """

    plan: SavePlan
    source: int
    own: tuple[int, ...]  # leaves whose copy this process holds already
    moved: tuple[tuple[tuple[int, ...], Callable[..., Any]], ...]  # per mesh: its leaves, their permute
    pairs: tuple[tuple[int, int], ...]  # (the source's device id, this process's) by local index


def plan_replica(plan: SavePlan, leaves: list[Any], shift: int) -> ReplicaPlan:
    """The replica plan of a save plan: which leaves move, through which collective.

    Raises:
      ValueError: a leaf's copy would need a device outside its mesh, or the
        processes have different numbers of devices.
    """
    by_process = devices_by_process()
    n = len(by_process)
    pid = jax.process_index()
    source = (pid - shift) % n
    counts = {len(d) for d in by_process.values()}
    if len(counts) != 1:
        raise ValueError(
            f"a local tier's replicas need the same number of devices in every process, found {sorted(counts)}"
        )
    # sigma: the device of process p + shift that receives device d's copy (the same local index).
    sigma = {
        d.id: by_process[(p + shift) % n][j]
        for p, devices in by_process.items()
        for j, d in enumerate(devices)
    }
    moved: dict[Any, list[int]] = {}  # mesh -> the leaves whose copies move through it
    own: list[int] = []
    for i, spec in enumerate(plan.leaves):
        leaf = leaves[i]
        if not isinstance(leaf, jax.Array):
            continue  # a host leaf is the same on every process: staged from this one's
        boxes = device_boxes(leaf.sharding, spec.shape)
        if all(boxes.get(sigma[d.id]) == box for d, box in boxes.items()):
            own.append(i)
            continue
        sharding = leaf.sharding
        if not isinstance(sharding, jax.sharding.NamedSharding) or not all(
            sigma[d.id] in boxes for d in boxes
        ):
            raise ValueError(
                f"leaf {spec.name!r}: a local tier's replica of its shards would need devices outside its "
                f"sharding ({sharding}); replicas need every leaf laid out over the devices of all "
                "processes (a NamedSharding of a mesh over jax.devices()), or replicas=0"
            )
        moved.setdefault(sharding.mesh, []).append(i)
    permutes = []
    for mesh, indices in moved.items():
        position = {d.id: k for k, d in enumerate(mesh.devices.flat)}
        perm = tuple((position[d.id], position[sigma[d.id].id]) for d in mesh.devices.flat)
        specs = tuple(leaves[i].sharding.spec for i in indices)
        permutes.append((tuple(indices), _permute(mesh, specs, perm)))
    pairs = tuple((src.id, dst.id) for src, dst in zip(by_process[source], by_process[pid]))
    return ReplicaPlan(plan, source, tuple(own), tuple(permutes), pairs)


def send_replicas(replica: ReplicaPlan, leaves: list[Any]) -> Replica:
    """Starts the collective that gives this process its copy of replica.source's shards.

    Every process calls it with the same plan and shift (it is collective), before
    it stages its own shards; it returns once the copy is dispatched (on CPU
    devices, where XLA runs a computation with collectives in the caller, once
    it is made). Shards the receiver holds itself are copied on their devices,
    since the caller may donate its arrays once save() returns.
    """
    received: dict[int, jax.Array] = {}
    for indices, permute in replica.moved:
        received.update(zip(indices, permute(*[leaves[i] for i in indices])))
    device_data: DeviceShards = {}
    for i in [*replica.own, *received]:
        array = received.get(i, leaves[i])
        here = {s.device.id: s.data for s in array.addressable_shards}
        if i not in received:
            # The caller's own arrays, which it may donate or delete once save() returns,
            # before the background thread stages them: copies on their devices.
            here = {d: jnp.copy(x) for d, x in here.items()}
        device_data[i] = {src: here[dst] for src, dst in replica.pairs if dst in here}
    return Replica(replica.source, device_data, list(received.values()))


@functools.lru_cache(maxsize=16)
def _permute(mesh: Any, specs: tuple[Any, ...], perm: tuple[tuple[int, int], ...]) -> Callable[..., Any]:
    axes = tuple(mesh.axis_names)

    def body(*blocks: Any) -> Any:
        return tuple(jax.lax.ppermute(b, axes, perm) for b in blocks)

    # The output is not one global value (each device holds another's block), so
    # jax's replication checks do not apply: only the addressable blocks are read.
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=specs, check_vma=False))
