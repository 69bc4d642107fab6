"""When a training loop saves: every N steps, every N seconds, and at a preemption notice."""

from __future__ import annotations

from collections.abc import Callable

from shardsave.lifecycle.preemption import Preemption
from shardsave.save.coordination import Coordinator


class SavePolicy:
    """The answers behind Saver.should_save and Saver.reached_preemption.

    Args:
      interval_steps: a step that is a multiple of it is due.
      interval_secs: due once this many seconds (on clock) passed since the last
        save began, until a save is made.
      clock: the Saver's time source.
      coordinator: with several processes, process 0's clock decides the time-based
        part, so every process gets the same answer for the same step.
      preemption: the SIGTERM notices (save_on_preemption), or None.
      started: when the Saver started (the time-based policy counts from it).
    """

    def __init__(
        self,
        interval_steps: int | None,
        interval_secs: float | None,
        clock: Callable[[], float],
        coordinator: Coordinator,
        preemption: Preemption | None,
        started: float,
    ):
        self.interval_steps, self.interval_secs = interval_steps, interval_secs
        self._clock, self._coordinator, self.preemption = clock, coordinator, preemption
        # The newest step saved or restored (never due again), and when the last save began.
        self._newest_step: int | None = None
        self._last_save_began = started

    def saved(self, step: int | None, began: float) -> None:
        """A save of step began at `began` (on the clock): the time-based policy starts over."""
        self._last_save_began = began
        self.restored(step)

    def restored(self, step: int | None) -> None:
        """The loop has step (saved or restored): it is not due again."""
        if step is not None:
            self._newest_step = step if self._newest_step is None else max(self._newest_step, step)

    def should_save(self, step: int) -> bool:
        # Asked first, every step: under several processes each call takes part in agreeing.
        preempted = self.reached_preemption(step)
        if self._newest_step is not None and step <= self._newest_step:
            return False
        if preempted:
            return True
        if self.interval_steps is not None and step % self.interval_steps == 0:
            return True
        if self.interval_secs is None:
            return False
        due = self._clock() - self._last_save_began >= self.interval_secs
        if self._coordinator.active:
            due = self._coordinator.agree(f"should_save/{step}", due)
        return due

    def reached_preemption(self, step: int) -> bool:
        return False if self.preemption is None else self.preemption.reached(step)

    def close(self) -> None:
        if self.preemption is not None:
            self.preemption.close()
