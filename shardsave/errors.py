"""Public exceptions of shardsave.

Every class also derives from the built-in exception that fits it, so code that
already catches ``FileNotFoundError`` or ``ValueError`` keeps working.
"""

from __future__ import annotations


class ShardsaveError(Exception):
    """Base class of every error raised by shardsave."""


class CheckpointNotFoundError(ShardsaveError, FileNotFoundError):
    """No committed checkpoint (no ``P.index``) exists at the given prefix."""


class CheckpointExistsError(ShardsaveError, FileExistsError):
    """A committed checkpoint already exists at the prefix being saved to."""


class CorruptCheckpointError(ShardsaveError, ValueError):
    """Stored bytes or the index disagree with what the format requires."""


class UnsupportedFormatError(CorruptCheckpointError):
    """The index was written by a newer format version than this reader knows."""


class StructureMismatchError(ShardsaveError, ValueError):
    """The target tree cannot be filled from the checkpoint (names, shapes, dtypes)."""


class LeafNotFoundError(StructureMismatchError, KeyError):
    """A leaf name is not in the checkpoint; the message suggests close names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class ShardingMismatchError(ShardsaveError, ValueError):
    """A sharding cannot be used here (its devices do not exist, or none is known)."""


class SaveFailedError(ShardsaveError, RuntimeError):
    """Writing a checkpoint failed; the original error is chained as ``__cause__``."""


class StorageError(ShardsaveError, OSError):
    """The store did not answer within its deadline, or failed; the message names the location."""


class ConcurrentSaveError(ShardsaveError, RuntimeError):
    """Another writer (a Saver in this or another process) holds the save path."""


class StateFileWarning(UserWarning):
    """The `checkpoint` state file was unreadable and was rebuilt from the directory listing."""


class CoordinationTimeoutError(ShardsaveError, TimeoutError):
    """Other processes did not reach a collective step of a save or restore in time."""
