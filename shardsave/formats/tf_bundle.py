"""TensorFlow V2 checkpoints (tensor bundles), read without TensorFlow.

A TF checkpoint `P` is `P.index` plus `P.data-K-of-N`. The index is a LevelDB
table (tensorflow/core/lib/io/table.cc): blocks of prefix-compressed key/value
entries, each block followed by a type byte (0: uncompressed, the only kind
TensorFlow's bundle writer produces) and the masked crc32c of the block and that
byte; a 48-byte footer holds the varint handles (offset, size) of the meta-index
and index blocks and ends with the magic 0xdb4775248b80fb57. Key "" holds a
BundleHeaderProto (num_shards 1, endianness 2); every other key a variable's
BundleEntryProto (dtype 1, shape 2, shard_id 3, offset 4, size 5, crc32c 6 as a
masked fixed32, slices 7). Tensors are raw little-endian bytes at (unaligned)
offsets of data file shard_id, and the checksum covers the whole tensor.

A partitioned variable's own entry has `slices` and no data; each slice lives
under a key of its own, the variable's name and the slice's extents in TF's
OrderedCode encoding (a leading 0x00, so no variable name collides with it),
which TF's reader hides. Here those slices become the stored shards of one
leaf, so a restore reads them exactly as it reads a shardsave checkpoint's
shards. String tensors (varint lengths, a masked crc32c of the lengths, then
the bytes) are listed and read by CheckpointReader, and refused by restore.

Only what tensor_bundle.cc documents is read; what is not understood (a
compressed block, a big-endian bundle, a bad checksum) is refused with the file
named. The format's details were checked against checkpoints TensorFlow wrote
(tests/fixtures/tf).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from shardsave import tree as _tree
from shardsave.errors import CorruptCheckpointError
from shardsave.formats.shardsave import data_key, index_key, step_of
from shardsave.index import Checksums, DataFile, Index, LeafEntry, StoredShard, checksum

MAGIC = struct.pack("<Q", 0xDB4775248B80FB57)


FOOTER_BYTES = 48


BLOCK_TRAILER_BYTES = 5


MASK_DELTA = 0xA282EAD8


OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"  # TF2's object graph: metadata, not a variable


# TensorFlow's DataType enum (types.proto) -> (name, numpy dtype or None where JAX cannot hold it)
DTYPES: dict[int, tuple[str, np.dtype | None]] = {
    1: ("float32", np.dtype(np.float32)),
    2: ("float64", np.dtype(np.float64)),
    3: ("int32", np.dtype(np.int32)),
    4: ("uint8", np.dtype(np.uint8)),
    5: ("int16", np.dtype(np.int16)),
    6: ("int8", np.dtype(np.int8)),
    7: ("string", None),
    8: ("complex64", np.dtype(np.complex64)),
    9: ("int64", np.dtype(np.int64)),
    10: ("bool", np.dtype(np.bool_)),
    11: ("qint8", None),
    12: ("quint8", None),
    13: ("qint32", None),
    14: ("bfloat16", np.dtype(ml_dtypes.bfloat16)),
    15: ("qint16", None),
    16: ("quint16", None),
    17: ("uint16", np.dtype(np.uint16)),
    18: ("complex128", np.dtype(np.complex128)),
    19: ("float16", np.dtype(np.float16)),
    20: ("resource", None),
    21: ("variant", None),
    22: ("uint32", np.dtype(np.uint32)),
    23: ("uint64", np.dtype(np.uint64)),
    24: ("float8_e5m2", np.dtype(ml_dtypes.float8_e5m2)),
    25: ("float8_e4m3fn", np.dtype(ml_dtypes.float8_e4m3fn)),
}


def is_tf_index(raw: bytes) -> bool:
    """Whether an index file is a TensorFlow bundle's (a LevelDB table) rather than shardsave's (JSON)."""
    return len(raw) >= FOOTER_BYTES and raw[-8:] == MAGIC


def unmask(masked: int) -> int:
    """A crc32c from LevelDB's masked form: ((c >> 15 | c << 17) + 0xa282ead8) mod 2**32."""
    rot = (masked - MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + MASK_DELTA) & 0xFFFFFFFF


class _Bad(Exception):
    """A defect in the index's bytes (reported with the file named by the caller)."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Bad("a varint runs past its record")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, ints: frozenset[int], blobs: frozenset[int]) -> list[tuple[int, Any]]:
    """A protobuf message's (field number, value) pairs: ints for varint and fixed
    fields, bytes for length-delimited ones. The fields numbered in `ints` must be
    ints and those in `blobs` bytes; other fields are skipped (as protobuf does)."""
    out = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise _Bad(f"protobuf wire type {wire} is not one a bundle uses")
        if pos > len(buf):
            raise _Bad("a protobuf field runs past its record")
        if number in ints or number in blobs:
            if isinstance(value, bytes) != (number in blobs):
                raise _Bad(f"protobuf field {number} has wire type {wire}, not its own")
            out.append((number, value))
    return out


_HEADER = (frozenset({1, 2}), frozenset({3}))  # BundleHeaderProto: num_shards, endianness, version


_ENTRY = (frozenset({1, 3, 4, 5, 6}), frozenset({2, 7}))  # BundleEntryProto


_SHAPE = (frozenset({3}), frozenset({2}))  # TensorShapeProto: dim, unknown_rank


_DIM = (frozenset({1}), frozenset({2}))  # TensorShapeProto.Dim: size, name


_SLICE: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset({1}))  # TensorSliceProto: extent


_EXTENT: tuple[frozenset[int], frozenset[int]] = (
    frozenset({1, 2}),
    frozenset(),
)  # TensorSliceProto.Extent: start, length


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for number, value in _fields(buf, *_SHAPE):
        if number == 2:
            size = next((_signed(v) for n, v in _fields(value, *_DIM) if n == 1), 0)
            dims.append(size)
        elif number == 3 and value:
            raise _Bad("a tensor of unknown rank")
    if any(d < 0 for d in dims):
        raise _Bad(f"a tensor of unknown shape {dims}")
    return tuple(dims)


def _extents(buf: bytes, shape: tuple[int, ...]) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """A TensorSliceProto's box, (start, stop) per dimension (no length: to the end),
    and its key order: (start, length) per dimension, a missing length as -1, as TF's
    slice keys encode them."""
    extents = [extent for _, extent in _fields(buf, *_SLICE)]
    if len(extents) != len(shape):
        raise _Bad(f"a slice of rank {len(extents)} of a variable of rank {len(shape)}")
    box: list[tuple[int, int]] = []
    order: list[int] = []
    for extent, dim in zip(extents, shape):
        parts = dict(_fields(extent, *_EXTENT))
        start = _signed(parts.get(1, 0))
        length = _signed(parts[2]) if 2 in parts else dim - start
        if not 0 <= start <= start + length <= dim:
            raise _Bad(f"a slice [{start}, {start + length}) outside a dimension of {dim}")
        box.append((start, start + length))
        order += [start, _signed(parts[2]) if 2 in parts else -1]
    return tuple(box), tuple(order)


def _block(raw: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    """The entries of one table block, its trailer's checksum verified."""
    end = offset + size
    if size < 4 or end + BLOCK_TRAILER_BYTES > len(raw) - FOOTER_BYTES:
        raise _Bad(f"a block handle ({offset}, {size}) outside the file")
    kind, stored = raw[end], struct.unpack_from("<I", raw, end + 1)[0]
    if checksum(np.frombuffer(raw[offset : end + 1], np.uint8)) != unmask(stored):
        raise _Bad(f"crc32c mismatch in the table block at bytes {offset}..{end}")
    if kind != 0:
        raise _Bad(f"a table block compressed with method {kind} (TensorFlow's bundles are uncompressed)")
    block = raw[offset:end]
    restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 - 4 * restarts
    if limit < 0:
        raise _Bad("a table block's restart array is larger than the block")
    entries = []
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        nvalue, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + nvalue > limit:
            raise _Bad("a table entry runs past its block")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + nvalue]))
        pos += nvalue
    return entries


def read_table(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a LevelDB table, in key order."""
    footer = raw[-FOOTER_BYTES:]
    _, pos = _varint(footer, 0)  # the meta-index block: filters, which bundles do not have
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    entries = []
    for _, handle in _block(raw, index_offset, index_size):
        offset, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        entries.extend(_block(raw, offset, size))
    return entries


@dataclass(frozen=True)
class TFTensor:
    """One entry of the bundle: a variable, or one slice of a partitioned variable."""

    dtype_code: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # unmasked
    slices: tuple[tuple[tuple[int, int], ...], ...]  # a partitioned variable's boxes (its own entry)
    slice_order: tuple[tuple[int, ...], ...] = ()  # each slice's place in key order (see _extents)

    @property
    def dtype_name(self) -> str:
        return DTYPES.get(self.dtype_code, (f"DataType {self.dtype_code}", None))[0]

    @property
    def numpy_dtype(self) -> np.dtype | None:
        return DTYPES.get(self.dtype_code, ("", None))[1]


def _entry(value: bytes) -> TFTensor:
    fields = _fields(value, *_ENTRY)
    single = {n: v for n, v in fields if n != 7}
    shape = _shape(single.get(2, b""))
    extents = [_extents(v, shape) for n, v in fields if n == 7]
    return TFTensor(
        dtype_code=single.get(1, 0),
        shape=shape,
        shard_id=single.get(3, 0),
        offset=single.get(4, 0),
        size=single.get(5, 0),
        crc32c=unmask(single.get(6, 0)),
        slices=tuple(box for box, _ in extents),
        slice_order=tuple(order for _, order in extents),
    )


def _read_ordered_string(key: bytes, pos: int) -> tuple[bytes, int]:
    """OrderedCode's string: 0x00 is written 0x00 0xff, 0xff is 0xff 0x00; ends with 0x00 0x01."""
    out = bytearray()
    while pos + 1 < len(key):
        byte = key[pos]
        if byte == 0x00:
            if key[pos + 1] == 0x01:
                return bytes(out), pos + 2
            out.append(0x00)
        elif byte == 0xFF:
            out.append(0xFF)
        else:
            out.append(byte)
            pos += 1
            continue
        pos += 2
    raise _Bad("a slice key's name is not terminated")


def slice_key_name(key: bytes) -> str | None:
    """The variable a slice key (TF's EncodeTensorNameSlice) belongs to; None for plain names."""
    if not key.startswith(b"\x00"):
        return None
    name, _ = _read_ordered_string(key, 1)
    return name.decode()


@dataclass(frozen=True)
class Bundle:
    """A TF checkpoint's index, decoded: its variables (slices folded in) and data files."""

    num_shards: int
    variables: dict[str, TFTensor]  # in key order, as TF lists them
    slices: dict[str, list[TFTensor]]  # a partitioned variable's slice entries, in its slices' order


def decode_bundle(raw: bytes, where: str) -> Bundle:
    """Parses a bundle's index; every defect raises CorruptCheckpointError naming `where`."""
    try:
        entries = read_table(raw)
        if not entries or entries[0][0] != b"":
            raise _Bad("no header entry (key '')")
        header = dict(_fields(entries[0][1], *_HEADER))
        if header.get(2, 0) != 0:
            raise _Bad("a big-endian bundle (only little-endian ones are read)")
        num_shards = header.get(1, 1)
        variables: dict[str, TFTensor] = {}
        by_variable: dict[str, list[TFTensor]] = {}  # slice entries, in key order
        for key, value in entries[1:]:
            tensor = _entry(value)
            owner = slice_key_name(key)
            if owner is None:
                variables[key.decode()] = tensor
            else:
                by_variable.setdefault(owner, []).append(tensor)
        slices: dict[str, list[TFTensor]] = {}
        for name, tensor in variables.items():
            if not tensor.slices:
                continue
            stored = by_variable.get(name, [])
            # Slice keys sort as their extents do (OrderedCode keeps numeric order), so
            # the variable's slices sorted the same way pair with its slice entries in
            # key order.
            order = sorted(range(len(tensor.slices)), key=lambda k: tensor.slice_order[k])
            if len(stored) != len(order):
                raise _Bad(f"variable {name!r} has {len(order)} slices but {len(stored)} slice entries")
            pieces = [stored[0]] * len(order)
            for entry, k in zip(stored, order):
                pieces[k] = entry
            for box, piece in zip(tensor.slices, pieces):
                if piece.shape != tuple(b - a for a, b in box):
                    raise _Bad(f"variable {name!r}: a slice entry of shape {piece.shape} for the box {box}")
            slices[name] = pieces
        for tensor in [*variables.values(), *(p for ps in slices.values() for p in ps)]:
            if tensor.shard_id >= num_shards and not tensor.slices:
                raise _Bad(f"a tensor in data file {tensor.shard_id}, of {num_shards}")
    except (_Bad, struct.error, UnicodeDecodeError, IndexError) as e:
        raise CorruptCheckpointError(f"{where}: not a readable TensorFlow checkpoint index ({e})") from e
    return Bundle(num_shards, variables, slices)


def _stored_shards(name: str, tensor: TFTensor, bundle: Bundle) -> tuple[StoredShard, ...]:
    if tensor.slices:
        return tuple(
            StoredShard(
                piece.shard_id,
                piece.offset,
                piece.size,
                tuple(a for a, _ in box),
                tuple(b for _, b in box),
                (piece.crc32c,),
            )
            for box, piece in zip(tensor.slices, bundle.slices[name])
        )
    return (
        StoredShard(
            tensor.shard_id,
            tensor.offset,
            tensor.size,
            (0,) * len(tensor.shape),
            tensor.shape,
            (tensor.crc32c,),
        ),
    )


def bundle_index(raw: bytes, where: str, base: str, mtime: float | None) -> Index:
    """A TF checkpoint as an Index: each variable a host leaf of its TF name (a
    partitioned one with a shard per slice), each tensor one whole-tensor checksum
    (Checksums.per_shard). Tensors JAX cannot hold (strings, ...) are leaves of dtype
    object, listed and never restored; the TF2 object graph is left out of the
    structure that a restore without a target returns."""
    bundle = decode_bundle(raw, where)
    leaves = []
    ends = [0] * bundle.num_shards
    for name, tensor in bundle.variables.items():
        dtype = tensor.numpy_dtype
        if dtype is not None and not tensor.slices:
            expected = int(np.prod(tensor.shape)) * dtype.itemsize
            if tensor.size != expected:
                raise CorruptCheckpointError(
                    f"{where}: variable {name!r} ({tensor.dtype_name} {list(tensor.shape)}) is "
                    f"recorded as {tensor.size} bytes, not {expected}"
                )
        shards = _stored_shards(name, tensor, bundle)
        for shard in shards:
            ends[shard.file] = max(ends[shard.file], shard.offset + shard.nbytes)
        leaves.append(
            LeafEntry(
                name,
                dtype if dtype is not None else np.dtype(object),
                tensor.shape,
                _tree.KIND_NUMPY,
                None,
                shards,
                stored_dtype=tensor.dtype_name,
            )
        )
    structure = {"dict": [[leaf.name, i] for i, leaf in enumerate(leaves) if leaf.name != OBJECT_GRAPH]}
    return Index(
        global_step=step_of(base),  # "model.ckpt-7", as save() names it (negative steps too)
        created=mtime or 0.0,
        checksums=Checksums.per_shard(),
        files=tuple(DataFile(n, None, 0, key=data_key(base, k, len(ends))) for k, n in enumerate(ends)),
        structure=structure,
        leaves=tuple(leaves),
        format_version=0,
        source="tensorflow",
        commit_key=index_key(base),
    )


def decode_strings(data: bytes, count: int, crc: int, where: str) -> np.ndarray:
    """A string tensor's elements from its stored bytes (TF's WriteStringTensor:
    varint64 lengths, the masked crc32c of the lengths, then the bytes), its
    checksum verified."""
    lengths, pos = [], 0
    try:
        for _ in range(count):
            n, pos = _varint(data, pos)
            lengths.append(n)
    except _Bad as e:
        raise CorruptCheckpointError(f"{where}: the string lengths are unreadable ({e})") from e
    # Each length enters the checksum as a little-endian uint32 (a uint64 above 2**32-1).
    packed = b"".join(struct.pack("<I" if n <= 0xFFFFFFFF else "<Q", n) for n in lengths)
    running = checksum(packed)
    stored = data[pos : pos + 4]
    if len(stored) < 4 or unmask(struct.unpack("<I", stored)[0]) != running:
        raise CorruptCheckpointError(f"{where}: crc32c mismatch in the string lengths (the data is corrupt)")
    pos += 4
    body = data[pos:]
    if len(body) != sum(lengths):
        raise CorruptCheckpointError(f"{where}: expected {sum(lengths)} bytes of strings, found {len(body)}")
    if checksum(body, checksum(stored, running)) != crc:
        raise CorruptCheckpointError(f"{where}: crc32c mismatch (the data is corrupt)")
    out = np.empty(count, dtype=object)
    start = 0
    for k, n in enumerate(lengths):
        out[k] = body[start : start + n]
        start += n
    return out
