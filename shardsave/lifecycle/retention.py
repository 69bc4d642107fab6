"""tf.train.Saver's retention: which checkpoints a Saver keeps, and deleting the rest."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from shardsave.errors import SaveFailedError
from shardsave.formats.shardsave import Listing, index_key, names_of_save_path, step_of
from shardsave.lifecycle.state import (
    CheckpointState,
    delete_checkpoint,
    get_checkpoint_mtimes,
    read_state,
    unrecorded_commits,
    write_state,
)
from shardsave.save.commit import PendingSave
from shardsave.storage.base import Store, join, location, split_prefix


def display_path(directory: Store, base: str) -> str:
    """A checkpoint's prefix as save() returns it: "s1" for a save path with no directory."""
    return base if directory.path == "." else join(directory.path, base)


@dataclass
class Retention:
    """tf.train.Saver's retention: max_to_keep, plus one kept per N hours.

    A checkpoint that falls off the end of the kept list is deleted, unless it
    was created at least keep_every_n_hours after the last one preserved: then
    it is preserved on disk for good (and leaves the list), and its creation time
    becomes last_preserved, as checkpoint_state.proto's last_preserved_timestamp
    and tf.train.CheckpointManager define it. With max_to_keep None or 0 nothing
    is recorded and nothing deleted (the state file then names only the newest).
    """

    max_to_keep: int | None
    keep_every_n_hours: float
    last_preserved: float
    kept: list[tuple[str, float]] = field(default_factory=list)  # (prefix as saved, time), oldest first
    keep_period: int | None = None  # checkpoints whose step is a multiple of it are kept for good
    # keep_best: (N, higher is better); then the N best by metric and the newest are kept,
    # instead of max_to_keep's most recent.
    keep_best: tuple[int, bool] | None = None
    metric: dict[str, float | None] = field(default_factory=dict)  # prefix -> its metric (None: none)

    def add(self, path: str, timestamp: float, metric: float | None = None) -> list[str]:
        """Records a committed checkpoint (and its metric); returns the prefixes to delete."""
        if not self.max_to_keep and self.keep_best is None:
            return []
        base = split_prefix(path)[1]
        self.kept = [(p, t) for p, t in self.kept if split_prefix(p)[1] != base]
        self.kept.append((path, timestamp))
        self.metric[path] = metric
        if self.keep_best is None:
            leaving = []
            while self.max_to_keep and len(self.kept) > self.max_to_keep:
                leaving.append(self.kept.pop(0))
        else:
            leaving = self._not_best()
        doomed: list[str] = []
        for old, t in leaving:
            self.metric.pop(old, None)
            if math.isinf(t):  # set_last_checkpoints gives no time: never deleted, as in TF
                continue
            step = step_of(split_prefix(old)[1])
            if self.keep_period and step is not None and step % self.keep_period == 0:
                continue  # kept for good, like a preserved one (it leaves the list)
            if t - self.keep_every_n_hours * 3600 >= self.last_preserved:
                self.last_preserved = t
                continue
            doomed.append(old)
        return doomed

    def _not_best(self) -> list[tuple[str, float]]:
        """Removes from the list what keep_best does not keep: all but the N best and the newest."""
        assert self.keep_best is not None
        count, higher_is_better = self.keep_best
        newest = self.kept[-1][0]
        order = {p: i for i, (p, _) in enumerate(self.kept)}  # later is newer: it wins ties
        scored = [p for p, _ in self.kept if self.metric.get(p) is not None]
        sign = 1.0 if higher_is_better else -1.0
        best = sorted(scored, key=lambda p: (sign * float(self.metric[p] or 0.0), order[p]), reverse=True)
        keep = set(best[:count]) | {newest}
        leaving = [(p, t) for p, t in self.kept if p not in keep]
        self.kept = [(p, t) for p, t in self.kept if p in keep]
        return leaving

    def state(self, newest: str, created: float, absolute_directory: str | None = None) -> CheckpointState:
        """The state file's contents after committing base name `newest`.

        Paths are relative to the directory unless absolute_directory is given.
        """

        def path(base: str) -> str:
            return base if absolute_directory is None else join(absolute_directory, base)

        kept = [(split_prefix(p)[1], t) for p, t in self.kept]
        if not kept or kept[-1][0] != newest:
            kept.append((newest, created))
        return CheckpointState(
            model_checkpoint_path=path(newest),
            all_model_checkpoint_paths=tuple(path(b) for b, _ in kept),
            all_model_checkpoint_timestamps=tuple(t for _, t in kept),
            last_preserved_timestamp=self.last_preserved,
        )


def adopt_retention(
    directory: Store,
    stem: str,
    state_file: str,
    new_retention: Callable[[float, list[tuple[str, float]]], Retention],
    started: float,
    checks_clock: bool,
) -> Retention:
    """A Saver's retention in a directory when it first commits there.

    Like tf.train.Saver, a Saver deletes only checkpoints it knows: those it saved
    or was given (recover_last_checkpoints), and, when it starts over a directory
    that has a state file, those of its own save path (stem or stem-STEP) that the
    file names or that were committed after it was written. Checkpoints of other
    save paths are never touched.

    Args:
      new_retention: makes a Retention from (last_preserved, kept) with the Saver's settings.
      started: when the Saver started (its clock): where last_preserved begins.
      checks_clock: whether to check the clock against the state file's last preserved
        time (process 0 only: the others delete nothing, and process 0's state file may
        be a moment newer than another process's start).
    """
    state = read_state(directory, state_file)
    own = names_of_save_path(stem)
    if state is None:
        # Commits of this save path whose process died before the first state file.
        found = unrecorded_commits(directory, [], stem)
        return new_retention(started, [(display_path(directory, b), t) for b, t in found])
    # Only names of this save path inside this directory: a hostile state file must
    # not steer deletion elsewhere ("../x", "", ".." never match).
    kept = [
        (base, t)
        for p, t in zip(state.all_model_checkpoint_paths, state.all_model_checkpoint_timestamps)
        if own.fullmatch(base := split_prefix(p)[1])
    ]
    kept += unrecorded_commits(directory, kept, stem)
    last_preserved = state.last_preserved_timestamp
    if checks_clock and started < last_preserved:
        # As tf.train.CheckpointManager: unsure what was preserved, keep them all.
        warnings.warn(
            f"the clock ({started}) is behind the last preserved checkpoint timestamp "
            f"({last_preserved}) of {join(directory.path, state_file)}; the checkpoints it names "
            "are left alone, and retention starts over from now",
            RuntimeWarning,
            stacklevel=5,
        )
        kept, last_preserved = [], started
    return new_retention(last_preserved, [(display_path(directory, b), t) for b, t in kept])


def remove_uncommitted(directory: Store, stem: str, listing: Listing | None = None) -> list[str]:
    """Deletes the data files of checkpoints of save path stem that have no index.

    They are leftovers of saves that failed or were killed, and of deletions cut
    short; so are the temporary files of writes a kill interrupted. Only the
    caller's own save path: the caller holds its writer lock (local directories),
    so nobody else is writing these names; other names may be another Saver's
    saves in flight.
    """
    doomed = (listing or Listing.of(directory)).leftovers(names_of_save_path(stem))
    for future in [directory.delete(k) for k in doomed]:
        future.result()
    return doomed


def recovered(paths: Iterable[str]) -> list[tuple[str, float]]:
    """(path, mtime) of the paths that are committed checkpoints, for recover_last_checkpoints."""
    found = []
    for path in paths:
        mtimes = get_checkpoint_mtimes([path])
        if mtimes:  # deleted by hand, or by another process meanwhile: dropped, as TF does
            found.append((location(path), mtimes[0]))
    return found


def finish_commit(
    save: PendingSave, retention: Retention | None, metric: float | None, absolute_directory: str | None
) -> None:
    """What follows a commit: retention's deletions and the state file.

    Args:
      save: the save just committed.
      retention: the Saver's retention in the directory; None for write_state=False
        (not recorded, nothing deleted).
      metric: the save's metric for keep_best.
      absolute_directory: write absolute paths in the state file under it (None: relative).

    Raises:
      SaveFailedError: saying the checkpoint is committed, and what failed after it.
    """
    directory = save.directory
    try:
        doomed: list[str] = []
        if retention is not None:
            doomed = [split_prefix(p)[1] for p in retention.add(save.prefix, save.timestamp, metric)]
        # Uncommit the doomed checkpoints (their index goes first), then stop naming
        # them, then remove their files and any data left without an index. A kill
        # anywhere in between leaves either a named-but-uncommitted checkpoint, which
        # readers skip, or index-less data, which the next commit removes: never an
        # unnamed commit.
        for future in [directory.delete(index_key(old)) for old in doomed]:
            future.result()
        if retention is not None and save.state_file is not None:
            state = retention.state(save.base, save.timestamp, absolute_directory)
            write_state(directory, state, save.state_file)
        listing = Listing.of(directory)
        for old in doomed:
            delete_checkpoint(directory, old, listing)
        remove_uncommitted(directory, save.stem, listing)
    except Exception as e:
        raise SaveFailedError(
            f"{save.prefix} is committed and restorable, but what follows a commit (the state "
            f"file, deleting old checkpoints) failed: {e}"
        ) from e
