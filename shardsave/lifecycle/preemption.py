"""Preemption: the SIGTERM handler that records notices, and the step every process saves.

A scheduler that preempts a job sends SIGTERM and waits a grace period before
SIGKILL. The handler only records the notice (a second SIGTERM while the final
save runs is recorded too, and interrupts nothing); the training loop asks
Saver.reached_preemption(step) each step and saves when it answers True.

One handler serves every Saver of the process. It keeps the handler it
replaced and calls it after recording: a Python handler, or a handler installed
below Python (jax.distributed's preemption notifier installs one in C++, which
Python's signal module cannot see or call), read and called through sigaction.
close() of the last Saver puts the replaced handler back.

Several processes agree on the step through jax.distributed's key-value store,
under a key every process derives alike: the handler's installation round in
the process (shared_key("preempt", "handler"), taken when the first Saver that
asks for the handler installs it). Every Saver of a process that watches for
preemption shares that one agreement, so how many other Savers each process
made, and in which order, changes nothing. Keys under it:

  notice        set by the first process that received SIGTERM;
  step/PID      each process's proposal: the step after the one at which it
                learned of the notice.

A single process agrees with itself on the step after the one at which it learned
of the notice. With several, every call looks for the notice (one key-value
read). A process that learns of it proposes step + 1 and goes on without
waiting; the agreed step is the largest proposal. A process blocks (with a
deadline) only at its own proposed step, until every proposal is in. No process passes the agreed step before knowing it: it is
at least each process's own proposal, and nobody passes that unawares. Loops in
lockstep (a collective per step) cannot deadlock: each process proposes at its
next call, which needs nothing from a peer's later step. Loops several steps
apart (no collectives) agree too: the process ahead waits at its proposal only
until the others have called once more.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from typing import Any

from shardsave.save.coordination import Coordinator, _client, shared_key

_SIG_DFL, _SIG_IGN = 0, 1


def _sigaction_of(signum: int) -> Any | None:
    """The raw `struct sigaction` installed for signum (as bytes), or None where unreadable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # Larger than struct sigaction on every Linux and macOS ABI; only its
        # first member (the handler's address) is read.
        buffer = ctypes.create_string_buffer(512)
        if libc.sigaction(signum, None, buffer) != 0:
            return None
        return buffer
    except (OSError, AttributeError):
        return None


def _address(action: Any) -> int:
    return ctypes.c_void_p.from_buffer(action).value or 0


class _Agreement:
    """The step the processes save at after a preemption notice, once per installation of the handler."""

    def __init__(self, key: str):
        self._key = key
        self.agreed: int | None = None
        self._proposed: int | None = None
        self._lock = threading.Lock()  # Savers of one process may ask from two threads

    def reached(self, step: int, coordinator: Coordinator) -> bool:
        with self._lock:
            return self._reached(step, coordinator)

    def _reached(self, step: int, coordinator: Coordinator) -> bool:
        if self.agreed is not None:
            return step >= self.agreed
        if not coordinator.active:
            if HANDLER.notices == 0:
                return False
            # The next step, as with several processes: a loop may ask should_save and
            # then reached_preemption within one step, and the notice may arrive between
            # the two; both answer alike at every step.
            self.agreed = step + 1
            return False
        if self._proposed is None:
            if not self._noticed(coordinator):
                return False
            self._proposed = step + 1
            coordinator.publish(f"{self._key}/step/{coordinator.process_index}", str(self._proposed))
        proposals = self._proposals(coordinator, block=step >= self._proposed)
        if proposals is None:
            return False
        self.agreed = max(proposals.values())
        return step >= self.agreed

    def _noticed(self, coordinator: Coordinator) -> bool:
        client = _client()
        if HANDLER.notices:
            with contextlib.suppress(Exception):  # another process announced first
                client.key_value_set(f"{self._key}/notice", str(coordinator.process_index))
            return True
        try:
            client.key_value_try_get(f"{self._key}/notice")
        except Exception:  # not found: no process has received a notice
            return False
        return True

    def _proposals(self, coordinator: Coordinator, block: bool) -> dict[int, int] | None:
        """Every process's proposal; None while some are missing and this one need not wait."""
        key = f"{self._key}/step"
        if block:
            what = f"agreeing on the step to save at after a preemption notice (this process proposed {self._proposed})"
            values = coordinator.gather(key, what)
        else:
            values = coordinator.collect(key)
            if len(values) < coordinator.process_count:
                return None
        return {pid: int(v) for pid, v in values.items()}


class _Handler:
    """The process's SIGTERM handler, installed while some Saver asks for it."""

    def __init__(self) -> None:
        self.notices = 0
        self.agreement = _Agreement("")  # replaced at each installation
        self._lock = threading.Lock()
        self._users = 0
        self._previous: Any = None  # the Python-level handler replaced
        self._previous_c: Any = None  # a handler installed below Python, replaced
        self._call_c: Any = None

    def acquire(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ValueError(
                "Saver(save_on_preemption=True) installs a SIGTERM handler, which Python allows only "
                "from the main thread: create this Saver on the main thread"
            )
        with self._lock:
            self._users += 1
            if self._users > 1:
                return
            self.notices = 0  # a notice counts while a Saver that asked for it is open
            self.agreement = _Agreement(shared_key("preempt", "handler"))
            before = _sigaction_of(signal.SIGTERM)
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            after = _sigaction_of(signal.SIGTERM)  # Python's own trampoline, now
            self._previous_c = self._call_c = None
            if before is not None and after is not None:
                replaced = _address(before)
                if replaced not in (_SIG_DFL, _SIG_IGN, _address(after)):
                    self._previous_c = before
                    prototype = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
                    self._call_c = prototype(replaced)

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            if threading.current_thread() is not threading.main_thread():
                return  # cannot restore from here; the handler stays (it only records)
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, previous)
            if self._previous_c is not None:
                ctypes.CDLL(None).sigaction(signal.SIGTERM, self._previous_c, None)
            self._previous = self._previous_c = self._call_c = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.notices += 1
        if self._call_c is not None:
            self._call_c(signum, None, None)
        if callable(self._previous):
            self._previous(signum, frame)


HANDLER = _Handler()


class Preemption:
    """One Saver's view of preemption: the process's notice, and the step agreed on."""

    def __init__(self, coordinator: Coordinator):
        self._coordinator = coordinator
        HANDLER.acquire()
        self._agreement = HANDLER.agreement
        self._held = True

    @property
    def agreed(self) -> int | None:
        return self._agreement.agreed

    def close(self) -> None:
        if self._held:
            self._held = False
            HANDLER.release()

    def reached(self, step: int) -> bool:
        return self._agreement.reached(step, self._coordinator)
