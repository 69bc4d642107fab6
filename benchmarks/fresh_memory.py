"""What touching new memory costs after it has been free for a while.

    python benchmarks/fresh_memory.py [GIB]

Maps GIB (4) of anonymous memory, touches every page, frees it, and does it
again after gaps of 0 to 10 s, printing the wall and system time of each touch.
On a VM whose balloon reports free pages to its host (virtio-balloon free page
reporting, as this project's Firecracker VMs have), memory that is free when
the reporting runs (every few seconds) goes back to the host, and touching it
again costs many times more; on bare metal every touch costs about the same.
Every restore's results are new memory, so this decides what a restore costs
after a pause (docs/guides/performance.md and benchmarks/NOTES.md).
"""

from __future__ import annotations

import mmap
import resource
import sys
import time

import numpy as np


def touch(nbytes: int) -> tuple[float, float]:
    """Maps, touches and frees nbytes; the touch's wall and system seconds."""
    block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block.madvise(mmap.MADV_HUGEPAGE)  # as numpy's and shardsave's large buffers
    pages = np.frombuffer(block, np.uint8)
    before, began = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    pages[::4096] = 1
    wall, after = time.perf_counter() - began, resource.getrusage(resource.RUSAGE_SELF)
    del pages
    block.close()
    return wall, after.ru_stime - before.ru_stime


def main() -> None:
    nbytes = int(float(sys.argv[1]) * (1 << 30)) if len(sys.argv) > 1 else 4 << 30
    touch(nbytes)
    for gap in (0, 0.5, 1, 2, 5, 0, 10, 0):
        time.sleep(gap)
        wall, system = touch(nbytes)
        print(
            f"freed {gap:>4} s before: {wall:.2f} s to touch {nbytes / (1 << 30):g} GiB ({system:.2f} s system)"
        )


if __name__ == "__main__":
    main()
