"""Saver: the one place that knows the order of a save and of a restore.

Save:    tree -> leaf specs -> plan (cached) -> stage (blocking; or an on-device
         snapshot, staged later) -> [background: checksums -> data writes ->
         (several processes: report, process 0 gathers) -> index (commit) ->
         state file -> retention].
Restore: index -> match target leaves -> plan reads -> read, verify, place.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import jax

from shardsave import _gc_pause
from shardsave import tree as _tree
from shardsave.errors import CheckpointExistsError, SaveFailedError, ShardsaveError, StorageError
from shardsave.formats import holds_value, open_checkpoint, read_value
from shardsave.formats.shardsave import (
    DEFAULT_PART_BYTES,
    checkpoint_name,
    index_key,
    stem_of,
)
from shardsave.index import json_document
from shardsave.lifecycle.policies import SavePolicy
from shardsave.lifecycle.preemption import HANDLER, Preemption
from shardsave.lifecycle.retention import (
    Retention,
    adopt_retention,
    finish_commit,
    recovered,
)
from shardsave.lifecycle.state import STATE_FILENAME, newest_of_save_path
from shardsave.restore.engine import restore_leaves
from shardsave.restore.shared import lay_out, plan_shared_reads
from shardsave.restore.targets import StoredValues, requests_for_saved, requests_for_target
from shardsave.save.background import BackgroundCommits
from shardsave.save.commit import LocalSave, PendingSave, commit, commit_local, prepare_overwrite
from shardsave.save.coordination import Coordinator, encode_report, shared_key
from shardsave.save.plan import PlanCache, compression_level, leaf_spec, step_number
from shardsave.save.replicas import (
    describe_self,
    plan_replica,
    read_peers,
    replica_shifts,
)
from shardsave.save.stage import host_copies
from shardsave.save.staging import HostStaging
from shardsave.save.stream import MIN_SAVE_HOST_BYTES
from shardsave.storage import open_prefix
from shardsave.storage.base import DEFAULT_STORAGE_TIMEOUT_S, Lock, Store, location, split_prefix
from shardsave.tiers.local import LocalTier
from shardsave.tiers.recover import LOCAL, PERSISTENT, restore_from_tiers

_PLAN_CACHE_SIZE = 8


# Below the default of jax.distributed.initialize(heartbeat_timeout_seconds=...), a
# setting, not a measurement: when a peer dies, jax aborts the survivors once that
# passes, so shardsave must have named it by then (Coordinator.check_timeout).
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SaveInfo:
    """Timings of a save, for logs and reports.

    Attributes:
      path: the checkpoint prefix.
      nbytes: bytes this process wrote.
      blocking_seconds: how long save() blocked the caller (the device-to-host copy).
      commit_seconds: from save() returning to the commit, or None while in flight
        (or if the save failed).
    """

    path: str
    nbytes: int
    blocking_seconds: float
    commit_seconds: float | None = None


@dataclass(frozen=True)
class RestoreInfo:
    """Timings of a restore, for logs and reports.

    The rest of `seconds` (less the three parts below) is reading, verifying and
    assembling.

    Attributes:
      path: the checkpoint prefix.
      nbytes: bytes of the leaves restored (in their target dtype).
      seconds: the whole restore() call.
      index_seconds: reading and validating the index.
      plan_seconds: matching the target's leaves and planning the reads.
      place_seconds: creating the arrays on their devices (jax's own calls).
      tier: where restore_latest() read it: "local" or "persistent"; None for restore().
      reason: why restore_latest() chose that tier and step.
    """

    path: str
    nbytes: int
    seconds: float
    index_seconds: float
    plan_seconds: float
    place_seconds: float
    tier: str | None = None
    reason: str | None = None


class Saver:
    """Saves and restores pytrees of sharded jax.Arrays, numpy arrays and numbers.

    The contract is tf.train.Saver's: save(tree, "dir/model", global_step=N)
    writes the checkpoint "dir/model-N", records it in the directory's
    `checkpoint` state file, and deletes checkpoints beyond max_to_keep.

    Args:
      max_to_keep: how many recent checkpoints to keep; None or 0 keeps all.
      keep_checkpoint_every_n_hours: additionally keep (for good) one checkpoint
        per this many hours of saving.
      sharded: write one data file per device that stores something (True) or a
        single data file (False).
      pad_step_number: name checkpoints "model-00001000" instead of "model-1000".
      save_relative_paths: write paths relative to the directory in the state
        file, so the directory can be moved.
      allow_empty: save() of a tree with no leaves returns None instead of raising.
      async_save: return from save() once the shards are copied to host memory;
        the writes and the commit finish in the background.
      reshape: let restore() fill a target leaf of another shape with the same
        number of elements.
      restore_sequentially: restore in bounded batches so host memory stays near
        max_host_bytes.
      max_host_bytes: the host-memory budget of a restore: what it holds beyond the
        restored arrays (reads in flight and, on accelerators, assembly; a CPU
        device adopts the assembled buffer as the array itself, and reads that
        land in it are not limited). With restore_sequentially at least 32 MiB
        (reads are verified in whole 4 MiB checksum chunks; a smaller cap is
        refused with that reason); None reads ahead up to 512 MiB.
      timeout_s: with several processes (jax.distributed), how long process 0 waits
        for the others' reports before raising CoordinationTimeoutError naming the
        missing ones. Keep it below jax.distributed.initialize's
        heartbeat_timeout_seconds (100 s by default): past that, jax aborts the
        survivors of a dead process before shardsave can name it.
      storage_timeout_s: the deadline of each storage operation (an object store
        that does not answer raises StorageError naming the location).
      snapshot_on_device: with async_save on accelerators, save() blocks only for a
        copy of the shards made on their own devices (which needs that much free
        device memory until the save commits); the device-to-host transfer then
        runs in the background. On CPU devices it changes nothing but the timing.
      save_host_bytes: the most host memory a save holds at once beyond the arrays
        themselves (staging buffers, writes in flight), at least 8 MiB. The shards
        then stream from the devices through buffers of that much in all, which are
        kept between saves and made (in the background) when the Saver is; each
        data file is written in numbered parts of one buffer each. An async save
        returns once every shard has been copied into them, that is once what is
        still unwritten fits in the cap (with snapshot_on_device, once the
        on-device copies are made). None (the default) stages each save in one host
        copy of everything this process writes, kept for the next save.
      clock: the time source for timestamps and keep_checkpoint_every_n_hours.
      part_bytes: the largest object written; a device's data beyond it is split into
        numbered parts (the default, 4 GiB, stays below S3's 5 GiB single-PUT limit).
      keep_period: retention also keeps, for good, every checkpoint whose step is a
        multiple of it (for evaluation later), beside max_to_keep's most recent.
      keep_best: keep exactly the N best checkpoints by the metric best_metric that
        save(metrics=...) passed (best_mode "min" or "max"; ties: the newer wins; a
        missing or non-finite metric is never best), and the newest, instead of
        max_to_keep's most recent. Metrics are read back after a restart.
      save_interval_steps: should_save(step) is true when step is a multiple of it.
      save_interval_secs: should_save(step) is true once this many seconds (on
        clock) have passed since the last save began (or the Saver started), until
        a save is made. With several processes, process 0's clock decides and every
        process gets the same answer for the same step.
      save_on_preemption: install a SIGTERM handler (chaining the one it replaces, until
        close()) that records a preemption notice instead of ending the process, so
        that reached_preemption(step) and should_save(step) answer True at a step every
        process agrees on; the loop saves that step and exits.
      compression: "zstd" (or a zstd level, 1 to 22; "zstd" is level 1) stores each
        4 MiB checksum chunk of every shard as a zstd frame, checksummed as stored;
        None (the default) stores raw bytes. Pays where bandwidth costs more than
        the CPU that compresses (an object store; a state of mostly zeros, such as
        an optimizer's early moments): docs/guides/object-stores.md measures when.
        Needs the zstandard package (`shardsave[zstd]`); not with save_host_bytes.
      share_reads: with several processes, read the stored bytes of a leaf that
        several processes need (a replicated leaf) once, spread over the processes,
        and share them through jax's collectives, instead of once per process.
        None (the default) shares on object stores and not from local paths.
      local_directory: a local tier beside the save path (which is then the
        persistent tier): a directory on this host's own memory or disk, such as
        /dev/shm/ckpt. save(..., tier="local") writes each process's shards there,
        and a copy of other processes' (replicas); restore_latest() restores the
        newest step from whichever tier holds it whole. docs/guides/tiers.md.
      local_interval_steps: should_save(step, tier="local") is true when step is a
        multiple of it.
      local_max_to_keep: how many local checkpoints each process keeps.
      replicas: how many other processes hold a copy of each process's local
        shards, each in a failure domain (local directory) of its own; 0 keeps
        none (a single process has no peer to hold one). Not with save_host_bytes.

    Examples:
      >>> import jax.numpy as jnp, shardsave, tempfile
      >>> saver = shardsave.Saver(max_to_keep=2)
      >>> d = tempfile.mkdtemp()
      >>> path = saver.save({"w": jnp.ones((4, 2))}, f"{d}/model", global_step=7)
      >>> saver.wait_until_finished()
      >>> restored = saver.restore(path, {"w": jnp.zeros((4, 2))})
      >>> float(restored["w"].sum())
      8.0
    """

    def __init__(
        self,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float = 10000.0,
        sharded: bool = True,
        pad_step_number: bool = False,
        save_relative_paths: bool = True,
        allow_empty: bool = False,
        async_save: bool = True,
        reshape: bool = False,
        restore_sequentially: bool = False,
        max_host_bytes: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        storage_timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S,
        snapshot_on_device: bool = False,
        save_host_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
        part_bytes: int = DEFAULT_PART_BYTES,
        share_reads: bool | None = None,
        save_interval_steps: int | None = None,
        save_interval_secs: float | None = None,
        keep_period: int | None = None,
        keep_best: int | None = None,
        best_metric: str = "loss",
        best_mode: str = "min",
        save_on_preemption: bool = False,
        compression: str | int | None = None,
        local_directory: str | None = None,
        local_interval_steps: int | None = None,
        local_max_to_keep: int = 2,
        replicas: int = 1,
    ):
        if max_to_keep is not None and max_to_keep < 0:
            raise ValueError(f"max_to_keep must be None or >= 0, found {max_to_keep}")
        if not keep_checkpoint_every_n_hours > 0:
            raise ValueError(
                f"keep_checkpoint_every_n_hours must be > 0, found {keep_checkpoint_every_n_hours}"
            )
        if max_host_bytes is not None and max_host_bytes <= 0:
            raise ValueError(f"max_host_bytes must be positive, found {max_host_bytes}")
        if part_bytes < 1:
            raise ValueError(f"part_bytes must be positive, found {part_bytes}")
        if save_host_bytes is not None and save_host_bytes < MIN_SAVE_HOST_BYTES:
            raise ValueError(
                f"save_host_bytes must be None or at least {MIN_SAVE_HOST_BYTES >> 20} MiB, "
                f"found {save_host_bytes}"
            )
        self.save_host_bytes = save_host_bytes
        self.compression = compression
        self._level = compression_level(compression, save_host_bytes)
        self.part_bytes = part_bytes
        self.share_reads = share_reads
        if save_interval_steps is not None and save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be None or >= 1, found {save_interval_steps}")
        if save_interval_secs is not None and not save_interval_secs > 0:
            raise ValueError(f"save_interval_secs must be None or > 0, found {save_interval_secs}")
        self.save_interval_steps = save_interval_steps
        self.save_interval_secs = save_interval_secs
        if keep_period is not None and keep_period < 1:
            raise ValueError(f"keep_period must be None or >= 1, found {keep_period}")
        self.keep_period = keep_period
        if keep_best is not None and keep_best < 1:
            raise ValueError(f"keep_best must be None or >= 1, found {keep_best}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', found {best_mode!r}")
        self.keep_best, self.best_metric, self.best_mode = keep_best, best_metric, best_mode
        self.max_to_keep = max_to_keep
        self.keep_checkpoint_every_n_hours = keep_checkpoint_every_n_hours
        self.sharded = sharded
        self.pad_step_number = pad_step_number
        self.save_relative_paths = save_relative_paths
        self.allow_empty = allow_empty
        self.async_save = async_save
        self.reshape = reshape
        self.restore_sequentially = restore_sequentially
        self.max_host_bytes = max_host_bytes
        self.snapshot_on_device = snapshot_on_device
        self._clock = clock
        self.timeout_s = timeout_s
        self.storage_timeout_s = storage_timeout_s
        self._created = clock()
        self._commits = BackgroundCommits()
        self._coordinator = Coordinator(timeout_s)
        self._plans = PlanCache(_PLAN_CACHE_SIZE)
        self._staging = HostStaging(save_host_bytes, storage_timeout_s)
        self._retention: dict[str, Retention] = {}
        self._locks: dict[tuple[str, str], Lock] = {}
        self._last_directory: str | None = None
        self._last_save: SaveInfo | None = None
        self._last_restore: RestoreInfo | None = None
        self._local: LocalTier | None = None
        if local_directory is not None:
            if replicas and save_host_bytes is not None:
                raise ValueError(
                    "a local tier's replicas with save_host_bytes are not supported: a capped save chooses "
                    "its data files' parts as it streams them, and a replica must be written in the same "
                    "parts; pass replicas=0 or save_host_bytes=None"
                )
            self._local = LocalTier(
                local_directory, local_interval_steps, local_max_to_keep, replicas, storage_timeout_s
            )
        elif local_interval_steps is not None:
            raise ValueError("local_interval_steps needs local_directory")
        self._shifts: list[int] | None = None  # where each process's replicas go, once known
        self._addresses: dict[int, str] = {}  # every process's transfer server (save.replicas)
        self._local_newest: int | None = None  # the newest local step saved or restored
        self._policy = SavePolicy(
            save_interval_steps,
            save_interval_secs,
            clock,
            self._coordinator,
            Preemption(self._coordinator) if save_on_preemption else None,
            started=self._created,
        )

    # ------------------------------------------------------------ save

    @property
    def last_save(self) -> SaveInfo | None:
        """Timings of the most recent save() call."""
        return self._last_save

    @property
    def last_restore(self) -> RestoreInfo | None:
        """Timings of the most recent successful restore() call."""
        return self._last_restore

    @property
    def last_checkpoints(self) -> list[str]:
        """The checkpoints retention keeps, oldest first, as save() returned them.

        Those of the directory saved to last; empty with max_to_keep None or 0, as
        in tf.train.Saver.
        """
        if self._last_directory is None:
            return []
        retention = self._retention.get(self._last_directory)
        return [] if retention is None else [p for p, _ in retention.kept]

    def set_last_checkpoints_with_time(self, last_checkpoints_with_time: list[tuple[str, float]]) -> None:
        """Sets the checkpoints retention manages: (prefix, creation time) pairs, oldest first.

        As tf.train.Saver.set_last_checkpoints_with_time: this Saver then deletes
        them as max_to_keep says, and no others.

        Args:
          last_checkpoints_with_time: prefixes (in one or several directories) and times.
        """
        by_directory: dict[str, list[tuple[str, float]]] = {}
        for path, t in last_checkpoints_with_time:
            by_directory.setdefault(split_prefix(location(path))[0], []).append((location(path), float(t)))
        for directory, kept in by_directory.items():
            retention = self._retention.get(directory)
            if retention is None:
                self._retention[directory] = self._new_retention(self._created, kept)
            else:
                retention.kept = kept
            self._last_directory = directory

    def set_last_checkpoints(self, last_checkpoints: list[str]) -> None:
        """Sets the checkpoints retention manages, with no times (deprecated in TensorFlow too).

        With no time a checkpoint counts as infinitely new: keep_checkpoint_every_n_hours
        preserves it rather than delete it. Prefer set_last_checkpoints_with_time.
        """
        self.set_last_checkpoints_with_time([(p, math.inf) for p in last_checkpoints])

    def recover_last_checkpoints(self, checkpoint_paths: list[str]) -> None:
        """Takes over the retention of checkpoints that exist, by their index's time.

        tf.train.Saver's restart idiom:
        `saver.recover_last_checkpoints(get_checkpoint_state(d).all_model_checkpoint_paths)`.
        Paths whose checkpoint no longer exists (deleted by hand, or by another
        process meanwhile) are dropped. A shardsave Saver also continues the
        retention of its own save path without it (see save()).

        Args:
          checkpoint_paths: checkpoint prefixes, oldest first.
        """
        self.set_last_checkpoints_with_time(recovered(checkpoint_paths))

    def _new_retention(self, last_preserved: float, kept: list[tuple[str, float]]) -> Retention:
        # With max_to_keep None or 0 nothing is recorded (tf.train.Saver's last_checkpoints is []).
        kept = kept if self.max_to_keep or self.keep_best else []
        best = None if self.keep_best is None else (self.keep_best, self.best_mode == "max")
        retention = Retention(
            self.max_to_keep, self.keep_checkpoint_every_n_hours, last_preserved, kept, self.keep_period, best
        )
        if best is not None:  # a restarted Saver reads the metrics back from the checkpoints
            for path, _ in kept:
                with contextlib.suppress(ShardsaveError):
                    retention.metric[path] = self._metric(
                        open_checkpoint(path, self.storage_timeout_s)[2].metrics
                    )
        return retention

    def _metric(self, metrics: dict[str, Any] | None) -> float | None:
        value = (metrics or {}).get(self.best_metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None  # missing, or not a number: never best
        return float(value)

    @_gc_pause.pausing
    def save(
        self,
        tree: Any,
        save_path: str,
        global_step: int | None = None,
        *,
        overwrite: bool = False,
        latest_filename: str | None = None,
        write_state: bool = True,
        metrics: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        tier: str = PERSISTENT,
    ) -> str | None:
        """Saves a pytree as the checkpoint save_path[-global_step].

        With async_save, returns once every shard is copied to host memory (the
        arrays may then be deleted, donated or changed); the commit finishes in
        the background. A failure there is raised by the next save() or
        wait_until_finished(). A second save first waits for the previous one.

        Args:
          tree: a pytree of jax.Array (any sharding), numpy arrays and numbers.
          save_path: the checkpoint prefix, such as "ckpt/model" or "memory://x/m".
          global_step: appended to the prefix as "-STEP" when given.
          overwrite: replace a committed checkpoint at the same prefix.
          latest_filename: the state file's name in the directory (default "checkpoint").
          write_state: record the checkpoint in the state file and in retention
            (max_to_keep); with False it is committed and left alone, as in
            tf.train.Saver.
          metrics: a dict with string keys and JSON values (numpy and jax scalars
            count as numbers), stored in the index and so committed with the
            checkpoint; CheckpointReader(path).metrics reads it, and keep_best ranks by it.
          metadata: the same for anything else (a data loader's position);
            CheckpointReader(path).metadata reads it.
          tier: "persistent" (the default) saves to save_path; "local" saves the
            step to the Saver's local tier instead (its local_directory, named
            after save_path's last part), each process's own shards and its
            replicas of others'. A local checkpoint commits once every process
            holds its shards and replicas; retention keeps local_max_to_keep of
            them. latest_filename, overwrite and write_state apply to the
            persistent tier only; a local save replaces a local checkpoint of
            the same step.

        Returns:
          The checkpoint's prefix (in the local directory, for a local save), or
          None for an empty tree with allow_empty.

        Raises:
          ValueError: the tree is empty or two leaves have the same name.
          TypeError: a leaf cannot be stored, or metrics/metadata hold what JSON cannot.
          CheckpointExistsError: the prefix holds a committed checkpoint.
          SaveFailedError: the previous asynchronous save failed.
        """
        if tier not in (PERSISTENT, LOCAL):
            raise ValueError(f'tier must be "persistent" or "local", found {tier!r}')
        if tier == LOCAL and self._local is None:
            raise ValueError('save(tier="local") needs a local tier: pass Saver(local_directory=...)')
        if tier == LOCAL and global_step is None:
            raise ValueError('save(tier="local") needs global_step: local checkpoints are told apart by it')
        self._commits.wait()
        began = time.perf_counter()
        began_on_clock = self._clock()
        names, leaves, treedef = _tree.flatten(tree)
        if not leaves:
            if self.allow_empty:
                return None
            raise ValueError("the tree to save has no leaves; pass allow_empty=True to Saver to allow it")
        save_path = location(save_path)
        documents = json_document(metrics, "metrics"), json_document(metadata, "metadata")
        step = None if global_step is None else step_number(global_step)
        prefix = checkpoint_name(save_path, step, self.pad_step_number)
        # Validate every leaf before anything on disk changes.
        stored = [leaf_spec(n, x) for n, x in zip(names, leaves)]
        specs, leaves = [spec for spec, _ in stored], [leaf for _, leaf in stored]
        if tier == LOCAL:
            assert step is not None
            structure = self._plans.structure(tree, treedef)
            return self._save_local(prefix, step, specs, leaves, structure, documents, began)
        try:
            directory, base = open_prefix(prefix, self.storage_timeout_s)
        except StorageError as e:
            raise SaveFailedError(f"saving {prefix} failed: {e}") from e
        stem = split_prefix(save_path)[1]
        key = None
        if self._coordinator.active:
            self._coordinator.check_timeout()
            key = self._coordinator.key_for_save(prefix)
        if key is not None and not self.sharded:
            raise ValueError(
                "sharded=False writes one file from one process; use sharded=True across processes"
            )
        directory.check_parent(prefix)
        if latest_filename is not None and (
            not latest_filename or os.path.basename(latest_filename) != latest_filename
        ):
            raise ValueError(
                f"latest_filename must be a file name without directories, found {latest_filename!r}"
            )
        structure = self._plans.structure(tree, treedef)
        taken = None
        if self._coordinator.process_index == 0:
            try:
                taken = self._lock(directory, stem)
            except OSError as e:
                raise SaveFailedError(
                    f"saving {prefix} failed: cannot write in {directory.path!r}: {e}"
                ) from e
        committed_key = index_key(base)
        replace_local = False
        try:
            committed = directory.exists(committed_key)
            if committed and not overwrite:
                raise CheckpointExistsError(
                    f"a committed checkpoint exists at {prefix!r}; pass overwrite=True to replace it"
                )
        except (StorageError, CheckpointExistsError) as e:
            if taken is not None:  # refused before writing: leave nothing behind, the lock included
                taken.release()
                del self._locks[directory.path, stem]
            if isinstance(e, CheckpointExistsError):
                raise
            raise SaveFailedError(f"saving {prefix} failed: {e}") from e
        if committed:
            replace_local = prepare_overwrite(directory, base, prefix, key, self._coordinator)

        plan = self._plans.plan(specs, self.sharded)
        pid = jax.process_index()
        staged = self._staging.stage(
            plan,
            leaves,
            pid,
            directory,
            base,
            prefix,
            publish=not replace_local,
            on_device=self.snapshot_on_device and self.async_save,
            part_bytes=self.part_bytes,
        )
        nbytes = sum(f.nbytes for f in plan.files if f.process_index == pid)
        pending = PendingSave(
            directory=directory,
            base=base,
            stem=stem,
            prefix=prefix,
            plan=plan,
            staged=staged,
            structure=structure,
            step=step,
            timestamp=self._clock(),
            key=key,
            replace_local=replace_local,
            state_file=(latest_filename or STATE_FILENAME) if write_state else None,
            metrics=documents[0],
            metadata=documents[1],
            compression_level=self._level,
        )
        info = SaveInfo(prefix, nbytes, time.perf_counter() - began)
        self._policy.saved(step, began_on_clock)
        self._last_save = info

        def background() -> None:
            started = time.perf_counter()
            commit(
                pending,
                self._coordinator,
                self.part_bytes,
                partial(self._after_commit, pending),
                partial(self._after_peer_commit, pending),
            )
            self._last_save = replace(info, commit_seconds=time.perf_counter() - started)

        self._run_commit(background, prefix)
        return prefix

    def _save_local(
        self,
        persistent_prefix: str,
        step: int,
        specs: list[Any],
        leaves: list[Any],
        structure: Any,
        documents: tuple[dict[str, Any] | None, dict[str, Any] | None],
        began: float,
    ) -> str:
        """save(tier="local"): this process's shards and its replicas, to the local tier."""
        tier = self._local
        assert tier is not None
        # The key first: every process takes it, whatever fails below, so that the keys of
        # later saves stay the same in every process.
        key = shared_key("local", persistent_prefix) if self._coordinator.active else None
        base = split_prefix(persistent_prefix)[1]
        stem = stem_of(base)
        shifts = self._replica_shifts(tier)
        prefix = tier.prefix(base)
        plan = self._plans.plan(specs, True)
        pid = jax.process_index()
        try:
            store = tier.store
            if store.exists(index_key(base)):  # the tier's own checkpoint of this step: saved again
                tier.forget(base)
            replicas = [plan_replica(plan, shift) for shift in shifts]
            staged = self._staging.stage(
                plan,
                leaves,
                pid,
                store,
                base,
                prefix,
                publish=True,
                on_device=self.snapshot_on_device and self.async_save,
                part_bytes=self.part_bytes,
            )
        except Exception as e:
            if key is not None:  # the peers, waiting for this process's files, then fail at once
                with contextlib.suppress(Exception):
                    self._coordinator.publish(f"{key}/files/{pid}", encode_report(None, error=repr(e)))
            if isinstance(e, OSError):
                raise SaveFailedError(f"saving {prefix} failed: {e}") from e
            raise
        # Host leaves may change once save() returns; replicas are checked against them in the background.
        host = host_copies(leaves) if replicas else []
        pending = PendingSave(
            directory=store,
            base=base,
            stem=stem,
            prefix=prefix,
            plan=plan,
            staged=staged,
            structure=structure,
            step=step,
            timestamp=self._clock(),
            key=key,
            metrics=documents[0],
            metadata=documents[1],
        )
        local = LocalSave(pending, replicas, self._addresses, host, self.timeout_s)
        nbytes = sum(f.nbytes for f in plan.files if f.process_index == pid)
        info = SaveInfo(prefix, nbytes, time.perf_counter() - began)
        self._last_save = info
        self._local_newest = step if self._local_newest is None else max(self._local_newest, step)

        def background() -> None:
            started = time.perf_counter()
            commit_local(local, self._coordinator, self.part_bytes, partial(_prune_local, tier, stem))
            self._last_save = replace(info, commit_seconds=time.perf_counter() - started)

        self._run_commit(background, prefix)
        return prefix

    def _run_commit(self, background: Callable[[], None], prefix: str) -> None:
        """A save's background half: on the commit thread (async_save), or now."""
        if self.async_save:
            self._commits.submit(background, prefix)
            return
        try:
            background()
        except SaveFailedError:
            raise
        except Exception as e:
            raise SaveFailedError(f"saving {prefix} failed: {e}") from e

    def _replica_shifts(self, tier: LocalTier) -> list[int]:
        """Where each process's replicas go (save.replicas), agreed once by all processes."""
        if self._shifts is None:
            key = shared_key("local-domains", "local")  # taken whatever fails below
            described = self._coordinator.exchange(
                key, describe_self(tier.domain(), tier.replicas), "agreeing where local replicas go"
            )
            domains, self._addresses = read_peers(described)
            self._shifts = replica_shifts(domains, tier.replicas) if tier.replicas else []
        return self._shifts

    def prepare(self, tree: Any) -> None:
        """Makes ready, in the background, what saving this tree needs: its plan and host memory.

        A save copies the shards into host memory, and memory used for the first
        time is faulted in page by page, which on many machines takes longer than
        the copy itself: without prepare(), the first save blocks several times
        longer than the next ones (docs/guides/performance.md). Call it once the
        state exists (initialized or restored); training goes on meanwhile, and a
        save that comes first waits for it. The memory is what the saves would hold
        anyway. With save_host_bytes, the Saver makes its buffers when it is made,
        and prepare() only plans.

        Args:
          tree: a tree with the structure, shapes, dtypes and shardings of the saves to come.

        Examples:
          >>> import jax.numpy as jnp, shardsave, tempfile
          >>> state = {"w": jnp.ones((1024, 256))}
          >>> saver = shardsave.Saver()
          >>> saver.prepare(state)  # returns at once
          >>> path = saver.save(state, f"{tempfile.mkdtemp()}/model", global_step=1)
          >>> saver.wait_until_finished()
        """
        names, leaves, _ = _tree.flatten(tree)
        plan = self._plans.plan([leaf_spec(n, x)[0] for n, x in zip(names, leaves)], self.sharded)
        self._staging.prepare(plan, jax.process_index())

    def _lock(self, directory: Store, stem: str) -> Lock | None:
        """Holds the save path for this Saver's life (see Store.lock).

        Returns the claim if this call took it (so that a save refused before it
        writes can let it go again), None if the Saver held it already.

        Raises:
          ConcurrentSaveError: another process holds the path, or a newer Saver in
            this process took it over.
        """
        held = self._locks.get((directory.path, stem))
        if held is not None:
            if held.held:
                return None
            held.check()  # a newer Saver holds it; else it let go (closed), and it is ours again
        # A Saver made later in this process takes the path over once this one's
        # pending save has committed: the new claim waits on it (settle).
        lock = directory.lock(stem, self._commits.join)
        if lock is not None:
            self._locks[directory.path, stem] = lock
        return lock

    def should_save(self, step: int, tier: str = PERSISTENT) -> bool:
        """Whether the training loop should save at this step, by the Saver's save policy.

        True when step is a multiple of save_interval_steps (step 0 included), or
        once save_interval_secs have passed on the Saver's clock since the last
        save began, staying true until a save is made; never for a step at or below
        the newest step this Saver saved or restored. save() itself is
        unconditional. With several processes every process gets the same answer
        for the same step: process 0's clock decides the time-based part.

        With tier="local": whether the step is due for the local tier, a multiple
        of local_interval_steps above the newest local step saved or restored (ask
        it where the persistent tier is not due: see the example in
        docs/guides/tiers.md).

        Examples:
          >>> import shardsave
          >>> saver = shardsave.Saver(save_interval_steps=100)
          >>> [s for s in range(0, 301, 50) if saver.should_save(s)]
          [0, 100, 200, 300]
        """
        if tier == LOCAL:
            step = step_number(step)
            interval = None if self._local is None else self._local.interval_steps
            newest = self._local_newest
            return interval is not None and step % interval == 0 and (newest is None or step > newest)
        if tier != PERSISTENT:
            raise ValueError(f'tier must be "persistent" or "local", found {tier!r}')
        return self._policy.should_save(step_number(step))

    def reached_preemption(self, step: int) -> bool:
        """Whether the job is being preempted and this is the step to save at (or past it).

        With save_on_preemption, a SIGTERM (the scheduler's notice) makes this True
        at one step that every process agrees on, and for every step after it: the
        step after the one at which the notice was first seen (so should_save and
        reached_preemption, asked one after the other, answer alike within a step).
        With several processes (jax.distributed) the notice is shared through jax's
        key-value store and each process proposes the step after the one at which it
        learned of it; the agreed step is the largest proposal, so the processes
        need not be in lockstep. Call it at every step (each call reads the
        key-value store once); a process waits, for at most timeout_s, only at its
        own proposed step, until every process has proposed. Then save that step,
        call wait_until_finished(), and exit: a second SIGTERM during the save is
        recorded (preemption_notices) and does not interrupt it.

        Always False without save_on_preemption.

        Raises:
          CoordinationTimeoutError: a process did not propose within timeout_s.
        """
        return self._policy.reached_preemption(step_number(step))

    @property
    def preemption_notices(self) -> int:
        """How many SIGTERMs arrived since a save_on_preemption Saver of this process installed the handler."""
        return HANDLER.notices

    def wait_until_finished(self) -> None:
        """Blocks until the pending asynchronous save has committed.

        Raises:
          SaveFailedError: the save failed; the original error is its __cause__.
        """
        self._commits.wait()

    def close(self) -> None:
        """Finishes the pending save, stops the background worker, frees host buffers.

        Also lets go of the save paths this Saver wrote, so another Saver may write them.
        """
        try:
            self._commits.close()
        finally:
            self._staging.close()
            self._policy.close()
            for lock in self._locks.values():
                lock.release()
            self._locks.clear()

    def __enter__(self) -> Saver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _after_commit(self, save: PendingSave) -> None:
        """Retention and the state file, once this process (alone, or as process 0) committed."""
        retention = None
        if save.state_file is not None:
            retention = self._retention_for(save.directory, save.stem, save.state_file)
        absolute = None
        if not self.save_relative_paths:
            directory = save.directory
            absolute = os.path.abspath(directory.path) if directory.is_local else directory.path
        finish_commit(save, retention, self._metric(save.metrics), absolute)
        if save.state_file is not None:
            self._last_directory = save.directory.path

    def _after_peer_commit(self, save: PendingSave) -> None:
        """Process 0 committed: this process's retention records the checkpoint too."""
        if save.state_file is not None:
            retention = self._retention_for(save.directory, save.stem, save.state_file)
            retention.add(save.prefix, save.timestamp, self._metric(save.metrics))
            self._last_directory = save.directory.path

    def _retention_for(self, directory: Store, stem: str, state_file: str) -> Retention:
        """This Saver's retention in a directory (see adopt_retention), made once."""
        retention = self._retention.get(directory.path)
        if retention is None:
            retention = self._retention[directory.path] = adopt_retention(
                directory,
                stem,
                state_file,
                self._new_retention,
                started=self._created,
                checks_clock=self._coordinator.process_index == 0,
            )
        return retention

    # ------------------------------------------------------------ restore

    def _requests(
        self,
        directory: Store,
        index: Any,
        save_path: str,
        target: Any,
        reshape: bool,
        cast: bool,
        names: Callable[[str], str] | dict[str, str] | None,
    ) -> tuple[list[Any], list[Any], list[int], Callable[[list[Any]], Any]]:
        """What a restore of target asks of the index: its requests, those it reads (some
        shared across processes), which moved, and how the values become the tree."""
        if target is None:
            requests, finish = requests_for_saved(index, save_path)
        else:
            stored = StoredValues(partial(holds_value, index), partial(read_value, directory, index))
            requests, finish = requests_for_target(index, target, reshape, cast, save_path, names, stored)
        shared, moved = plan_shared_reads(requests) if self._shares(directory) else (requests, [])
        return requests, shared, moved, finish

    def _shares(self, directory: Store) -> bool:
        """Whether a restore from directory shares replicated reads across processes."""
        if self._local is not None and directory.is_local:
            root = os.path.realpath(self._local.root)
            if os.path.realpath(directory.local_path("x")).startswith(root + os.sep):
                # The local tier: each process reads what it holds, and one that fails must
                # not leave the others in the sharing collective (tiers.recover agrees after).
                return False
        # Sharing pays where reading is dear (an object store); from a local file system,
        # reading the page cache again is cheaper than the collective (the commit that
        # added this has the measurement).
        return (not directory.is_local) if self.share_reads is None else self.share_reads

    def restore_latest(
        self,
        save_path: str,
        target: Any,
        *,
        reshape: bool | None = None,
        cast: bool = False,
        names: Callable[[str], str] | dict[str, str] | None = None,
    ) -> Any:
        """Restores the newest step of save_path from the fastest tier that holds it whole.

        Without a local tier, the persistent tier's latest_checkpoint. With one (a
        collective call: every process makes it), the processes exchange which
        local steps they hold, and restore the newest one newer than the
        persistent tier's newest checkpoint whose data files some running process
        holds: each reads what its local directory holds, and receives the rest
        from the processes that hold it, through jax's collectives (a replaced
        host's shards come from its peer's replica). Otherwise, or if a local file
        proves damaged and no replica holds it whole, the persistent tier.
        last_restore says which tier, which step and why; CheckpointReader of its
        path reads the step's metadata. Local steps newer than the one restored
        are deleted: they belong to a timeline the job has left.

        Args:
          save_path: the save path given to save(), such as "ckpt/model".
          target: as restore()'s.
          reshape, cast, names: as restore()'s.

        Returns:
          The restored tree, or None when neither tier holds a checkpoint of
          save_path that can be restored.

        Raises:
          As restore(); CoordinationTimeoutError: a process did not take part in
          time; CorruptCheckpointError: a local step failed to restore even from
          its replicas, and the persistent tier holds nothing.

        Examples:
          >>> import jax.numpy as jnp, shardsave, tempfile
          >>> d = tempfile.mkdtemp()
          >>> saver = shardsave.Saver(local_directory=f"{d}/local", replicas=0)
          >>> _ = saver.save({"w": jnp.ones(4)}, f"{d}/model", global_step=5, tier="local")
          >>> saver.wait_until_finished()
          >>> restored = saver.restore_latest(f"{d}/model", {"w": jnp.zeros(4)})
          >>> saver.last_restore.tier, float(restored["w"].sum())
          ('local', 4.0)
        """
        self._commits.wait()
        save_path = location(save_path)
        directory_path, _ = split_prefix(save_path)
        stem = split_prefix(save_path)[1]
        timeout = self.storage_timeout_s

        def persistent() -> tuple[str, int | None] | None:
            latest = newest_of_save_path(directory_path, stem, timeout)
            if latest is None:
                return None
            return latest, open_checkpoint(latest, timeout)[2].global_step

        def restore(path: str) -> Any:
            return self.restore(path, target, reshape=reshape, cast=cast, names=names)

        if self._local is None:
            newest = persistent()
            if newest is None:
                return None
            value = restore(newest[0])
            reason = f"no local tier; restoring the persistent tier's newest checkpoint {newest[0]}"
            self._last_restore = replace(self._last_restore, tier=PERSISTENT, reason=reason)  # type: ignore[type-var]
            return value
        local = self._local
        same_reshape = self.reshape if reshape is None else reshape

        def requests_of(index: Any, path: str) -> list[Any]:
            return self._requests(local.store, index, path, target, same_reshape, cast, names)[1]

        value, choice = restore_from_tiers(
            local, stem, save_path, self._coordinator, persistent, requests_of, restore
        )
        if choice.step is not None and value is not None:
            # Local steps newer than the one restored belong to a timeline the job has left
            # (their files are incomplete, or it resumed from elsewhere). With nothing
            # restored they stay (a directory missing by mistake may come back), and
            # retention, newest first by time, removes them as new steps are saved.
            local.forget_newer(stem, choice.step)
            if choice.tier == LOCAL:
                self._local_newest = max(self._local_newest or choice.step, choice.step)
        if value is not None and self._last_restore is not None:
            # A local restore read a view of the step: report the step's own local prefix.
            path = local.prefix(choice.base) if choice.base is not None else self._last_restore.path
            self._last_restore = replace(
                self._last_restore, path=path, tier=choice.tier, reason=choice.reason
            )
        return value

    @_gc_pause.pausing
    def restore(
        self,
        save_path: str,
        target: Any = None,
        *,
        reshape: bool | None = None,
        cast: bool = False,
        restore_sequentially: bool | None = None,
        max_host_bytes: int | None = None,
        names: Callable[[str], str] | dict[str, str] | None = None,
    ) -> Any:
        """Restores a checkpoint into the structure, shapes and shardings of target.

        Args:
          save_path: the checkpoint prefix returned by save(), a TensorFlow
            checkpoint prefix ("model.ckpt-1000", recognised from its .index),
            safetensors (a .safetensors file or a sharded set's index.json), or a
            PyTorch DCP directory (recognised from its .metadata).
          target: a pytree of jax.Array or jax.ShapeDtypeStruct (with a sharding),
            numpy arrays or numbers, naming a subset of the saved leaves; any
            mesh, device count or partition spec. None restores the saved tree
            onto the saved shardings, which requires the same devices. A leaf
            that names a value a PyTorch DCP checkpoint stored as a Python
            object (param_groups' "lr", or "betas" whole or item by item) takes
            that value.
          reshape: allow a target shape with the same number of elements
            (defaults to the Saver's setting).
          cast: convert stored values to the target dtype where they differ.
          restore_sequentially: bound host memory by max_host_bytes (defaults to
            the Saver's setting).
          max_host_bytes: the host-memory budget (defaults to the Saver's).
          names: the stored name of each target leaf, where it differs from the
            leaf's path ("dense/kernel" for {"dense": {"kernel": ...}}): a function
            of the path, or a dict from paths to stored names (others unchanged).
            For checkpoints written by others, such as TensorFlow's. For
            safetensors, paths not mapped read "/" as "." ("model.embed").

        Returns:
          A pytree like target (or like the saved tree) holding the values.

        Raises:
          CheckpointNotFoundError: there is no committed checkpoint at save_path.
          StructureMismatchError: a target leaf is missing, or its shape or dtype
            cannot be satisfied.
          ShardingMismatchError: target=None, but the saved devices do not exist.
          CorruptCheckpointError: stored bytes disagree with the index.
        """
        self._commits.wait()
        if target is not None and self.allow_empty and not _tree.flatten(target)[1]:
            return target  # as tf.train.Saver(allow_empty=True): nothing to restore, nothing read
        began = time.perf_counter()
        save_path = location(save_path)
        directory, base, index = open_checkpoint(save_path, self.storage_timeout_s)
        indexed = time.perf_counter()
        reshape = self.reshape if reshape is None else reshape
        sequential = self.restore_sequentially if restore_sequentially is None else restore_sequentially
        budget = self.max_host_bytes if max_host_bytes is None else max_host_bytes
        requests, shared, moved, finish = self._requests(
            directory, index, save_path, target, reshape, cast, names
        )
        matched = time.perf_counter()
        values, times = restore_leaves(directory, base, index, shared, budget=budget, sequential=sequential)
        restored = finish(lay_out(values, requests, moved))
        self._policy.restored(index.global_step)  # a resumed run does not save this step again
        self._last_restore = RestoreInfo(
            path=save_path,
            nbytes=sum(math.prod(r.shape) * r.dtype.itemsize for r in requests),
            seconds=time.perf_counter() - began,
            index_seconds=indexed - began,
            plan_seconds=matched - indexed + times.plan_seconds,
            place_seconds=times.place_seconds,
        )
        return restored


def _prune_local(tier: LocalTier, stem: str) -> None:
    """The local tier's retention after a local commit; a failure there is a warning, not the save's."""
    try:
        tier.prune(stem)
    except OSError as e:
        warnings.warn(f"the local tier's retention in {tier.path} failed: {e}", RuntimeWarning, stacklevel=1)
