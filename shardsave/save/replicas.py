"""A local tier's replicas: which processes hold a copy of whose shards, and the copy itself.

Each process's shards are copied to `replicas` other processes, chosen by a shift
of the process index (process p's copy j goes to p + shift_j). The shifts are the
smallest for which no two copies of any process's shards share a failure domain
(the local directory they are written to: two processes writing to one directory
lose it together).

The copy travels device to device through jax's transfer server
(jax.experimental.transfer): save() copies the shards the peer needs on their
own devices (the caller may donate its arrays once save() returns) and offers
them, which only enqueues work; the peer's background thread pulls them onto its
own devices, copies them to its host and writes them as the source process's
data files, byte for byte what that process writes itself (the same plan stages
them). A pull is point to point, not a collective: it cannot interleave with the
training step's own collectives, and it runs wholly off the training thread,
also on CPU devices, where XLA runs a collective in the calling thread. A shard
the receiver holds itself (a leaf replicated across the two) moves nothing
between processes; it is copied on its device.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from shardsave.errors import CoordinationTimeoutError
from shardsave.index import box_shape, device_boxes
from shardsave.save.plan import SavePlan
from shardsave.save.stage import DeviceShards

_POLL_S = 0.005  # how often the background thread looks whether the copies have arrived
# The transfer server's sockets: several per peer and pieces of a few MiB keep loopback and
# network links busy (one socket and whole 256 MiB pieces moved a fifth as fast on loopback).
_TRANSPORTS = 4
_PIECE_BYTES = 4 << 20
_PARALLEL_COPIES = 8
HOST_ENV = "SHARDSAVE_TRANSFER_HOST"


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


@dataclass(frozen=True)
class Piece:
    """One shard of a source process's data files, as its replica receives it."""

    leaf: int
    writer: int  # the source's device whose copy the plan writes
    holder: int  # the receiver's device: the one holding the same box, or the one the pull lands on
    shape: tuple[int, ...]
    dtype: Any
    local: bool  # the receiver holds the box itself: copied on its device, not pulled


def pieces(plan: SavePlan, leaves: list[Any], source: int, receiver: int) -> tuple[Piece, ...]:
    """What the receiver needs to write the source's data files, in one order both compute.

    Only the shards the plan has the source write travel (a box several of the
    source's devices hold moves once). Host leaves are not pieces: they hold the
    same value on every process, so the receiver stages its own.
    """
    devices = devices_by_process()
    mine = devices[receiver]
    out: list[Piece] = []
    for f in plan.files:
        if f.process_index != source:
            continue
        for shard in f.shards:
            leaf = leaves[shard.leaf]
            if not isinstance(leaf, jax.Array) or shard.writer is None or shard.nbytes == 0:
                continue
            boxes = device_boxes(leaf.sharding, plan.leaves[shard.leaf].shape)
            held = [d for d in mine if boxes.get(d) == shard.box]
            local_index = devices[source].index(shard.writer)
            holder = held[0] if held else mine[local_index % len(mine)]
            out.append(
                Piece(shard.leaf, shard.writer.id, holder.id, box_shape(shard.box), leaf.dtype, bool(held))
            )
    return tuple(out)


@dataclass(frozen=True)
class ReplicaPlan:
    """One shift's copies for one save plan: what this process receives from `source`
    and what it offers to `target`, whose replica of this process's shards it is.

    It depends only on the plan (shapes and shardings) and the shift, so the Saver
    keeps it across saves, like the plan.
    """

    plan: SavePlan
    shift: int
    source: int
    target: int
    incoming: tuple[Piece, ...]  # the pieces of source's files, in its offer's order
    outgoing: tuple[Piece, ...]  # the pieces of this process's files that target pulls


def plan_replica(plan: SavePlan, leaves: list[Any], shift: int) -> ReplicaPlan:
    """The replica plan of a save plan for one shift."""
    n = jax.process_count()
    pid = jax.process_index()
    source, target = (pid - shift) % n, (pid + shift) % n
    return ReplicaPlan(
        plan, shift, source, target, pieces(plan, leaves, source, pid), pieces(plan, leaves, pid, target)
    )


# This process's jax transfer server, started at the first local save with replicas,
# and its connections to the peers' servers, by address.
_lock = threading.Lock()
_server: list[Any] = []
_connections: dict[str, Any] = {}


def transfer_server() -> Any:
    """This process's transfer server. It listens on the host address that reaches
    jax.distributed's coordinator (or SHARDSAVE_TRANSFER_HOST), where the peers can connect."""
    with _lock:
        if not _server:
            from jax.experimental import transfer

            host = _reachable_host()
            bind = f"[{host}]" if ":" in host else host
            _server.append(
                transfer.start_transfer_server(
                    jax.local_devices()[0].client,
                    f"{bind}:0",
                    [f"{bind}:0"] * _TRANSPORTS,
                    _PARALLEL_COPIES,
                    _PIECE_BYTES,
                )
            )
        return _server[0]


def _connect(address: str) -> Any:
    server = transfer_server()
    with _lock:
        if address not in _connections:
            _connections[address] = server.connect(address)
        return _connections[address]


def _forget(address: str) -> None:
    """Drops a connection that failed: the next save connects afresh."""
    with _lock:
        _connections.pop(address, None)


def _reachable_host() -> str:
    """The address of this host's interface that reaches the coordinator (no packet is sent)."""
    override = os.environ.get(HOST_ENV)
    if override:
        return override
    from jax._src import distributed

    coordinator = distributed.global_state.coordinator_address
    if not coordinator:
        return "127.0.0.1"
    host, _, port = coordinator.rpartition(":")
    host = host.strip("[]")
    try:
        family = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0]
        with socket.socket(family[0], socket.SOCK_DGRAM) as probe:
            probe.connect(family[4])
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def _uuid(key: str, source: int, receiver: int) -> int:
    """The transfer's name, the same on both ends: from the save's shared key."""
    digest = hashlib.blake2b(f"{key}/{source}->{receiver}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


_copy_all = jax.jit(lambda *xs: tuple(jnp.copy(x) for x in xs))


def _device_copies(arrays: list[jax.Array]) -> list[jax.Array]:
    """Copies made on their own devices, one dispatch per device."""
    by_device: dict[Any, list[int]] = {}
    for k, x in enumerate(arrays):
        by_device.setdefault(next(iter(x.devices())), []).append(k)
    out: list[Any] = [None] * len(arrays)
    for indices in by_device.values():
        for k, copy in zip(indices, _copy_all(*[arrays[k] for k in indices])):
            out[k] = copy
    return out


@dataclass
class Replica:
    """This process's copy of another's shards, on its way: what stage() needs to write the
    source's data files, once the background thread has pulled them."""

    plan: ReplicaPlan
    address: str  # the source's transfer server
    uuid: int
    local: dict[tuple[int, int], jax.Array]  # (leaf, source device): the receiver's own copy
    timeout_s: float

    @property
    def source(self) -> int:
        return self.plan.source

    def wait(self, deadline: float, what: str) -> DeviceShards:
        """The copies, once pulled; raises naming the source if they do not arrive in time."""
        remote = [p for p in self.plan.incoming if not p.local]
        arrived: list[jax.Array] = []
        if remote:
            devices = {d.id: d for d in jax.local_devices()}
            specs = [
                jax.ShapeDtypeStruct(
                    p.shape, p.dtype, sharding=jax.sharding.SingleDeviceSharding(devices[p.holder])
                )
                for p in remote
            ]
            until = datetime.datetime.now() + datetime.timedelta(
                seconds=max(0.0, deadline - time.monotonic())
            )
            try:
                arrived = _connect(self.address).pull(self.uuid, specs, timeout=until)
                while not all(x.is_ready() for x in arrived):  # type: ignore[attr-defined]
                    if time.monotonic() >= deadline:
                        raise CoordinationTimeoutError(
                            f"{what}: process {self.source} did not send its shards for this process's "
                            f"replica within {self.timeout_s:g} s (did it die or stall?); the local "
                            "checkpoint stays uncommitted"
                        )
                    time.sleep(_POLL_S)
                for x in arrived:
                    x.block_until_ready()  # a failed pull raises here
            except CoordinationTimeoutError:
                _forget(self.address)
                raise
            except Exception as e:
                _forget(self.address)
                raise CoordinationTimeoutError(
                    f"{what}: pulling process {self.source}'s shards for this process's replica from "
                    f"{self.address} failed (did it die?): {str(e).splitlines()[0] if str(e) else e!r}; the "
                    "local checkpoint stays uncommitted"
                ) from e
        out: DeviceShards = {}
        for p, x in zip(remote, arrived):
            out.setdefault(p.leaf, {})[p.writer] = x
        for (leaf, writer), x in self.local.items():
            out.setdefault(leaf, {})[writer] = x
        return out


def send_replicas(
    replica: ReplicaPlan, leaves: list[Any], key: str, addresses: dict[int, str], timeout_s: float
) -> Replica:
    """Offers this process's shards to replica.target and readies its copy of replica.source's.

    It only enqueues work on the devices (copies, and the offer), so the training
    thread does not wait for the transfer; the offer lapses after timeout_s if the
    target never pulls it. Shards are copied before they are offered, and the
    receiver's own boxes before save() returns, since the caller may donate its
    arrays then.
    """
    pid = jax.process_index()

    def shard_of(leaf: int, device: int) -> jax.Array:
        return next(s.data for s in leaves[leaf].addressable_shards if s.device.id == device)

    outgoing = [shard_of(p.leaf, p.writer) for p in replica.outgoing if not p.local]
    if outgoing:
        until = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        transfer_server().await_pull(_uuid(key, pid, replica.target), _device_copies(outgoing), timeout=until)
    local = [p for p in replica.incoming if p.local]
    copies = _device_copies([shard_of(p.leaf, p.holder) for p in local])
    return Replica(
        replica,
        addresses.get(replica.source, ""),
        _uuid(key, replica.source, pid),
        {(p.leaf, p.writer): x for p, x in zip(local, copies)},
        timeout_s,
    )


def describe_self(domain: str, replicas: int) -> str:
    """What a process tells the others of itself for its replicas: its failure domain and,
    with replicas, its transfer server's address."""
    return json.dumps({"domain": domain, "address": str(transfer_server().address()) if replicas else ""})


def read_peers(described: dict[int, str]) -> tuple[list[str], dict[int, str]]:
    """describe_self's answers: the failure domains by process index, and the addresses."""
    values = {p: json.loads(v) for p, v in described.items()}
    return [values[p]["domain"] for p in sorted(values)], {p: v["address"] for p, v in values.items()}
