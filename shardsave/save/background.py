"""The background half of a save: one save at a time, errors handed back.

A save's commit (data writes, index, state file, retention) runs on one worker
thread while the storage layer's I/O threads write the files. Its outcome is kept
until the caller's next save() or wait_until_finished(), which re-raise a
failure as SaveFailedError with the original error chained. At interpreter exit
every pending save is finished.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from shardsave.errors import SaveFailedError

log = logging.getLogger("shardsave")


_live: weakref.WeakSet[BackgroundCommits] = weakref.WeakSet()


class BackgroundCommits:
    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._describe = ""
        self._lock = threading.Lock()
        _live.add(self)

    def submit(self, fn: Callable[[], None], describe: str) -> None:
        """Runs fn in the background. The previous commit must have been waited on."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="shardsave-commit")
            self._describe = describe
            self._pending = self._executor.submit(fn)

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def wait(self) -> None:
        """Blocks until the pending commit ends; raises SaveFailedError if it failed.

        The failure is reported once: after it is raised, later saves proceed.
        """
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        error = pending.exception()
        if isinstance(error, SaveFailedError):
            raise error  # it already says what happened, and whether anything committed
        if error is not None:
            raise SaveFailedError(f"saving {self._describe} failed: {error}") from error

    def join(self) -> None:
        """Blocks until the pending commit ends, leaving its outcome for wait() to report."""
        with self._lock:
            pending = self._pending
        if pending is not None:
            pending.exception()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


@atexit.register
def _finish_pending_saves() -> None:
    for commits in list(_live):
        try:
            commits.close()
        except SaveFailedError as e:
            log.error("shardsave: a background save failed at exit: %s", e)
