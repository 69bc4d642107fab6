"""The `checkpoint` state file, latest_checkpoint, and tf.train.Saver's retention.

The state file is JSON, written whole through the storage layer (a temporary
file renamed into place), so a reader sees the old state or the new one, never
a torn one. It names only committed checkpoints: a checkpoint enters it after
its index is written and leaves it before its files are deleted.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from . import _format
from ._storage import Directory, join, split_prefix
from .errors import CorruptCheckpointError

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


def read_state(directory: Directory) -> CheckpointState | None:
    """The state file as stored (paths as written), or None if there is none."""
    raw = directory.read_all(STATE_FILENAME)
    if raw is None:
        return None
    where = join(directory.path, STATE_FILENAME)
    try:
        doc = json.loads(raw)
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


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """The prefix of the newest committed checkpoint the state file names.

    Args:
      checkpoint_dir: the directory holding the checkpoints (a path or URL).

    Returns:
      A prefix such as "ckpt/model-1000", or None if there is none.

    Example:
      >>> import shardsave, tempfile
      >>> shardsave.latest_checkpoint(tempfile.mkdtemp()) is None
      True
    """
    state = get_checkpoint_state(checkpoint_dir)
    if state is None:
        return None
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

    def state(self) -> CheckpointState:
        newest = self.kept[-1][0] if self.kept else ""
        return CheckpointState(
            model_checkpoint_path=newest,
            all_model_checkpoint_paths=tuple(b for b, _ in self.kept),
            all_model_checkpoint_timestamps=tuple(t for _, t in self.kept),
            last_preserved_timestamp=self.next_preserve_time - self.keep_every_n_hours * 3600,
        )


def delete_checkpoint(directory: Directory, base: str, keys: list[str] | None = None) -> None:
    """Deletes a checkpoint: its index first (it is then uncommitted), then its data."""
    keys = directory.list() if keys is None else keys
    directory.delete(_format.index_key(base)).result()
    doomed = [k for k in keys if (p := _format.parse_data_key(k)) is not None and p[0] == base]
    for future in [directory.delete(k) for k in doomed]:
        future.result()


def remove_uncommitted(directory: Directory, keep: set[str]) -> list[str]:
    """Deletes data files whose checkpoint has no index (leftovers of failed saves).

    keep: base names that must not be touched (a save in progress).
    """
    keys = directory.list()
    present = set(keys)
    doomed = [
        k
        for k in keys
        if (p := _format.parse_data_key(k)) is not None
        and p[0] not in keep
        and _format.index_key(p[0]) not in present
    ]
    for future in [directory.delete(k) for k in doomed]:
        future.result()
    return doomed
