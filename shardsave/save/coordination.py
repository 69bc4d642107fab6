"""Multi-process coordination through jax.distributed's key-value store.

Every wait has a deadline. A process that dies or stalls makes the others raise
CoordinationTimeoutError naming the step and the processes that did not report,
instead of hanging in a barrier.

The protocol of one save, keyed by a name every process derives the same way
(the Saver's creation order and its save count: save() is collective):

  every process  writes its data files, then publishes  KEY/files/PID  (its
                 checksums, or the error that stopped it);
  process 0      publishes KEY/gathering, collects the reports of all processes
                 at once against one deadline (so it names exactly those that had
                 not reported when it passed), writes the index (the commit), the
                 state file and retention, then publishes  KEY/done: the outcome,
                 success or the error with the processes it names;
  others         wait for KEY/gathering (process 0 reached the commit), then for
                 KEY/done for longer than process 0's deadline, and raise the
                 error process 0 published, so that every process names the same
                 processes. Only when process 0 itself goes silent do they name it.
"""

from __future__ import annotations

import collections
import inspect
import json
import threading
import time
import urllib.parse
import warnings
from typing import Any

import jax

from shardsave.errors import CoordinationTimeoutError, SaveFailedError

# Keys in jax's key-value store are named by what every process shares: the collective
# operation's subject (a checkpoint's prefix, a question's name) and how many times this
# process has done it before. Every process saves the same prefixes and asks the same
# questions in the same order, whichever Savers it created first.
_rounds: collections.Counter[str] = collections.Counter()
_rounds_lock = threading.Lock()


def shared_key(kind: str, subject: str) -> str:
    """A fresh key for the next collective `kind` operation on `subject`, the same in every process."""
    name = f"{kind}/{urllib.parse.quote(subject, safe='')}"
    with _rounds_lock:
        n = _rounds[name]
        _rounds[name] += 1
    return f"shardsave/{name}/{n}"


_POLL_S = 0.02  # how often process 0 looks for reports while it gathers them


_MARGIN_S = 10.0  # at least this long past process 0's deadline for its outcome


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
        self._checked = False

    @property
    def active(self) -> bool:
        return jax.process_count() > 1

    @property
    def process_index(self) -> int:
        return jax.process_index()

    @property
    def process_count(self) -> int:
        return jax.process_count()

    def check_timeout(self) -> None:
        """Warns once when timeout_s is not below jax.distributed's heartbeat timeout.

        jax does not expose the running client's heartbeat timeout, so this compares
        with the default of jax.distributed.initialize (100 s): past it, jax aborts the
        survivors of a dead process before shardsave's deadline can name it.
        """
        if self._checked:
            return
        self._checked = True
        parameter = inspect.signature(jax.distributed.initialize).parameters.get("heartbeat_timeout_seconds")
        heartbeat = parameter.default if parameter is not None else None
        if isinstance(heartbeat, (int, float)) and self.timeout_s >= heartbeat:
            warnings.warn(
                f"Saver(timeout_s={self.timeout_s:g}) is not below jax.distributed's default heartbeat "
                f"timeout ({heartbeat} s): if a process dies, jax aborts the others before shardsave "
                "names it. Lower timeout_s, or ignore this if you raised heartbeat_timeout_seconds",
                RuntimeWarning,
                stacklevel=4,
            )

    def key_for_save(self, prefix: str) -> str:
        """The key of a collective save of checkpoint `prefix`."""
        return shared_key("save", prefix)

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
        """Each process's value of KEY/PID, all awaited together until one deadline.

        The values are polled as a directory, so a process that reports late does
        not shorten the wait for the others: when the deadline passes, exactly the
        processes whose report is absent are named.
        """
        count = jax.process_count()
        deadline = time.monotonic() + self.timeout_s
        while True:
            values = self.collect(key)
            if len(values) >= count or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        missing = [pid for pid in range(count) if pid not in values]
        if missing:
            raise CoordinationTimeoutError(
                f"{what}: processes {missing} did not report within {self.timeout_s:g} s "
                "(did they die or stall?); the checkpoint stays uncommitted"
            )
        return values

    def collect(self, key: str) -> dict[int, str]:
        """The values of KEY/PID published so far, by process index (does not wait)."""
        values: dict[int, str] = {}
        for name, value in _client().key_value_dir_get(f"{key}/"):
            tail = name.rsplit("/", 1)[-1]
            if tail.isdigit():
                values[int(tail)] = value
        return values

    def exchange(self, key: str, mine: str, what: str) -> dict[int, str]:
        """Every process's value, this one's included, once all have published (one deadline).

        Alone (no jax.distributed), just this process's.
        """
        if not self.active:
            return {0: mine}
        self.publish(f"{key}/{self.process_index}", mine)
        return self.gather(key, what)

    def fetch(self, key: str, what: str) -> str:
        """The value another process publishes at key, waited for until the deadline."""
        try:
            return str(_client().blocking_key_value_get(key, int(self.timeout_s * 1000)))
        except Exception as e:
            raise CoordinationTimeoutError(
                f"{what}: no answer within {self.timeout_s:g} s (did a process die or stall?) "
                f"({str(e).splitlines()[0]})"
            ) from e

    def agree(self, name: str, mine: bool) -> bool:
        """Process 0's answer to a yes/no question every process asks (its own elsewhere)."""
        key = shared_key("agree", name)
        if self.process_index == 0:
            try:
                self.publish(key, "1" if mine else "0")
                return mine
            except Exception:  # asked before: the first answer stands, for everyone
                return bool(_client().blocking_key_value_get(key, int(self.timeout_s * 1000)) == "1")
        try:
            return _client().blocking_key_value_get(key, int(self.timeout_s * 1000)) == "1"
        except Exception as e:
            raise CoordinationTimeoutError(
                f"{name}: process 0 did not answer within {self.timeout_s:g} s (did it die or stall?)"
            ) from e

    def publish_outcome(self, key: str, error: BaseException | None) -> None:
        """Process 0 tells the others how the save ended (they raise the same error)."""
        doc = (
            {"ok": True}
            if error is None
            else {"ok": False, "type": type(error).__name__, "message": str(error)}
        )
        self.publish(key, json.dumps(doc))

    def wait_for_outcome(self, key: str, what: str) -> None:
        """Waits for process 0's outcome of a save; raises the error it published.

        Process 0 first announces that it reached the commit (KEY/gathering); after
        that, its gather may take up to timeout_s and the commit some more, so the
        wait for the outcome is longer than process 0's own deadline.
        """
        client = _client()
        try:
            client.blocking_key_value_get(f"{key}/gathering", int(self.timeout_s * 1000))
        except Exception as e:
            raise CoordinationTimeoutError(
                f"{what}: process 0 did not reach the commit within {self.timeout_s:g} s "
                f"(did it die or stall?) ({str(e).splitlines()[0]})"
            ) from e
        patience = self.timeout_s + max(_MARGIN_S, self.timeout_s / 2)
        try:
            raw = client.blocking_key_value_get(f"{key}/done", int(patience * 1000))
        except Exception as e:
            raise CoordinationTimeoutError(
                f"{what}: process 0 went silent during the commit: no outcome within {patience:g} s "
                f"(did it die or stall?) ({str(e).splitlines()[0]})"
            ) from e
        doc = json.loads(raw)
        if not doc["ok"]:
            error_type = {"CoordinationTimeoutError": CoordinationTimeoutError}.get(
                doc["type"], SaveFailedError
            )
            raise error_type(doc["message"])


def encode_report(
    crcs: dict[int, list[tuple[int, ...]]] | None,
    parts: dict[int, tuple[int, ...] | None] | None = None,
    layouts: dict[int, Any] | None = None,
    error: str | None = None,
) -> str:
    """What a process tells process 0 of its data files: each shard's checksums, each
    file's part sizes (a capped save chooses its own) and, compressed, where its shards
    were stored (save.stream.Layout); or the error that stopped it."""
    if error is not None:
        return json.dumps({"error": error})
    if crcs is None:
        return json.dumps({})
    return json.dumps(
        {
            "crcs": {str(k): v for k, v in crcs.items()},
            "parts": {str(k): v for k, v in (parts or {}).items()},
            "layouts": {str(k): v for k, v in (layouts or {}).items()},
        }
    )


def decode_reports(
    reports: dict[int, str], what: str
) -> tuple[dict[int, list[tuple[int, ...]]], dict[int, tuple[int, ...] | None], dict[int, Any]]:
    """Every file's checksums, part sizes and layouts from all reports; a reported error
    becomes SaveFailedError."""
    crcs: dict[int, list[tuple[int, ...]]] = {}
    parts: dict[int, tuple[int, ...] | None] = {}
    layouts: dict[int, Any] = {}
    for pid, raw in sorted(reports.items()):
        doc = json.loads(raw)
        if "error" in doc:
            raise SaveFailedError(f"{what}: process {pid} failed: {doc['error']}")
        for k, shards in doc["crcs"].items():
            crcs[int(k)] = [tuple(c) for c in shards]
        for k, sizes in doc.get("parts", {}).items():
            parts[int(k)] = None if sizes is None else tuple(sizes)
        for k, (nbytes, shards) in doc.get("layouts", {}).items():
            layouts[int(k)] = (nbytes, [(offset, tuple(frames)) for offset, frames in shards])
    return crcs, parts, layouts
