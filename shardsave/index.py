"""The records every format's reader produces, and what they mean.

An Index lists a checkpoint's leaves (LeafEntry), each as stored boxes
(StoredShard) at offsets of data files (DataFile), with their checksums. A
format's reader (formats/) validates what it reads before it builds these, so
the rest of the package may trust them: offsets lie inside their files, boxes
lie inside their arrays and cover them exactly once, dtypes come from a fixed
list. Also here: dtype names, boxes, shardings in their JSON form, checksums.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import crc32c
import jax
import ml_dtypes
import numpy as np

from shardsave.errors import CorruptCheckpointError


def checksum(data: Any, value: int = 0) -> int:
    """The CRC-32C (Castagnoli) of a buffer (bytes, memoryview, contiguous numpy array),
    continuing from `value` (the checksum of the bytes before it).

    The crc32c package releases the GIL while it computes. google-crc32c 1.9 holds
    it (googleapis/google-cloud-python#16923), so an async commit's checksums
    would stall the training thread; docs/guides/storage.md has the measurement.
    """
    return int(crc32c.crc32c(data, value))


# Limits that keep a hostile index from making a reader allocate or loop without bound.
MAX_NDIM = 64


MAX_BYTES = 1 << 50  # 1 PiB per array or per data file


MAX_SHARDS_PER_LEAF = 1 << 20


_DTYPE_NAMES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]


_ML_DTYPE_NAMES = [
    "bfloat16",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e4m3b11fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e3m4",
    "float8_e4m3",
    "float8_e8m0fnu",
    "float4_e2m1fn",
    "float6_e2m3fn",
    "float6_e3m2fn",
    "int2",
    "int4",
    "uint2",
    "uint4",
]


DTYPES: dict[str, np.dtype] = {n: np.dtype(n) for n in _DTYPE_NAMES}


DTYPES.update({n: np.dtype(getattr(ml_dtypes, n)) for n in _ML_DTYPE_NAMES if hasattr(ml_dtypes, n)})


@functools.cache  # every leaf of every save asks; trees have few dtypes
def dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise TypeError(f"dtype {name} cannot be stored (supported: {', '.join(DTYPES)})")
    return name


def crc_chunks(nbytes: int, chunk: int) -> int:
    return -(-nbytes // chunk)


def shard_checksums(data: np.ndarray, offset: int, nbytes: int, chunk: int) -> tuple[int, ...]:
    """The chunk checksums of the shard stored at data[offset : offset + nbytes]."""
    end = offset + nbytes
    return tuple(checksum(data[o : min(o + chunk, end)]) for o in range(offset, end, chunk))


@dataclass(frozen=True)
class Checksums:
    """How a checkpoint's stored bytes are checked, and in what units they are read.

    A closed set of four kinds, each a reader's choice for its format, and the one
    place that knows their arithmetic (restores, CheckpointReader and verify use it):

    - chunked(C): one CRC-32C per C bytes of each shard (shardsave's format); a read
      is widened to whole chunks, and each chunk it covers is verified.
    - per_shard(): one CRC-32C over each whole shard (TensorFlow's tensors); a read
      of part of a shard still reads all of it, or carries the checksum read by read.
    - none(C): no checksums (safetensors); only lengths are checked, and reads are
      planned in C-byte units as if chunked.
    - by_store(C): every C-byte unit is checked by the store that serves it, before
      it is returned (a compressed checkpoint's frames: formats.zstd_chunks); reads
      are planned in whole units, and only their lengths are checked here.

    Offsets here are relative to the shard's first byte; unit j of a shard is
    bytes [j * unit, (j + 1) * unit) of it, the last one possibly shorter.
    """

    kind: Literal["chunked", "per_shard", "none", "by_store"]
    chunk_bytes: int = 0  # chunked and none: the unit; per_shard: 0 (the unit is the shard)

    @classmethod
    def chunked(cls, chunk_bytes: int) -> Checksums:
        return cls("chunked", chunk_bytes)

    @classmethod
    def per_shard(cls) -> Checksums:
        return cls("per_shard", 0)

    @classmethod
    def none(cls, chunk_bytes: int) -> Checksums:
        return cls("none", chunk_bytes)

    @classmethod
    def by_store(cls, chunk_bytes: int) -> Checksums:
        return cls("by_store", chunk_bytes)

    @property
    def verified(self) -> bool:
        """Whether stored bytes are checked against checksums (not only their lengths)."""
        return self.kind != "none"

    @property
    def whole_shards(self) -> bool:
        """Whether a shard is one unit (one checksum over it all)."""
        return self.kind == "per_shard"

    @property
    def plan_unit(self) -> int:
        """The unit the pure planners align reads to; 0: the whole shard (per_shard)."""
        return self.chunk_bytes

    def unit_bytes(self, shard: StoredShard) -> int:
        return shard.nbytes if self.whole_shards else self.chunk_bytes

    def widen(self, shard: StoredShard, start: int, stop: int) -> tuple[int, int]:
        """Bytes [start, stop) of a shard widened to whole units."""
        if self.whole_shards:
            return 0, shard.nbytes
        c = self.chunk_bytes
        return start // c * c, min(-(-stop // c) * c, shard.nbytes)

    def units(self, shard: StoredShard, start: int, stop: int) -> range:
        """The numbers of the units that bytes [start, stop) of a shard touch."""
        if self.whole_shards:
            return range(1)
        c = self.chunk_bytes
        return range(start // c, -(-stop // c))

    def count(self, nbytes: int) -> int:
        """How many checksums a chunked shard of nbytes has (a writer's question)."""
        return -(-nbytes // self.chunk_bytes) if self.chunk_bytes else 1

    def problem(self, data: np.ndarray, data_start: int, shard: StoredShard, j: int) -> str | None:
        """What is wrong with unit j of a shard, in data read from file offset data_start.

        The one vocabulary of damage, for restores and for verify: a short read is
        truncation, a checksum mismatch is corruption, both naming the byte range.
        None when the unit is sound.
        """
        unit = self.unit_bytes(shard)
        lo = shard.offset + j * unit
        hi = min(lo + unit, shard.offset + shard.nbytes)
        if hi - data_start > data.size:
            found = max(0, data.size - (lo - data_start))
            return f"expected {hi - lo} bytes at offset {lo}, found {found} (the file is truncated)"
        if (
            self.kind in ("chunked", "per_shard")
            and checksum(data[lo - data_start : hi - data_start]) != shard.crc32c[j]
        ):
            return f"crc32c mismatch in bytes {lo}..{hi} (the data is corrupt)"
        return None

    def describe(self) -> str:
        """The unit in words, for messages: "whole 4 MiB checksum chunks", "whole tensors (...)"."""
        if self.whole_shards:
            return "whole tensors (this checkpoint has one checksum per tensor)"
        return f"whole {self.chunk_bytes >> 20} MiB checksum chunks"


@dataclass(frozen=True)
class StoredShard:
    """One stored box of one array: where its bytes are and their checksums."""

    file: int
    offset: int
    nbytes: int
    start: tuple[int, ...]
    stop: tuple[int, ...]
    crc32c: tuple[int, ...]  # one per CRC chunk, in order
    # A compressed shard (Index.compression): the stored size of each chunk, whose
    # crc32c covers its stored bytes; None: stored as it is, nbytes at offset.
    stored: tuple[int, ...] | None = None
    # stop - start, computed unless given (an index decoder has it at hand already).
    shape: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed here: functools.cached_property takes a lock shared by every
        # instance on each first access (Python 3.11), which made restores of many
        # shards measurably slower (the commit that moved this here has the figure).
        if len(self.shape) != len(self.start):
            object.__setattr__(self, "shape", tuple(b - a for a, b in zip(self.start, self.stop)))


@dataclass(frozen=True)
class LeafEntry:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    kind: str
    sharding: dict[str, Any] | None  # JSON form; see encode_sharding
    shards: tuple[StoredShard, ...]
    key_impl: str | None = None  # kind "key": the PRNG implementation of the stored key data
    stored_dtype: str | None = None  # a foreign format's dtype name (TensorFlow's "string", ...)
    stored_name: str | None = None  # a foreign format's own name, where it is not the tree path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class DataFile:
    nbytes: int
    device_id: int | None  # the device whose shards the file holds (sharded=True)
    process_index: int  # the process that wrote it
    parts: tuple[int, ...] | None = None  # sizes of its numbered parts, when split (version 2)
    # Where its bytes are, as the format's reader names them (left unset by a writer): the
    # file's name in its directory, and the objects holding its parts in order, if split.
    key: str | None = None
    part_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Index:
    global_step: int | None
    created: float
    checksums: Checksums
    files: tuple[DataFile, ...]
    structure: Any
    leaves: tuple[LeafEntry, ...]
    format_version: int  # of the format it was read from (0 where that format has none)
    metrics: dict[str, Any] | None = None  # save(metrics=...): JSON, committed with the checkpoint
    metadata: dict[str, Any] | None = None  # save(metadata=...)
    # The format's reader that produced it ("shardsave", "tensorflow", "safetensors"): for
    # what is shown to people; what the records mean never depends on it.
    source: str = "shardsave"
    # False for save(write_state=False): committed, but never to be recorded in a state
    # file, adopted by retention or returned by latest_checkpoint (absent in older indexes).
    recorded: bool = True
    # The object whose absence means the checkpoint is gone (its index file), as the
    # format's reader names it: a restore that loses a data file checks it to tell a
    # checkpoint deleted under it from a damaged one.
    commit_key: str | None = None
    # How the data files store their chunks: None (raw bytes) or "zstd" (each checksum
    # chunk of a shard a zstd frame of its own; StoredShard.stored has their sizes).
    compression: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)


def json_document(value: Any, what: str) -> dict[str, Any] | None:
    """value as a JSON object (string keys, JSON values), numpy and jax scalars as numbers.

    Raises TypeError naming the offending key path: metrics and metadata are
    checked before anything is written, so that a save either stores them or
    refuses at once.
    """
    if value is None:
        return None

    def convert(x: Any, path: str) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (int, float)):
            if isinstance(x, float) and not math.isfinite(x):
                raise TypeError(f"{what}{path} is {x}, which JSON cannot hold; store None or a string")
            return x
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if not isinstance(k, str):
                    raise TypeError(f"{what}{path} has the key {k!r}; keys must be strings")
                out[k] = convert(v, f"{path}[{k!r}]")
            return out
        if isinstance(x, (list, tuple)):
            return [convert(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if getattr(x, "shape", None) == () and getattr(x, "dtype", None) is not None:  # numpy/jax scalars
            kind = np.dtype(x.dtype).kind
            if kind in "iub":
                return bool(x) if kind == "b" else int(x)
            if kind == "f":
                return convert(float(x), path)
        raise TypeError(
            f"{what}{path} is a {type(x).__name__}, which JSON cannot hold; metrics and metadata take "
            "strings, numbers, booleans, None, lists and dicts with string keys (store arrays in the tree)"
        )

    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict with string keys, found {type(value).__name__}")
    return convert(value, "")


def device_ids(devices: Any) -> list[int]:
    """Sorted ids of a collection of jax devices."""
    return sorted(d.id for d in devices)


def encode_sharding(sharding: jax.sharding.Sharding) -> dict[str, Any]:
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        (device,) = device_ids(sharding.device_set)
        return {"type": "single", "device": device}
    if isinstance(sharding, jax.sharding.NamedSharding):
        mesh = sharding.mesh
        spec: list[Any] = []
        for entry in sharding.spec:
            if entry is None or isinstance(entry, str):
                spec.append(entry)
            elif isinstance(entry, tuple) and all(isinstance(a, str) for a in entry):
                spec.append(list(entry))
            else:  # UNCONSTRAINED and friends cannot be rebuilt
                return {"type": "other", "devices": device_ids(sharding.device_set)}
        return {
            "type": "named",
            "axis_names": list(mesh.axis_names),
            "mesh_shape": list(mesh.devices.shape),
            "devices": [d.id for d in mesh.devices.flat],
            "spec": spec,
        }
    return {"type": "other", "devices": device_ids(sharding.device_set)}


def decode_sharding(
    desc: dict[str, Any] | None, devices_by_id: dict[int, jax.Device]
) -> jax.sharding.Sharding | None:
    """The sharding a leaf was saved with, or None when it cannot be rebuilt here."""
    if desc is None:
        return None
    try:
        kind = desc["type"]
        if kind == "single":
            device = devices_by_id.get(desc["device"])
            return None if device is None else jax.sharding.SingleDeviceSharding(device)
        if kind == "named":
            ids = desc["devices"]
            if not all(i in devices_by_id for i in ids):
                return None
            devices = np.array([devices_by_id[i] for i in ids], dtype=object)
            mesh = jax.sharding.Mesh(devices.reshape(desc["mesh_shape"]), tuple(desc["axis_names"]))
            spec = [tuple(e) if isinstance(e, list) else e for e in desc["spec"]]
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        return None
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"the index holds a malformed sharding {desc!r:.200}: {e}") from e


Box = tuple[tuple[int, int], ...]  # per dimension [start, stop)


def index_box(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    out = []
    for sl, dim in zip(index, shape):
        start, stop, _ = sl.indices(dim)
        out.append((start, max(start, stop)))
    return tuple(out)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def full_box(shape: tuple[int, ...]) -> Box:
    return tuple((0, d) for d in shape)


def device_boxes(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> dict[jax.Device, Box]:
    return {d: index_box(idx, shape) for d, idx in sharding.devices_indices_map(shape).items()}
