"""PyTorch Distributed Checkpoint (DCP) directories, read without torch.

A DCP checkpoint is a directory holding `.metadata` (a pickle of
torch.distributed.checkpoint.metadata.Metadata) and the data files it names
(`__R_S.distcp`, one or more per rank). `.metadata` lists each tensor's global
size, dtype and chunks (offsets and sizes in the global tensor), and where each
chunk is stored: (file, offset, length), optionally through stream transforms
(`stream.zstd/1`). A chunk is either a torch.save record at that range (a zip
archive: `data.pkl`, `byteorder`, `data/0` with the storage's raw bytes), or,
with DCP's safetensors serialization, a tensor of a safetensors blob that
starts at that offset. Entries that are not tensors (optimizer param_groups,
Python numbers) are torch.save records of pickled Python objects.

Nothing here executes a pickle. `.metadata` and each record's `data.pkl` are
read by unpicklers whose find_class allows exactly the classes DCP's metadata
and torch.save's tensor records name (mapped to stand-ins of this module) and
nothing else: any other global is refused with CorruptCheckpointError naming
the file, before anything of it runs.

Read here as an Index (source "dcp"): each tensor a host leaf whose stored
shards are its chunks. A chunk stored as contiguous little-endian bytes (what
DCP writes for FSDP and DTensor shards) is a byte range of its data file, so a
restore reads only what each device needs. A chunk that must be decoded (zstd,
a strided view, a big-endian record) is an object of DecodedStore, a read-only
Store over the directory whose objects are those chunks' C-order bytes,
decoded whole when first read; the restore engine sees plain byte ranges
either way. Tree paths come from `planner_data` (DCP's flattening of nested
state dicts: ("optim", "param_groups", 0, "lr") is the leaf
"optim/param_groups/0/lr"); each leaf's DCP name ("optim.param_groups.0.lr")
is its stored_name.

Also read: the per-rank safetensors files that DCP's HuggingFaceStorageWriter
writes with save_distributed=True (`shard-R-model-K-of-N.safetensors`, no
`.metadata`), whose `DCP_SHARDING_INFO` metadata gives each tensor's offsets in
the global tensor; names there follow the safetensors rule ("." is "/").
"""

from __future__ import annotations

import collections
import importlib
import io
import json
import math
import os
import pickle
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeGuard

import ml_dtypes
import numpy as np

from shardsave.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedFormatError

# DCP's safetensors serialization writes the safetensors package's dtype names.
from shardsave.formats.safetensors import DTYPES as SAFETENSORS_DTYPES
from shardsave.index import Checksums, DataFile, Index, LeafEntry, StoredShard, crc_chunks
from shardsave.storage import open_store
from shardsave.storage.base import IOStats, Lock, Pending, Store, join, location, split_prefix

zstandard: Any
try:  # the "dcp" extra: only checkpoints saved with DCP's ZStandard extension need it
    zstandard = importlib.import_module("zstandard")
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    zstandard = None

METADATA_NAME = ".metadata"


# HuggingFaceStorageWriter(save_distributed=True) names each rank's files so.
HF_SHARD_NAME = re.compile(r"^shard-\d+-model-\d+-of-\d+\.safetensors$")


ZSTD = "stream.zstd/1"


KIND_TENSOR = "numpy"  # the leaf kind of every tensor (host arrays, as safetensors' are)


# Reads are planned in these units (there is nothing to verify in them).
READ_CHUNK_BYTES = 4 << 20


MAX_METADATA_BYTES = 1 << 30


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


# A record's zip directory and data.pkl are read from windows at its two ends (torch.save
# writes the pickle first and the directory last, each a few hundred bytes).
WINDOW_BYTES = 4 << 10


# A zstd entry decodes to at most its chunk's bytes plus this (the zip around them):
# a hostile frame cannot make a reader allocate without bound.
MAX_RECORD_OVERHEAD = 1 << 20


# Decoded chunks kept for the reads that follow (the engine reads a chunk in spans).
DECODED_CACHE_BYTES = 256 << 20


OBJECT_DTYPES = ("pickle", "pickle+zstd")  # stored_dtype of the entries that are not tensors


# torch dtypes by the names torch pickles them under (torch.float32 is "torch float32").
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "cfloat": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "cdouble": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
    _TORCH_DTYPES["float8_e8m0fnu"] = np.dtype(ml_dtypes.float8_e8m0fnu)


# torch dtypes that may appear and that no numpy array holds: listed, never restored.
_FOREIGN_DTYPES = (
    "complex32",
    "chalf",
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "quint2x4",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bits16",
    "float4_e2m1fn_x2",
    "int1",
    "int2",
    "int3",
    "int4",
    "int5",
    "int6",
    "int7",
    "uint1",
    "uint2",
    "uint3",
    "uint4",
    "uint5",
    "uint6",
    "uint7",
)


# torch.save's legacy storage classes, by the dtype of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ByteStorage": "uint8",
    "CharStorage": "int8",
    "ShortStorage": "int16",
    "IntStorage": "int32",
    "LongStorage": "int64",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


# ---------------------------------------------------------------- the restricted unpicklers


class _Refused(Exception):
    """A pickle named a global outside the allowed set (becomes CorruptCheckpointError)."""


class _Stub:
    """A stand-in for one of DCP's metadata classes: it only holds what the pickle gave it."""

    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        self = object.__new__(cls)
        self.args = args
        self.state = kwargs or None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def get(self, name: str, default: Any = None) -> Any:
        """A field of the dataclass this stands in for (from its pickled state)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots)
        return state.get(name, default) if isinstance(state, dict) else default


class _Metadata(_Stub):
    pass


class _TensorStorageMetadata(_Stub):
    pass


class _ChunkStorageMetadata(_Stub):
    pass


class _BytesStorageMetadata(_Stub):
    pass


class _TensorProperties(_Stub):
    pass


class _MetadataIndex(_Stub):
    pass


class _StorageInfo(_Stub):
    pass


class _StorageMeta(_Stub):
    pass


@dataclass(frozen=True)
class _Dtype:
    """torch.<name>, as a pickle names it."""

    name: str


def _size(*args: Any) -> tuple[Any, ...]:
    """torch.Size(iterable): a tuple (its elements are checked where it is used)."""
    if len(args) != 1 or not isinstance(args[0], (tuple, list)):
        raise _Refused(f"torch.Size{args!r:.80}")
    return tuple(args[0])


def _layout(*args: Any) -> str:
    """torch.serialization._get_layout("torch.strided"): the name."""
    return str(args[0]) if args else ""


def _path(*parts: Any) -> str:
    return "/".join(str(p) for p in parts)


def _memory_format(*args: Any) -> Any:
    """DCP's _MEM_FORMAT_ENCODING(value): the value."""
    return args[0] if args else None


_DCP_CLASSES: dict[str, type[_Stub]] = {
    "Metadata": _Metadata,
    "TensorStorageMetadata": _TensorStorageMetadata,
    "ChunkStorageMetadata": _ChunkStorageMetadata,
    "BytesStorageMetadata": _BytesStorageMetadata,
    "TensorProperties": _TensorProperties,
    "MetadataIndex": _MetadataIndex,
    "StorageMeta": _StorageMeta,
}


def _metadata_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {}
    # torch 2.x: the metadata classes moved between these modules over the versions.
    for module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint._metadata"):
        for name, stub in _DCP_CLASSES.items():
            allowed[(module, name)] = stub
        allowed[(module, "_MEM_FORMAT_ENCODING")] = _memory_format
        allowed[(module, "MEM_FORMAT_ENCODING")] = _memory_format
    for module in (
        "torch.distributed._shard.sharded_tensor.metadata",  # torch 2.0 to 2.2: TensorProperties
        "torch.distributed._shard.sharded_tensor",
    ):
        allowed[(module, "TensorProperties")] = _TensorProperties
        allowed[(module, "MEM_FORMAT_ENCODING")] = _memory_format
        allowed[(module, "_MEM_FORMAT_ENCODING")] = _memory_format
    for module in (
        "torch.distributed.checkpoint.filesystem",
        "torch.distributed.checkpoint._fsspec_filesystem",
    ):
        allowed[(module, "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = _size
    allowed[("torch.serialization", "_get_layout")] = _layout
    for name in ("strided", "sparse_coo", "sparse_csr", "_mkldnn"):
        allowed[("torch", name)] = f"torch.{name}"
    for name in (*_TORCH_DTYPES, *_FOREIGN_DTYPES):
        allowed[("torch", name)] = _Dtype(name)
    for module in ("pathlib", "pathlib._local"):  # StorageMeta.checkpoint_id
        for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
            allowed[(module, name)] = _path
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


_METADATA_GLOBALS = _metadata_globals()


@dataclass(frozen=True)
class _StorageRef:
    """persistent_load's ("storage", type, key, location, numel) of a torch.save record."""

    dtype: str  # the torch dtype name of its elements ("uint8" for an UntypedStorage)
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorRecord:
    """What torch._utils._rebuild_tensor_v2/v3 would have built: a view of a storage."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str


class _UntypedStorage:
    """torch.storage.UntypedStorage, as a persistent id names it (its elements are bytes)."""


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _TensorRecord:
    if not isinstance(storage, _StorageRef):
        raise _Refused("a tensor whose storage is not a torch.save storage")
    return _TensorRecord(storage, offset, tuple(size), tuple(stride), storage.dtype)


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any, *rest: Any
) -> _TensorRecord:
    if not isinstance(storage, _StorageRef) or not isinstance(dtype, _Dtype):
        raise _Refused("a tensor whose storage or dtype is not torch.save's")
    return _TensorRecord(storage, offset, tuple(size), tuple(stride), dtype.name)


def _record_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch.storage", "UntypedStorage"): _UntypedStorage,
        ("torch", "UntypedStorage"): _UntypedStorage,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _Dtype(dtype)
    for name in (*_TORCH_DTYPES, *_FOREIGN_DTYPES):
        allowed[("torch", name)] = _Dtype(name)
    return allowed


_RECORD_GLOBALS = _record_globals()


# What a non-tensor entry (a Python value DCP torch.saved) may name: plain containers.
_OBJECT_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("__builtin__", "complex"): complex,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals it is given; a persistent id only where persistent is given."""

    def __init__(
        self,
        data: bytes,
        allowed: dict[tuple[str, str], Any],
        persistent: Callable[[Any], Any] | None = None,
    ):
        super().__init__(io.BytesIO(data))
        self._allowed = allowed
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"the global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise _Refused("a persistent id (a torch storage)")
        return self._persistent(pid)


def _unpickle(
    data: bytes,
    allowed: dict[tuple[str, str], Any],
    where: str,
    persistent: Callable[[Any], Any] | None = None,
) -> Any:
    """data unpickled with only `allowed` globals; anything else is CorruptCheckpointError."""
    try:
        return _Unpickler(data, allowed, persistent).load()
    except _Refused as e:
        raise CorruptCheckpointError(
            f"{where}: the pickle names {e}, which a DCP checkpoint does not hold; shardsave refuses "
            "it without running it (a pickle can run any code)"
        ) from None
    except RecursionError:
        raise CorruptCheckpointError(f"{where}: the pickle nests too deep to be DCP's") from None
    except Exception as e:  # a damaged pickle fails in any of the unpickler's ways
        raise CorruptCheckpointError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from None


def _storage_ref(pid: Any) -> _StorageRef:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise _Refused(f"the persistent id {pid!r:.80}")
    _, kind, key, _location, numel = pid
    if kind is _UntypedStorage:
        dtype = "uint8"
    elif isinstance(kind, _Dtype):
        dtype = kind.name
    else:
        raise _Refused(f"the storage type {kind!r:.80}")
    if not isinstance(key, str) or not _is_int(numel) or numel < 0:
        raise _Refused(f"the persistent id {pid!r:.80}")
    return _StorageRef(dtype, key, numel)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(x: Any) -> TypeGuard[tuple[int, ...]]:
    return isinstance(x, tuple) and all(_is_int(v) and v >= 0 for v in x)


# ---------------------------------------------------------------- the .metadata pickle


@dataclass(frozen=True)
class _Location:
    """Where one entry is stored: a byte range of a data file, and its transforms."""

    path: str
    offset: int
    length: int
    transforms: tuple[str, ...]


@dataclass
class _Tensor:
    fqn: str
    dtype_name: str  # torch's
    size: tuple[int, ...]
    chunks: list[tuple[tuple[int, ...], tuple[int, ...], _Location]] = field(default_factory=list)


@dataclass
class _Parsed:
    tensors: list[_Tensor]
    objects: list[tuple[str, _Location]]
    paths: dict[str, tuple[str | int, ...]]  # planner_data: fqn -> the path in the nested state dict
    version: str | None


def _parse_metadata(raw: bytes, where: str) -> _Parsed:
    md = _unpickle(raw, _METADATA_GLOBALS, where)
    if not isinstance(md, _Metadata):
        raise CorruptCheckpointError(f"{where}: the pickle holds a {type(md).__name__}, not DCP's Metadata")

    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: {what}")

    entries = md.get("state_dict_metadata")
    storage = md.get("storage_data")
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise bad(
            "its state_dict_metadata and storage_data must be dicts (DCP's own FileSystemWriter wrote neither)"
        )
    locations: dict[tuple[str, tuple[int, ...] | None], _Location] = {}
    for key, info in storage.items():
        if not isinstance(key, _MetadataIndex) or not isinstance(info, _StorageInfo):
            raise bad(
                f"storage_data holds {type(key).__name__}: {type(info).__name__}, not MetadataIndex: _StorageInfo"
            )
        fqn, offset = key.get("fqn"), key.get("offset")
        path, start, length = info.get("relative_path"), info.get("offset"), info.get("length")
        transforms = info.get("transform_descriptors") or ()
        if (
            not isinstance(fqn, str)
            or not (offset is None or _ints(offset))
            or not isinstance(path, str)
            or not (_is_int(start) and _is_int(length) and start >= 0 and length >= 0)
            or not isinstance(transforms, (list, tuple))
            or not all(isinstance(t, str) for t in transforms)
        ):
            raise bad(f"a malformed storage entry {fqn!r:.100}")
        if "/" in path or "\\" in path or path in ("", ".", "..", METADATA_NAME):
            raise bad(f"entry {fqn!r} is stored in {path!r}, which is not a file beside it")
        unknown = [t for t in transforms if t != ZSTD]
        if unknown:
            raise UnsupportedFormatError(
                f"{where}: entry {fqn!r} is stored through the transforms {unknown}; shardsave reads "
                f"DCP's {ZSTD} only"
            )
        locations[(fqn, offset)] = _Location(path, start, length, tuple(transforms))
    tensors: list[_Tensor] = []
    objects: list[tuple[str, _Location]] = []
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise bad(f"state_dict_metadata has the key {fqn!r:.80}, not a string")
        if isinstance(entry, _BytesStorageMetadata):
            loc = locations.get((fqn, None))
            if loc is None:
                raise bad(f"entry {fqn!r} has no storage_data (where its bytes are)")
            objects.append((fqn, loc))
            continue
        if not isinstance(entry, _TensorStorageMetadata):
            raise bad(f"entry {fqn!r} is a {type(entry).__name__}, neither a tensor nor bytes")
        props, size, chunks = entry.get("properties"), entry.get("size"), entry.get("chunks")
        state = props.state if isinstance(props, _TensorProperties) else None
        dtype = (
            state[0]
            if isinstance(state, tuple) and state
            else (state or {}).get("dtype")
            if isinstance(state, dict)
            else None
        )
        if not isinstance(dtype, _Dtype) or not _ints(size) or not isinstance(chunks, list) or len(size) > 64:
            raise bad(f"tensor {fqn!r} has a malformed entry (properties, size, chunks)")
        tensor = _Tensor(fqn, dtype.name, size)
        for chunk in chunks:
            offsets = chunk.get("offsets") if isinstance(chunk, _ChunkStorageMetadata) else None
            sizes = chunk.get("sizes") if isinstance(chunk, _ChunkStorageMetadata) else None
            if not (_ints(offsets) and _ints(sizes) and len(offsets) == len(sizes) == len(size)):
                raise bad(f"tensor {fqn!r} {list(size)} has a malformed chunk")
            if any(o + s > d for o, s, d in zip(offsets, sizes, size)):
                raise bad(
                    f"tensor {fqn!r} {list(size)} has a chunk at {list(offsets)} of {list(sizes)}, outside it"
                )
            loc = locations.get((fqn, offsets))
            if loc is None:
                raise bad(
                    f"tensor {fqn!r}: the chunk at {list(offsets)} has no storage_data (where its bytes are)"
                )
            tensor.chunks.append((offsets, sizes, loc))
        _check_cover(fqn, size, [(o, s) for o, s, _ in tensor.chunks], where)
        tensors.append(tensor)
    planner = md.get("planner_data")
    paths: dict[str, tuple[str | int, ...]] = {}
    if isinstance(planner, dict):
        for fqn, path in planner.items():
            if (
                isinstance(fqn, str)
                and isinstance(path, (tuple, list))
                and path
                and all(isinstance(p, str) or _is_int(p) for p in path)
            ):
                paths[fqn] = tuple(path)
    version = md.get("version")
    return _Parsed(tensors, objects, paths, version if isinstance(version, str) else None)


def _check_cover(
    fqn: str, size: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], where: str
) -> None:
    """The chunks cover the tensor exactly once (identical repeats are dropped by the caller)."""
    unique = list(dict.fromkeys(boxes))
    volume = sum(math.prod(s) for _, s in unique)
    if volume != math.prod(size):
        raise CorruptCheckpointError(
            f"{where}: tensor {fqn!r} {list(size)} has chunks of {volume} elements in all, not {math.prod(size)}"
        )
    boxes = [(a, b) for a, b in unique if all(b)]  # an empty chunk overlaps nothing
    if len(boxes) <= 256:  # beyond, the volume check stands alone (quadratic otherwise)
        for i, (a0, a1) in enumerate(boxes):
            for b0, b1 in boxes[i + 1 :]:
                if all(x < y + k and y < x + m for x, m, y, k in zip(a0, a1, b0, b1)):
                    raise CorruptCheckpointError(
                        f"{where}: tensor {fqn!r} has overlapping chunks at {list(a0)} and {list(b0)}"
                    )


# ---------------------------------------------------------------- torch.save records (zip)


@dataclass(frozen=True)
class _ZipEntry:
    name: str
    header: int  # offset of its local header in the record
    size: int
    crc: int


def _zip_directory(get: Callable[[int, int], bytes], length: int, where: str) -> dict[str, _ZipEntry]:
    """The entries of a zip archive of `length` bytes, read through get(start, stop).

    Only stored (uncompressed) entries, as torch.save writes them; zip64 is read.
    """
    tail = get(max(0, length - WINDOW_BYTES), length)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 and length > WINDOW_BYTES:  # a zip comment: the end record is further back
        tail = get(max(0, length - (22 + 0xFFFF)), length)
        pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < 22:
        raise CorruptCheckpointError(f"{where}: not a torch.save record (no zip directory at its end)")
    (_, _, _, _, count, cd_size, cd_offset, _) = struct.unpack("<IHHHHIIH", tail[pos : pos + 22])
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        loc = pos - 20
        if loc < 0 or tail[loc : loc + 4] != b"PK\x06\x07":
            raise CorruptCheckpointError(f"{where}: a zip64 record without its locator")
        (z64,) = struct.unpack("<Q", tail[loc + 8 : loc + 16])
        rec = get(z64, z64 + 56)
        if len(rec) < 56 or rec[:4] != b"PK\x06\x06":
            raise CorruptCheckpointError(f"{where}: a zip64 end record that is not one")
        count, _, cd_size, cd_offset = struct.unpack("<QQQQ", rec[24:56])
    if cd_offset + cd_size > length or count > 1 << 16:
        raise CorruptCheckpointError(f"{where}: its zip directory lies outside the record")
    cd = get(cd_offset, cd_offset + cd_size)
    entries: dict[str, _ZipEntry] = {}
    p = 0
    for _ in range(count):
        if cd[p : p + 4] != b"PK\x01\x02" or p + 46 > len(cd):
            raise CorruptCheckpointError(f"{where}: a damaged zip directory entry")
        (_, _, _, flag, method, _, _, crc, csize, usize, nlen, elen, clen, _, _, _, header) = struct.unpack(
            "<IHHHHHHIIIHHHHHII", cd[p : p + 46]
        )
        name = cd[p + 46 : p + 46 + nlen].decode("utf-8", "replace")
        extra = cd[p + 46 + nlen : p + 46 + nlen + elen]
        p += 46 + nlen + elen + clen
        if 0xFFFFFFFF in (csize, usize, header):  # the zip64 extra field holds them, in this order
            q = 0
            while q + 4 <= len(extra):
                tag, n = struct.unpack("<HH", extra[q : q + 4])
                if tag == 1:
                    values = list(struct.unpack(f"<{n // 8}Q", extra[q + 4 : q + 4 + n // 8 * 8]))
                    if usize == 0xFFFFFFFF and values:
                        usize = values.pop(0)
                    if csize == 0xFFFFFFFF and values:
                        csize = values.pop(0)
                    if header == 0xFFFFFFFF and values:
                        header = values.pop(0)
                    break
                q += 4 + n
        if method != 0 or csize != usize or flag & 1:
            raise CorruptCheckpointError(
                f"{where}: zip entry {name!r} is compressed or encrypted (method {method}); torch.save "
                "stores its entries"
            )
        if header + 30 + usize > length:
            raise CorruptCheckpointError(
                f"{where}: zip entry {name!r} ends past the record (it is truncated)"
            )
        entries[name] = _ZipEntry(name, header, usize, crc)
    return entries


def _entry_start(get: Callable[[int, int], bytes], entry: _ZipEntry, length: int, where: str) -> int:
    head = get(entry.header, entry.header + 30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise CorruptCheckpointError(f"{where}: zip entry {entry.name!r} has no local header")
    nlen, elen = struct.unpack("<HH", head[26:30])
    start = entry.header + 30 + nlen + elen
    if start + entry.size > length:
        raise CorruptCheckpointError(
            f"{where}: zip entry {entry.name!r} ends past the record (it is truncated)"
        )
    return start


def _entry_bytes(get: Callable[[int, int], bytes], entry: _ZipEntry, length: int, where: str) -> bytes:
    start = _entry_start(get, entry, length, where)
    return get(start, start + entry.size)


def _archive(entries: dict[str, _ZipEntry], where: str) -> str:
    """The folder torch.save put the record's entries in ("archive/" since torch 1.6)."""
    roots = [n[: -len("data.pkl")] for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise CorruptCheckpointError(f"{where}: not a torch.save record (no data.pkl in it)")
    return roots[0]


@dataclass(frozen=True)
class _Layout:
    """Where a tensor's elements are in a torch.save record, and how they are laid out."""

    data_start: int  # of the storage's bytes, in the record
    storage_bytes: int
    record: _TensorRecord
    big_endian: bool
    crc: int  # the zip's CRC-32 of the storage bytes

    @property
    def itemsize(self) -> int:
        return _TORCH_DTYPES[self.record.dtype].itemsize

    @property
    def contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.record.size), reversed(self.record.stride)):
            if size > 1 and stride != expected:
                return False
            expected *= size
        return True


def _tensor_layout(
    get: Callable[[int, int], bytes],
    length: int,
    where: str,
    dtype: str,
    sizes: tuple[int, ...],
) -> _Layout:
    """The layout of the tensor record of `length` bytes, checked against the chunk DCP recorded."""
    entries = _zip_directory(get, length, where)
    root = _archive(entries, where)
    pickled = _entry_bytes(get, entries[f"{root}data.pkl"], length, where)
    record = _unpickle(pickled, _RECORD_GLOBALS, f"{where} ({root}data.pkl)", _storage_ref)
    if not isinstance(record, _TensorRecord):
        raise CorruptCheckpointError(f"{where}: its data.pkl holds a {type(record).__name__}, not a tensor")
    if not (_is_int(record.offset) and record.offset >= 0 and _ints(record.size) and _ints(record.stride)):
        raise CorruptCheckpointError(f"{where}: a tensor of malformed offset, size or strides")
    if record.dtype != dtype or record.size != sizes or len(record.stride) != len(sizes):
        raise CorruptCheckpointError(
            f"{where}: the record holds a {record.dtype} tensor {list(record.size)}, but .metadata "
            f"records this chunk as {dtype} {list(sizes)}"
        )
    order = "little"
    if f"{root}byteorder" in entries:
        order = _entry_bytes(get, entries[f"{root}byteorder"], length, where).decode("ascii", "replace")
        if order not in ("little", "big"):
            raise CorruptCheckpointError(f"{where}: byteorder {order!r:.20} (little or big)")
    data = entries.get(f"{root}data/{record.storage.key}")
    if data is None:
        raise CorruptCheckpointError(f"{where}: storage {record.storage.key!r} is not in the record")
    storage_dtype = _TORCH_DTYPES[record.storage.dtype]
    if data.size != record.storage.numel * storage_dtype.itemsize and record.storage.dtype != "uint8":
        raise CorruptCheckpointError(
            f"{where}: storage {record.storage.key!r} is {data.size} bytes, not {record.storage.numel} "
            f"{record.storage.dtype} elements"
        )
    itemsize = _TORCH_DTYPES[dtype].itemsize
    if math.prod(sizes):
        last = record.offset + sum((n - 1) * s for n, s in zip(sizes, record.stride))
        if (last + 1) * itemsize > data.size:
            raise CorruptCheckpointError(
                f"{where}: the tensor's elements reach past its storage of {data.size} bytes"
            )
    start = _entry_start(get, data, length, where)
    return _Layout(start, data.size, record, order == "big", data.crc)


def _chunk_bytes(record: bytes, layout: _Layout, dtype: np.dtype, where: str) -> np.ndarray:
    """A tensor's elements as C-order little-endian bytes, from the whole record."""
    storage = np.frombuffer(record, np.uint8, layout.storage_bytes, layout.data_start)
    if zlib.crc32(storage.data) != layout.crc:
        raise CorruptCheckpointError(
            f"{where}: the storage's CRC-32 disagrees with its zip entry (the data is corrupt)"
        )
    rec = layout.record
    elements = storage[: layout.storage_bytes // dtype.itemsize * dtype.itemsize].view(
        dtype.newbyteorder(">") if layout.big_endian and dtype.itemsize > 1 else dtype
    )
    if not math.prod(rec.size):
        return np.zeros(0, np.uint8)
    view = np.lib.stride_tricks.as_strided(
        elements[rec.offset :],
        shape=rec.size,
        strides=tuple(s * dtype.itemsize for s in rec.stride),
        writeable=False,
    )
    out = np.ascontiguousarray(view, dtype=dtype)  # little-endian, C order
    return out.reshape(-1).view(np.uint8)


def _object_value(record: bytes, where: str) -> Any:
    """The Python value of a non-tensor entry (a torch.save record), unpickled with only
    plain containers allowed; an entry holding tensors or other classes is refused."""
    get = _bytes_getter(record)
    entries = _zip_directory(get, len(record), where)
    root = _archive(entries, where)
    pickled = _entry_bytes(get, entries[f"{root}data.pkl"], len(record), where)
    return _unpickle(pickled, _OBJECT_GLOBALS, f"{where} ({root}data.pkl)")


def _bytes_getter(data: bytes) -> Callable[[int, int], bytes]:
    return lambda a, b: data[a:b]


# ---------------------------------------------------------------- decoded entries


def _decompress(data: bytes, limit: int, where: str) -> bytes:
    if zstandard is None:
        raise UnsupportedFormatError(
            f"{where}: compressed with DCP's {ZSTD}; install zstandard to read it (pip install 'shardsave[dcp]')"
        )
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
        out = reader.read(limit + 1)
    except zstandard.ZstdError as e:
        raise CorruptCheckpointError(f"{where}: its zstd frame is damaged ({e})") from None
    if len(out) > limit:
        raise CorruptCheckpointError(f"{where}: decompresses to more than the {limit} bytes its chunk needs")
    return bytes(out)


@dataclass(frozen=True)
class _Decode:
    """One object of DecodedStore: a chunk whose C-order bytes are decoded from its record."""

    location: _Location
    dtype_name: str
    sizes: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * _TORCH_DTYPES[self.dtype_name].itemsize


def _decoded_key(loc: _Location) -> str:
    return f"{loc.path}[{loc.offset}:{loc.offset + loc.length}]"


class _DecodedRead:
    def __init__(self, store: DecodedStore, key: str, start: int, stop: int, then: Any, allocate: Any):
        self._args = (store, key, start, stop, then, allocate)

    def result(self) -> np.ndarray:
        store, key, start, stop, then, allocate = self._args
        data = store.decoded(key)
        n = max(0, min(stop, data.size) - start)
        out = allocate(n)
        out[:n] = data[start : start + n]
        return then(out) if then is not None else out


class DecodedStore:
    """A read-only Store over a DCP directory: its files, and the decoded chunks as objects.

    A key "__0_0.distcp[743:1428]" is the chunk whose record is at those bytes of
    that file, as C-order little-endian bytes; it is decoded (zstd, strides, byte
    order) whole on its first read and kept for the reads that follow. Every other
    key is the directory's own. Reads count in the directory store's stats.
    """

    def __init__(self, inner: Store, decodes: dict[str, _Decode]):
        self.inner = inner
        self.path = inner.path
        self.timeout_s = inner.timeout_s
        self.stats: IOStats = inner.stats  # reads count in the directory store's stats
        self._decodes = decodes
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._decoding: dict[str, threading.Lock] = {}

    @property
    def is_local(self) -> bool:
        return self.inner.is_local

    @property
    def copies_writes(self) -> bool:
        return self.inner.copies_writes

    def local_path(self, key: str) -> str:
        return self.inner.local_path(key)

    def decoded(self, key: str) -> np.ndarray:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            gate = self._decoding.setdefault(key, threading.Lock())
        with gate:  # one decode of an object however many reads wait for it
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            data = self._decode(self._decodes[key], join(self.path, key))
            with self._lock:
                self._cache[key] = data
                held = sum(a.size for a in self._cache.values())
                while held > DECODED_CACHE_BYTES and len(self._cache) > 1:
                    held -= self._cache.popitem(last=False)[1].size
        return data

    def _decode(self, spec: _Decode, where: str) -> np.ndarray:
        loc = spec.location
        try:
            raw = self.inner.read_range(loc.path, loc.offset, loc.offset + loc.length).result()
        except FileNotFoundError:
            raise
        if raw.size < loc.length:
            raise CorruptCheckpointError(
                f"{where}: expected {loc.length} bytes at offset {loc.offset}, found {raw.size} (the file is truncated)"
            )
        record = raw.tobytes()
        if ZSTD in loc.transforms:
            record = _decompress(record, spec.nbytes * 2 + MAX_RECORD_OVERHEAD, where)
        dtype = _TORCH_DTYPES[spec.dtype_name]
        layout = _tensor_layout(_bytes_getter(record), len(record), where, spec.dtype_name, spec.sizes)
        return _chunk_bytes(record, layout, dtype, where)

    def read_range(
        self,
        key: str,
        start: int,
        stop: int,
        then: Callable[[np.ndarray], np.ndarray] | None = None,
        allocate: Callable[[int], np.ndarray] = lambda n: np.empty(n, np.uint8),
    ) -> Pending[np.ndarray]:
        if key in self._decodes:
            return _DecodedRead(self, key, start, stop, then, allocate)
        return self.inner.read_range(key, start, stop, then, allocate)

    def read_all(self, key: str) -> bytes | None:
        if key in self._decodes:
            return self.decoded(key).tobytes()
        return self.inner.read_all(key)

    def write(self, key: str, data: bytes | memoryview, *, publish: bool = True) -> Pending[Any]:
        raise PermissionError(
            f"{join(self.path, key)}: a DCP checkpoint is read, never written, by shardsave"
        )

    def exists(self, key: str) -> bool:
        spec = self._decodes.get(key)
        return self.inner.exists(spec.location.path if spec else key)

    def mtime(self, key: str) -> float | None:
        spec = self._decodes.get(key)
        return self.inner.mtime(spec.location.path if spec else key)

    def list(self) -> list[str]:
        return self.inner.list()

    def delete(self, key: str) -> Pending[None]:
        raise PermissionError(
            f"{join(self.path, key)}: a DCP checkpoint is read, never deleted, by shardsave"
        )

    def check_parent(self, prefix: str) -> None:
        self.inner.check_parent(prefix)

    def lock(self, stem: str, settle: Callable[[], None] | None = None) -> Lock | None:
        return None


# ---------------------------------------------------------------- the tree


def _nest(paths: list[tuple[str | int, ...]]) -> tuple[Any, list[int]]:
    """The structure of leaves at these paths, and the order it visits them in.

    Dicts nest along string parts, lists along integer parts numbered 0..n-1 (DCP
    flattens lists so); a path that is also another path's container, or has an
    empty part, is one whole key at the top.
    """
    names = ["/".join(str(p) for p in path) for path in paths]
    every = set(names)
    root: dict[Any, Any] = {}
    flat: list[int] = []
    for i, path in enumerate(paths):
        if any(str(p) == "" for p in path) or any(
            "/".join(str(p) for p in path[:n]) in every for n in range(1, len(path))
        ):
            flat.append(i)
            continue
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        if path[-1] in node:
            flat.append(i)
            continue
        node[path[-1]] = i
    order: list[int] = []

    def encode(node: dict[Any, Any]) -> Any:
        keys = list(node)
        as_list = keys and all(_is_int(k) for k in keys) and sorted(keys) == list(range(len(keys)))
        items = [(k, node[k]) for k in sorted(keys)] if as_list else [(str(k), v) for k, v in node.items()]
        out = []
        for key, value in items:
            if isinstance(value, int):
                out.append((key, len(order)))
                order.append(value)
            else:
                out.append((key, encode(value)))
        if as_list:
            return {"list": [c for _, c in out]}
        return {"dict": [[k, c] for k, c in out]}

    structure = encode(root) if root else {"dict": []}
    if "dict" not in structure:  # a top-level list: DCP's state dict is a dict
        structure = {"dict": [[str(i), c] for i, c in enumerate(structure["list"])]}
    for i in flat:
        structure["dict"].append([names[i], len(order)])
        order.append(i)
    return structure, order


# ---------------------------------------------------------------- the index


def _dtype_of(name: str) -> np.dtype:
    return _TORCH_DTYPES.get(name, np.dtype(object))


def _crcs(nbytes: int) -> tuple[int, ...]:
    return (0,) * crc_chunks(nbytes, READ_CHUNK_BYTES)  # placeholders: nothing is verified


class _Files:
    """The data files an index names, numbered as they are first used."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.ends: list[int] = []
        self._numbers: dict[str, int] = {}

    def number(self, key: str, end: int) -> int:
        k = self._numbers.get(key)
        if k is None:
            k = self._numbers[key] = len(self.keys)
            self.keys.append(key)
            self.ends.append(0)
        self.ends[k] = max(self.ends[k], end)
        return k

    def data_files(self) -> tuple[DataFile, ...]:
        return tuple(DataFile(n, None, 0, key=key) for key, n in zip(self.keys, self.ends))


class _Windows:
    """Reads of a data file's records: the two ends of each record read at once, up front."""

    def __init__(self, store: Store):
        self.store = store
        self._pending: dict[tuple[str, int, int], Any] = {}
        self._done: dict[tuple[str, int, int], bytes] = {}

    def ask(self, path: str, start: int, stop: int) -> None:
        key = (path, start, stop)
        if key not in self._pending and key not in self._done:
            self._pending[key] = self.store.read_range(path, start, stop)

    def read(self, path: str, start: int, stop: int) -> bytes:
        key = (path, start, stop)
        if key not in self._done:
            future = self._pending.pop(key, None) or self.store.read_range(path, start, stop)
            where = join(self.store.path, path)
            try:
                self._done[key] = future.result().tobytes()
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{where}: the data file is missing") from None
        return self._done[key]

    def getter(self, loc: _Location) -> Callable[[int, int], bytes]:
        """get(a, b) of bytes [a, b) of the record, from its windows where they hold them."""
        windows = self.windows(loc)

        def get(a: int, b: int) -> bytes:
            b = min(b, loc.length)
            for lo, hi in windows:
                if lo <= a and b <= hi:
                    return self.read(loc.path, loc.offset + lo, loc.offset + hi)[a - lo : b - lo]
            return self.read(loc.path, loc.offset + a, loc.offset + b)

        return get

    @staticmethod
    def windows(loc: _Location) -> list[tuple[int, int]]:
        if loc.length <= 2 * WINDOW_BYTES:
            return [(0, loc.length)]
        return [(0, WINDOW_BYTES), (loc.length - WINDOW_BYTES, loc.length)]


def _safetensors_header(windows: _Windows, path: str, start: int, where: str) -> tuple[dict[str, Any], int]:
    head = windows.read(path, start, start + 8)
    if len(head) < 8:
        raise CorruptCheckpointError(f"{where}: a safetensors blob cut short at offset {start}")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(f"{where}: a safetensors header of {n} bytes at offset {start}")
    raw = windows.read(path, start + 8, start + 8 + n)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise CorruptCheckpointError(
            f"{where}: the safetensors header at offset {start} is not JSON ({e})"
        ) from None
    if not isinstance(header, dict) or len(raw) < n:
        raise CorruptCheckpointError(f"{where}: the safetensors header at offset {start} is not an object")
    return header, start + 8 + n


def _sharding_info(header: dict[str, Any], where: str) -> dict[str, Any]:
    meta = header.get("__metadata__")
    info = meta.get("DCP_SHARDING_INFO") if isinstance(meta, dict) else None
    if info is None:
        return {}
    try:
        parsed = json.loads(info)
    except (TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{where}: DCP_SHARDING_INFO is not JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise CorruptCheckpointError(f"{where}: DCP_SHARDING_INFO is not a JSON object")
    return parsed


def _safetensors_tensor(
    header: dict[str, Any], name: str, where: str
) -> tuple[np.dtype, tuple[int, ...], int, int, str]:
    info = header.get(name)
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]  # type: ignore[index]
    except (TypeError, KeyError, ValueError) as e:
        raise CorruptCheckpointError(f"{where}: tensor {name!r} has a malformed safetensors entry") from e
    dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CorruptCheckpointError(f"{where}: tensor {name!r} has the safetensors dtype {dtype_name!r:.20}")
    if not (_ints(shape) and _is_int(begin) and _is_int(end) and 0 <= begin <= end):
        raise CorruptCheckpointError(f"{where}: tensor {name!r} has shape {list(shape)} at {[begin, end]}")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CorruptCheckpointError(
            f"{where}: tensor {name!r} ({dtype_name} {list(shape)}) spans {end - begin} bytes, "
            f"not {math.prod(shape) * dtype.itemsize}"
        )
    return dtype, shape, begin, end, dtype_name


def _file_size(store: Store, key: str) -> int | None:
    return os.path.getsize(store.local_path(key)) if store.is_local and store.exists(key) else None


def _dcp_index(store: Store, where: str) -> tuple[Index, dict[str, _Decode]]:
    raw = store.read_all(METADATA_NAME)
    if raw is None:
        raise CheckpointNotFoundError(f"{where} does not exist")
    if len(raw) > MAX_METADATA_BYTES:
        raise CorruptCheckpointError(f"{where}: {len(raw)} bytes, more than DCP's metadata")
    parsed = _parse_metadata(raw, where)
    windows = _Windows(store)
    sizes: dict[str, int | None] = {}

    def size_of(path: str) -> int | None:
        if path not in sizes:
            sizes[path] = _file_size(store, path)
        return sizes[path]

    for tensor in parsed.tensors:
        for _, _, loc in tensor.chunks:
            end = size_of(loc.path)
            if end is not None and loc.offset + loc.length > end:
                raise CorruptCheckpointError(
                    f"{join(store.path, loc.path)}: {end} bytes, but .metadata stores {tensor.fqn!r} at "
                    f"{loc.offset}..{loc.offset + loc.length} (the file is truncated)"
                )
            if not loc.transforms and tensor.dtype_name in _TORCH_DTYPES:
                for lo, hi in _Windows.windows(loc):
                    windows.ask(loc.path, loc.offset + lo, loc.offset + hi)
    if any(ZSTD in loc.transforms for t in parsed.tensors for *_, loc in t.chunks) and zstandard is None:
        raise UnsupportedFormatError(
            f"{where}: its tensors are compressed with DCP's {ZSTD}; install zstandard to read them "
            "(pip install 'shardsave[dcp]')"
        )
    files = _Files()
    decodes: dict[str, _Decode] = {}
    blobs: dict[tuple[str, int], tuple[dict[str, Any], int]] = {}
    leaves: list[LeafEntry] = []
    for tensor in parsed.tensors:
        dtype = _dtype_of(tensor.dtype_name)
        shards: list[StoredShard] = []
        seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
        for offsets, csizes, loc in tensor.chunks:
            if (offsets, csizes) in seen:  # a replicated chunk saved twice: one copy is read
                continue
            seen.add((offsets, csizes))
            file_where = f"{join(store.path, loc.path)} ({tensor.fqn!r} at {list(offsets)})"
            if dtype == np.dtype(object):
                break  # listed, never read
            nbytes = math.prod(csizes) * dtype.itemsize
            stop = tuple(o + s for o, s in zip(offsets, csizes))
            if loc.transforms:
                key = _decoded_key(loc)
                decodes[key] = _Decode(loc, tensor.dtype_name, csizes)
                k = files.number(key, nbytes)
                shards.append(StoredShard(k, 0, nbytes, offsets, stop, _crcs(nbytes)))
                continue
            head = (
                windows.getter(loc)(0, 9)
                if loc.length >= 9
                else windows.read(loc.path, loc.offset, loc.offset + 9)  # a blob's header, maybe
            )
            if head[:4] == b"PK\x03\x04":
                layout = _tensor_layout(
                    windows.getter(loc), loc.length, file_where, tensor.dtype_name, csizes
                )
                if layout.contiguous and not (layout.big_endian and dtype.itemsize > 1):
                    begin = loc.offset + layout.data_start + layout.record.offset * dtype.itemsize
                    k = files.number(loc.path, begin + nbytes)
                    shards.append(StoredShard(k, begin, nbytes, offsets, stop, _crcs(nbytes)))
                else:  # strided or big-endian: decoded into C-order little-endian bytes
                    key = _decoded_key(loc)
                    decodes[key] = _Decode(loc, tensor.dtype_name, csizes)
                    k = files.number(key, nbytes)
                    shards.append(StoredShard(k, 0, nbytes, offsets, stop, _crcs(nbytes)))
                continue
            if len(head) >= 9 and head[8:9] == b"{":  # DCP's safetensors serialization
                blob = blobs.get((loc.path, loc.offset))
                if blob is None:
                    blob = blobs[(loc.path, loc.offset)] = _safetensors_header(
                        windows, loc.path, loc.offset, join(store.path, loc.path)
                    )
                header, data = blob
                sdtype, shape, begin, end, sname = _safetensors_tensor(header, tensor.fqn, file_where)
                saved = _sharding_info(header, file_where).get(tensor.fqn, {})
                saved_offsets = (
                    tuple(saved.get("saved_offsets", offsets)) if isinstance(saved, dict) else None
                )
                if sdtype != dtype or shape != csizes or saved_offsets != offsets:
                    raise CorruptCheckpointError(
                        f"{file_where}: the safetensors blob holds {sname} {list(shape)} at "
                        f"{saved_offsets}, but .metadata records {tensor.dtype_name} {list(csizes)} at {list(offsets)}"
                    )
                end_abs = data + end
                fsize = size_of(loc.path)
                if fsize is not None and end_abs > fsize:
                    raise CorruptCheckpointError(
                        f"{file_where}: the tensor ends at byte {end_abs} of a {fsize}-byte file (the file is truncated)"
                    )
                k = files.number(loc.path, end_abs)
                shards.append(StoredShard(k, data + begin, nbytes, offsets, stop, _crcs(nbytes)))
                continue
            raise CorruptCheckpointError(
                f"{file_where}: neither a torch.save record nor a safetensors blob starts at offset {loc.offset}"
            )
        stored = None if dtype != np.dtype(object) else f"torch.{tensor.dtype_name}"
        leaves.append(
            LeafEntry(tensor.fqn, dtype, tensor.size, KIND_TENSOR, None, tuple(shards), stored_dtype=stored)
        )
    objects: list[LeafEntry] = []
    for fqn, loc in parsed.objects:
        k = files.number(loc.path, loc.offset + loc.length)
        shard = StoredShard(k, loc.offset, loc.length, (), (), _crcs(loc.length))
        kind = "pickle+zstd" if loc.transforms else "pickle"
        objects.append(LeafEntry(fqn, np.dtype(object), (), KIND_TENSOR, None, (shard,), stored_dtype=kind))
    # Tensors only in the structure: what a restore without a target returns.
    paths = [parsed.paths.get(leaf.name, (leaf.name,)) for leaf in leaves]
    object_paths = [parsed.paths.get(leaf.name, (leaf.name,)) for leaf in objects]
    structure, order = _nest(paths)
    named = [_renamed(leaves[i], paths[i]) for i in order]
    named += [_renamed(leaf, path) for leaf, path in zip(objects, object_paths)]
    _unique_names(named, where)
    mtime = store.mtime(METADATA_NAME)
    index = Index(
        global_step=None,
        created=mtime or 0.0,
        checksums=Checksums.none(READ_CHUNK_BYTES),  # DCP has none that a range read could check
        files=files.data_files(),
        structure=structure,
        leaves=tuple(named),
        format_version=0,
        source="dcp",
        commit_key=METADATA_NAME,
    )
    return index, decodes


def _renamed(leaf: LeafEntry, path: tuple[str | int, ...]) -> LeafEntry:
    return replace(leaf, name="/".join(str(p) for p in path), stored_name=leaf.name)


def _unique_names(leaves: Iterable[LeafEntry], where: str) -> None:
    seen: dict[str, str] = {}
    for leaf in leaves:
        other = seen.setdefault(leaf.name, str(leaf.stored_name))
        if other != leaf.stored_name:
            raise CorruptCheckpointError(
                f"{where}: entries {other!r} and {leaf.stored_name!r} are both the tree path {leaf.name!r}"
            )


def _hf_index(store: Store, names: list[str], where: str) -> Index:
    """A set of HuggingFaceStorageWriter(save_distributed=True) files as an Index."""
    windows = _Windows(store)
    files = _Files()
    by_name: dict[str, dict[str, Any]] = {}
    for name in names:
        file_where = join(store.path, name)
        header, data = _safetensors_header(windows, name, 0, file_where)
        info = _sharding_info(header, file_where)
        fsize = _file_size(store, name)
        for tensor in header:
            if tensor == "__metadata__":
                continue
            dtype, shape, begin, end, sname = _safetensors_tensor(header, tensor, file_where)
            saved = info.get(tensor, {})
            offsets = saved.get("saved_offsets", [0] * len(shape)) if isinstance(saved, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == len(shape) and _ints(tuple(offsets))):
                raise CorruptCheckpointError(
                    f"{file_where}: tensor {tensor!r} has DCP_SHARDING_INFO {saved!r:.100}"
                )
            if fsize is not None and data + end > fsize:
                raise CorruptCheckpointError(
                    f"{file_where}: tensor {tensor!r} ends at byte {data + end} of a {fsize}-byte file "
                    "(the file is truncated)"
                )
            entry = by_name.setdefault(tensor, {"dtype": dtype, "name": sname, "chunks": []})
            if entry["dtype"] != dtype:
                raise CorruptCheckpointError(
                    f"{file_where}: tensor {tensor!r} is {sname} here and {entry['name']} elsewhere"
                )
            k = files.number(name, data + end)
            entry["chunks"].append((tuple(offsets), shape, k, data + begin, end - begin))
    leaves = []
    for tensor, entry in by_name.items():
        chunks = list({(o, s): (o, s, k, b, n) for o, s, k, b, n in entry["chunks"]}.values())
        ndim = len(chunks[0][1])
        if any(len(s) != ndim for _, s, *_ in chunks):
            raise CorruptCheckpointError(f"{where}: tensor {tensor!r} has chunks of different ranks")
        size = tuple(max(o[d] + s[d] for o, s, *_ in chunks) for d in range(ndim))
        _check_cover(tensor, size, [(o, s) for o, s, *_ in chunks], where)
        shards = tuple(
            StoredShard(k, b, n, o, tuple(a + m for a, m in zip(o, s)), _crcs(n)) for o, s, k, b, n in chunks
        )
        leaves.append(
            LeafEntry(tensor, entry["dtype"], size, KIND_TENSOR, None, shards, stored_dtype=entry["name"])
        )
    paths: list[tuple[str | int, ...]] = [tuple(leaf.name.split(".")) for leaf in leaves]
    structure, order = _nest(paths)
    named = [_renamed(leaves[i], paths[i]) for i in order]
    _unique_names(named, where)
    return Index(
        global_step=None,
        created=store.mtime(names[0]) or 0.0,
        checksums=Checksums.none(READ_CHUNK_BYTES),
        files=files.data_files(),
        structure=structure,
        leaves=tuple(named),
        format_version=0,
        source="dcp",
        commit_key=names[0],
    )


def _directory(path: str) -> str:
    path = location(path)
    if path.rstrip("/").endswith("/" + METADATA_NAME) or path == METADATA_NAME:
        return split_prefix(path.rstrip("/"))[0]
    return path.rstrip("/") or path


def _hf_names(keys: list[str]) -> list[str]:
    return sorted(k for k in keys if HF_SHARD_NAME.match(k))


def is_dcp(path: str) -> bool:
    """Whether path is a DCP checkpoint directory (its `.metadata` file, or a set of
    HuggingFaceStorageWriter's per-rank files), or that `.metadata` file itself.

    A local path costs a stat (and a listing, if it is a directory); a URL one listing.
    """
    try:
        path = location(path)
    except (TypeError, ValueError):
        return False
    if not isinstance(path, str) or path.endswith((".safetensors", ".index.json", ".index")):
        return False
    directory = _directory(path)
    if "://" not in directory or directory.startswith("file://"):
        local = directory[len("file://") :] if directory.startswith("file://") else directory
        if not os.path.isdir(local):
            return False
        if os.path.isfile(os.path.join(local, METADATA_NAME)):
            return True
        try:
            return bool(_hf_names(os.listdir(local)))
        except OSError:
            return False
    try:
        keys = open_store(directory).list()
    except Exception:  # an unreachable store is for the reader that claims it to report
        return False
    return METADATA_NAME in keys or bool(_hf_names(keys))


def dcp_index(path: str, timeout_s: float) -> tuple[Store, str, Index]:
    """A DCP checkpoint directory (or its .metadata) as (DecodedStore, ".metadata", Index)."""
    directory = _directory(path)
    store = open_store(directory, timeout_s)
    where = join(directory, METADATA_NAME)
    if store.exists(METADATA_NAME):
        index, decodes = _dcp_index(store, where)
        return DecodedStore(store, decodes), METADATA_NAME, index
    names = _hf_names(store.list())
    if not names:
        raise CheckpointNotFoundError(
            f"no DCP checkpoint at {directory!r}: {where} does not exist (nor do "
            "HuggingFaceStorageWriter's shard-*-model-*.safetensors files)"
        )
    return DecodedStore(store, {}), names[0], _hf_index(store, names, directory)


def read_object(store: Store, key: str, shard: StoredShard, stored_dtype: str, where: str) -> Any:
    """The Python value of a non-tensor entry (param_groups' numbers, strings, lists),
    unpickled with only plain containers allowed (a tensor or any class is refused)."""
    try:
        data = store.read_range(key, shard.offset, shard.offset + shard.nbytes).result()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{where}: the data file is missing") from None
    if data.size < shard.nbytes:
        raise CorruptCheckpointError(
            f"{where}: expected {shard.nbytes} bytes at offset {shard.offset}, found {data.size} (the file is truncated)"
        )
    record = data.tobytes()
    if stored_dtype == "pickle+zstd":
        record = _decompress(record, MAX_METADATA_BYTES, where)
    return _object_value(record, where)
