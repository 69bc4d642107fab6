"""Hugging Face safetensors out, and in as a convenience over formats/ and the Saver.

save_safetensors writes a tree or a checkpoint as safetensors that Hugging Face
tools read; load_safetensors restores safetensors onto shardings.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from shardsave import tree as _tree
from shardsave.errors import SaveFailedError
from shardsave.formats.safetensors import INDEX_NAME, NAMES, SINGLE_NAME, path_to_name, resolve
from shardsave.reader import CheckpointReader
from shardsave.save.coordination import Coordinator, shared_key
from shardsave.saver import Saver
from shardsave.storage import open_store
from shardsave.storage.base import TEMP_MARK, Store, join, location
from shardsave.storage.local import sync_directory, write_file

WRITE_BLOCK_BYTES = 64 << 20  # the host memory a write holds of one tensor at a time


def load_safetensors(
    path: str,
    target: Any = None,
    *,
    names: Callable[[str], str] | dict[str, str] | None = None,
    max_host_bytes: int | None = None,
) -> Any:
    """Restores safetensors onto the shapes, dtypes and shardings of target.

    Reads only the byte ranges each device needs, and with max_host_bytes holds
    at most that much host memory at a time (a tensor larger than it streams
    into its device buffers).

    Args:
      path: a .safetensors file, a sharded set's index.json, or a directory
        holding model.safetensors or model.safetensors.index.json.
      target: a pytree of jax.Array, jax.ShapeDtypeStruct (with a sharding) or
        numpy arrays; None returns every tensor as a numpy array, by name.
      names: the stored name of each target leaf path; by default the path with
        "/" read as "." ({"model": {"embed": x}} is "model.embed").
      max_host_bytes: a host-memory cap for the restore (at least 32 MiB).

    Examples:
      >>> import numpy as np, shardsave, tempfile
      >>> from safetensors.numpy import save_file
      >>> d = tempfile.mkdtemp()
      >>> save_file({"layer.w": np.ones((2, 3), np.float32)}, d + "/model.safetensors")
      >>> shardsave.load_safetensors(d, {"layer": {"w": np.zeros((2, 3), np.float32)}})["layer"]["w"].sum()
      np.float32(6.0)
    """
    return Saver().restore(
        resolve(path),
        target,
        names=names,
        restore_sequentially=max_host_bytes is not None,
        max_host_bytes=max_host_bytes,
    )


@dataclass(frozen=True)
class _Tensor:
    """One tensor to write: its safetensors name, dtype, shape and a way to its bytes."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    blocks: Callable[[], Iterator[np.ndarray]]  # its bytes in row order, a bounded block at a time
    leaf: Any = None  # the live array (a tree's leaf), whose local shards a process writes

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _row_blocks(shape: tuple[int, ...], itemsize: int) -> Iterator[slice]:
    rows = shape[0] if shape else 1
    row_bytes = math.prod(shape[1:]) * itemsize if shape else itemsize
    step = max(1, WRITE_BLOCK_BYTES // max(1, row_bytes))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _from_tree(tree: Any, names: Callable[[str], str] | None) -> list[_Tensor]:
    paths, leaves, _ = _tree.flatten(tree)
    out = []
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, (int, float, bool, np.generic)) and not isinstance(leaf, np.ndarray):
            leaf = np.asarray(leaf)
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise TypeError(f"leaf {path!r} is a {type(leaf).__name__}; safetensors holds arrays")
        if isinstance(leaf, jax.Array) and _tree.is_key_dtype(leaf.dtype):
            leaf = jax.random.key_data(leaf)

        def blocks(leaf: Any = leaf) -> Iterator[np.ndarray]:
            if leaf.ndim == 0:
                yield np.asarray(leaf).reshape(1)
                return
            for rows in _row_blocks(leaf.shape, leaf.dtype.itemsize):
                yield np.asarray(leaf[rows])  # one block of rows on the host at a time

        name = names(path) if names else path_to_name(path)
        out.append(_Tensor(name, np.dtype(leaf.dtype), tuple(leaf.shape), blocks, leaf))
    return out


def _from_checkpoint(path: str, names: Callable[[str], str] | None) -> list[_Tensor]:
    reader = CheckpointReader(path)
    # What the source's own tree leaves out (DCP's param_groups, TF2's object graph) is
    # not a tensor of it; convert names what it left out.
    in_tree = {reader.index.leaves[i].name for i in _tree.structure_leaf_indices(reader.index.structure)}
    out = []
    strings = {e.name for e in reader.index.leaves if e.kind == _tree.KIND_STR}
    for variable in reader.variables():
        if variable.name in strings:  # a Python str (Orbax's): safetensors holds arrays
            continue
        if variable.dtype == np.dtype(object) and variable.name not in in_tree:
            continue
        if variable.dtype == np.dtype(object):
            raise TypeError(
                f"{path}: {variable.name!r} is a {variable.dtype_name} tensor; safetensors holds arrays"
            )

        def blocks(v: Any = variable) -> Iterator[np.ndarray]:
            if not v.shape:
                yield np.asarray(reader.get(v.name)).reshape(1)
                return
            for rows in _row_blocks(v.shape, v.dtype.itemsize):
                yield reader.get(v.name, (rows,))  # only these rows' bytes are read

        name = names(variable.name) if names else path_to_name(variable.name)
        out.append(_Tensor(name, variable.dtype, variable.shape, blocks))
    return out


def save_safetensors(
    source: Any,
    directory: str,
    *,
    max_shard_bytes: int = 5 << 30,
    names: Callable[[str], str] | None = None,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
    timeout_s: float = 300.0,
) -> list[str]:
    """Writes a tree, or a checkpoint, as safetensors that Hugging Face tools read.

    One file (model.safetensors) when everything fits max_shard_bytes, else a
    sharded set (model-00001-of-0000N.safetensors, ...) and its index.json; a
    file exceeds max_shard_bytes only to hold a single larger tensor. Tensors are
    written a block of rows at a time, so host memory holds one block, not the
    model. Each file is written under a temporary name and renamed when whole
    (on an object store, one PUT each), the index.json last.

    Under jax.distributed, saving a tree is collective: every process calls it
    alike and writes the shards it holds (each replicated box once) into files
    that process 0 creates; the directory must be a file system every process
    sees. Saving a checkpoint's path is not collective (it reads the checkpoint).

    Args:
      source: a pytree of jax or numpy arrays, or the path of a checkpoint
        (shardsave's, TensorFlow's or safetensors).
      directory: where the files go: a local directory (created if needed), or
        any location a Saver saves to (memory://, s3://, gs://, a kvstore spec),
        where each file is one write held in host memory while it is sent.
      max_shard_bytes: the most tensor bytes per file.
      names: the safetensors name of each leaf path; by default "/" becomes ".".
      metadata: strings for the header's __metadata__ (e.g. {"format": "pt"}).
      progress: called with the bytes written after each block.
      timeout_s: under jax.distributed, how long a process waits for the others
        at each step before it raises, naming them.

    Returns:
      The paths written, the index.json (if any) last.

    Examples:
      >>> import numpy as np, shardsave, tempfile
      >>> from safetensors.numpy import load_file
      >>> d = tempfile.mkdtemp()
      >>> [p.rsplit("/", 1)[1] for p in shardsave.save_safetensors({"layer": {"w": np.ones((2, 3))}}, d)]
      ['model.safetensors']
      >>> sorted(load_file(d + "/model.safetensors"))
      ['layer.w']
    """
    from_tree = not isinstance(source, (str, os.PathLike))
    tensors = _from_tree(source, names) if from_tree else _from_checkpoint(os.fspath(source), names)
    seen: set[str] = set()
    for tensor in tensors:
        if tensor.dtype not in NAMES:
            raise TypeError(f"{tensor.name!r} has dtype {tensor.dtype}, which safetensors has no name for")
        if tensor.name in seen:
            raise ValueError(
                f"two leaves are named {tensor.name!r} in safetensors; pass names= to tell them apart"
            )
        seen.add(tensor.name)
    groups: list[list[_Tensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    directory = location(directory)
    store = open_store(directory, timeout_s)
    n = len(groups)
    file_names = [SINGLE_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    headers = [_header_bytes(group, metadata) for group in groups]
    index_doc = None
    if n > 1:
        index_doc = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: file_names[k] for k, group in enumerate(groups) for t in group},
        }
    index_raw = (
        None if index_doc is None else (json.dumps(index_doc, indent=2, sort_keys=True) + "\n").encode()
    )
    if store.is_local:
        os.makedirs(store.local_path(""), exist_ok=True)
        paths = [store.local_path(name) for name in file_names]
        if from_tree and jax.process_count() > 1:
            _write_distributed(paths, headers, groups, index_raw, store, progress, timeout_s)
        else:
            for path, header, group in zip(paths, headers, groups):
                # Durable under its name (the directory fsync'd too) before index.json names it.
                write_file(path, itertools.chain((header,), _tensor_bytes(group, progress)))
            if index_raw is not None:
                store.write(INDEX_NAME, index_raw).result()
    else:
        if from_tree and jax.process_count() > 1:
            raise ValueError(
                f"save_safetensors to {directory}: under jax.distributed every process writes its "
                "shards into files on a file system they all see; an object store has no such "
                "files. Save to a shared file system, or call it from one process on gathered arrays"
            )
        for name, header, group in zip(file_names, headers, groups):
            store.write(name, _file_bytes(header, group, progress)).result()
        if index_raw is not None:
            store.write(INDEX_NAME, index_raw).result()
    return [join(directory, name) for name in file_names] + (
        [join(directory, INDEX_NAME)] if index_raw else []
    )


def _header_bytes(tensors: list[_Tensor], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte size and the JSON header of a file holding these tensors, in order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors package writes it
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(tensors: list[_Tensor], progress: Callable[[int], None] | None) -> Iterator[memoryview]:
    """The tensors' bytes in file order, a bounded block at a time."""
    for t in tensors:
        written = 0
        for block in t.blocks():
            data = np.ascontiguousarray(block, dtype=t.dtype).view(np.uint8).reshape(-1)
            yield data.data
            written += data.size
            if progress is not None:
                progress(data.size)
        if written != t.nbytes:
            raise RuntimeError(f"{t.name!r}: wrote {written} bytes, expected {t.nbytes}")


def _file_bytes(header: bytes, tensors: list[_Tensor], progress: Callable[[int], None] | None) -> bytes:
    """A whole file in memory: for a store whose writes are whole values (one PUT)."""
    out = bytearray(header)
    for data in _tensor_bytes(tensors, progress):
        out += data
    return bytes(out)


def _write_distributed(
    paths: list[str],
    headers: list[bytes],
    groups: list[list[_Tensor]],
    index_raw: bytes | None,
    store: Store,
    progress: Callable[[int], None] | None,
    timeout_s: float,
) -> None:
    """Every process writes the shards it holds (replica 0 of each) into files that
    process 0 created at their full size; once every process has reported its
    bytes durable, process 0 renames the files into place and writes index.json."""
    coordinator = Coordinator(timeout_s)
    key = shared_key("safetensors", store.path)
    me = jax.process_index()
    # One name in every process, from what they share, and in storage.temp_target's
    # form (TEMP_MARK, 8 hex digits), so that a crash's leftovers are recognised.
    tag = hashlib.sha256(key.encode()).hexdigest()[:8]
    temporaries = [f"{path}{TEMP_MARK}{tag}" for path in paths]

    def step(n: int, what: str, work: Callable[[], None]) -> None:
        error: BaseException | None = None
        try:
            work()
        except Exception as e:
            error = e
        coordinator.publish(f"{key}/{n}/{me}", "" if error is None else f"{type(error).__name__}: {error}")
        reports = coordinator.gather(f"{key}/{n}", f"save_safetensors to {store.path}: {what}")
        failed = {pid: report for pid, report in reports.items() if report}
        if failed:
            if me == 0:
                for temporary in temporaries:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temporary)
            raise SaveFailedError(
                f"save_safetensors to {store.path} failed while {what}: "
                + "; ".join(f"process {pid}: {report}" for pid, report in sorted(failed.items()))
            ) from error

    def create() -> None:
        if me == 0:
            for temporary, header, group in zip(temporaries, headers, groups):
                with open(temporary, "wb") as f:
                    f.write(header)
                    f.truncate(len(header) + sum(t.nbytes for t in group))

    def write_mine() -> None:
        for temporary, header, group in zip(temporaries, headers, groups):
            fd = os.open(temporary, os.O_WRONLY)
            try:
                offset = len(header)
                for t in group:
                    for start, block in _local_blocks(t.leaf, me):
                        _write_box(fd, offset, t.shape, start, np.ascontiguousarray(block, dtype=t.dtype))
                        if progress is not None:
                            progress(block.nbytes)
                    offset += t.nbytes
                os.fsync(fd)
            finally:
                os.close(fd)

    def commit() -> None:
        if me == 0:
            for temporary, path in zip(temporaries, paths):
                os.replace(temporary, path)
            sync_directory(store)
            if index_raw is not None:
                store.write(INDEX_NAME, index_raw).result()

    step(0, "creating the files", create)
    step(1, "writing each process's shards", write_mine)
    step(2, "renaming the files into place", commit)
    # No process returns while another still awaits the last reports: process 0 hosts
    # jax.distributed's key-value store, and its exit would fail their reads.
    coordinator.barrier(f"{key}/done", f"save_safetensors to {store.path}: finishing")


def _local_blocks(leaf: Any, me: int) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """(start, values) of what this process writes of a leaf: replica 0 of each of its
    shards, a bounded block of rows at a time; a host value, by process 0."""
    if not isinstance(leaf, jax.Array):
        if me == 0:
            yield (0,) * np.ndim(leaf), np.asarray(leaf)
        return
    for shard in leaf.addressable_shards:
        if shard.replica_id != 0:
            continue
        start = tuple(s.indices(d)[0] for s, d in zip(shard.index, leaf.shape))
        shape = shard.data.shape
        if not shape:
            yield (), np.asarray(shard.data)
            continue
        for rows in _row_blocks(shape, leaf.dtype.itemsize):
            yield (start[0] + rows.start, *start[1:]), np.asarray(shard.data[rows])


def _write_box(fd: int, base: int, shape: tuple[int, ...], start: tuple[int, ...], block: np.ndarray) -> None:
    """Writes a box of a row-major array stored at byte `base` of a file: one write per
    run that is contiguous in the file (one for the box, where it spans whole rows)."""
    if not shape:
        os.pwrite(fd, block.tobytes(), base)
        return
    if not block.size:
        return
    # From axis m on, the box is contiguous in the file: it spans every later axis whole.
    m = len(shape) - 1
    while m > 0 and block.shape[m] == shape[m]:
        m -= 1
    for outer in np.ndindex(*block.shape[:m]):
        first = tuple(a + b for a, b in zip(start[:m], outer)) + tuple(start[m:])
        element = int(np.ravel_multi_index(first, shape))
        os.pwrite(fd, np.ascontiguousarray(block[outer]).tobytes(), base + element * block.dtype.itemsize)
