"""A local tier's replicas: which processes hold a copy of whose shards, and the copy itself.

Each process's shards are copied to `replicas` other processes, chosen by a shift
of the process index (process p's copy j goes to p + shift_j). The shifts are the
smallest for which no two copies of any process's shards share a failure domain
(the local directory they are written to: two processes writing to one directory
lose it together).

The copy travels host to host, in the background threads, through jax's
transfer server (jax.experimental.transfer, on the host's CPU client): once a
process has staged its data files in host memory (what every save does), its
commit thread offers them to its peer, whose commit thread pulls them and
writes them byte for byte as the source's files. save() itself does nothing
more than a plain save's device-to-host copy. A pull is point to point, not a
collective: it never waits for, or interleaves with, the training step's own
collectives (XLA's CPU client runs a collective in the calling thread, so a
collective permute of the replicas would block the training thread there), and
it takes no device memory.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from shardsave.errors import CoordinationTimeoutError
from shardsave.save.plan import SavePlan

_POLL_S = 0.005  # how often the background thread looks whether the copies have arrived
_LOOK_S = 0.1  # how often it looks whether their source gave up
# The transfer server's sockets: several per peer and pieces of a few MiB keep loopback and
# network links busy, where one socket and whole pieces of 256 MiB left them idle (measured
# when these were set: the commit that moved replicas onto the transfer server).
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


@dataclass(frozen=True)
class ReplicaPlan:
    """One shift's copies: this process holds a replica of `source`'s data files and
    offers its own to `target`, which holds its replica. The data files of a plan are
    numbered alike on every process, so both ends name them by number."""

    source: int
    target: int
    incoming: tuple[tuple[int, int], ...]  # the source's data files: (number, size)
    outgoing: tuple[int, ...]  # this process's non-empty data files, in the order the target pulls them

    @property
    def pulled(self) -> tuple[tuple[int, int], ...]:
        """The incoming files that travel: an empty one is written as it is, with nothing pulled."""
        return tuple((k, n) for k, n in self.incoming if n)


def plan_replica(plan: SavePlan, shift: int) -> ReplicaPlan:
    """The replica plan of a save plan for one shift."""
    n = jax.process_count()
    pid = jax.process_index()
    source, target = (pid - shift) % n, (pid + shift) % n

    def files(p: int) -> list[tuple[int, int]]:
        return [(k, f.nbytes) for k, f in enumerate(plan.files) if f.process_index == p]

    outgoing = tuple(k for k, n in files(pid) if n)
    return ReplicaPlan(source, target, tuple(files(source)), outgoing)


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
            host = _reachable_host()
            bind = f"[{host}]" if ":" in host else host
            client = _host_device().client
            try:
                from jax.experimental import transfer

                server = transfer.start_transfer_server(
                    client, f"{bind}:0", [f"{bind}:0"] * _TRANSPORTS, _PARALLEL_COPIES, _PIECE_BYTES
                )
            except (ImportError, AttributeError, TypeError) as e:
                raise RuntimeError(
                    "a local tier's replicas move through jax.experimental.transfer, which this jax "
                    f"{jax.__version__} lacks or calls differently ({e}); shardsave's tests run it on jax "
                    "0.10: upgrade jax, or pass replicas=0"
                ) from e
            _server.append(server)
        return _server[0]


def _connect(address: str) -> Any:
    server = transfer_server()
    with _lock:
        known = _connections.get(address)
    if known is not None:
        return known
    connection = server.connect(address)  # outside the lock: it may wait for the peer
    with _lock:
        return _connections.setdefault(address, connection)


def _forget(address: str) -> None:
    """Drops a connection that failed: the next save connects afresh."""
    with _lock:
        _connections.pop(address, None)


def _reachable_host() -> str:
    """The address of this host's interface that the peers reach it at (no packet is sent).

    The interface that routes to jax.distributed's coordinator, unless the
    coordinator is named by a loopback address (then every process is on this
    host). A coordinator's own host may resolve its name to loopback
    (127.0.1.1 in Debian's /etc/hosts); then the interface of the default route.
    """
    override = os.environ.get(HOST_ENV)
    if override:
        return override
    from jax._src import distributed

    coordinator = distributed.global_state.coordinator_address
    if not coordinator:
        return "127.0.0.1"
    host, _, port = coordinator.rpartition(":")
    host = host.strip("[]")
    if host == "localhost" or _is_loopback(host):
        return "127.0.0.1"
    routed = _interface_towards(host, int(port))
    if routed is not None and not _is_loopback(routed):
        return routed
    default = _interface_towards("192.0.2.1", 9)  # TEST-NET-1: only the route is looked up
    return default if default is not None and not _is_loopback(default) else routed or "127.0.0.1"


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _interface_towards(host: str, port: int) -> str | None:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family[0], socket.SOCK_DGRAM) as probe:
            probe.connect(family[4])
            return str(probe.getsockname()[0])
    except OSError:
        return None


def _uuid(key: str, source: int, receiver: int) -> int:
    """The transfer's name, the same on both ends: from the save's shared key."""
    digest = hashlib.blake2b(f"{key}/{source}->{receiver}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


def _host_device() -> jax.Device:
    """The device of host memory, whose client the transfer server runs on."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError as e:
        raise RuntimeError(
            "a local tier's replicas move between hosts through jax's CPU backend, which this process "
            f"does not have ({e}): add cpu to JAX_PLATFORMS (for example JAX_PLATFORMS=cuda,cpu), or "
            "pass replicas=0"
        ) from e


def offer(replicas: list[ReplicaPlan], staged: dict[int, Any], key: str, timeout_s: float) -> None:
    """Offers this process's staged data files to each replica's target, which pulls them.

    The files are copied once (jax's CPU client does not alias the staging
    buffers, whose bytes objects are not aligned for it) and that copy is offered
    to every target; it is made before this returns, so the buffers may be
    reused at once. The offer lapses, releasing the copy, after twice timeout_s
    if a target never pulls it (it died or failed first), so that a target
    always gives up first, at its own deadline.
    """
    outgoing = replicas[0].outgoing if replicas else ()
    if not outgoing:
        return
    device = _host_device()
    arrays = [jax.device_put(np.frombuffer(staged[k], np.uint8), device) for k in outgoing]
    jax.block_until_ready(arrays)
    until = datetime.datetime.now() + datetime.timedelta(seconds=2 * timeout_s)
    server = transfer_server()
    for replica in replicas:
        server.await_pull(_uuid(key, jax.process_index(), replica.target), arrays, timeout=until)


@dataclass
class Pulling:
    """One replica's pull, started: wait() gives its data files."""

    replica: ReplicaPlan
    address: str
    started: Future[list[jax.Array]] | None  # None: the source has no data files

    def wait(self, deadline: float, what: str, source_failed: Callable[[], str | None]) -> dict[int, Any]:
        """The source's data files, once pulled.

        Raises CoordinationTimeoutError naming the source if they have not arrived
        by the deadline, if the pull fails (the source died, or this process
        cannot reach its address), or once source_failed() says why the source
        gave up.
        """
        empty = {k: b"" for k, n in self.replica.incoming if not n}
        if self.started is None:
            return empty
        source = self.replica.source
        try:
            arrived = self.started.result(timeout=max(0.0, deadline - time.monotonic()))
            looked = time.monotonic()
            while not all(x.is_ready() for x in arrived):  # type: ignore[attr-defined]
                now = time.monotonic()
                if now >= deadline:
                    raise TimeoutError()
                if now - looked >= _LOOK_S:
                    looked = now
                    why = source_failed()
                    if why is not None:
                        raise CoordinationTimeoutError(
                            f"{what}: process {source} failed before sending its data files for this "
                            f"process's replica ({why}); the local checkpoint stays uncommitted"
                        )
                time.sleep(_POLL_S)
            pulled = {k: np.asarray(x) for (k, _), x in zip(self.replica.pulled, arrived)}  # a failure raises
            return {**empty, **pulled}
        except CoordinationTimeoutError:
            _forget(self.address)
            raise
        except TimeoutError as e:
            _forget(self.address)
            raise CoordinationTimeoutError(
                f"{what}: process {source} did not send its data files for this process's replica in time "
                f"(did it die or stall?); the local checkpoint stays uncommitted"
            ) from e
        except Exception as e:
            _forget(self.address)
            raise CoordinationTimeoutError(
                f"{what}: pulling process {source}'s data files for this process's replica from "
                f"{self.address} failed ({str(e).splitlines()[0] if str(e) else repr(e)}): did it die, or "
                f"is that address unreachable from here (set {HOST_ENV} to the address each host's peers "
                "reach it at)? The local checkpoint stays uncommitted"
            ) from e


def start_pull(replica: ReplicaPlan, address: str, key: str, deadline: float) -> Pulling:
    """Starts pulling replica.source's data files from its transfer server at address.

    The connection is made on a thread of its own, so that a peer that cannot be
    reached holds no one past the deadline (Pulling.wait's).
    """
    if not replica.pulled:
        return Pulling(replica, address, None)
    sharding = jax.sharding.SingleDeviceSharding(_host_device())
    specs = [jax.ShapeDtypeStruct((n,), np.uint8, sharding=sharding) for _, n in replica.pulled]
    until = datetime.datetime.now() + datetime.timedelta(seconds=max(0.0, deadline - time.monotonic()))
    uuid = _uuid(key, replica.source, jax.process_index())

    future: Future[list[jax.Array]] = Future()

    def thread() -> None:  # not a pool's: a connection that never returns holds only its own
        try:
            future.set_result(list(_connect(address).pull(uuid, specs, timeout=until)))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=thread, name="shardsave-pull", daemon=True).start()
    return Pulling(replica, address, future)


def describe_self(domain: str, replicas: int) -> str:
    """What a process tells the others of itself for its replicas: its failure domain and,
    with replicas, its transfer server's address."""
    serving = replicas and jax.process_count() > 1  # alone, replica_shifts refuses replicas
    return json.dumps({"domain": domain, "address": str(transfer_server().address()) if serving else ""})


def read_peers(described: dict[int, str]) -> tuple[list[str], dict[int, str]]:
    """describe_self's answers: the failure domains by process index, and the addresses."""
    values = {p: json.loads(v) for p, v in described.items()}
    return [values[p]["domain"] for p in sorted(values)], {p: v["address"] for p, v in values.items()}
