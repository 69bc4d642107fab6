"""Hugging Face safetensors, both ways: restored onto shardings, written from trees.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}),
then the tensors' bytes, offsets counted from the end of the header. A sharded
set is several such files and `model.safetensors.index.json`, whose
"weight_map" names the file of each tensor. The format has no checksums: what
is checked is the header (every tensor's bytes inside the file, its size that of
its dtype and shape, no two tensors overlapping) and the file's length.

Read here as an Index (source "safetensors"): each tensor a host leaf with one
stored shard at its byte offset, so a restore reads only the byte ranges each
device needs, under max_host_bytes, exactly as it reads a shardsave checkpoint.
One naming rule, both ways (path_to_name, name_to_path): a safetensors name is a
tree path with "/" written as "." ("model.layers.0.weight" is the leaf at
model/layers/0/weight). Reading, the index names each leaf by that path and nests
the structure along it, so load_safetensors, Saver.restore, inspect and convert
all see the tree that save_safetensors was given; a name that cannot nest (it is
also another name's container, or has an empty part) stays one key at the top.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import jax
import ml_dtypes
import numpy as np

from . import _format, _tree
from ._format import DataFile, Index, LeafEntry, StoredShard
from ._storage import Store, join, location, open_store, split_prefix, sync_directory
from .errors import CheckpointNotFoundError, CorruptCheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the safetensors package refuses larger headers too
# Reads are widened to these (there is nothing to verify in them; the planner's unit).
READ_CHUNK_BYTES = _format.CRC_CHUNK_BYTES
WRITE_BLOCK_BYTES = 64 << 20  # the host memory a write holds of one tensor at a time

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "C64": np.dtype(np.complex64),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def is_safetensors(path: str) -> bool:
    return path.endswith(".safetensors") or path.endswith(".safetensors.index.json")


def path_to_name(path: str) -> str:
    """A pytree path ("model/layers/0/weight") as a safetensors name ("model.layers.0.weight")."""
    return path.replace("/", ".")


def name_to_path(name: str) -> str:
    """A safetensors name ("model.layers.0.weight") as a pytree path ("model/layers/0/weight")."""
    return name.replace(".", "/")


def _nested(paths: list[str]) -> tuple[Any, list[int]]:
    """The structure of leaves named by these paths, and the order it visits them in.

    Dicts nest along each path's parts where they can; a path with an empty part, or
    one under another path's leaf ("a/b" beside "a"), is one whole key at the top.
    """
    every = set(paths)
    root: dict[str, Any] = {}
    flat: list[tuple[str, int]] = []
    for i, path in enumerate(paths):
        parts = path.split("/")
        if "" in parts or any("/".join(parts[:n]) in every for n in range(1, len(parts))):
            flat.append((path, i))
            continue
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = i
    order: list[int] = []

    def encode(node: dict[str, Any]) -> Any:
        items = []
        for key, value in node.items():
            if isinstance(value, int):
                items.append([key, len(order)])
                order.append(value)
            else:
                items.append([key, encode(value)])
        return {"dict": items}

    structure = encode(root)
    for path, i in flat:
        structure["dict"].append([path, len(order)])
        order.append(i)
    return structure, order


def _header(store: Store, key: str) -> tuple[dict[str, Any], int]:
    """A file's header JSON and the offset of its data."""
    where = join(store.path, key)
    if not store.exists(key):
        raise CheckpointNotFoundError(f"{where} does not exist")
    head = store.read_range(key, 0, 8).result()
    if head.size < 8:
        raise CorruptCheckpointError(f"{where}: {head.size} bytes, shorter than a safetensors header")
    (n,) = struct.unpack("<Q", head.tobytes())
    if n > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(
            f"{where}: a header of {n} bytes (at most {MAX_HEADER_BYTES}): not safetensors"
        )
    raw = store.read_range(key, 8, 8 + n).result()
    if raw.size < n:
        raise CorruptCheckpointError(f"{where}: the header is cut short (the file is truncated)")
    try:
        header = json.loads(raw.tobytes())
    except ValueError as e:
        raise CorruptCheckpointError(f"{where}: the header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{where}: the header is not a JSON object")
    return header, 8 + n


def _entries(store: Store, key: str, file: int) -> tuple[list[LeafEntry], int]:
    """The tensors of one file, checked against each other and the file's size."""
    where = join(store.path, key)
    header, start = _header(store, key)
    size = os.path.getsize(store.local_path(key)) if store.is_local else None
    leaves, spans = [], []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise CorruptCheckpointError(
                f"{where}: tensor {name!r} has a malformed entry {info!r:.200}"
            ) from e
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise CorruptCheckpointError(
                f"{where}: tensor {name!r} has dtype {dtype_name!r}, which shardsave does not read "
                f"(it reads {', '.join(DTYPES)})"
            )
        ints = [*shape, begin, end]
        if (
            not all(isinstance(d, int) and not isinstance(d, bool) for d in ints)
            or min(ints, default=0) < 0
            or begin > end
        ):
            raise CorruptCheckpointError(
                f"{where}: tensor {name!r} has shape {list(shape)} at {[begin, end]}"
            )
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CorruptCheckpointError(
                f"{where}: tensor {name!r} ({dtype_name} {list(shape)}) spans {end - begin} bytes, "
                f"not {math.prod(shape) * dtype.itemsize}"
            )
        nbytes = end - begin
        crcs = (0,) * _format.crc_chunks(nbytes, READ_CHUNK_BYTES)  # placeholders: nothing is verified
        shard = StoredShard(file, start + begin, nbytes, (0,) * len(shape), shape, crcs)
        leaves.append(
            LeafEntry(name, dtype, shape, _tree.KIND_NUMPY, None, (shard,), stored_dtype=dtype_name)
        )
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in itertools.pairwise(spans):
        if begin < end:
            raise CorruptCheckpointError(f"{where}: tensors {a!r} and {b!r} overlap")
    data_end = start + (spans[-1][1] if spans else 0)
    if size is not None and size < data_end:
        raise CorruptCheckpointError(
            f"{where}: {size} bytes, but its tensors end at byte {data_end} (the file is truncated)"
        )
    return leaves, data_end


def safetensors_index(path: str, timeout_s: float) -> tuple[Store, str, Index]:
    """A safetensors file, or a sharded set through its index.json, as an Index."""
    directory, base = split_prefix(location(path))
    store = open_store(directory, timeout_s)
    if base.endswith(".index.json"):
        raw = store.read_all(base)
        if raw is None:
            raise CheckpointNotFoundError(f"{join(directory, base)} does not exist")
        try:
            weight_map = json.loads(raw)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(f"{join(directory, base)}: no weight_map in it ({e})") from e
        if not all(isinstance(t, str) and isinstance(f, str) for t, f in weight_map.items()) or any(
            "/" in f or f in ("", ".", "..") for f in files
        ):
            raise CorruptCheckpointError(
                f"{join(directory, base)}: its weight_map must name files beside it, by tensor name"
            )
    else:
        weight_map, files = None, [base]
    leaves: list[LeafEntry] = []
    data_files = []
    for k, name in enumerate(files):
        entries, end = _entries(store, name, k)
        if weight_map is not None:
            held = {e.name for e in entries}
            strays = held - {t for t, f in weight_map.items() if f == name}
            missing = [t for t, f in weight_map.items() if f == name and t not in held]
            if missing:
                raise CorruptCheckpointError(
                    f"{join(directory, base)} maps {missing[:3]} to {name}, which does not hold them"
                )
            entries = [e for e in entries if e.name not in strays]
        leaves.extend(entries)
        data_files.append(DataFile(end, None, 0, key=name))
    names = [leaf.name for leaf in leaves]
    if len(set(names)) != len(names):
        raise CorruptCheckpointError(f"{join(directory, base)}: a tensor is stored in two files")
    # Each leaf is named by its tree path; the file's own name stays beside it.
    by_path: dict[str, str] = {}
    for name in names:
        other = by_path.setdefault(name_to_path(name), name)
        if other != name:
            raise CorruptCheckpointError(
                f"{join(directory, base)}: tensors {other!r} and {name!r} are both the tree path "
                f"{name_to_path(name)!r} ('.' read as '/'), so shardsave cannot tell them apart"
            )
    structure, order = _nested([name_to_path(name) for name in names])
    leaves = [
        replace(leaves[i], name=name_to_path(leaves[i].name), stored_name=leaves[i].name) for i in order
    ]
    index = Index(
        global_step=None,
        created=store.mtime(files[0] if files else base) or 0.0,
        crc_chunk_bytes=READ_CHUNK_BYTES,
        files=tuple(data_files),
        structure=structure,
        leaves=tuple(leaves),
        format_version=0,
        source="safetensors",
    )
    return store, base, index


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
    from ._saver import Saver

    return Saver().restore(
        resolve(path),
        target,
        names=names,
        restore_sequentially=max_host_bytes is not None,
        max_host_bytes=max_host_bytes,
    )


def resolve(path: str) -> str:
    """A directory (any location) as the set or file in it."""
    path = location(path)
    if is_safetensors(path):
        return path
    store = open_store(path)
    for name in (INDEX_NAME, SINGLE_NAME):
        if store.exists(name):
            return join(path, name)
    raise CheckpointNotFoundError(
        f"{path} is neither a .safetensors file nor a directory holding {SINGLE_NAME} or {INDEX_NAME}"
    )


# ---------------------------------------------------------------- writing


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
    from ._reader import CheckpointReader

    reader = CheckpointReader(path)
    out = []
    for variable in reader.variables():
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
                _write_file(path, header, group, progress)
            sync_directory(store)  # the renames are durable before index.json names the files
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


def _write_file(
    path: str, header: bytes, tensors: list[_Tensor], progress: Callable[[int], None] | None
) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            f.write(header)
            for data in _tensor_bytes(tensors, progress):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


_distributed_calls = itertools.count()  # every process calls save_safetensors alike (it is collective)


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
    from ._distributed import Coordinator
    from .errors import SaveFailedError

    coordinator = Coordinator(timeout_s)
    key = f"shardsave/safetensors/{next(_distributed_calls)}"
    me = jax.process_index()
    temporaries = [f"{path}.tmp-shardsave" for path in paths]

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
