"""A training loop that a test preempts with real SIGTERMs.

    python tests/programs/preempted_alone.py DIRECTORY

It installs a SIGTERM handler of its own first (the Saver must chain it), trains
with periodic saves, and on the notice saves the agreed step. Its final save
holds the commit until a second SIGTERM has arrived, which the test sends when
it reads {"saving": ...}; the save must not be interrupted. Prints JSON lines.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import numpy as np

import shardsave
import shardsave.storage
from shardsave.storage.testing import Hooked


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def main(directory: str) -> None:
    own_calls: list[int] = []

    def own(signum: int, frame: Any) -> None:
        own_calls.append(signum)

    signal.signal(signal.SIGTERM, own)
    saver = shardsave.Saver(save_on_preemption=True, save_interval_steps=50, max_to_keep=2)
    final: list[int] = []

    def on_write(key: str) -> None:
        if final and key.endswith(f"-{final[0]}.index"):  # the commit of the final save
            emit(saving=final[0])
            deadline = time.monotonic() + 60
            while saver.preemption_notices < 2 and time.monotonic() < deadline:
                time.sleep(0.01)

    with shardsave.storage.wrapping_stores(lambda store: Hooked(store, on_write, lambda key: None)):
        for step in range(1, 100_000):
            time.sleep(0.005)
            emit(step=step)
            if saver.reached_preemption(step):
                final.append(step)
            if saver.should_save(step):
                saver.save({"w": np.full((64, 64), step, np.float32)}, directory + "/model", global_step=step)
            if final:
                saver.wait_until_finished()
                break
    emit(saved=final[0], notices=saver.preemption_notices, own_calls=len(own_calls))
    saver.close()
    emit(handler_restored=signal.getsignal(signal.SIGTERM) is own)


if __name__ == "__main__":
    main(sys.argv[1])
