"""Writing a checkpoint: its data files, and the index built from the plan and checksums.

The index is checked by the reader's own validation before anything commits.
A data file is one object, `P.data-KKKKK-of-NNNNN`, or, when it is larger than
the part size, numbered parts `P.data-KKKKK-of-NNNNN.part-JJJJJ` holding its
consecutive byte ranges (FORMAT.md).
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

from shardsave import _gc_pause
from shardsave.errors import CorruptCheckpointError, SaveFailedError
from shardsave.formats.shardsave import (
    FORMAT_VERSION,
    data_key,
    data_keys,
    decode_index,
    encode_index,
    split_parts,
)
from shardsave.index import DataFile, Index, LeafEntry, StoredShard, encode_sharding
from shardsave.save.plan import SavePlan
from shardsave.storage.base import Store


@_gc_pause.pausing
def build_index(
    plan: SavePlan,
    crcs: dict[int, list[tuple[int, ...]]],
    step: int | None,
    created: float,
    structure: Any,
    chunk: int,
    part_bytes: int,
    metrics: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    recorded: bool = True,
) -> Index:
    """The index of a saved plan: each planned shard with its file, offset and checksums."""
    shards: list[list[StoredShard]] = [[] for _ in plan.leaves]
    for k, f in enumerate(plan.files):
        for shard, crc in zip(f.shards, crcs[k]):
            start = tuple(a for a, _ in shard.box)
            stop = tuple(b for _, b in shard.box)
            shards[shard.leaf].append(StoredShard(k, shard.offset, shard.nbytes, start, stop, crc))
    leaves = tuple(
        LeafEntry(
            name=spec.name,
            dtype=spec.dtype,
            shape=spec.shape,
            kind=spec.kind,
            sharding=None if spec.sharding is None else encode_sharding(spec.sharding),
            shards=tuple(s),
            key_impl=spec.key_impl,
        )
        for spec, s in zip(plan.leaves, shards)
    )
    files = tuple(
        DataFile(f.nbytes, f.device_id, f.process_index, split_parts(f.nbytes, part_bytes))
        for f in plan.files
    )
    return Index(
        step,
        created,
        chunk,
        files,
        structure,
        leaves,
        format_version=FORMAT_VERSION,
        metrics=metrics,
        metadata=metadata,
        recorded=recorded,
    )


def encode_checked(index: Index, where: str) -> bytes:
    """The index's bytes, checked by the reader's own validation: never commit what it refuses."""
    raw = encode_index(index)
    try:
        decode_index(raw, where)
    except CorruptCheckpointError as e:
        raise SaveFailedError(
            f"{where}: shardsave built an index that its own reader refuses, so nothing was "
            f"committed (please report this as a bug, with the tree's structure): {e}"
        ) from e
    return raw


def write_data_file(
    directory: Store, base: str, k: int, n: int, data: bytes, parts: tuple[int, ...] | None, publish: bool
) -> list[Any]:
    """Starts writing data file k (its parts, if any); returns one future per object."""
    if parts is None:
        return [directory.write(data_key(base, k, n), data, publish=publish)]
    view = memoryview(data)
    keys = data_keys(base, k, n, parts)
    starts = [0, *accumulate(parts)]
    return [directory.write(key, view[a:b], publish=publish) for key, a, b in zip(keys, starts, starts[1:])]
