"""The host memory a Saver's saves copy their shards into, kept from save to save.

Without a cap, one host copy of everything this process writes, made for a plan
(in the background by Saver.prepare, or by the first save of the plan) and
refilled by each later save of it. With save_host_bytes, a Ring of buffers of
that much in all, made in the background when the Saver is, through which the
shards stream to the store. With snapshot_on_device (and an asynchronous save),
a save blocks only for copies on the devices, and the copy to the host runs on
the commit thread.
"""

from __future__ import annotations

import contextlib
import threading
from functools import partial
from typing import Any

from shardsave.errors import SaveFailedError
from shardsave.formats.shardsave import CRC_CHUNK_BYTES
from shardsave.save.commit import Staged
from shardsave.save.plan import SavePlan
from shardsave.save.stage import StagingBuffer, prepare, snapshot_on_device, stage
from shardsave.save.stream import Ring, stream
from shardsave.storage.base import Store


class HostStaging:
    """One Saver's staging memory: a copy per plan, or a capped ring.

    Args:
      save_host_bytes: the cap (see Saver), or None for one copy of everything.
      timeout_s: how long a save waits for prepare()'s buffers.
    """

    def __init__(self, save_host_bytes: int | None, timeout_s: float):
        self._timeout_s = timeout_s
        # The buffers of the last plan staged, refilled by the next save of that plan.
        self._plan: SavePlan | None = None
        self._buffers: dict[int, StagingBuffer] = {}
        self._preparing: threading.Thread | None = None  # prepare()'s, filling _buffers
        # A capped save's buffers instead, touched now so that the first save is as fast as the next.
        self._ring: Ring | None = None
        if save_host_bytes is not None:
            self._ring = Ring(save_host_bytes)
            self._ring.start_warming()

    def prepare(self, plan: SavePlan, process_index: int) -> None:
        """Makes the plan's host copy in the background (nothing to do with a cap)."""
        if self._ring is not None or self._plan is plan:
            return
        self._prepared("prepare()")
        self._plan, self._buffers = plan, {}
        self._preparing = threading.Thread(
            target=prepare, args=(plan, process_index, self._buffers), name="shardsave-prepare", daemon=True
        )
        self._preparing.start()

    def stage(
        self,
        plan: SavePlan,
        leaves: list[Any],
        process_index: int,
        directory: Store,
        base: str,
        prefix: str,
        *,
        publish: bool,
        on_device: bool,
        part_bytes: int,
    ) -> Staged:
        """Copies this process's shards out of the arrays (what a save blocks for).

        Args:
          publish: a capped save's data files may take their names as they are
            written (False while they would replace a committed checkpoint's).
          on_device: copy on the devices now, and to the host on the commit thread.
          part_bytes: the largest object a capped save writes.
        """
        if self._ring is not None:
            return self._stream(
                plan, leaves, process_index, directory, base, prefix, publish, on_device, part_bytes
            )
        self._prepared(f"saving {prefix}")
        if self._plan is not plan:
            self._plan, self._buffers = plan, {}
        if on_device:
            copies, host_leaves = snapshot_on_device(plan, leaves, process_index)
            return partial(stage, plan, host_leaves, process_index, self._buffers, copies)
        return stage(plan, leaves, process_index, self._buffers)

    def _stream(
        self,
        plan: SavePlan,
        leaves: list[Any],
        process_index: int,
        directory: Store,
        base: str,
        prefix: str,
        publish: bool,
        on_device: bool,
        part_bytes: int,
    ) -> Staged:
        """A capped save's data: streamed now, or (on_device) from device copies later."""
        assert self._ring is not None
        args = (directory, base, self._ring, CRC_CHUNK_BYTES, part_bytes, publish)
        if on_device:
            copies, host_leaves = snapshot_on_device(plan, leaves, process_index)
            return partial(stream, plan, host_leaves, process_index, *args, copies)
        try:
            return stream(plan, leaves, process_index, *args)
        except SaveFailedError:
            raise
        except Exception as e:
            raise SaveFailedError(f"saving {prefix} failed while streaming its data: {e}") from e

    def _prepared(self, what: str) -> None:
        """Waits for prepare()'s buffers, within the deadline."""
        if self._preparing is None:
            return
        self._preparing.join(self._timeout_s)
        if self._preparing.is_alive():
            raise SaveFailedError(
                f"{what}: the host buffers that prepare() makes were not ready within "
                f"{self._timeout_s:.0f} s (storage_timeout_s)"
            )
        self._preparing = None

    def close(self) -> None:
        """Frees the host memory (after prepare()'s thread, if one runs, has finished)."""
        with contextlib.suppress(SaveFailedError):  # a daemon thread: its buffers go with this object
            self._prepared("close()")
        self._plan, self._buffers = None, {}
        if self._ring is not None:
            self._ring.close()
