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

import itertools
import json
import math
import os
import struct
from dataclasses import replace
from typing import Any

import ml_dtypes
import numpy as np

from shardsave import tree as _tree
from shardsave.errors import CheckpointNotFoundError, CorruptCheckpointError
from shardsave.formats.shardsave import CRC_CHUNK_BYTES
from shardsave.index import Checksums, DataFile, Index, LeafEntry, StoredShard, crc_chunks
from shardsave.storage import open_store
from shardsave.storage.base import Store, join, location, split_prefix

INDEX_NAME = "model.safetensors.index.json"


SINGLE_NAME = "model.safetensors"


MAX_HEADER_BYTES = 100_000_000  # the safetensors package refuses larger headers too


# Reads are widened to these (there is nothing to verify in them; the planner's unit).
READ_CHUNK_BYTES = CRC_CHUNK_BYTES


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
        crcs = (0,) * crc_chunks(nbytes, READ_CHUNK_BYTES)  # placeholders: nothing is verified
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
        checksums=Checksums.none(READ_CHUNK_BYTES),  # the format has none: lengths only
        files=tuple(data_files),
        structure=structure,
        leaves=tuple(leaves),
        format_version=0,
        source="safetensors",
        commit_key=base,
    )
    return store, base, index


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
