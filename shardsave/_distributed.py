"""Multi-process coordination through jax.distributed's key-value store.

Every wait has a deadline. A process that dies or stalls makes the others raise
CoordinationTimeoutError naming the step and the processes that did not report,
instead of hanging in a barrier.

The protocol of one save, keyed by a name every process derives the same way
(the Saver's creation order and its save count: save() is collective):

  every process  writes its data files, then publishes  KEY/files/PID  (its
                 checksums, or the error that stopped it);
  process 0      gathers every PID's report, writes the index (the commit), the
                 state file and retention, then publishes  KEY/done  ("ok" or the
                 error);
  others         wait for KEY/done.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import jax

from .errors import CoordinationTimeoutError, SaveFailedError

_saver_ids = itertools.count()


def _client() -> Any:
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


class Coordinator:
    """The collective steps of one Saver's saves."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.saver_id = next(_saver_ids)
        self._saves = itertools.count()

    @property
    def active(self) -> bool:
        return jax.process_count() > 1

    @property
    def process_index(self) -> int:
        return jax.process_index()

    def next_key(self) -> str:
        return f"shardsave/{self.saver_id}/{next(self._saves)}"

    def publish(self, key: str, value: str) -> None:
        _client().key_value_set(key, value)

    def barrier(self, key: str, what: str) -> None:
        try:
            _client().wait_at_barrier(key, int(self.timeout_s * 1000))
        except Exception as e:
            raise CoordinationTimeoutError(
                f"{what}: not every process arrived within {self.timeout_s:g} s ({e})"
            ) from e

    def gather(self, key: str, what: str) -> dict[int, str]:
        """Each process's value of KEY/PID, waiting until the deadline for all of them."""
        client = _client()
        deadline = time.monotonic() + self.timeout_s
        values: dict[int, str] = {}
        missing = []
        for pid in range(jax.process_count()):
            remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
            try:
                values[pid] = client.blocking_key_value_get(f"{key}/{pid}", remaining_ms)
            except Exception:  # DEADLINE_EXCEEDED: that process never reported
                missing.append(pid)
        if missing:
            raise CoordinationTimeoutError(
                f"{what}: processes {missing} did not report within {self.timeout_s:g} s "
                "(did they die or stall?); the checkpoint stays uncommitted"
            )
        return values

    def wait_for(self, key: str, what: str) -> str:
        try:
            return _client().blocking_key_value_get(key, int(self.timeout_s * 1000))
        except Exception as e:
            raise CoordinationTimeoutError(
                f"{what}: process 0 did not report the commit within {self.timeout_s:g} s "
                f"(did it die or stall?) ({str(e).splitlines()[0]})"
            ) from e


def encode_report(crcs: dict[int, list[tuple[int, ...]]] | None, error: str | None = None) -> str:
    if error is not None:
        return json.dumps({"error": error})
    return json.dumps({"crcs": {str(k): v for k, v in crcs.items()}} if crcs is not None else {})


def decode_reports(reports: dict[int, str], what: str) -> dict[int, list[tuple[int, ...]]]:
    """Every file's checksums from all reports; a reported error becomes SaveFailedError."""
    crcs: dict[int, list[tuple[int, ...]]] = {}
    for pid, raw in sorted(reports.items()):
        doc = json.loads(raw)
        if "error" in doc:
            raise SaveFailedError(f"{what}: process {pid} failed: {doc['error']}")
        for k, shards in doc["crcs"].items():
            crcs[int(k)] = [tuple(c) for c in shards]
    return crcs
