"""A Saver's local tier: a directory on this host's own memory or disk.

Each local checkpoint is a shardsave checkpoint prefix, `STEM-STEP`, in the
local directory: the whole checkpoint's index, and of its data files only those
this process wrote (its own devices') and its replicas of other processes'
(save.replicas). Its index is this process's commit marker of the step (written
only once every process holds its own files and its replicas, save.commit's
commit_local). A local checkpoint alone is therefore not restorable: the
processes restore it together (tiers.recover), each reading what it holds and
receiving the rest from the peers that hold it.

The directory belongs to the local tier: retention deletes its checkpoints of the
save path's name beyond local_max_to_keep, and leftovers of local saves that did
not commit, whichever run of the job wrote them, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass

import numpy as np

from shardsave.errors import CorruptCheckpointError, ShardsaveError
from shardsave.formats import open_checkpoint
from shardsave.formats.shardsave import (
    INDEX_SUFFIX,
    Listing,
    data_keys,
    index_key,
    names_of_save_path,
    parse_data_key,
    step_of,
)
from shardsave.index import Index
from shardsave.storage import Store, join, location, open_store, temp_target

# A file in the local directory naming its failure domain: processes that write to
# one directory (one host's memory) lose it together, so replicas go elsewhere.
DOMAIN_FILE = ".shardsave-domain"

# A restore from the local tier reads a view of its step in a directory of this prefix,
# then the process index and the step's name (deleted once the restore ends; retention
# removes those a kill left): the files held, linked, and sparse files holding
# the ranges received from peers. Listing reads files only, never this directory.
VIEW_PREFIX = ".restoring-"


@dataclass(frozen=True)
class Held:
    """A committed local checkpoint as this process holds it."""

    base: str
    index: Index
    files: frozenset[int]  # the data files present whole (every part, of the size the index says)


class LocalTier:
    """The local directory of a Saver's local tier, and the rules it keeps.

    Args:
      directory: a path on this host (such as /dev/shm/ckpt, or a local NVMe).
      interval_steps: Saver.should_save(step, tier="local") is true at multiples of it
        (never, with None).
      max_to_keep: how many local checkpoints each process keeps.
      replicas: how many other processes hold a copy of each process's shards.
      timeout_s: the deadline of each storage operation.
    """

    def __init__(
        self, directory: str, interval_steps: int | None, max_to_keep: int, replicas: int, timeout_s: float
    ):
        self.path = location(directory)
        if "://" in self.path and not self.path.startswith("file://"):
            raise ValueError(f"local_directory must be a path on this host, found {directory!r}")
        if interval_steps is not None and interval_steps < 1:
            raise ValueError(f"local_interval_steps must be None or >= 1, found {interval_steps}")
        if max_to_keep < 1:
            raise ValueError(f"local_max_to_keep must be >= 1, found {max_to_keep}")
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, found {replicas}")
        self.interval_steps = interval_steps
        self.max_to_keep = max_to_keep
        self.replicas = replicas
        self.timeout_s = timeout_s
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            store = open_store(self.path, self.timeout_s)
            os.makedirs(os.path.dirname(store.local_path(DOMAIN_FILE)), exist_ok=True)
            self._store = store
        return self._store

    def prefix(self, base: str) -> str:
        return join(self.path, base)

    @property
    def root(self) -> str:
        """The local directory as a path of this host."""
        return os.path.dirname(self.store.local_path(DOMAIN_FILE))

    def read_into(self, held: Held, k: int, start: int, out: np.ndarray) -> None:
        """Fills out (uint8) with the bytes of data file k from start, of a local checkpoint held here."""
        at = 0
        for key, a, b in _part_ranges(held.base, held.index, k, start, start + out.size):
            fd = os.open(self.store.local_path(key), os.O_RDONLY)
            try:
                got = os.preadv(fd, [out[at : at + b - a].data], a)
            finally:
                os.close(fd)
            if got != b - a:
                raise CorruptCheckpointError(
                    f"{self.store.local_path(key)}: {got} bytes at offset {a}, {b - a} expected (truncated?)"
                )
            at += b - a

    def view(self, base: str, index: Index, raw_index: bytes, held: frozenset[int], pid: int) -> RestoreView:
        """A checkpoint for one restore by process pid: its files of the step, and room for the rest."""
        path = os.path.join(self.root, f"{VIEW_PREFIX}{pid}-{base}")
        return RestoreView(path, base, index, raw_index, self, held)

    def forget_newer(self, stem: str, step: int | None) -> None:
        """Deletes the local checkpoints of stem newer than step (a timeline the job has left).

        None: every one (the job starts afresh: nothing it held could be restored).
        """
        for newer, held in self.held(stem).items():
            if step is None or newer > step:
                self.forget(held.base)

    def domain(self) -> str:
        """This directory's failure-domain token, made by the first process to ask."""
        path = self.store.local_path(DOMAIN_FILE)
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            if token := f.read().strip():
                return token
        temp = f"{path}.{uuid.uuid4().hex}"
        with open(temp, "w") as f:
            f.write(uuid.uuid4().hex)
        try:
            os.link(temp, path)  # never replaces a token another process made meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(temp)
        with open(path) as f:
            return f.read().strip()

    def held(self, stem: str) -> dict[int, Held]:
        """The committed local checkpoints of save path stem, by step, with the files present.

        An index that does not open (damaged) is left out: that step is not held here.
        """
        listing = Listing.of(self.store)
        pattern = names_of_save_path(stem)
        present = set(listing.keys)
        out: dict[int, Held] = {}

        def whole(key: str, size: int) -> bool:
            try:
                return key in present and os.stat(self.store.local_path(key)).st_size == size
            except OSError:
                return False

        for base in listing.committed:
            step = step_of(base)
            if step is None or not pattern.fullmatch(base):
                continue
            try:
                index = open_checkpoint(self.prefix(base), self.timeout_s)[2]
            except ShardsaveError:
                continue
            n = len(index.files)
            files = frozenset(
                k
                for k, f in enumerate(index.files)
                if all(
                    whole(key, size)
                    for key, size in zip(data_keys(base, k, n, f.parts), f.parts or (f.nbytes,))
                )
            )
            out[step] = Held(base, index, files)
        return out

    def forget(self, base: str, files: frozenset[int] | None = None) -> None:
        """Deletes a local checkpoint (its index first, so it is never half-visible), or some of its data files."""
        store = self.store
        listing = Listing.of(store)
        if files is None:
            store.delete(index_key(base)).result()
            doomed = listing.files_of(base)
        else:
            doomed = [k for k in listing.data.get(base, []) if _file_number(k) in files]
        for future in [store.delete(k) for k in doomed]:
            future.result()

    def prune(self, stem: str) -> list[str]:
        """Keeps the max_to_keep most recently committed local checkpoints of stem; deletes the rest.

        Most recent by the time of their commit, not by step: a job that started
        afresh (nothing it held restored) keeps its new steps over higher-numbered
        ones of the timeline it left. Also deletes leftovers of local saves of
        stem that never committed (a kill or a failure mid-save): their data
        files, and temporary files.
        """
        listing = Listing.of(self.store)
        pattern = names_of_save_path(stem)
        by_step = sorted(
            (step, base)
            for base in listing.committed
            if pattern.fullmatch(base) and (step := step_of(base)) is not None
        )
        by_time = sorted(by_step, key=lambda sb: (self.store.mtime(index_key(sb[1])) or 0.0, sb[0]))
        doomed = [base for _, base in by_time[: -self.max_to_keep]]
        committed = by_step
        for base in doomed:
            self.store.delete(index_key(base)).result()
        keys = [k for base in doomed for k in listing.files_of(base)]
        # Only older than the newest commit: a process sharing this directory may be
        # writing a newer step already.
        newest = committed[-1][0] if committed else None
        keys += [
            k
            for k in listing.leftovers(pattern)
            if newest is not None and (step := step_of(_base_of(k))) is not None and step < newest
        ]
        for future in [self.store.delete(k) for k in keys]:
            future.result()
        # Views of restores that were killed (a restore removes its own when it ends).
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root):
                if (
                    entry.is_dir()
                    and entry.name.startswith(VIEW_PREFIX)
                    and pattern.fullmatch(_view_base(entry.name))
                ):
                    shutil.rmtree(entry.path, ignore_errors=True)
        return doomed


class RestoreView:
    """A local checkpoint as one restore reads it, in a directory of its own.

    The data files this process holds are hard links; of the others, the ranges
    the restore reads arrive from peers (write) into sparse files of the right
    size, where any byte not received reads as zero and so fails its checksum:
    a range missed by mistake is never restored silently. close() deletes it.
    """

    def __init__(
        self, path: str, base: str, index: Index, raw_index: bytes, tier: LocalTier, held: frozenset[int]
    ):
        self.path, self.base, self.index = path, base, index
        shutil.rmtree(path, ignore_errors=True)  # a view left by a restore that was killed
        os.makedirs(path)
        n = len(index.files)
        for k in held:
            for key in data_keys(base, k, n, index.files[k].parts):
                os.link(tier.store.local_path(key), os.path.join(path, key))
        with open(os.path.join(path, index_key(base)), "wb") as f:
            f.write(raw_index)
        self._held = held

    @property
    def prefix(self) -> str:
        return os.path.join(self.path, self.base)

    def write(self, k: int, start: int, data: memoryview) -> None:
        """Received bytes of data file k at offset start."""
        if k in self._held:
            return
        at = start
        for key, a, b in _part_ranges(self.base, self.index, k, start, start + len(data)):
            name = os.path.join(self.path, key)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                size = _part_size(self.index, k, key)
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)
                os.pwrite(fd, data[at - start : at - start + b - a], a)
            finally:
                os.close(fd)
            at += b - a

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _part_ranges(base: str, index: Index, k: int, start: int, stop: int) -> list[tuple[str, int, int]]:
    """(object key, start, stop within it) of the objects holding bytes [start, stop) of data file k."""
    f = index.files[k]
    keys = data_keys(base, k, len(index.files), f.parts)
    sizes = f.parts or (f.nbytes,)
    out, offset = [], 0
    for key, size in zip(keys, sizes):
        a, b = max(start, offset), min(stop, offset + size)
        if a < b:
            out.append((key, a - offset, b - offset))
        offset += size
    return out


def _part_size(index: Index, k: int, key: str) -> int:
    f = index.files[k]
    if not f.parts:
        return f.nbytes
    return f.parts[int(key.rsplit(".part-", 1)[1])]


def _file_number(key: str) -> int | None:
    parsed = parse_data_key(key)
    return None if parsed is None else parsed[1]


def _view_base(name: str) -> str:
    """The checkpoint name of a view directory, .restoring-PID-BASE."""
    return name.removeprefix(VIEW_PREFIX).partition("-")[2]


def _base_of(key: str) -> str:
    written = temp_target(key) or key
    parsed = parse_data_key(written)
    return parsed[0] if parsed else written.removesuffix(INDEX_SUFFIX)
