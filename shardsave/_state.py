"""The `checkpoint` state file, latest_checkpoint, and tf.train.Saver's retention.

The state file is JSON, written whole through the storage layer (a temporary
file renamed into place), so a reader sees the old state or the new one, never
a torn one. It names only committed checkpoints: a checkpoint enters it after
its index is written and leaves it before its files are deleted.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field

from . import _format
from ._storage import Directory, join, split_prefix, temp_target
from .errors import CorruptCheckpointError, ShardsaveError, StateFileWarning

STATE_FILENAME = "checkpoint"


@dataclass(frozen=True)
class CheckpointState:
    """The contents of a directory's `checkpoint` file.

    Attributes:
      model_checkpoint_path: the newest checkpoint's prefix.
      all_model_checkpoint_paths: the checkpoints retention keeps, oldest first.
      all_model_checkpoint_timestamps: their save times (seconds since the epoch).
      last_preserved_timestamp: when keep_checkpoint_every_n_hours last kept one.
    """

    model_checkpoint_path: str
    all_model_checkpoint_paths: tuple[str, ...] = ()
    all_model_checkpoint_timestamps: tuple[float, ...] = ()
    last_preserved_timestamp: float = 0.0


def _is_absolute(path: str) -> bool:
    return os.path.isabs(path) or "://" in path


@functools.cache
def save_path_pattern(stem: str) -> re.Pattern[str]:
    """Checkpoint names of one save path: stem itself, or stem-STEP (STEP may be negative)."""
    return re.compile(rf"{re.escape(stem)}(--?\d+)?")


def read_state(directory: Directory) -> CheckpointState | None:
    """The state file as stored (paths as written), or None if there is none.

    An unreadable state file (empty, torn by a tool that wrote it in place, or
    not a state file) is treated as absent, with a StateFileWarning: the
    directory's listing says which checkpoints are committed, and the next save
    writes the file anew. It must never block a save or a restart.
    """
    try:
        return parse_state(directory)
    except CorruptCheckpointError as e:
        warnings.warn(
            f"{e}; ignoring it: the checkpoints are found from the directory listing, and the "
            "next save rewrites it",
            StateFileWarning,
            stacklevel=3,
        )
        return None


def parse_state(directory: Directory) -> CheckpointState | None:
    """The state file as stored, None if there is none; CorruptCheckpointError if unreadable."""
    raw = directory.read_all(STATE_FILENAME)
    if raw is None:
        return None
    where = join(directory.path, STATE_FILENAME)
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise TypeError("not an object")
        paths = tuple(doc["all_model_checkpoint_paths"])
        stamps = tuple(float(t) for t in doc["all_model_checkpoint_timestamps"])
        state = CheckpointState(
            model_checkpoint_path=doc["model_checkpoint_path"],
            all_model_checkpoint_paths=paths,
            all_model_checkpoint_timestamps=stamps,
            last_preserved_timestamp=float(doc["last_preserved_timestamp"]),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{where} is not a valid state file: {e}") from e
    if not all(isinstance(p, str) for p in (state.model_checkpoint_path, *paths)) or len(paths) != len(
        stamps
    ):
        raise CorruptCheckpointError(f"{where} is not a valid state file: malformed paths")
    return state


def write_state(directory: Directory, state: CheckpointState) -> None:
    doc = {
        "model_checkpoint_path": state.model_checkpoint_path,
        "all_model_checkpoint_paths": list(state.all_model_checkpoint_paths),
        "all_model_checkpoint_timestamps": list(state.all_model_checkpoint_timestamps),
        "last_preserved_timestamp": state.last_preserved_timestamp,
    }
    directory.write(STATE_FILENAME, json.dumps(doc, indent=1).encode()).result()


def get_checkpoint_state(checkpoint_dir: str) -> CheckpointState | None:
    """Reads the `checkpoint` state file of a directory.

    Relative paths in the file are returned joined to checkpoint_dir, as
    tf.train.get_checkpoint_state does.

    Args:
      checkpoint_dir: the directory holding the checkpoints (a path or URL).

    Returns:
      The state, or None when the directory has no state file.

    Example:
      >>> import shardsave, tempfile
      >>> shardsave.get_checkpoint_state(tempfile.mkdtemp()) is None
      True
    """
    directory = Directory(os.fspath(checkpoint_dir))
    state = read_state(directory)
    if state is None:
        return None

    def full(p: str) -> str:
        return p if _is_absolute(p) else join(directory.path, p)

    return CheckpointState(
        model_checkpoint_path=full(state.model_checkpoint_path),
        all_model_checkpoint_paths=tuple(full(p) for p in state.all_model_checkpoint_paths),
        all_model_checkpoint_timestamps=state.all_model_checkpoint_timestamps,
        last_preserved_timestamp=state.last_preserved_timestamp,
    )


def is_committed(prefix: str) -> bool:
    directory, base = split_prefix(prefix)
    return bool(base) and Directory(directory).exists(_format.index_key(base))


def unrecorded_commits(
    directory: Directory, kept: list[tuple[str, float]], stem: str | None = None
) -> list[tuple[str, float]]:
    """Checkpoints committed after the state file was last written, oldest first.

    A process killed between writing a checkpoint's index and updating the state
    file (or writing the first one) leaves a committed checkpoint that the state
    file does not name. Only those newer than every recorded one count, so a
    checkpoint that keep_checkpoint_every_n_hours preserved (and the state file
    dropped) never does; with stem, only checkpoints named stem or stem-STEP.
    """
    newest = max((t for _, t in kept), default=float("-inf"))
    recorded = {b for b, _ in kept}
    named = save_path_pattern(stem) if stem is not None else None
    found = []
    for key in directory.list():
        if not key.endswith(_format.INDEX_SUFFIX) or key[: -len(_format.INDEX_SUFFIX)] in recorded:
            continue
        if named is not None and not named.fullmatch(key[: -len(_format.INDEX_SUFFIX)]):
            continue
        try:
            created = _format.decode_index(directory.read_all(key) or b"", key).created
        except ShardsaveError:
            continue  # not ours to judge, and never ours to delete
        if created > newest:
            found.append((key[: -len(_format.INDEX_SUFFIX)], created))
    return sorted(found, key=lambda bt: bt[1])


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """The prefix of the newest committed checkpoint the state file names.

    A checkpoint committed after the state file's last update (its saving process
    died in between) is newer than anything the state file names, and is returned
    instead, so a restarted job neither loses it nor collides with its name. With
    no state file at all (a kill before the first was written) or an unreadable
    one, the newest committed checkpoint in the directory is returned.

    Args:
      checkpoint_dir: the directory holding the checkpoints (a path or URL).

    Returns:
      A prefix such as "ckpt/model-1000", or None if there is none.

    Example:
      >>> import shardsave, tempfile
      >>> shardsave.latest_checkpoint(tempfile.mkdtemp()) is None
      True
    """
    directory = Directory(os.fspath(checkpoint_dir))
    state = get_checkpoint_state(checkpoint_dir)
    if state is None:
        # No state file (a kill before the first one was written) or an unreadable
        # one: the newest commit in the directory.
        commits = unrecorded_commits(directory, [])
        return join(directory.path, commits[-1][0]) if commits else None
    kept = [
        (split_prefix(p)[1], t)
        for p, t in zip(state.all_model_checkpoint_paths, state.all_model_checkpoint_timestamps)
    ]
    missed = unrecorded_commits(directory, kept)
    if missed:
        return join(directory.path, missed[-1][0])
    # Newest first; the index is the commit marker, so never name a prefix without it.
    candidates = [state.model_checkpoint_path, *reversed(state.all_model_checkpoint_paths)]
    for path in candidates:
        if is_committed(path):
            return path
    return None


@dataclass
class Retention:
    """tf.train.Saver's retention: max_to_keep, plus one kept per N hours.

    A checkpoint that falls off the end of the kept list is deleted, unless it is
    the first one saved after the preservation interval has elapsed, in which case
    it is preserved on disk for good (and leaves the list).
    """

    max_to_keep: int | None
    keep_every_n_hours: float
    next_preserve_time: float
    kept: list[tuple[str, float]] = field(default_factory=list)  # (base name, time), oldest first

    def add(self, base: str, timestamp: float) -> list[str]:
        """Records a committed checkpoint; returns the base names to delete."""
        self.kept = [(b, t) for b, t in self.kept if b != base]
        self.kept.append((base, timestamp))
        doomed: list[str] = []
        if not self.max_to_keep:
            return doomed
        while len(self.kept) > self.max_to_keep:
            base_out, t = self.kept.pop(0)
            if math.isfinite(self.keep_every_n_hours) and t > self.next_preserve_time:
                self.next_preserve_time += self.keep_every_n_hours * 3600
                continue
            doomed.append(base_out)
        return doomed

    def state(self, absolute_directory: str | None = None) -> CheckpointState:
        """The state file's contents; paths relative unless absolute_directory is given."""

        def path(base: str) -> str:
            return base if absolute_directory is None else join(absolute_directory, base)

        newest = path(self.kept[-1][0]) if self.kept else ""
        return CheckpointState(
            model_checkpoint_path=newest,
            all_model_checkpoint_paths=tuple(path(b) for b, _ in self.kept),
            all_model_checkpoint_timestamps=tuple(t for _, t in self.kept),
            last_preserved_timestamp=self.next_preserve_time - self.keep_every_n_hours * 3600,
        )


def _temp_of(key: str, base: str) -> bool:
    """Whether key is the temporary file of a write of base's index or data files."""
    written = temp_target(key)
    if written is None:
        return False
    parsed = _format.parse_data_key(written)
    return (parsed[0] if parsed else written.removesuffix(_format.INDEX_SUFFIX)) == base and written != base


def delete_checkpoint(directory: Directory, base: str, keys: list[str]) -> None:
    """Deletes every data and temporary file of checkpoint base (its index is already gone)."""
    doomed = [
        k
        for k in keys
        if ((p := _format.parse_data_key(k)) is not None and p[0] == base) or _temp_of(k, base)
    ]
    for future in [directory.delete(k) for k in doomed]:
        future.result()


def remove_uncommitted(directory: Directory, stem: str, keys: list[str] | None = None) -> list[str]:
    """Deletes the data files of checkpoints of save path stem that have no index.

    They are leftovers of saves that failed or were killed, and of deletions cut
    short; so are the temporary files of writes a kill interrupted. Only the
    caller's own save path: the caller holds its writer lock (local directories),
    so nobody else is writing these names; other names may be another Saver's
    saves in flight.
    """
    if keys is None:
        keys = directory.list()
    present = set(keys)
    named = save_path_pattern(stem)

    def leftover(key: str) -> bool:
        written = temp_target(key)
        if written is not None:  # an interrupted write of a data file or an index of this save path
            p = _format.parse_data_key(written)
            base = p[0] if p else written.removesuffix(_format.INDEX_SUFFIX)
            return base != written and named.fullmatch(base) is not None
        p = _format.parse_data_key(key)
        return p is not None and named.fullmatch(p[0]) is not None and _format.index_key(p[0]) not in present

    doomed = [k for k in keys if leftover(k)]
    for future in [directory.delete(k) for k in doomed]:
        future.result()
    return doomed
