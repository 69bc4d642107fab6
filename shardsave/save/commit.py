"""Writing a checkpoint: its data files, and the index built from the plan and checksums.

The index is checked by the reader's own validation before anything commits.
A data file is one object, `P.data-KKKKK-of-NNNNN`, or, when it is larger than
the part size, numbered parts `P.data-KKKKK-of-NNNNN.part-JJJJJ` holding its
consecutive byte ranges (FORMAT.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import accumulate
from typing import Any, TypeAlias

import numpy as np

from shardsave.errors import CorruptCheckpointError, SaveFailedError
from shardsave.formats.shardsave import (
    CRC_CHUNK_BYTES,
    INDEX_SUFFIX,
    ZSTD,
    Listing,
    data_keys,
    decode_index,
    encode_index,
    index_key,
    split_parts,
)
from shardsave.formats.zstd_chunks import compress_shard
from shardsave.index import (
    Checksums,
    DataFile,
    Index,
    LeafEntry,
    StoredShard,
    encode_sharding,
    shard_checksums,
)
from shardsave.save.coordination import Coordinator, decode_reports, encode_report
from shardsave.save.plan import SavePlan
from shardsave.save.replicas import ReplicaPlan, offer, start_pull
from shardsave.save.stage import host_array
from shardsave.save.stream import Layout, Streamed
from shardsave.storage.base import PendingFile, Store
from shardsave.storage.local import sync_directory


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
    parts: dict[int, tuple[int, ...] | None] | None = None,
    layouts: dict[int, Layout] | None = None,
    compression: str | None = None,
) -> Index:
    """The index of a saved plan: each planned shard with its file, offset and checksums.

    parts: the part sizes of the files written in parts other than part_bytes' (a capped save's).
    layouts: with compression, where each file's shards were stored, and each file's size.
    """
    shards: list[list[StoredShard]] = [[] for _ in plan.leaves]
    sizes = {k: f.nbytes for k, f in enumerate(plan.files)}
    for k, f in enumerate(plan.files):
        layout = None if layouts is None else layouts[k]
        if layout is not None:
            sizes[k] = layout[0]
        for j, (shard, crc) in enumerate(zip(f.shards, crcs[k])):
            start = tuple(a for a, _ in shard.box)
            stop = tuple(b for _, b in shard.box)
            if layout is None:
                stored = StoredShard(k, shard.offset, shard.nbytes, start, stop, crc)
            else:
                offset, frames = layout[1][j]
                stored = StoredShard(k, offset, shard.nbytes, start, stop, crc, frames)
            shards[shard.leaf].append(stored)
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
        DataFile(
            sizes[k],
            f.device_id,
            f.process_index,
            parts[k] if parts is not None and k in parts else split_parts(sizes[k], part_bytes),
        )
        for k, f in enumerate(plan.files)
    )
    return Index(
        step,
        created,
        Checksums.chunked(chunk),
        files,
        structure,
        leaves,
        format_version=3 if compression is not None else 2,  # as encode_index writes it
        metrics=metrics,
        metadata=metadata,
        recorded=recorded,
        compression=compression,
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


def start_writes(
    directory: Store,
    base: str,
    plan: SavePlan,
    staged: dict[int, bytes],
    chunk: int,
    part_bytes: int,
    publish: bool,
    level: int | None = None,
) -> Streamed:
    """Starts writing each staged data file (in parts beyond part_bytes), and checksums them.

    level: compress each checksum chunk with zstd at this level (formats.zstd_chunks).
    """
    if level is not None:
        return _start_compressed_writes(directory, base, plan, staged, chunk, part_bytes, publish, level)
    streamed = Streamed([], {}, {}, [])
    for k, data in staged.items():
        _write_file(directory, base, k, len(plan.files), data, part_bytes, publish, streamed)
    streamed.crcs = {k: checksums_of(data, plan.files[k], chunk) for k, data in staged.items()}
    return streamed


def _write_file(
    directory: Store,
    base: str,
    k: int,
    n: int,
    data: bytes,
    part_bytes: int,
    publish: bool,
    streamed: Streamed,
) -> None:
    """Starts the writes of data file k of n (in parts beyond part_bytes), recording them in streamed."""
    parts = streamed.parts[k] = split_parts(len(data), part_bytes)
    starts = [0, *accumulate(parts or (len(data),))]
    view = memoryview(data)
    for key, a, b in zip(data_keys(base, k, n, parts), starts, starts[1:]):
        streamed.keys.append(key)
        streamed.writes.append(directory.write(key, data if parts is None else view[a:b], publish=publish))


def _start_compressed_writes(
    directory: Store,
    base: str,
    plan: SavePlan,
    staged: dict[int, bytes],
    chunk: int,
    part_bytes: int,
    publish: bool,
    level: int,
) -> Streamed:
    """start_writes with each shard stored as one zstd frame per checksum chunk, the
    frames of a file one after another; checksums cover the stored (compressed) bytes."""
    n = len(plan.files)
    streamed = Streamed([], {}, {}, [])
    for k, data in staged.items():
        view = memoryview(data)
        frames: list[bytes] = []
        crcs, shards, at = [], [], 0
        for shard in plan.files[k].shards:
            compressed, sizes, shard_crcs = compress_shard(
                view[shard.offset : shard.offset + shard.nbytes], chunk, level
            )
            frames.extend(compressed)
            shards.append((at, sizes))
            crcs.append(shard_crcs)
            at += sum(sizes)
        stored = b"".join(frames)
        del frames
        _write_file(directory, base, k, n, stored, part_bytes, publish, streamed)
        streamed.crcs[k] = crcs
        streamed.layouts[k] = (len(stored), shards)
    return streamed


# The staged data files, their writes already started (a capped save's stream), or how to
# stage them (an on-device snapshot, staged in the background).
Staged: TypeAlias = dict[int, bytes] | Streamed | Callable[[], dict[int, bytes] | Streamed]


@dataclass(frozen=True)
class PendingSave:
    """Everything the background half of one save needs."""

    directory: Store
    base: str  # the checkpoint's name in its directory ("model-1000")
    stem: str  # the save path's name ("model"): retention manages stem-STEP
    prefix: str
    plan: SavePlan
    staged: Staged
    structure: Any
    step: int | None
    timestamp: float
    key: str | None  # the coordination key when several processes save together
    # Replacing a committed checkpoint in a local directory, alone: the new files are
    # made durable under temporary names before the old index goes.
    replace_local: bool = False
    state_file: str | None = None  # the state file recording it; None: write_state=False
    metrics: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    compression_level: int | None = None  # zstd's level, where the save compresses


def checksums_of(data: bytes, plan_file: Any, chunk: int) -> list[tuple[int, ...]]:
    """The chunk checksums of each of a planned file's shards in its staged bytes."""
    view = np.frombuffer(data, dtype=np.uint8)
    return [shard_checksums(view, s.offset, s.nbytes, chunk) for s in plan_file.shards]


def commit(
    save: PendingSave,
    coordinator: Coordinator,
    part_bytes: int,
    after_commit: Callable[[], None],
    after_peer_commit: Callable[[], None],
) -> None:
    """Writes this process's data files, then commits the checkpoint (alone, or with the others).

    Alone: the index follows the data files (or replaces a local checkpoint, see
    replace_local_checkpoint), then after_commit runs. With several processes each
    reports its files' checksums; process 0 gathers them, writes the index, runs
    after_commit and tells the others the outcome, who then run after_peer_commit.
    A failure before the commit removes what this save wrote (the Saver holds the
    save path, so the names are its own).
    """
    directory, plan = save.directory, save.plan
    chunk = CRC_CHUNK_BYTES
    what = f"saving {save.prefix}"
    streamed = Streamed([], {}, {}, [])  # the objects this save writes, in order
    pending: list[PendingFile] = []
    try:
        staged = save.staged() if callable(save.staged) else save.staged
        if isinstance(staged, Streamed):
            streamed = staged
        else:
            publish = not save.replace_local
            streamed = start_writes(
                directory, save.base, plan, staged, chunk, part_bytes, publish, save.compression_level
            )
        raw, refused = b"", None
        if save.key is None:
            # The index needs only the checksums, which are known once the writes have
            # started: building and checking it overlaps the writes still in flight
            # (the commit that moved it here has the measurement).
            try:
                raw = encoded_index(save, streamed.crcs, chunk, part_bytes, streamed.parts, streamed.layouts)
            except Exception as e:  # raised once the writes are done, so that they are cleaned up
                refused = e
        results = streamed.wait()
        pending = [r for r in results if isinstance(r, PendingFile)]
        if refused is not None:
            raise refused
        if save.key is None:
            if save.replace_local:
                replace_local_checkpoint(save, pending, raw)
            else:
                directory.write(index_key(save.base), raw).result()
        else:
            coordinator.publish(
                f"{save.key}/files/{coordinator.process_index}",
                encode_report(streamed.crcs, streamed.parts, streamed.layouts),
            )
    except BaseException as e:
        if save.key is not None:  # let process 0 fail fast instead of timing out
            with contextlib.suppress(Exception):
                coordinator.publish(
                    f"{save.key}/files/{coordinator.process_index}", encode_report(None, error=repr(e))
                )
        for file in pending:
            file.discard()
        if not save.replace_local:  # the names are this save's alone (the Saver holds the lock)
            for future in [directory.delete(key) for key in streamed.keys]:
                with contextlib.suppress(Exception):  # the original error matters more
                    future.result()
        raise
    if save.key is None:
        after_commit()
    elif coordinator.process_index == 0:
        try:
            coordinator.publish(f"{save.key}/gathering", "1")
            all_crcs, all_parts, all_layouts = decode_reports(
                coordinator.gather(f"{save.key}/files", what), what
            )
            raw = encoded_index(save, all_crcs, chunk, part_bytes, all_parts, all_layouts)
            directory.write(index_key(save.base), raw).result()
            after_commit()
        except BaseException as e:
            with contextlib.suppress(Exception):
                coordinator.publish_outcome(f"{save.key}/done", e)
            raise
        coordinator.publish_outcome(f"{save.key}/done", None)
    else:
        coordinator.wait_for_outcome(save.key, what)
        after_peer_commit()


def encoded_index(
    save: PendingSave,
    crcs: dict[int, list[tuple[int, ...]]],
    chunk: int,
    part_bytes: int,
    parts: dict[int, tuple[int, ...] | None],
    layouts: dict[int, Layout],
) -> bytes:
    """The index of a save with these checksums, encoded and checked by the reader's validation."""
    index = build_index(
        save.plan,
        crcs,
        save.step,
        save.timestamp,
        save.structure,
        chunk,
        part_bytes,
        save.metrics,
        save.metadata,
        recorded=save.state_file is not None,
        parts=parts,
        layouts=layouts if save.compression_level is not None else None,
        compression=ZSTD if save.compression_level is not None else None,
    )
    return encode_checked(index, f"{save.prefix}{INDEX_SUFFIX}")


def replace_local_checkpoint(save: PendingSave, pending: list[PendingFile], raw: bytes) -> None:
    """Replaces a committed local checkpoint once every new file is durable.

    The new index is made durable under a temporary name too; then the old index
    goes (the old checkpoint is uncommitted), the new data files take their names,
    and the new index takes its name (the commit). A failure before that keeps the
    old checkpoint whole; a crash inside that window of renames leaves no
    checkpoint at this prefix, but never a mix of old and new.
    """
    directory = save.directory
    index = directory.write(index_key(save.base), raw, publish=False).result()
    pending.append(index)
    with contextlib.suppress(FileNotFoundError):  # gone already: nothing to uncommit
        os.unlink(directory.local_path(index_key(save.base)))
    for file in pending[:-1]:
        file.publish()
    sync_directory(directory)
    index.publish()
    sync_directory(directory)
    # The old checkpoint may have had more data files than the new one.
    ours = {os.path.basename(file.path) for file in pending}
    for key in Listing.of(directory).data.get(save.base, []):
        if key not in ours:
            directory.delete(key).result()


def prepare_overwrite(
    directory: Store, base: str, prefix: str, key: str | None, coordinator: Coordinator
) -> bool:
    """Readies the replacement of the committed checkpoint at prefix; True: replace it in place.

    A lone process on a local file system replaces it once the new files are durable
    (replace_local_checkpoint). Object stores have no rename, and several processes
    would need another round of agreement: there the old index is deleted first, so
    that a crash while rewriting never leaves an index over mixed data (FORMAT.md).
    """
    if directory.is_local and key is None:
        return True
    if coordinator.process_index == 0:
        try:
            directory.delete(index_key(base)).result()
        except Exception as e:
            raise SaveFailedError(f"overwriting {prefix} failed: cannot delete its index: {e}") from e
    if key is not None:
        coordinator.barrier(f"{key}/uncommitted", f"overwriting {prefix}")
    return False


@dataclass(frozen=True)
class LocalSave:
    """The background half of one local-tier save: this process's own shards (as
    PendingSave, its directory the local tier's) and its replicas of other processes'."""

    save: PendingSave
    replicas: list[ReplicaPlan]
    addresses: dict[int, str]  # every process's transfer server (save.replicas)
    leaves: list[Any]  # the stored leaves, host ones copied (a replica's host values are checked with them)
    timeout_s: float


def commit_local(
    local: LocalSave, coordinator: Coordinator, part_bytes: int, after_commit: Callable[[], object]
) -> None:
    """Writes this process's data files and its replicas of others', then commits the step locally.

    Each process reports its own files' checksums. Every process (not only
    process 0) gathers all reports against one deadline, checks that its replicas
    hold what their owners wrote, and writes the index into its own local
    directory: its commit marker of the step, written only once every process has
    its own shards and its replicas. A failure before the report removes what
    this save wrote and tells the others, who fail too (naming this process), as
    they do when a process does not report in time. Once all have reported, each
    says whether it committed, and all raise if one did not: a save fails on
    every process or on none, so that no process keeps a step another lacks, or
    goes on to the next save's agreement while another raises (those that had
    written their index take it back).
    """
    save = local.save
    directory, plan = save.directory, save.plan
    chunk = CRC_CHUNK_BYTES
    what = f"saving the local checkpoint {save.prefix}"
    deadline = time.monotonic() + local.timeout_s
    pid = coordinator.process_index
    written: list[Streamed] = []
    pending: list[PendingFile] = []
    reported = gathered = False
    error = ""
    try:
        staged = save.staged() if callable(save.staged) else save.staged
        pulls = []
        if local.replicas:
            # Replicas need several processes (so a key) and a whole staged copy (no capped save).
            assert save.key is not None and isinstance(staged, dict)
            offer(local.replicas, staged, save.key, local.timeout_s)  # first: the peers' pulls start at once
            # All at once, so that they overlap each other and this process's own writes.
            pulls = [start_pull(r, local.addresses[r.source], save.key, deadline) for r in local.replicas]
        own = (
            staged
            if isinstance(staged, Streamed)
            else start_writes(directory, save.base, plan, staged, chunk, part_bytes, True)
        )
        written.append(own)
        copies: dict[int, list[tuple[int, ...]]] = {}
        differs: str | None = None  # raised once all have reported, as a checksum mismatch is
        for pulling in pulls:
            reports = f"{save.key}/files"
            files = pulling.wait(
                deadline, what, partial(_failure_of, coordinator, reports, pulling.replica.source)
            )
            differs = differs or _host_values_differ(plan, local.leaves, files)
            streamed = start_writes(directory, save.base, plan, files, chunk, part_bytes, True)
            written.append(streamed)
            copies.update(streamed.crcs)
        for streamed in written:
            pending += [r for r in streamed.wait() if isinstance(r, PendingFile)]
        if save.key is None:
            crcs, parts = own.crcs, own.parts
        else:
            coordinator.publish(f"{save.key}/files/{pid}", encode_report(own.crcs, own.parts))
            reported = True
            crcs, parts, _ = decode_reports(coordinator.gather(f"{save.key}/files", what), what)
            gathered = True
        for k, sums in copies.items():
            if crcs.get(k) != sums:
                raise SaveFailedError(f"{what}: {_replica_differs(plan, k, sums, crcs.get(k))}")
        if differs is not None:
            raise SaveFailedError(f"{what}: {differs}")
        raw = encoded_index(save, crcs, chunk, part_bytes, parts, {})
        directory.write(index_key(save.base), raw).result()
    except BaseException as e:
        if save.key is not None and not reported:
            with contextlib.suppress(Exception):  # the others then fail at once, not at their deadline
                coordinator.publish(f"{save.key}/files/{pid}", encode_report(None, error=repr(e)))
        for file in pending:
            file.discard()
        _delete_quietly(directory, [key for streamed in written for key in streamed.keys])
        if not gathered:  # every process sees the same reports (or their absence), and fails alike
            raise
        error = f"{type(e).__name__}: {e}"
    if save.key is not None:
        outcomes = coordinator.exchange(f"{save.key}/committed", error, what)
        failed = {p: o for p, o in sorted(outcomes.items()) if o}
        if failed:
            if not error:  # committed here: take it back (index first), so that it is committed nowhere
                _delete_quietly(directory, [index_key(save.base)])
                _delete_quietly(directory, [key for streamed in written for key in streamed.keys])
            first = next(iter(failed.values()))
            raise SaveFailedError(
                f"{what}: process(es) {sorted(failed)} could not commit it ({first}); no process keeps it"
            )
    after_commit()


def _failure_of(coordinator: Coordinator, key: str, process: int) -> str | None:
    """The error a process reported at KEY/PID in place of its files, if it did."""
    report = coordinator.collect(key).get(process)
    if report is None:
        return None
    error = json.loads(report).get("error")
    return str(error) if error is not None else None


def _host_values_differ(plan: SavePlan, leaves: list[Any], files: dict[int, Any]) -> str | None:
    """Whether a replica's host values (numpy arrays, numbers: the same on every process)
    differ from this process's, naming the first leaf that does."""
    for k, data in files.items():
        for shard in plan.files[k].shards:
            spec = plan.leaves[shard.leaf]
            if spec.sharding is not None or shard.nbytes == 0:
                continue
            mine = host_array(leaves[shard.leaf], spec.dtype).reshape(-1).view(np.uint8)
            if not np.array_equal(mine, data[shard.offset : shard.offset + shard.nbytes]):
                owner = plan.files[k].process_index
                return (
                    f"leaf {spec.name!r}: a host value (a numpy array or a number) differs between this "
                    f"process and process {owner}; it must be the same on every process, so the step is "
                    "not committed"
                )
    return None


def _delete_quietly(directory: Store, keys: list[str]) -> None:
    """Deletes what a failed save wrote; an error here matters less than the one being raised."""
    for future in [directory.delete(key) for key in keys]:
        with contextlib.suppress(Exception):
            future.result()


def _replica_differs(plan: SavePlan, k: int, mine: list[tuple[int, ...]], theirs: Any) -> str:
    """Why a replica of data file k disagrees with its owner's report, naming the leaf: the
    bytes changed between the owner's staging and this process's (a transfer or memory fault)."""
    owner = plan.files[k].process_index
    for j, shard in enumerate(plan.files[k].shards):
        if theirs is None or j >= len(theirs) or tuple(theirs[j]) != tuple(mine[j]):
            return (
                f"leaf {plan.leaves[shard.leaf].name!r}: this process's replica of data file {k} differs "
                f"from what process {owner} wrote (changed on its way; please report this as a bug), so "
                "the step is not committed here"
            )
    return f"this process's replica of data file {k} differs from what process {owner} wrote"
