"""shardsave's own format: names, the index file's encoding and its validation.

FORMAT.md is the specification; this module is its reference implementation.
Everything read from an index is validated here before any other module sees
it, and file names are derived from the prefix, never read.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import replace
from operator import le, sub
from typing import Any

from shardsave import tree as _tree
from shardsave.errors import CorruptCheckpointError, UnsupportedFormatError
from shardsave.index import (
    DTYPES,
    MAX_BYTES,
    MAX_NDIM,
    MAX_SHARDS_PER_LEAF,
    Checksums,
    DataFile,
    Index,
    LeafEntry,
    StoredShard,
    checksum,
    crc_chunks,
    dtype_name,
)
from shardsave.storage.base import Store, temp_target

FORMAT_NAME = "shardsave"


FORMAT_VERSION = 3


# Version 2 wraps the index in an envelope that carries the CRC-32C of its body.
# The envelope's bytes before the body are fixed, so a reader finds the body by
# position and checks its checksum without re-encoding anything:
#   {"format":"shardsave","format_version":2,"crc32c":"XXXXXXXX","index":BODY}
_ENVELOPE_HEADS = {v: b'{"format":"shardsave","format_version":%d,"crc32c":"' % v for v in (2, 3)}


_ENVELOPE_MID = b'","index":'


_ENVELOPE_BODY_AT = len(_ENVELOPE_HEADS[2]) + 8 + len(_ENVELOPE_MID)  # (every version's head is as long)


# Stored shards carry one crc32c per chunk of this many bytes, so a reader that
# needs only part of a shard can verify what it reads without reading it all.
CRC_CHUNK_BYTES = 4 << 20


ZSTD = "zstd"  # the one compression the format knows (version 3)


INDEX_SUFFIX = ".index"


_DATA_RE = re.compile(r"^(?P<base>.+)\.data-(?P<k>\d{5})-of-(?P<n>\d{5})(?:\.part-(?P<j>\d{5}))?$")


# No stored object is larger than this by default: a single PUT to AWS S3 is limited
# to 5 GiB, so a device's data beyond it is split into numbered parts.
DEFAULT_PART_BYTES = 4 << 30


MAX_PARTS = 99_999  # part numbers have five digits


# Checkpoint names: the save path's name (the stem), then "-STEP" when saved with a
# global step; STEP may be negative ("model--3") or zero-padded ("model-00001000").
_STEP_RE = re.compile(r"-(-?\d+)$")


def checkpoint_name(stem: str, step: int | None, pad: bool = False) -> str:
    """The name save() gives a checkpoint: stem, or stem-STEP."""
    if step is None:
        return stem
    return f"{stem}-{step:08d}" if pad else f"{stem}-{step}"


def step_of(name: str) -> int | None:
    """The step in a checkpoint's name, or None when it has none."""
    m = _STEP_RE.search(name)
    return int(m[1]) if m else None


def stem_of(name: str) -> str:
    """The save path's name of a checkpoint: "model" for "model-1000" (and for "model")."""
    return _STEP_RE.sub("", name)


@functools.cache
def names_of_save_path(stem: str) -> re.Pattern[str]:
    """The names of one save path's checkpoints: stem itself, or stem-STEP."""
    return re.compile(rf"{re.escape(stem)}(--?\d+)?")


def index_key(base: str) -> str:
    return base + INDEX_SUFFIX


def data_key(base: str, k: int, n: int) -> str:
    return f"{base}.data-{k:05d}-of-{n:05d}"


def part_key(base: str, k: int, n: int, j: int) -> str:
    return f"{data_key(base, k, n)}.part-{j:05d}"


def data_keys(base: str, k: int, n: int, parts: tuple[int, ...] | None) -> list[str]:
    """The names of the objects that hold data file k: itself, or its parts in order."""
    if parts is None:
        return [data_key(base, k, n)]
    return [part_key(base, k, n, j) for j in range(len(parts))]


def located(index: Index, base: str) -> Index:
    """The index of checkpoint `base` with its files' object names filled in (DataFile.key)."""
    n = len(index.files)
    files = tuple(
        replace(
            f,
            key=data_key(base, k, n),
            part_keys=tuple(data_keys(base, k, n, f.parts)) if f.parts else (),
        )
        for k, f in enumerate(index.files)
    )
    return replace(index, files=files, commit_key=index_key(base))


def parse_data_key(key: str) -> tuple[str, int, int] | None:
    """(base, k, n) of a data file's name (or of one of its parts), or None if the name is not one."""
    m = _DATA_RE.match(key)
    return (m["base"], int(m["k"]), int(m["n"])) if m else None


def split_parts(nbytes: int, part_bytes: int) -> tuple[int, ...] | None:
    """The part sizes of a data file of nbytes, or None when it fits in one object."""
    if nbytes <= part_bytes:
        return None
    full, rest = divmod(nbytes, part_bytes)
    parts = (part_bytes,) * full + ((rest,) if rest else ())
    if len(parts) > MAX_PARTS:
        raise ValueError(f"{nbytes} bytes in parts of {part_bytes} would need more than {MAX_PARTS} parts")
    return parts


def encode_index(index: Index) -> bytes:
    """The index file's bytes (the current format version: the checksummed envelope)."""
    leaves = []
    for leaf in index.leaves:
        entry = {
            "name": leaf.name,
            "dtype": dtype_name(leaf.dtype),
            "shape": list(leaf.shape),
            "kind": leaf.kind,
            "sharding": leaf.sharding,
            # json writes tuples as arrays: no per-shard list copies
            "shards": [(s.file, s.offset, s.nbytes, s.start, s.stop, s.crc32c) for s in leaf.shards]
            if index.compression is None
            else [(s.file, s.offset, s.nbytes, s.start, s.stop, s.crc32c, s.stored) for s in leaf.shards],
        }
        if leaf.key_impl is not None:
            entry["key_impl"] = leaf.key_impl
        leaves.append(entry)
    doc = {
        "global_step": index.global_step,
        "created": index.created,
        "crc_chunk_bytes": index.checksums.chunk_bytes,
        "files": [
            {"nbytes": f.nbytes, "device_id": f.device_id, "process_index": f.process_index}
            | ({} if f.parts is None else {"parts": list(f.parts)})
            for f in index.files
        ],
        "structure": index.structure,
        "leaves": leaves,
    }
    if index.metrics is not None:
        doc["metrics"] = index.metrics
    if index.metadata is not None:
        doc["metadata"] = index.metadata
    if not index.recorded:
        doc["recorded"] = False
    if index.compression is not None:
        doc["compression"] = index.compression
    body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    # Version 3 only where it differs from 2 (compression), so that an uncompressed
    # checkpoint stays readable by every reader of version 2.
    head = _ENVELOPE_HEADS[3 if index.compression is not None else 2]
    return b"".join((head, b"%08x" % checksum(body), _ENVELOPE_MID, body, b"}"))


def _int(value: Any, what: str, lo: int = 0, hi: int = MAX_BYTES) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], found {value!r:.60}")
    return value


def _in(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


_INT_ONLY = {int}


def _ints(value: Any, lo: int, hi: int) -> tuple[int, ...] | None:
    """A list of integers in [lo, hi] as a tuple, or None; checked in bulk (in C: an
    index holds tens of thousands of these lists)."""
    if type(value) is not list:
        return None
    if value and (set(map(type, value)) != _INT_ONLY or min(value) < lo or max(value) > hi):
        return None  # (type(True) is bool, not int: booleans are refused)
    return tuple(value)


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list, found {type(value).__name__}")
    return value


def decode_index(raw: bytes, where: str) -> Index:
    """Parses and validates an index; every defect raises CorruptCheckpointError."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{where}: the index is not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f'{where}: not a shardsave index (no "format": "shardsave")')
    version = doc.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where}: written by format version {version}, but this shardsave reads versions "
            f"up to {FORMAT_VERSION}; upgrade shardsave to read it"
        )
    try:
        if (
            type(version) is int and version == 1
        ):  # no envelope, no checksum of its own: the fields are at the top
            return _decode(doc, 1)
        version = _int(version, "format_version", 2, FORMAT_VERSION)
        head = _ENVELOPE_HEADS[version]
        body = raw[_ENVELOPE_BODY_AT:-1]
        stored = raw[len(head) : len(head) + 8]
        if (
            not raw.startswith(head)
            or raw[len(head) + 8 : _ENVELOPE_BODY_AT] != _ENVELOPE_MID
            or not raw.endswith(b"}")
            or set(doc) != {"format", "format_version", "crc32c", "index"}
        ):
            raise ValueError("the envelope is not laid out as FORMAT.md requires")
        if stored != b"%08x" % checksum(body):
            raise CorruptCheckpointError(
                f"{where}: the index's crc32c does not match its contents (the index is corrupt; "
                "restore an earlier checkpoint)"
            )
        if not isinstance(doc["index"], dict):
            raise ValueError("index must be an object")
        return _decode(doc["index"], version)
    except CorruptCheckpointError:
        raise
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise CorruptCheckpointError(f"{where}: invalid index: {detail}") from e


def _decode(doc: dict[str, Any], version: int) -> Index:
    step = doc["global_step"]
    if step is not None:
        _int(step, "global_step", -(1 << 62), 1 << 62)
    created = doc["created"]
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
        raise ValueError(f"created must be a number, found {created!r:.60}")
    chunk = _int(doc["crc_chunk_bytes"], "crc_chunk_bytes", 1, 1 << 40)
    compression = doc.get("compression")
    if compression is not None and (version < 3 or compression != ZSTD):
        raise ValueError(
            f"compression must be absent or (from version 3) {ZSTD!r}, found {compression!r:.40}"
        )

    files = []
    for i, f in enumerate(_list(doc["files"], "files")):
        if not isinstance(f, dict):
            raise ValueError(f"files[{i}] must be an object")
        device = f["device_id"]
        if device is not None:
            _int(device, f"files[{i}].device_id", 0, 1 << 31)
        nbytes = _int(f["nbytes"], f"files[{i}].nbytes")
        parts = f.get("parts")
        if parts is not None:
            sizes = _ints(parts, 1, MAX_BYTES)
            if version < 2 or sizes is None or not 2 <= len(sizes) <= MAX_PARTS or sum(sizes) != nbytes:
                raise ValueError(
                    f"files[{i}].parts must be 2..{MAX_PARTS} positive sizes adding up to nbytes {nbytes}"
                )
            parts = sizes
        files.append(
            DataFile(
                nbytes=nbytes,
                device_id=device,
                process_index=_int(f["process_index"], f"files[{i}].process_index", 0, 1 << 31),
                parts=parts,
            )
        )

    leaves = []
    names: set[str] = set()
    for i, leaf in enumerate(_list(doc["leaves"], "leaves")):
        if not isinstance(leaf, dict):
            raise ValueError(f"leaves[{i}] must be an object")
        name = leaf["name"]
        # "" is the name of a bare array saved as the whole tree (format version 2).
        if not isinstance(name, str) or (not name and version < 2) or "\0" in name:
            raise ValueError(f"leaves[{i}].name must be a string without NUL")
        if name in names:
            raise ValueError(f"leaf name {name!r} appears twice")
        names.add(name)
        leaves.append(_decode_leaf(leaf, name, files, chunk, compression is not None))

    structure = doc["structure"]
    indices = _tree.structure_leaf_indices(structure)
    if indices != list(range(len(leaves))):
        raise ValueError("structure does not refer to every leaf exactly once, in order")
    documents = {}
    for name in ("metrics", "metadata"):
        value = doc.get(name)
        if value is not None and (not isinstance(value, dict) or not all(isinstance(k, str) for k in value)):
            raise ValueError(f"{name} must be an object")
        documents[name] = value
    recorded = doc.get("recorded", True)
    if not isinstance(recorded, bool):
        raise ValueError(f"recorded must be true or false, found {recorded!r:.60}")
    return Index(
        global_step=step,
        created=float(created),
        checksums=Checksums.chunked(chunk),
        files=tuple(files),
        structure=structure,
        leaves=tuple(leaves),
        format_version=version,
        metrics=documents["metrics"],
        metadata=documents["metadata"],
        recorded=recorded,
        compression=compression,
    )


def _decode_leaf(
    leaf: dict[str, Any], name: str, files: list[DataFile], chunk: int, compressed: bool = False
) -> LeafEntry:
    dtype_str = leaf["dtype"]
    if not isinstance(dtype_str, str) or dtype_str not in DTYPES:
        raise ValueError(f"leaf {name!r}: unknown dtype {dtype_str!r:.40}")
    dtype = DTYPES[dtype_str]
    shape_list = _list(leaf["shape"], f"leaf {name!r} shape")
    if len(shape_list) > MAX_NDIM:
        raise ValueError(f"leaf {name!r}: more than {MAX_NDIM} dimensions")
    shape = tuple(_int(d, f"leaf {name!r} shape") for d in shape_list)
    size = math.prod(shape)
    if size * dtype.itemsize > MAX_BYTES:
        raise ValueError(f"leaf {name!r}: claims {size * dtype.itemsize} bytes, over the limit")
    kind = leaf["kind"]
    if kind not in _tree.KINDS:
        raise ValueError(f"leaf {name!r}: unknown kind {kind!r:.40}")
    sharding = leaf["sharding"]
    if sharding is not None and not isinstance(sharding, dict):
        raise ValueError(f"leaf {name!r}: sharding must be an object or null")
    key_impl = leaf.get("key_impl")
    if (kind == _tree.KIND_KEY) != (key_impl is not None):
        raise ValueError(f"leaf {name!r}: key_impl is required for kind 'key' and only for it")
    if key_impl is not None and not (
        isinstance(key_impl, str) and key_impl and len(key_impl) <= 64 and key_impl.isprintable()
    ):
        raise ValueError(f"leaf {name!r}: key_impl must be a short printable string")
    if kind == _tree.KIND_KEY and (dtype_str != "uint32" or not shape):
        raise ValueError(f"leaf {name!r}: key data must be uint32 with at least one dimension")

    raw_shards = _list(leaf["shards"], f"leaf {name!r} shards")
    if len(raw_shards) > MAX_SHARDS_PER_LEAF:
        raise ValueError(f"leaf {name!r}: too many shards ({len(raw_shards)})")
    shards = []
    covered = 0
    last_file = len(files) - 1
    ndim = len(shape)
    for j, s in enumerate(raw_shards):
        # Messages are built only on failure: an index holds tens of thousands of shards.
        if type(s) is not list or len(s) != (7 if compressed else 6):
            fields = "file, offset, nbytes, start, stop, crc32c" + (", stored" if compressed else "")
            raise ValueError(f"leaf {name!r} shard {j} must be [{fields}]")
        file, offset, nbytes = s[0], s[1], s[2]
        if not (_in(file, 0, last_file) and _in(offset, 0, MAX_BYTES) and _in(nbytes, 0, MAX_BYTES)):
            raise ValueError(
                f"leaf {name!r} shard {j}: file, offset and nbytes must be integers in range "
                f"(files 0..{last_file}, sizes up to {MAX_BYTES}), found {s[:3]!r:.80}"
            )
        start, stop, crc = _ints(s[3], 0, 1 << 50), _ints(s[4], 0, 1 << 50), _ints(s[5], 0, 0xFFFFFFFF)
        if start is None or stop is None or crc is None:
            raise ValueError(
                f"leaf {name!r} shard {j}: start, stop and crc32c must be lists of integers in range"
            )
        if len(start) != ndim or len(stop) != ndim:
            raise ValueError(
                f"leaf {name!r} shard {j}: box has {len(start)}/{len(stop)} dims, array has {ndim}"
            )
        # start >= 0 (_ints); stop >= start and stop <= shape in each dimension.
        extent = tuple(map(sub, stop, start))
        if ndim and (min(extent) < 0 or not all(map(le, stop, shape))):
            raise ValueError(f"leaf {name!r} shard {j}: box {start}..{stop} lies outside shape {shape}")
        volume = math.prod(extent)
        if nbytes != volume * dtype.itemsize:
            raise ValueError(f"leaf {name!r} shard {j}: nbytes {nbytes} != {volume} elements of {dtype_str}")
        if len(crc) != crc_chunks(nbytes, chunk):
            raise ValueError(
                f"leaf {name!r} shard {j}: {len(crc)} checksums for {crc_chunks(nbytes, chunk)} chunks"
            )
        sizes = None
        if compressed:
            sizes = _ints(s[6], 1, MAX_BYTES)
            if sizes is None or len(sizes) != len(crc):
                raise ValueError(f"leaf {name!r} shard {j}: stored must hold one positive size per checksum")
        span = nbytes if sizes is None else sum(sizes)
        if offset + span > files[file].nbytes:
            raise ValueError(
                f"leaf {name!r} shard {j}: bytes {offset}..{offset + span} lie past the end of file {file}"
            )
        covered += volume
        shards.append(StoredShard(file, offset, nbytes, start, stop, crc, sizes, extent))
    if covered != size:
        raise ValueError(f"leaf {name!r}: shards hold {covered} elements, the array has {size}")
    if size == 0 and len(shards) != 1:
        raise ValueError(f"leaf {name!r}: an empty array is stored as exactly one empty shard")
    if size:
        _check_grid(name, shape, shards)
    return LeafEntry(name, dtype, shape, kind, sharding, tuple(shards), key_impl)


def _check_grid(name: str, shape: tuple[int, ...], shards: list[StoredShard]) -> None:
    # jax shardings cut each dimension at a set of boundaries; stored boxes are the
    # cells of that grid. Requiring every box to be one distinct grid cell, and every
    # cell to be present, proves the boxes cover the array exactly once, in
    # O(n log n) however hostile the index.
    cuts = [sorted({s.start[d] for s in shards}) for d in range(len(shape))]
    next_cut = [dict(zip(c, [*c[1:], dim])) for c, dim in zip(cuts, shape)]
    if any(c[0] != 0 for c in cuts):
        raise ValueError(f"leaf {name!r}: stored shards leave the array's start uncovered")
    cells = {s.start for s in shards}
    if len(cells) != len(shards) or len(shards) != math.prod(len(c) for c in cuts):
        raise ValueError(f"leaf {name!r}: stored shards do not form a grid covering the array once")
    for s in shards:
        if any(next_cut[d][a] != b for d, (a, b) in enumerate(zip(s.start, s.stop))):
            raise ValueError(f"leaf {name!r}: stored shard {s.start}..{s.stop} is not a grid cell")


class Listing:
    """A directory's keys grouped by the checkpoint they belong to: the one place that reads names.

    Attributes:
      keys: every key, sorted.
      committed: checkpoint names with an index (committed checkpoints).
      data: checkpoint name -> its data objects (files and parts), whether committed or not.
      temps: checkpoint name -> temporary files of interrupted writes of its index or data.
    """

    def __init__(self, keys: list[str]):
        self.keys = keys
        self.committed: set[str] = set()
        self.data: dict[str, list[str]] = {}
        self.temps: dict[str, list[str]] = {}
        for key in keys:
            written = temp_target(key)
            if written is not None:
                parsed = parse_data_key(written)
                base = parsed[0] if parsed else written.removesuffix(INDEX_SUFFIX)
                if base != written:  # a data file's or an index's, not another file's
                    self.temps.setdefault(base, []).append(key)
            elif (parsed := parse_data_key(key)) is not None:
                self.data.setdefault(parsed[0], []).append(key)
            elif key.endswith(INDEX_SUFFIX):
                self.committed.add(key[: -len(INDEX_SUFFIX)])

    @classmethod
    def of(cls, store: Store) -> Listing:
        return cls(store.list())

    def checkpoints(self) -> list[str]:
        """Every checkpoint name that has an index or data objects, sorted."""
        return sorted(self.committed | set(self.data))

    def files_of(self, base: str) -> list[str]:
        """Every data object and temporary file of checkpoint base (not its index)."""
        return self.data.get(base, []) + self.temps.get(base, [])

    def leftovers(self, names: re.Pattern[str]) -> list[str]:
        """Data objects of uncommitted checkpoints whose names match, and temporary files of any."""
        out = [
            k
            for base, keys in self.data.items()
            if base not in self.committed and names.fullmatch(base)
            for k in keys
        ]
        out += [k for base, keys in self.temps.items() if names.fullmatch(base) for k in keys]
        return sorted(out)
