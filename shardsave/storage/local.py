"""Local files as a Store: system calls on shardsave's I/O threads, locks, O_DIRECT reads.

Local files are written and read here with plain system calls rather than
through tensorstore's Python binding, which copies every value while holding
the GIL (stalling every other Python thread, a training loop included, for the
whole copy; docs/guides/storage.md) and hands every read back as a new bytes
object. A local write goes to a temporary file (TEMP_MARK in its name), which is
fsync'd, renamed over the key, and made durable with an fsync of the directory,
the protocol tensorstore's file driver follows too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import os
import secrets
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from shardsave._threads import Pool
from shardsave.errors import ConcurrentSaveError
from shardsave.storage.base import (
    DEFAULT_STORAGE_TIMEOUT_S,
    TEMP_MARK,
    IOStats,
    Pending,
    PendingFile,
    Store,
    _Done,
    _Local,
    join,
)
from shardsave.storage.buffers import DIRECT_IO_ALIGNMENT, MIN_UNCACHED_READ_BYTES, aligned_empty

# Reads and write() calls of local files are memory copies into or out of the page
# cache: more threads than cores only steal CPU from the training loop (they
# lengthened the longest stall of another Python thread during an async commit
# and saved no time). fsync and rename wait on the device, and a disk is fastest
# with several in flight, so they have threads of their own.
_IO = Pool("shardsave-io", min(8, max(2, os.cpu_count() or 2)))


_SYNC = Pool("shardsave-sync", 8)


_WRITE_BYTES = 64 << 20  # one write() call at most: Linux caps a call near 2 GiB


class LocalStore:
    """A local directory, read and written with system calls on shardsave's I/O threads.

    Not through tensorstore's Python binding, which copies every value while
    holding the GIL and hands every read back as a new bytes object (README
    "Storage"). Reads land with preadv straight in an aligned buffer, from the disk
    itself (O_DIRECT) where the page cache holds none of a large one
    (would_read_uncached); a write goes to a temporary file that is fsync'd and
    renamed into place (write_file streams one in the caller's thread).
    """

    is_local = True
    copies_writes = False  # os.write from the caller's buffer

    def __init__(self, directory: str, timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S):
        self.path = directory
        self.timeout_s = timeout_s
        self.stats = IOStats()  # this store's reads and writes (storage.testing.Counts adds them up)
        root = directory[len("file://") :] if directory.startswith("file://") else directory
        self._root = os.path.abspath(root)

    def local_path(self, key: str) -> str:
        return os.path.join(self._root, key)

    def read_range(
        self,
        key: str,
        start: int,
        stop: int,
        then: Callable[[np.ndarray], np.ndarray] | None = None,
        allocate: Callable[[int], np.ndarray] = aligned_empty,
    ) -> Pending[np.ndarray]:
        self.stats.add_read(stop - start)
        future = _IO.submit(_pread, self.local_path(key), start, stop, then, allocate, self.stats)
        return _Local(future, f"reading {self.local_path(key)}", self.timeout_s)

    def read_all(self, key: str) -> bytes | None:
        try:
            with open(self.local_path(key), "rb") as f:
                data = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        self.stats.add_read(len(data))
        return data

    def write(self, key: str, data: bytes | memoryview, *, publish: bool = True) -> Pending[Any]:
        self.stats.add_written(len(data))
        path = self.local_path(key)
        done: Future[Any] = Future()
        finish = _sync_and_rename if publish else _sync_only

        def then_sync(written: Future[tuple[int, str]]) -> None:
            if (error := written.exception()) is not None:
                done.set_exception(error)
            else:
                _SYNC.submit(finish, *written.result(), path).add_done_callback(settle)

        def settle(synced: Future[Any]) -> None:
            if (error := synced.exception()) is not None:
                done.set_exception(error)
            else:
                done.set_result(synced.result())

        _IO.submit(_write_temp, path, (data,)).add_done_callback(then_sync)
        return _Local(done, f"writing {path}", self.timeout_s)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self.local_path(key))

    def mtime(self, key: str) -> float | None:
        try:
            return os.stat(self.local_path(key)).st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list(self) -> list[str]:
        try:
            with os.scandir(self._root) as entries:
                return sorted(e.name for e in entries if e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, key: str) -> Pending[None]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.local_path(key))
        return _Done(None)

    def check_parent(self, prefix: str) -> None:
        """ValueError when a checkpoint cannot be created here: a path component is a file."""
        path = self._root
        while path and not os.path.lexists(path):
            parent = os.path.dirname(path.rstrip("/"))
            if parent == path:
                return
            path = parent
        if path and not os.path.isdir(path):
            raise ValueError(
                f"cannot save {prefix!r}: {path!r} is not a directory (it is a file); "
                "choose a save path inside a directory"
            )

    def lock(self, stem: str, settle: Callable[[], None] | None = None) -> WriterLock | None:
        """Takes an exclusive claim on the save path `stem`.

        Two writers of one save path delete each other's files in flight (each
        removes the other's uncommitted data as leftovers) and interleave their
        retention. An flock on `.STEM.lock` excludes a second writer, in this
        process or another, and the kernel releases it when its holder dies, so a
        killed job never blocks the next one. Inside one process a later claim takes
        the path over once settle() returns (WriterLock).
        """
        return _take_lock(self.local_path(f".{stem}{LOCK_SUFFIX}"), join(self.path, stem), settle)


def _take_lock(path: str, what: str, settle: Callable[[], None] | None) -> WriterLock:
    """Claims the save path `what` through the lock file at path (see WriterLock)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    path = os.path.realpath(path)
    with _holds_lock:
        hold = _holds.get(path)
        earlier = hold.claim() if hold is not None else None
    if earlier is not None:
        earlier.settle()  # outside the registry's lock: it waits for a commit in flight
    with _holds_lock:
        hold = _holds.get(path)
        if hold is not None:  # held by this process: taken over
            return WriterLock(hold, what, settle)
    while True:
        handle = open(path, "a+")  # noqa: SIM115 (held open for the owner's life)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(50):  # the holder writes who it is right after it locks
                handle.seek(0)
                holder = handle.read().strip()
                if holder:
                    break
                time.sleep(0.01)
            handle.close()
            holder = holder or "a writer that has not said who it is"
            raise ConcurrentSaveError(
                f"another writer holds the save path {what!r} ({holder}; lock file {path}): two "
                "writers of one save path would delete each other's files. Stop the other job, "
                "close() its Saver, or save under another name"
            ) from None
        except BaseException:
            handle.close()
            raise
        # The holder before us may have removed the file between our open and our
        # lock: then we hold a lock on a name nobody sees, so take the new file.
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n")
    handle.flush()
    hold = _Hold(path, handle)
    with _holds_lock:
        _holds[path] = hold
    return WriterLock(hold, what, settle)


LOCK_SUFFIX = ".lock"


class WriterLock:
    """One owner's claim on a save path: this process's flock, held for that owner.

    Across processes the flock decides: a second writer is refused. Inside one
    process, a later claim of the same lock file (a Saver made again in a notebook
    cell, or tf.train.Saver's idiom of a fresh Saver beside the old ones) takes the
    flock over from the earlier claim once the earlier owner's pending work has
    settled; the earlier claim is then superseded, and check() says so. A claim that
    is released, or garbage-collected with its owner, lets the flock go, and
    release() removes the lock file too (a killed holder leaves it, harmless and
    reused by the next writer).
    """

    def __init__(self, hold: _Hold, what: str, settle: Callable[[], None] | None):
        self._hold, self._what, self._settle = hold, what, settle
        # The claim is told apart by a serial, not by the weak reference: the cyclic
        # collector clears weak references before it runs __del__, and release() there
        # must still find that this claim is the one holding the flock.
        self._serial = next(_serials)
        hold.claim, hold.serial = weakref.ref(self), self._serial

    @property
    def held(self) -> bool:
        """Whether this claim still holds the save path (not released, not taken over)."""
        hold = self._hold
        return _holds.get(hold.path) is hold and hold.serial == self._serial

    def check(self) -> None:
        """Raises ConcurrentSaveError if a newer claim in this process holds the path now."""
        hold = _holds.get(self._hold.path)
        if hold is not None and hold.serial != self._serial and hold.claim() is not None:
            raise ConcurrentSaveError(
                f"a newer Saver in this process holds the save path {self._what!r} (lock file "
                f"{self._hold.path}): it took the path over when it first saved there, after this "
                "Saver's pending saves had committed. Save with the newer Saver, or close() it first"
            )

    def settle(self) -> None:
        """Waits for the owner's pending work on the path (before a takeover)."""
        if self._settle is not None:
            self._settle()

    def release(self) -> None:
        with _holds_lock:
            if not self.held:
                return  # taken over or released already: the flock is someone else's now
            del _holds[self._hold.path]
        self._hold.close()

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter exit module globals may be gone.
        try:  # noqa: SIM105
            self.release()
        except Exception:
            pass


@dataclass
class _Hold:
    """A flock this process holds on a lock file, and the claim it is held for."""

    path: str  # the lock file's real path
    handle: Any
    claim: Callable[[], WriterLock | None] = lambda: None  # a weak reference to the claim
    serial: int = 0  # the claim's (WriterLock._serial)

    def close(self) -> None:
        if not self.handle.closed:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still held: a waiter re-checks the name
            self.handle.close()  # closing the descriptor releases the flock


# The flocks this process holds, by lock file. A flock belongs to an open file
# description, so a second open of the same file in this process would be refused
# like another process: a claim inside the process is handed over here instead.
_holds: dict[str, _Hold] = {}
_holds_lock = threading.Lock()
_serials = itertools.count(1)


def sync_directory(directory: Store) -> None:
    """Makes renames and deletions in a local directory durable."""
    if directory.is_local:
        _fsync_directory(directory.local_path(""))


def write_file(path: str, chunks: Iterable[bytes | memoryview]) -> None:
    """Writes a local file durably from its bytes streamed in order, for a file too
    large to hold in memory whole (a safetensors export).

    The protocol of LocalStore.write, run in the caller's thread: the bytes go to a
    temporary file beside path (TEMP_MARK and 8 hex digits in its name, so that a
    crash's leftover is recognised: storage.temp_target), which is fsync'd, renamed
    over path, and made durable with an fsync of the directory. Each chunk is
    written before the next is asked for, so only one is in memory at a time. If
    it fails before the rename, the temporary file is removed and path is left as
    it was.

    Args:
      path: the file to write; its directory is created if needed.
      chunks: the file's bytes, in order.

    Raises:
      OSError: creating, writing, syncing or renaming the file failed; the error
        names the file.
    """
    _sync_and_rename(*_write_temp(path, chunks), path)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _name_file(error: BaseException, path: str) -> None:
    """Names path in an OSError that names no file: those of write() and fsync() do not."""
    if isinstance(error, OSError) and error.filename is None and error.errno is not None:
        error.filename = path


def _write_temp(path: str, chunks: Iterable[bytes | memoryview]) -> tuple[int, str]:
    """Writes chunks to a new temporary file next to path; returns its open fd and name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = f"{path}{TEMP_MARK}{secrets.token_hex(4)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")  # write() counts bytes, whatever the items are
            done = 0
            while done < len(view):
                try:
                    done += os.write(fd, view[done : done + _WRITE_BYTES])
                except OSError as e:  # only write()'s: an error making a chunk is about another file
                    _name_file(e, path)
                    raise
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return fd, temp


def _sync_only(fd: int, temp: str, path: str) -> PendingFile:
    """Makes the temporary file durable and leaves it under its temporary name."""
    try:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        _name_file(e, path)
        raise
    return PendingFile(temp, path)


def _sync_and_rename(fd: int, temp: str, path: str) -> None:
    """Makes the temporary file durable, renames it to path, and makes the rename durable."""
    pending = _sync_only(fd, temp, path)
    try:
        pending.publish()
    except BaseException:
        pending.discard()
        raise
    _fsync_directory(os.path.dirname(path))


def _pread(
    path: str,
    start: int,
    stop: int,
    then: Callable[[np.ndarray], np.ndarray] | None,
    allocate: Callable[[int], np.ndarray],
    stats: IOStats,
) -> np.ndarray:
    out = allocate(stop - start)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        if (
            out.size >= MIN_UNCACHED_READ_BYTES
            and start % DIRECT_IO_ALIGNMENT == 0
            and out.ctypes.data % DIRECT_IO_ALIGNMENT == 0
            and would_read_uncached(fd, start, out.size)
        ):
            done = read_uncached(fd, out[: out.size // DIRECT_IO_ALIGNMENT * DIRECT_IO_ALIGNMENT], start)
            stats.add_uncached(done)
        while done < out.size:
            n = os.preadv(fd, [cast(Any, out[done:])], start + done)
            if n == 0:  # end of file: the caller sees a short array
                break
            done += n
    finally:
        os.close(fd)
    return out[:done] if then is None else then(out[:done])


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


_libc = ctypes.CDLL(None, use_errno=True)


_CACHESTAT = 451  # the system call's number (Linux 6.5 and later) on x86-64 and arm64 alike


# File systems whose files keep pages of their own in the page cache (which cachestat
# reports) and read with O_DIRECT: ext2/3/4, XFS, btrfs. Others read through the page
# cache as before: overlayfs (a container's root), whose pages belong to the files
# beneath, so cachestat reports none even of a file just read; ZFS, whose cache is
# not the page cache; network and cluster file systems, whose O_DIRECT was not measured.
_DIRECT_FILE_SYSTEMS = {0xEF53, 0x58465342, 0x9123683E}


_direct_devices: dict[int, bool] = {}  # st_dev -> whether reads there may go past the page cache


def direct_io_decisions() -> dict[int, bool]:
    """What this process has decided about each file system it has read from.

    Returns:
      A copy: st_dev -> whether large reads of uncached files there may go past
      the page cache (O_DIRECT). False for a file system other than ext2/3/4,
      XFS and btrfs, and for one that refused an O_DIRECT read or cachestat(2),
      which later reads then do not try again.
    """
    return dict(_direct_devices)


def forget_direct_io_decisions() -> None:
    """Forgets every file system's decision: each is probed again on its next large read.

    The decisions only spare probes (fstatfs, and a refused O_DIRECT read), so
    forgetting them costs those probes, never a wrong read. For tests of the
    probing, and for a process whose file systems were remounted with others.
    """
    _direct_devices.clear()


def _direct_device(fd: int) -> bool:
    device = os.fstat(fd).st_dev
    verdict = _direct_devices.get(device)
    if verdict is None:
        statfs = ctypes.create_string_buffer(512)  # struct statfs; f_type is its first word
        verdict = bool(
            _libc.fstatfs(fd, statfs) == 0 and ctypes.c_long.from_buffer(statfs).value in _DIRECT_FILE_SYSTEMS
        )
        _direct_devices[device] = verdict
    return verdict


def _no_direct_reads(fd: int) -> None:
    """Every later read on fd's file system goes through the page cache."""
    _direct_devices[os.fstat(fd).st_dev] = False


def would_read_uncached(fd: int, start: int, nbytes: int) -> bool:
    """Whether LocalStore reads bytes [start, start + nbytes) of an open file past the
    page cache (O_DIRECT, read_uncached): the page cache holds no page of the range
    (cachestat(2)), on a file system whose reads may go past it (ext2/3/4, XFS, btrfs).

    A cached range is read from memory, as it always was (a checkpoint just written,
    tmpfs); on other file systems, kernels before 6.5 and other operating systems,
    every read is. A read also needs its start, its buffer and its size to suit
    O_DIRECT (DIRECT_IO_ALIGNMENT, MIN_UNCACHED_READ_BYTES) before LocalStore asks.

    Args:
      fd: a file descriptor open for reading.
      start: the range's first byte.
      nbytes: the range's length.

    Returns:
      True where the range would be read from the disk itself; False otherwise, and
      False from then on for the file system of a kernel that refuses cachestat(2)
      (direct_io_decisions records it).
    """
    if sys.platform != "linux" or not _direct_device(fd):
        return False
    stats = _Cachestat()
    if _libc.syscall(_CACHESTAT, fd, ctypes.byref(_CachestatRange(start, nbytes)), ctypes.byref(stats), 0):
        _no_direct_reads(fd)  # ENOSYS before 6.5; EPERM under a seccomp filter
        return False
    return stats.nr_cache == 0


def read_uncached(fd: int, out: np.ndarray, start: int) -> int:
    """Reads bytes of an open file from start into out with O_DIRECT, as LocalStore does
    for a range would_read_uncached approves: the disk's DMA lands in the buffer, with
    none of the page cache's copying and bookkeeping.

    Args:
      fd: a file descriptor open for reading (its flags are restored afterwards).
      out: a uint8 buffer of whole pages (DIRECT_IO_ALIGNMENT) at an aligned address.
      start: the file offset to read from, page-aligned.

    Returns:
      The bytes read: fewer than out holds at the end of the file, and 0 where the
      file system refuses (EINVAL: no O_DIRECT, or alignment rules of its own). The
      caller then reads the rest through the page cache, and so does every later
      read on that file system (direct_io_decisions records it as False).
    """
    done = 0
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        _no_direct_reads(fd)
        return 0
    try:
        while done < out.size:
            n = os.preadv(fd, [cast(Any, out[done:])], start + done)
            done += n
            if n == 0 or n % DIRECT_IO_ALIGNMENT:  # the end of the file
                break
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        _no_direct_reads(fd)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return done
