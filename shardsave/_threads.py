"""Thread pools that start on first use and keep working while the interpreter exits.

A save still pending at exit is finished by an atexit hook (see _commit), which
runs after concurrent.futures has stopped accepting new work; from then on a
task runs inline on the calling thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Pool:
    def __init__(self, name: str, threads: int):
        self._name, self._threads = name, threads
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix=self._name)
            executor = self._executor
        try:
            return executor.submit(fn, *args)
        except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
            future: Future[Any] = Future()
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)
            return future
