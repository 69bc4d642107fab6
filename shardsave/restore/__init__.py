"""The restore path, in the order a restore takes it.

targets (what the caller asked for, as LeafRequests) -> plan (pure: units, reads,
batches under the budget) -> fetch (verified reads, shared with
CheckpointReader.verify) -> place (assembly onto devices); engine runs a plan,
and shared spreads the reads of replicated leaves over processes. Nothing here
imports a format: readers in shardsave.formats turn a checkpoint into index records.

The names below are the seams that tests and instrumentation use.
"""

from shardsave.restore.engine import RestoreTimes, restore_leaves
from shardsave.restore.fetch import Fetcher, RestoreObserver
from shardsave.restore.plan import (
    DEFAULT_BATCH_BYTES,
    MAX_SPAN_BYTES,
    MIN_SEQUENTIAL_BYTES,
    LeafRequest,
    Placement,
    RestorePlan,
    plan_restore,
)

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "MAX_SPAN_BYTES",
    "MIN_SEQUENTIAL_BYTES",
    "Fetcher",
    "LeafRequest",
    "Placement",
    "RestoreObserver",
    "RestorePlan",
    "RestoreTimes",
    "plan_restore",
    "restore_leaves",
]
