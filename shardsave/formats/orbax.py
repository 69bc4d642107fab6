"""Orbax checkpoints, read without Orbax: onto any mesh, under the memory cap, from any store.

What Orbax (orbax-checkpoint's PyTree and Standard handlers, 0.3 to 0.12) writes,
and what is read of it here (FORMAT.md, "Reading Orbax checkpoints", says it for
a stranger):

- A CheckpointManager root holds one folder per step (`1000`, or `prefix_1000`),
  each holding one folder per item (`default`; `pytree` in Orbax's v1 API) and
  `_CHECKPOINT_METADATA`. A save in progress is a folder named
  `*.orbax-checkpoint-tmp*`; on a file system Orbax commits it by a rename (so
  any other name is committed), on GCS by writing `commit_success.txt` into the
  folder (so there a folder without it is not). Both rules are Orbax's own
  (orbax.checkpoint._src.path.atomicity_defaults).
- An item folder holds `_METADATA` (JSON: the tree, as each leaf's key path in
  `key_metadata` with its `value_metadata`, and `use_ocdbt`, `use_zarr3`),
  `_sharding` (each array's sharding when saved), `array_metadatas/process_N`
  (chunk shapes, a PRNG key's implementation), `_strings.json` (string leaves),
  and the arrays: zarr (v2) or zarr3 arrays named `'.'.join(keys)`, either keys
  of an OCDBT database rooted at the folder (`manifest.ocdbt`, `d/`), or, in
  the older layout, one folder each. Each process of a save writes a database
  of its own (`ocdbt.process_N/`) which the save merges into the root one
  before it commits: per-process databases without the root manifest are a save
  that never finished.
- Orbax before 0.4.3 (and flax.training.checkpoints over it) wrote no `_METADATA`
  unless asked: the tree is the msgpack file `checkpoint` beside the arrays, each
  leaf either `PLACEHOLDER://name` (an array, or a string of the `_strings.json`
  in the first string's folder) or the value itself (SaveArgs(aggregate=True)),
  which is read from there. Such an array's type was not recorded: it is restored
  as numpy, as that Orbax restores it. A msgpack file alone is not an item
  (shardsave's and TensorFlow's state file has the same name): an item holds
  zarr arrays or an OCDBT database beside it (OCDBT from 0.4.0). In 0.4 `_sharding` named no
  devices; the mesh is laid over devices 0 to n-1, as Orbax lays it over
  jax.devices().

Each array is opened with tensorstore's zarr or zarr3 driver (over the ocdbt
driver where the item is a database), which decodes its chunks and checks what
Orbax's format checks (zarr3's shard indexes carry a crc32c). The arrays are
then served as a read-only Store of their own (OrbaxArrays), whose object for an
array is its *decoded* chunks one after another in chunk-grid order, and the
Index lists one StoredShard per stored chunk (its box in the array, clipped to
the shape). The restore engine, CheckpointReader and the CLI then read an Orbax
item exactly as they read a shardsave checkpoint: only the chunks each target
box needs, under max_host_bytes. Orbax's data has no checksums of its own
(zstd frames without checksums), so the index says Checksums.none: a restore
checks that each chunk decodes to its size, not its bytes.
"""

from __future__ import annotations

import base64
import bisect
import functools
import json
import math
import os
import posixpath
import re
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorstore as ts

from shardsave import tree as _tree
from shardsave.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from shardsave.formats.shardsave import CRC_CHUNK_BYTES
from shardsave.index import (
    DTYPES,
    MAX_NDIM,
    MAX_SHARDS_PER_LEAF,
    Checksums,
    DataFile,
    Index,
    LeafEntry,
    StoredShard,
    crc_chunks,
)
from shardsave.storage import open_store
from shardsave.storage.base import DEFAULT_STORAGE_TIMEOUT_S, IOStats, Pending, Store, join, location
from shardsave.storage.buffers import aligned_empty
from shardsave.storage.kvstore import list_recursive, tensorstore_location

FORMAT_NAME = "orbax"


METADATA = "_METADATA"  # an item's tree and options


STEP_METADATA = "_CHECKPOINT_METADATA"  # a step's (or a bare checkpointer's) metadata


COMMIT_FILE = "commit_success.txt"


TMP_MARK = ".orbax-checkpoint-tmp"  # in the name of a folder Orbax is still writing


SHARDING = "_sharding"


STRINGS = "_strings.json"


ARRAY_METADATAS = "array_metadatas"


MANIFEST = "manifest.ocdbt"


PROCESS_PREFIX = "ocdbt.process_"


MSGPACK = "checkpoint"  # the tree as msgpack: all Orbax before 0.4.3 wrote of it, unless asked for _METADATA


# An item of a step folder is read in this order of preference (Orbax's default item
# name, Orbax v1's); any other single item is read too.
ITEM_NAMES = ("default", "pytree", "state")


MAX_JSON_BYTES = 1 << 30  # no metadata file of a real checkpoint comes near this


# Reads are planned in these units (there is nothing to verify in them).
READ_CHUNK_BYTES = CRC_CHUNK_BYTES


_STEP_RE = re.compile(r"^(?:.*_)?(\d+)$")  # `1000`, `checkpoint_1000` (Orbax's step_prefix)


_SEQUENCE, _DICT = 1, 2  # Orbax's KeyType


# Orbax's names for the empty nodes it records (orbax.checkpoint._src.metadata.empty_values).
_EMPTY: dict[str, Any] = {
    "None": {"none": None},
    "Dict": {"dict": []},
    "List": {"list": []},
    "Tuple": {"tuple": []},
    "NamedTuple": {"node": "NamedTuple", "items": []},
    "Unknown": {"dict": []},
}


# The cache of OCDBT's B-tree nodes (as Orbax sizes it): a restore reads each node once.
_RESOURCES = {"cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}}


# Orbax's read options for OCDBT on object stores: adjacent reads merged into one request.
_REMOTE_OCDBT = {
    "experimental_read_coalescing_threshold_bytes": 1_000_000,
    "experimental_read_coalescing_merged_bytes": 500_000_000_000,
    "experimental_read_coalescing_interval": "1ms",
}


# tensorstore's status codes that mean the store failed, not the data.
_STORAGE_CODES = (
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "RESOURCE_EXHAUSTED",
)


# ---------------------------------------------------------------- locating the item


def _strip(path: str) -> str:
    return path if path.endswith("://") else path.rstrip("/") or path


def _name(path: str) -> str:
    return posixpath.basename(path.split("://", 1)[-1].rstrip("/"))


def _commits_by_file(path: str) -> bool:
    """Whether Orbax commits a folder here by writing commit_success.txt into it (on GCS),
    rather than by renaming it (elsewhere)."""
    return path.startswith("gs://")


def _listing(path: str, timeout_s: float) -> list[str]:
    if "://" not in path and not os.path.isdir(path):
        raise CheckpointNotFoundError(f"no Orbax checkpoint at {path!r}: it is not a directory")
    try:
        return list_recursive(path, timeout_s)
    except StorageError:
        raise
    except (OSError, ValueError) as e:
        raise CheckpointNotFoundError(f"no Orbax checkpoint at {path!r}: cannot list it ({e})") from e


def _children(keys: list[str]) -> dict[str, set[str]]:
    """The subfolders of a listing, each with the keys directly in it."""
    out: dict[str, set[str]] = {}
    for key in keys:
        head, sep, rest = key.partition("/")
        if sep:
            out.setdefault(head, set()).add(rest)
    return out


def _holds_arrays(keys: Collection[str]) -> bool:
    """Whether a folder's keys hold Orbax's arrays: an OCDBT database or zarr array folders."""
    return any(k == MANIFEST or (k.count("/") == 1 and k.endswith(("/.zarray", "/zarr.json"))) for k in keys)


def _is_item(keys: Collection[str]) -> bool:
    # MSGPACK alone is not enough (shardsave's and TensorFlow's state file has that name
    # too): Orbax before 0.4.3 wrote it beside the arrays, without _METADATA.
    return METADATA in keys or (MSGPACK in keys and _holds_arrays(keys))


@dataclass(frozen=True)
class Located:
    """Where an Orbax item is, and what names it."""

    item: str  # the item folder
    keys: tuple[str, ...]  # every key under it
    step: int | None
    step_folder: str | None  # the folder holding _CHECKPOINT_METADATA, if any


def _pick_item(folder: str, children: dict[str, set[str]]) -> str:
    items = sorted(n for n, keys in children.items() if TMP_MARK not in n and _is_item(keys))
    if not items:
        raise CheckpointNotFoundError(f"no Orbax item in {folder}: no folder in it holds {METADATA}")
    for name in ITEM_NAMES:
        if name in items:
            return name
    if len(items) == 1:
        return items[0]
    raise CheckpointNotFoundError(
        f"{folder} holds the Orbax items {items}; name the one to read ({join(folder, items[0])})"
    )


def _step_of(name: str) -> int | None:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def _require_commit(folder: str, keys: Collection[str]) -> None:
    if _commits_by_file(folder) and COMMIT_FILE not in keys:
        raise CheckpointNotFoundError(
            f"{folder} is not a committed Orbax checkpoint: it has no {COMMIT_FILE}, which Orbax "
            "writes into a folder on GCS once its save has finished; restore a committed step"
        )


def locate(path: str, timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S) -> Located:
    """The item an Orbax location names: a CheckpointManager root (its newest committed
    step), a step folder, or an item folder.

    Raises:
      CheckpointNotFoundError: nothing committed is there (a save Orbax never finished
        included), naming the folder.
    """
    path = _strip(location(path))
    if TMP_MARK in _name(path):
        raise CheckpointNotFoundError(
            f"{path} is a save Orbax never finished (its name has {TMP_MARK!r}); restore a committed step"
        )
    keys = _listing(path, timeout_s)
    if not keys:
        raise CheckpointNotFoundError(f"no Orbax checkpoint at {path!r}: it is empty or absent")
    children = _children(keys)
    if _is_item(keys):
        _require_commit(path, keys)
        parent = posixpath.dirname(path) if "://" in path else os.path.dirname(path)
        step = _step_of(_name(path))
        if step is None and parent:
            step = _step_of(_name(parent))
        return Located(path, tuple(keys), step, None)
    items = [n for n, k in children.items() if TMP_MARK not in n and _is_item(k)]
    # A step folder holds items; a root whose items are all named as steps is flax's
    # (flax.training.checkpoints' `checkpoint_N`, each the item itself).
    if STEP_METADATA in keys or (items and not all(_step_of(n) is not None for n in items)):
        _require_commit(path, keys)
        item = _pick_item(path, children)
        inner = tuple(sorted(children[item]))
        _require_commit(join(path, item), inner)
        return Located(join(path, item), inner, _step_of(_name(path)), path)
    # A CheckpointManager's root: its newest committed step.
    steps = []
    for name, inner_keys in children.items():
        step = _step_of(name)
        if step is None or TMP_MARK in name:
            continue
        inner_children = _children(sorted(inner_keys))
        if (
            STEP_METADATA not in inner_keys
            and not _is_item(inner_keys)
            and not any(_is_item(k) for k in inner_children.values())
        ):
            continue
        if _commits_by_file(path) and COMMIT_FILE not in inner_keys:
            continue
        steps.append((step, name))
    if not steps:
        unfinished = sorted(n for n in children if TMP_MARK in n)
        hint = f" ({len(unfinished)} saves never finished: {unfinished[:3]})" if unfinished else ""
        raise CheckpointNotFoundError(f"no committed Orbax checkpoint at {path!r}{hint}")
    step, name = max(steps)
    folder = join(path, name)
    if STEP_METADATA not in children[name] and _is_item(children[name]):
        # a step folder that is the item itself (flax.training.checkpoints' `checkpoint_N`)
        inner = tuple(sorted(children[name]))
        _require_commit(folder, inner)
        return Located(folder, inner, step, None)
    inner_children = _children(sorted(children[name]))
    item = _pick_item(folder, inner_children)
    inner = tuple(sorted(inner_children[item]))
    _require_commit(join(folder, item), inner)
    return Located(join(folder, item), inner, step, folder)


def is_orbax(path: str) -> bool:
    """Whether a location is an Orbax checkpoint (an item, a step, a manager's root).

    A local path is recognised by the folders and marker files in it; any other by
    the marker files at it (one listing).
    """
    if path.endswith((".index", ".safetensors", ".json")):
        return False
    path = _strip(path)
    if "://" not in path or path.startswith("file://"):
        local = path[len("file://") :] if path.startswith("file://") else path
        if not os.path.isdir(local):
            return False
        try:
            names = os.listdir(local)
        except OSError:
            return False
        if METADATA in names or STEP_METADATA in names or _local_msgpack_item(local, names):
            return True
        for name in names:
            sub = os.path.join(local, name)
            if not os.path.isdir(sub):
                continue
            if os.path.exists(os.path.join(sub, STEP_METADATA)) or os.path.exists(
                os.path.join(sub, METADATA)
            ):
                return True
            if _local_msgpack_step(sub, below=_step_of(name) is not None):
                return True
        return False
    try:
        keys = list_recursive(path, 60.0)
    except (OSError, ValueError):
        return False
    if any(posixpath.basename(k) in (METADATA, STEP_METADATA) for k in keys):
        return True
    folders: dict[str, set[str]] = {}  # each folder holding a msgpack file -> its keys
    for k in keys:
        if posixpath.basename(k) == MSGPACK:
            folders[posixpath.dirname(k)] = set()
    for k in keys:
        for folder, inner in folders.items():
            if not folder or k.startswith(folder + "/"):
                inner.add(k[len(folder) + 1 :] if folder else k)
    return any(_is_item(inner) for inner in folders.values())


def _local_msgpack_item(folder: str, names: list[str]) -> bool:
    """Whether a local folder is an item of Orbax before 0.4.3: its msgpack file beside the arrays."""
    if MSGPACK not in names:
        return False
    if MANIFEST in names:
        return True
    return any(
        os.path.exists(os.path.join(folder, n, ".zarray"))
        or os.path.exists(os.path.join(folder, n, "zarr.json"))
        for n in names
    )


def _local_msgpack_step(folder: str, below: bool) -> bool:
    """Whether a local folder is an item of Orbax before 0.4.3 (flax's `checkpoint_1`, a
    manager's `1/default`), or, if below, holds one (a manager's step `1`)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    if _local_msgpack_item(folder, names):
        return True
    for name in names if below else ():
        sub = os.path.join(folder, name)
        try:
            if os.path.isdir(sub) and _local_msgpack_item(sub, os.listdir(sub)):
                return True
        except OSError:
            continue
    return False


# ---------------------------------------------------------------- reading the metadata


def _json(store: Store, key: str, *, required: bool = True) -> Any:
    where = join(store.path, key)
    raw = store.read_all(key)
    if raw is None:
        if required:
            raise CheckpointNotFoundError(f"{where} does not exist")
        return None
    if len(raw) > MAX_JSON_BYTES:
        raise CorruptCheckpointError(f"{where}: {len(raw)} bytes, more than any Orbax metadata file holds")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{where} is not JSON ({e}); the checkpoint is damaged") from e


@dataclass
class _Leaf:
    """One entry of _METADATA's tree (or of the msgpack file's, before 0.4.3)."""

    keys: tuple[str, ...]
    value_type: str  # Orbax's; MSGPACK_ARRAY and MSGPACK_VALUE for the msgpack file's leaves
    write_shape: tuple[int, ...] | None
    value: np.ndarray | None = None  # a value stored in the msgpack file itself
    kind: str | None = None  # the value's leaf kind


@dataclass
class _Node:
    kind: int | None = None  # _SEQUENCE or _DICT
    children: dict[str, _Node | _Leaf | dict[str, Any]] = field(default_factory=dict)


def _tree_entries(doc: Any, where: str) -> tuple[list[_Leaf], Any]:
    """The leaves of _METADATA, and the structure (leaf indices in tree order) they form."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tree_metadata"), dict):
        raise CorruptCheckpointError(
            f"{where} has no tree_metadata object: not an Orbax PyTree item (or one written by an "
            "Orbax older than 0.5, which shardsave does not read)"
        )
    root = _Node()
    leaves: list[_Leaf] = []
    for text, entry in doc["tree_metadata"].items():
        try:
            key_metadata = entry["key_metadata"]
            value = entry["value_metadata"]
            keys = tuple(k["key"] for k in key_metadata)
            types = tuple(k["key_type"] for k in key_metadata)
            value_type = value["value_type"]
            skip = value.get("skip_deserialize", False)
            write_shape = value.get("write_shape")
        except (KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(
                f"{where}: the entry {text!r:.100} lacks key_metadata or value_metadata ({e!r})"
            ) from e
        if (
            not keys
            or len(keys) > _tree.MAX_STRUCTURE_DEPTH
            or not all(isinstance(k, str) for k in keys)
            or not all(t in (_SEQUENCE, _DICT) for t in types)
            or not isinstance(value_type, str)
            or (write_shape is not None and _ints(write_shape) is None)
        ):
            raise CorruptCheckpointError(f"{where}: the entry {text!r:.100} is malformed")
        node = root
        for depth, (key, kind) in enumerate(zip(keys, types)):
            if kind == _SEQUENCE and not key.isdigit():
                raise CorruptCheckpointError(f"{where}: {text!r:.100} indexes a sequence by {key!r}")
            if node.kind is not None and node.kind != kind:
                raise CorruptCheckpointError(f"{where}: {text!r:.100} is both a sequence and a dict")
            node.kind = kind
            last = depth == len(keys) - 1
            child = node.children.get(key)
            if last:
                if child is not None:
                    raise CorruptCheckpointError(
                        f"{where}: {text!r:.100} is listed twice, or also holds leaves"
                    )
                if value_type in _EMPTY and (skip or value_type == "None"):
                    node.children[key] = _EMPTY[value_type]
                elif not skip:
                    leaf = _Leaf(keys, value_type, None if write_shape is None else _ints(write_shape))
                    node.children[key] = leaf
                    leaves.append(leaf)
                else:  # a value Orbax did not store (a placeholder): nothing to restore
                    node.children[key] = {"none": None}
            else:
                if child is None:
                    child = node.children[key] = _Node()
                if not isinstance(child, _Node):
                    raise CorruptCheckpointError(f"{where}: {text!r:.100} is below another leaf")
                node = child
    order: dict[int, int] = {}

    def encode(node: _Node) -> Any:
        if node.kind == _SEQUENCE:
            indices = sorted(int(k) for k in node.children)
            if indices != list(range(len(indices))):
                raise CorruptCheckpointError(f"{where}: a sequence has the indices {indices[:10]}")
            return {"list": [encode_child(node.children[str(i)]) for i in indices]}
        return {"dict": [[k, encode_child(c)] for k, c in node.children.items()]}

    def encode_child(child: Any) -> Any:
        if isinstance(child, _Node):
            return encode(child)
        if isinstance(child, _Leaf):
            order[id(child)] = len(order)
            return order[id(child)]
        return child

    structure = encode(root)
    leaves.sort(key=lambda leaf: order[id(leaf)])
    return leaves, structure


# ---------------------------------------------------------------- the msgpack file (Orbax before 0.4.3)


PLACEHOLDER = "PLACEHOLDER://"  # the msgpack file's stand-in for a value stored as an array


MSGPACK_ARRAY = "msgpack-array"  # a placeholder: an array whose type Orbax did not record


MSGPACK_VALUE = "msgpack-value"  # a value in the msgpack file itself (SaveArgs(aggregate=True))


# The extension types of Orbax's msgpack file (orbax.checkpoint.msgpack_utils, after flax.serialization).
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR, _EXT_TUPLE = 1, 2, 3, 4


@dataclass(frozen=True)
class _Packed:
    """An array (or a numpy scalar) of the msgpack file."""

    value: np.ndarray
    scalar: bool


class _MsgpackError(ValueError):
    pass


class _Msgpack:
    """A msgpack decoder for what Orbax's msgpack file holds: maps, arrays, strings, bytes,
    numbers, nil, booleans and its four extension types. Nothing is executed and nothing
    is allocated beyond what the bytes hold (msgpack is not a dependency of shardsave)."""

    def __init__(self, data: bytes, depth: int = 0):
        self.data = memoryview(data)
        self.at = 0
        self.depth = depth

    def take(self, n: int) -> memoryview:
        if n < 0 or self.at + n > len(self.data):
            raise _MsgpackError(f"truncated at byte {self.at} (wants {n} more)")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def whole(self) -> Any:
        value = self.value()
        if self.at != len(self.data):
            raise _MsgpackError(f"{len(self.data) - self.at} bytes after the end of the value")
        return value

    def count(self, n: int) -> int:
        if n > len(self.data) - self.at:  # each element takes a byte at least
            raise _MsgpackError(f"a container of {n} elements in {len(self.data) - self.at} bytes")
        return n

    def value(self) -> Any:
        b = self.uint(1)
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F)
        if 0xA0 <= b <= 0xBF:
            return self.text(b & 0x1F)
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        if b in (0xC4, 0xC5, 0xC6):
            return bytes(self.take(self.uint(1 << (b - 0xC4))))
        if b in (0xC7, 0xC8, 0xC9):
            n = self.uint(1 << (b - 0xC7))
            return self.ext(int.from_bytes(self.take(1), "big", signed=True), n)
        if b == 0xCA:
            return float(np.frombuffer(self.take(4), ">f4")[0])
        if b == 0xCB:
            return float(np.frombuffer(self.take(8), ">f8")[0])
        if 0xCC <= b <= 0xCF:
            return self.uint(1 << (b - 0xCC))
        if 0xD0 <= b <= 0xD3:
            return int.from_bytes(self.take(1 << (b - 0xD0)), "big", signed=True)
        if 0xD4 <= b <= 0xD8:
            code = int.from_bytes(self.take(1), "big", signed=True)
            return self.ext(code, 1 << (b - 0xD4))
        if b in (0xD9, 0xDA, 0xDB):
            return self.text(self.uint(1 << (b - 0xD9)))
        if b in (0xDC, 0xDD):
            return self.array(self.uint(2 if b == 0xDC else 4))
        if b in (0xDE, 0xDF):
            return self.map(self.uint(2 if b == 0xDE else 4))
        raise _MsgpackError(f"byte {self.at - 1} is 0x{b:02x}, which begins no msgpack value")

    def text(self, n: int) -> str:
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError as e:
            raise _MsgpackError(f"a string that is not UTF-8 ({e})") from e

    def nested(self) -> None:
        if self.depth >= _tree.MAX_STRUCTURE_DEPTH:
            raise _MsgpackError(f"containers nested more than {_tree.MAX_STRUCTURE_DEPTH} deep")

    def array(self, n: int) -> list[Any]:
        self.nested()
        self.depth += 1
        out = [self.value() for _ in range(self.count(n))]
        self.depth -= 1
        return out

    def map(self, n: int) -> dict[Any, Any]:
        self.nested()
        self.depth += 1
        out: dict[Any, Any] = {}
        for _ in range(self.count(n)):
            key = self.value()
            if isinstance(key, bool) or not isinstance(key, (str, int)) or key in out:
                raise _MsgpackError(f"a map key {key!r:.60} that is not a new string or integer")
            out[key] = self.value()
        self.depth -= 1
        return out

    def ext(self, code: int, n: int) -> Any:
        inner = _Msgpack(bytes(self.take(n)), self.depth + 1)
        inner.nested()
        if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
            doc = inner.whole()
            if not (isinstance(doc, list) and len(doc) == 3):
                raise _MsgpackError(f"an array that is not (shape, dtype, bytes): {doc!r:.80}")
            shape, name, buffer = doc
            if isinstance(name, bytes):
                name = name.decode("ascii", "replace")
            if not isinstance(name, str) or name not in DTYPES:
                raise _MsgpackError(f"an array of dtype {name!r:.40}, which shardsave does not read")
            dims = _ints(shape)
            dtype = DTYPES[name]
            size = len(buffer) if isinstance(buffer, bytes) else -1
            if dims is None or size != math.prod(dims) * dtype.itemsize:
                raise _MsgpackError(f"an array of shape {shape!r:.60} and {size} bytes of {name}")
            if code == _EXT_NPSCALAR and dims:
                raise _MsgpackError(f"a numpy scalar of shape {list(dims)}")
            return _Packed(np.frombuffer(buffer, dtype).reshape(dims), scalar=code == _EXT_NPSCALAR)
        if code == _EXT_COMPLEX:
            pair = inner.whole()
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, float) for x in pair)):
                raise _MsgpackError(f"a complex number that is not (real, imag): {pair!r:.60}")
            return complex(pair[0], pair[1])
        if code == _EXT_TUPLE:
            items = inner.whole()
            if not isinstance(items, list):
                raise _MsgpackError("a tuple that is not a list")
            return tuple(items)
        raise _MsgpackError(f"the extension type {code}, which Orbax's msgpack file does not use")


def _msgpack_value(value: Any, name: str, where: str) -> tuple[np.ndarray, str]:
    """A value of the msgpack file itself, as an array and its leaf kind."""
    if isinstance(value, _Packed):
        return value.value, _tree.KIND_NUMPY_SCALAR if value.scalar else _tree.KIND_NUMPY
    if isinstance(value, bool):
        return np.asarray(value, np.bool_), _tree.KIND_BOOL
    if isinstance(value, int):
        if not -(1 << 63) <= value < 1 << 63:
            raise CorruptCheckpointError(f"{where}: {name!r} is the integer {value}, beyond 64 bits")
        return np.asarray(value, np.int64), _tree.KIND_INT
    if isinstance(value, float):
        return np.asarray(value, np.float64), _tree.KIND_FLOAT
    if isinstance(value, complex):
        return np.asarray(value, np.complex128), _tree.KIND_COMPLEX
    raise CorruptCheckpointError(
        f"{where}: {name!r} is a {type(value).__name__} value, which shardsave does not restore"
    )


def _msgpack_entries(raw: bytes, where: str, strings: dict[str, Any]) -> tuple[list[_Leaf], Any]:
    """The leaves and structure of an item of Orbax before 0.4.3, from its msgpack file.

    The file is the tree itself: dicts, lists, None, and at each leaf either
    `PLACEHOLDER://name` (an array `name`, or a string of some `_strings.json`) or
    the value (a number, a string, an array: SaveArgs(aggregate=True), as flax's
    save_args_from_target asked for every leaf but a multi-device array). A string
    value found there is added to strings.
    """
    try:
        doc = _Msgpack(raw).whole()
    except _MsgpackError as e:
        raise CorruptCheckpointError(f"{where} is not Orbax's msgpack file: {e}") from e
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: the tree is a {type(doc).__name__}, not a dict")
    leaves: list[_Leaf] = []

    def walk(node: Any, keys: tuple[str, ...]) -> Any:
        if node is None:
            return {"none": None}
        if isinstance(node, dict):
            if "__msgpack_chunked_array__" in node:
                raise CorruptCheckpointError(
                    f"{where}: {'/'.join(keys)!r} is an array of more than 1 GiB chunked into the msgpack "
                    "file, which shardsave does not read"
                )
            return {"dict": [[k, walk(v, (*keys, str(k)))] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            items = [walk(v, (*keys, str(i))) for i, v in enumerate(node)]
            return {"list" if isinstance(node, list) else "tuple": items}
        name = ".".join(keys)
        if isinstance(node, str) and node.startswith(PLACEHOLDER):
            if node[len(PLACEHOLDER) :] != name:
                raise CorruptCheckpointError(f"{where}: the leaf {name!r} stands for {node!r:.100}")
            leaf = _Leaf(keys, "string" if name in strings else MSGPACK_ARRAY, None)
        elif isinstance(node, str):
            strings[name] = node
            leaf = _Leaf(keys, "string", None)
        else:
            value, kind = _msgpack_value(node, name, where)
            leaf = _Leaf(keys, MSGPACK_VALUE, None, value=value, kind=kind)
        leaves.append(leaf)
        return len(leaves) - 1

    return leaves, walk(doc, ())


def _msgpack_strings(store: Store, keys: tuple[str, ...]) -> dict[str, Any]:
    """The strings of an item of Orbax before 0.4.3: each save put all of its strings into
    `_strings.json` of the first string's folder (`name/_strings.json`)."""
    out: dict[str, Any] = {}
    for key in keys:
        if key == STRINGS or (key.count("/") == 1 and key.endswith("/" + STRINGS)):
            doc = _json(store, key)
            if not isinstance(doc, dict):
                raise CorruptCheckpointError(f"{join(store.path, key)} is not a JSON object")
            out.update(doc)
    return out


def _ints(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 50 for d in value):
        return None
    return tuple(value)


def _array_metadatas(store: Store, keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """param name -> Orbax's array metadata (write_shape, chunk_shape, ext_metadata), every process's."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        if not key.startswith(ARRAY_METADATAS + "/"):
            continue
        doc = _json(store, key)
        try:
            for record in doc["array_metadatas"]:
                meta = record["array_metadata"]
                out.setdefault(meta["param_name"], meta)
        except (KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{join(store.path, key)}: malformed array metadata ({e!r})") from e
    return out


def _sharding(desc: Any) -> dict[str, Any] | None:
    """An Orbax sharding record (_sharding) in shardsave's JSON form, or None."""
    try:
        doc = json.loads(desc) if isinstance(desc, str) else desc
        kind = doc.get("sharding_type")
        if kind == "NamedSharding":
            shape = list(doc["shape"])
            if "device_mesh" in doc:
                ids = [d["id"] for d in np.array(doc["device_mesh"]["mesh"], dtype=object).reshape(-1)]
            elif all(isinstance(d, int) and 0 < d < 1 << 20 for d in shape) and math.prod(shape) < 1 << 20:
                # Orbax 0.4 and before recorded no devices, and restores onto the mesh it lays over
                # jax.devices() in order: devices 0 to n-1 (of one host, where ids are in order)
                ids = list(range(math.prod(shape)))
            else:
                return None
            spec: list[Any] = list(doc["partition_spec"])
            if not all(
                e is None
                or isinstance(e, str)
                or (isinstance(e, list) and all(isinstance(a, str) for a in e))
                for e in spec
            ):
                return None
            names = list(doc["axis_names"])
            if (
                math.prod(shape) != len(ids)
                or len(shape) != len(names)
                or not all(isinstance(i, int) for i in ids)
                or not all(isinstance(n, str) for n in names)
            ):
                return None
            return {"type": "named", "axis_names": names, "mesh_shape": shape, "devices": ids, "spec": spec}
        if kind == "SingleDeviceSharding":
            m = re.search(r"(\d+)$", str(doc.get("device_str", "")))
            return {"type": "single", "device": int(m.group(1))} if m else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return None


def _check_divides(sharding: dict[str, Any], shape: tuple[int, ...], name: str, where: str, by: str) -> None:
    """The saved sharding splits each dimension evenly, as it did when Orbax saved the array."""
    sizes = dict(zip(sharding["axis_names"], sharding["mesh_shape"]))
    spec = sharding["spec"]
    for d, entry in enumerate(spec):
        axes = [] if entry is None else [entry] if isinstance(entry, str) else entry
        if any(a not in sizes for a in axes) or d >= len(shape):
            raise CorruptCheckpointError(
                f"{by}: the sharding of {name!r} ({spec}) does not fit its shape {list(shape)}"
            )
        parts = math.prod(sizes[a] for a in axes)
        if shape[d] % parts:
            raise CorruptCheckpointError(
                f"{where}: array {name!r} has the shape {list(shape)}, but {by} splits its dimension {d} "
                f"into {parts} (the checkpoint is damaged)"
            )


def _shardings(store: Store, keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    if SHARDING not in keys:
        return {}
    doc = _json(store, SHARDING)
    out = {}
    if isinstance(doc, dict):
        for encoded, desc in doc.items():
            try:
                name = base64.b64decode(encoded).decode()
            except (ValueError, UnicodeDecodeError):
                continue
            sharding = _sharding(desc)
            if sharding is not None:
                out[name] = sharding
    return out


# ---------------------------------------------------------------- the arrays


def _kvstore_at(base: Any, name: str) -> Any:
    """A kvstore spec (a dict or URL) with name appended to its path, as a folder."""
    if isinstance(base, str):
        return base.rstrip("/") + "/" + name + "/"
    spec = dict(base)
    spec["path"] = str(spec.get("path", "")).rstrip("/") + ("/" if spec.get("path") else "") + name + "/"
    return spec


def _array_spec(
    item_base: Any, name: str, ocdbt: bool, zarr3: bool, remote: bool, strict: bool
) -> dict[str, Any]:
    if ocdbt:
        kvstore: Any = {"driver": "ocdbt", "base": item_base, "path": name, "cache_pool": "cache_pool#ocdbt"}
        if remote:
            kvstore.update(_REMOTE_OCDBT)
    else:
        kvstore = _kvstore_at(item_base, name)
    spec: dict[str, Any] = {
        "driver": "zarr3" if zarr3 else "zarr",
        "kvstore": kvstore,
        "recheck_cached_data": False,
        "recheck_cached_metadata": False,
    }
    if strict:  # every chunk was stored: a missing one is damage, not the fill value
        spec["fill_missing_data_reads"] = False
    return spec


def _where_chunk(item: str, name: str, ocdbt: bool, zarr3: bool, index: tuple[int, ...], sep: str) -> str:
    """The chunk's key, as a person looks for it."""
    grid = "/".join(map(str, index)) if zarr3 else sep.join(map(str, index)) or "0"
    key = f"{name}/c/{grid}" if zarr3 else f"{name}/{grid}"
    return f"key {key} of the OCDBT database {item}" if ocdbt else join(item, key)


def _error(e: BaseException, what: str) -> Exception:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    message = message.split(" [tensorstore_spec=", 1)[0]  # the whole spec, context and all: noise
    if isinstance(e, TimeoutError):
        return StorageError(f"{what}: the store did not answer in time")
    if any(code in message for code in _STORAGE_CODES):
        return StorageError(f"{what}: {message}")
    return CorruptCheckpointError(f"{what}: {message} (the checkpoint is damaged)")


@dataclass
class _Stored:
    """One stored array of an item, as OrbaxArrays serves it."""

    name: str  # Orbax's param name
    array: Any  # ts.TensorStore; None for a string
    value: np.ndarray | None  # a string's UTF-8 bytes
    shards: list[StoredShard]
    offsets: list[int]
    where: Callable[[tuple[int, ...]], str]  # a chunk's start -> its key, for messages
    chunk: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.offsets[-1] + self.shards[-1].nbytes if self.shards else 0


class _Failed:
    def __init__(self, error: BaseException):
        self._error = error

    def result(self) -> Any:
        raise self._error


class _Value:
    def __init__(self, data: np.ndarray, then: Callable[[np.ndarray], np.ndarray] | None):
        self._data, self._then = data, then

    def result(self) -> np.ndarray:
        return self._data if self._then is None else self._then(self._data)


class _Chunk:
    """One stored chunk being read, decoded whole, shared by every read that needs part of it."""

    def __init__(self, future: Any, what: str):
        self.what = what
        self.users = 0  # reads holding it (OrbaxArrays counts them)
        self.data: np.ndarray | None = None
        self.error: Exception | None = None
        self._lock = threading.Lock()
        self._waiting: list[Callable[[_Chunk], None]] = []
        future.add_done_callback(self._done)

    def _done(self, future: Any) -> None:
        """On tensorstore's thread, once the chunk is decoded: hands it to every waiting read."""
        data, error = None, None
        try:
            data = np.ascontiguousarray(future.result()).reshape(-1).view(np.uint8)
        except Exception as e:
            error = _error(e, f"reading {self.what}")
        with self._lock:
            self.data, self.error = data, error
            waiting, self._waiting = self._waiting, []
        for land in waiting:
            land(self)

    def then(self, land: Callable[[_Chunk], None]) -> None:
        """Calls land(chunk) once the chunk is decoded: now, if it is already."""
        with self._lock:
            if self.data is None and self.error is None:
                self._waiting.append(land)
                return
        land(self)


class _ChunkReads:
    """Reads of parts of consecutive chunks of one array, seen as one byte range.

    Each part is copied into the read's buffer (the caller's destination, where it
    gave one) by the thread that decoded its chunk, so the copies of many reads run
    in parallel on tensorstore's threads and the caller finds the bytes in place.
    """

    def __init__(
        self,
        owner: OrbaxArrays,
        pieces: list[tuple[tuple[str, int], _Chunk, int, int]],
        nbytes: int,
        then: Callable[[np.ndarray], np.ndarray] | None,
        allocate: Callable[[int], np.ndarray],
    ):
        self._owner, self._then = owner, then
        self._buffer = allocate(nbytes)[:nbytes]
        self._lock = threading.Lock()
        self._left = len(pieces)
        self._finished = threading.Event()
        self._problem: BaseException | None = None
        at = 0
        for key, chunk, skip, n in pieces:
            chunk.then(functools.partial(self._land, key, at, skip, n))
            at += n

    def _land(self, key: tuple[str, int], at: int, skip: int, n: int, chunk: _Chunk) -> None:
        problem: BaseException | None = chunk.error
        try:
            if problem is None and chunk.data is not None:
                if chunk.data.size < skip + n:
                    problem = CorruptCheckpointError(
                        f"reading {chunk.what}: {chunk.data.size} bytes, expected {skip + n}"
                    )
                else:
                    self._buffer[at : at + n] = chunk.data[skip : skip + n]
        except BaseException as e:  # on tensorstore's thread: kept for result() to raise
            problem = e
        finally:
            self._owner.release(key, chunk)
        with self._lock:
            if problem is not None and self._problem is None:
                self._problem = problem
            self._left -= 1
            if self._left == 0:
                self._finished.set()

    def result(self) -> np.ndarray:
        if not self._finished.wait(self._owner.timeout_s):
            raise StorageError(
                f"reading {self._owner.path}: the store did not answer within {self._owner.timeout_s:g} s"
            )
        if self._problem is not None:
            raise self._problem
        return self._buffer if self._then is None else self._then(self._buffer)


class OrbaxArrays:
    """The arrays of one Orbax item as a read-only Store.

    The object of an array (its param name) is its stored chunks, each decoded
    and clipped to the array's shape, one after another in chunk-grid order; a
    ranged read decodes only the chunks it touches, each whole (a compressed
    chunk decodes whole) and once for all the reads in flight that need part of
    it (a resharded restore's boxes cross the saved chunks), and the last chunk
    read is kept until another one is, for the next piece of it (a capped restore
    reads a large chunk in pieces). Other keys are the item folder's own files.
    """

    is_local = False
    copies_writes = False  # (read-only: nothing is written through it)

    def __init__(self, folder: Store, arrays: dict[str, _Stored], marker: str = METADATA):
        self.path = folder.path
        self._marker = marker  # the item's tree file: _METADATA, or the msgpack file before 0.4.3
        self.timeout_s = folder.timeout_s
        self.stats = IOStats()
        self._folder = folder
        self._arrays = arrays
        self._lock = threading.Lock()
        self._reading: dict[tuple[str, int], _Chunk] = {}  # chunks some read still needs
        self._last: tuple[tuple[str, int], _Chunk] | None = None

    def local_path(self, key: str) -> str:
        raise ValueError(f"{self.path}: an Orbax array is not a local file")

    def read_range(
        self,
        key: str,
        start: int,
        stop: int,
        then: Callable[[np.ndarray], np.ndarray] | None = None,
        allocate: Callable[[int], np.ndarray] = aligned_empty,
    ) -> Pending[np.ndarray]:
        stored = self._arrays.get(key)
        if stored is None:
            return _Failed(FileNotFoundError(join(self.path, key)))
        stop = min(stop, stored.nbytes)
        if stop <= start:
            return _Value(np.empty(0, np.uint8), then)
        self.stats.add_read(stop - start)
        if stored.value is not None:
            return _Value(stored.value[start:stop], then)
        pieces = []
        j = bisect.bisect_right(stored.offsets, start) - 1
        while j < len(stored.shards) and stored.offsets[j] < stop:
            shard, offset = stored.shards[j], stored.offsets[j]
            a, b = max(start, offset) - offset, min(stop, offset + shard.nbytes) - offset
            pieces.append(((key, j), self._chunk(stored, j), a, b - a))
            j += 1
        return _ChunkReads(self, pieces, stop - start, then, allocate)

    def _chunk(self, stored: _Stored, j: int) -> _Chunk:
        """Chunk j of an array, read whole: the one being read already, or the last one
        read (a capped restore reads a large chunk in pieces, one after another)."""
        key = (stored.name, j)
        with self._lock:
            chunk = self._reading.get(key)
            if chunk is None:
                if self._last is not None and self._last[0] == key:
                    chunk = self._last[1]
                else:
                    shard = stored.shards[j]
                    box = tuple(slice(a, b) for a, b in zip(shard.start, shard.stop))
                    view = stored.array[box] if box else stored.array
                    chunk = _Chunk(view.read(order="C"), stored.where(shard.start))
                self._reading[key] = chunk
            chunk.users += 1
            return chunk

    def release(self, key: tuple[str, int], chunk: _Chunk) -> None:
        """A read is done with a chunk; the last one keeps it as the last chunk read."""
        with self._lock:
            chunk.users -= 1
            if chunk.users == 0 and self._reading.get(key) is chunk:
                del self._reading[key]
                self._last = (key, chunk)

    def read_all(self, key: str) -> bytes | None:
        stored = self._arrays.get(key)
        if stored is None:
            return self._folder.read_all(key)
        return bytes(self.read_range(key, 0, stored.nbytes).result())

    def write(self, key: str, data: bytes | memoryview, *, publish: bool = True) -> Pending[Any]:
        raise StorageError(f"{self.path} is an Orbax checkpoint, which shardsave only reads")

    def exists(self, key: str) -> bool:
        return key in self._arrays or self._folder.exists(key)

    def mtime(self, key: str) -> float | None:
        return self._folder.mtime(self._marker if key in self._arrays else key)

    def list(self) -> list[str]:
        return sorted(self._arrays)

    def delete(self, key: str) -> Pending[None]:
        raise StorageError(f"{self.path} is an Orbax checkpoint, which shardsave only reads")

    def check_parent(self, prefix: str) -> None:
        return None

    def lock(self, stem: str, settle: Callable[[], None] | None = None) -> None:
        return None


def _grid(
    name: str, shape: tuple[int, ...], chunk: tuple[int, ...], itemsize: int, file: int, where: str
) -> list[StoredShard]:
    """One StoredShard per stored chunk, in chunk-grid (C) order, clipped to the shape."""
    if len(chunk) != len(shape) or any(c <= 0 for c in chunk):
        raise CorruptCheckpointError(
            f"{where}: array {name!r} of shape {list(shape)} has chunks {list(chunk)}"
        )
    counts = [-(-s // c) for s, c in zip(shape, chunk)]
    if math.prod(counts) > MAX_SHARDS_PER_LEAF:
        raise CorruptCheckpointError(
            f"{where}: array {name!r} has {math.prod(counts)} chunks (at most {MAX_SHARDS_PER_LEAF})"
        )
    if 0 in shape:  # no elements: one empty shard, the whole array (FORMAT.md)
        return [StoredShard(file, 0, 0, (0,) * len(shape), shape, ())]
    shards = []
    offset = 0
    for index in np.ndindex(*counts) if shape else [()]:
        start = tuple(i * c for i, c in zip(index, chunk))
        stop = tuple(min(a + c, s) for a, c, s in zip(start, chunk, shape))
        nbytes = math.prod(b - a for a, b in zip(start, stop)) * itemsize
        crcs = (0,) * crc_chunks(nbytes, READ_CHUNK_BYTES)  # placeholders: nothing is verified
        shards.append(StoredShard(file, offset, nbytes, start, stop, crcs))
        offset += nbytes
    return shards


def _open_arrays(
    folder: str,
    names: list[str],
    ocdbt: bool,
    zarr3: bool,
    strict: bool,
    timeout_s: float,
    listed_by: str = METADATA,
) -> list[Any]:
    """Each named array of the item, opened (concurrently) with tensorstore."""
    base, context = tensorstore_location(folder, _RESOURCES)
    remote = "://" in folder and not folder.startswith(("file://", "memory://"))
    futures = []
    for name in names:
        spec = _array_spec(base, name, ocdbt, zarr3, remote, strict)
        futures.append(ts.open(spec, read=True, open=True, context=context))
    arrays = []
    meta = "zarr.json" if zarr3 else ".zarray"
    for name, future in zip(names, futures):
        what = (
            f"key {name}/{meta} of the OCDBT database {folder}" if ocdbt else join(folder, f"{name}/{meta}")
        )
        try:
            arrays.append(future.result(timeout=timeout_s))
        except Exception as e:
            if "NOT_FOUND" in str(e):
                raise CorruptCheckpointError(
                    f"{join(folder, listed_by)} lists the array {name!r}, but {what} does not exist "
                    "(the checkpoint is damaged)"
                ) from e
            raise _error(e, f"opening {what}") from e
    return arrays


def _dtype_of(array: Any, name: str, where: str) -> np.dtype:
    try:
        dtype = np.dtype(array.dtype.numpy_dtype)
    except (TypeError, ValueError, AttributeError) as e:
        raise CorruptCheckpointError(
            f"{where}: array {name!r} has dtype {array.dtype}, which shardsave does not read"
        ) from e
    if dtype.name not in DTYPES:
        raise CorruptCheckpointError(
            f"{where}: array {name!r} has dtype {dtype}, which shardsave does not read "
            f"(it reads {', '.join(DTYPES)})"
        )
    return DTYPES[dtype.name]


def orbax_index(path: str, timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S) -> tuple[Store, str, Index]:
    """An Orbax checkpoint (a CheckpointManager root, a step folder or an item folder) as an Index.

    Returns (store, base, index): the store serves the item's arrays as OrbaxArrays
    does, base is the item folder's name.

    Raises:
      CheckpointNotFoundError: nothing committed is there, or its per-process
        databases were never merged (a save that did not finish).
      CorruptCheckpointError: its metadata or arrays are damaged (naming the file).
    """
    found = locate(path, timeout_s)
    folder = open_store(found.item, timeout_s)
    keys = found.keys
    strings: dict[str, Any] = {}
    if METADATA in keys:
        marker = METADATA
        where = join(found.item, METADATA)
        doc = _json(folder, METADATA)
        leaves, structure = _tree_entries(doc, where)
    elif MSGPACK in keys and _holds_arrays(keys):  # Orbax before 0.4.3: the tree is in the msgpack file
        marker = MSGPACK
        where = join(found.item, MSGPACK)
        raw = folder.read_all(MSGPACK)
        if raw is None:
            raise CheckpointNotFoundError(f"{where} does not exist")
        if len(raw) > MAX_JSON_BYTES:
            raise CorruptCheckpointError(f"{where}: {len(raw)} bytes, more than shardsave reads of it")
        strings = _msgpack_strings(folder, keys)
        leaves, structure = _msgpack_entries(raw, where, strings)
        doc = {"use_zarr3": any(k.endswith("/zarr.json") for k in keys)}
    else:
        raise CorruptCheckpointError(
            f"{found.item} has no {METADATA}: not an Orbax PyTree item, which shardsave does not read; "
            "restore it with that Orbax and save it again"
        )
    processes = sorted({k.split("/", 1)[0] for k in keys if k.startswith(PROCESS_PREFIX) and "/" in k})
    use_ocdbt = doc.get("use_ocdbt")
    if use_ocdbt is None:
        use_ocdbt = MANIFEST in keys or bool(processes)
    use_zarr3 = doc.get("use_zarr3", False)
    strict = doc.get("store_array_data_equal_to_fill_value", False)
    if not all(isinstance(v, bool) for v in (use_ocdbt, use_zarr3, strict)):
        raise CorruptCheckpointError(f"{where}: use_ocdbt, use_zarr3 and its other options must be booleans")
    arrays = [leaf for leaf in leaves if leaf.value_type not in ("string", MSGPACK_VALUE)]
    if use_ocdbt and arrays and MANIFEST not in keys:
        if processes:
            raise CheckpointNotFoundError(
                f"{found.item} is not a committed Orbax checkpoint: its per-process OCDBT databases "
                f"({', '.join(processes[:4])}) were never merged into {MANIFEST}, as a save does before "
                "it commits; restore a committed step"
            )
        raise CorruptCheckpointError(f"{found.item}: {where} says OCDBT, but there is no {MANIFEST}")
    metas = _array_metadatas(folder, keys)
    shardings = _shardings(folder, keys)
    if marker == METADATA and any(leaf.value_type == "string" for leaf in leaves):
        strings = _json(folder, STRINGS)
        if not isinstance(strings, dict):
            raise CorruptCheckpointError(f"{join(found.item, STRINGS)} is not a JSON object")
    names = [".".join(leaf.keys) for leaf in arrays]
    opened = dict(
        zip(names, _open_arrays(found.item, names, use_ocdbt, use_zarr3, strict, timeout_s, marker))
    )
    entries: list[LeafEntry] = []
    stored: dict[str, _Stored] = {}
    files: list[DataFile] = []
    for leaf in leaves:
        name = ".".join(leaf.keys)
        path_name = "/".join(leaf.keys)
        k = len(files)
        if leaf.value_type == "string":
            value = strings.get(name)
            if not isinstance(value, str):
                raise CorruptCheckpointError(
                    f"{join(found.item, STRINGS)} holds no string {name!r}, which {where} lists"
                )
            data = np.frombuffer(value.encode("utf-8"), np.uint8)
            shape: tuple[int, ...] = (data.size,)
            shards = [
                StoredShard(k, 0, data.size, (0,), shape, (0,) * crc_chunks(data.size, READ_CHUNK_BYTES))
            ]
            stored[name] = _Stored(name, None, data, shards, [0], lambda _: join(found.item, STRINGS), shape)
            files.append(DataFile(data.size, None, 0, key=name))
            entries.append(
                LeafEntry(
                    path_name,
                    np.dtype(np.uint8),
                    shape,
                    _tree.KIND_STR,
                    None,
                    tuple(shards),
                    stored_dtype="string",
                    stored_name=name,
                )
            )
            continue
        if leaf.value is not None:  # a value of the msgpack file itself
            value = np.array(leaf.value, order="C")  # (ascontiguousarray makes a 0-d array 1-d)
            if value.size == 0:  # no elements: one empty shard, the whole array (FORMAT.md)
                shards = [StoredShard(k, 0, 0, (0,) * value.ndim, value.shape, ())]
            else:
                shards = [
                    StoredShard(
                        k,
                        0,
                        value.nbytes,
                        (0,) * value.ndim,
                        value.shape,
                        (0,) * crc_chunks(value.nbytes, READ_CHUNK_BYTES),
                    )
                ]
            data = value.reshape(-1).view(np.uint8)
            stored[name] = _Stored(name, None, data, shards, [0], lambda _: where, value.shape)
            files.append(DataFile(value.nbytes, None, 0, key=name))
            kind = leaf.kind or _tree.KIND_NUMPY
            entries.append(
                LeafEntry(path_name, value.dtype, value.shape, kind, None, tuple(shards), stored_name=name)
            )
            continue
        array = opened[name]
        meta_where = (
            f"key {name}/{'zarr.json' if use_zarr3 else '.zarray'} of the OCDBT database {found.item}"
            if use_ocdbt
            else join(found.item, f"{name}/{'zarr.json' if use_zarr3 else '.zarray'}")
        )
        dtype = _dtype_of(array, name, meta_where)
        shape = tuple(int(d) for d in array.shape)
        if len(shape) > MAX_NDIM:
            raise CorruptCheckpointError(f"{meta_where}: {len(shape)} dimensions (at most {MAX_NDIM})")
        chunk = tuple(int(c) for c in array.chunk_layout.read_chunk.shape) if shape else ()
        meta = metas.get(name, {})
        recorded = _ints(meta.get("chunk_shape")) if isinstance(meta, dict) else None
        if recorded is not None and recorded != chunk:
            raise CorruptCheckpointError(
                f"{meta_where}: array {name!r} is stored in chunks {list(chunk)}, but "
                f"{join(found.item, ARRAY_METADATAS)} records {list(recorded)} (the checkpoint is damaged)"
            )
        if leaf.write_shape is not None and (
            len(leaf.write_shape) != len(shape) or any(w > max(s, 1) for w, s in zip(leaf.write_shape, shape))
        ):
            raise CorruptCheckpointError(
                f"{where}: array {name!r} was written in pieces of {list(leaf.write_shape)}, but "
                f"{meta_where} gives it the shape {list(shape)} (the checkpoint is damaged)"
            )
        if math.prod(shape) * dtype.itemsize > 1 << 50:
            raise CorruptCheckpointError(f"{meta_where}: array {name!r} of shape {list(shape)} is too large")
        key_impl = None
        ext = meta.get("ext_metadata") if isinstance(meta, dict) else None
        if isinstance(ext, dict) and isinstance(ext.get("random_key_impl"), str):
            key_impl = ext["random_key_impl"]
            if dtype != np.dtype(np.uint32) or not shape:
                raise CorruptCheckpointError(
                    f"{meta_where}: PRNG key {name!r} ({key_impl}) has key data of {dtype} {list(shape)}"
                )
        if leaf.value_type == "scalar":
            if shape:
                raise CorruptCheckpointError(
                    f"{where}: {name!r} is a scalar, but {meta_where} gives it the shape {list(shape)}"
                )
            kind = {
                "i": _tree.KIND_INT,
                "u": _tree.KIND_INT,
                "f": _tree.KIND_FLOAT,
                "b": _tree.KIND_BOOL,
                "c": _tree.KIND_COMPLEX,
            }.get(dtype.kind, _tree.KIND_NUMPY_SCALAR)
        elif key_impl is not None:
            kind = _tree.KIND_KEY
        elif leaf.value_type in ("np.ndarray", MSGPACK_ARRAY):  # (Orbax restores both as numpy)
            kind = _tree.KIND_NUMPY
        else:
            kind = _tree.KIND_ARRAY
        sep = "."
        if not use_zarr3:
            try:
                sep = array.spec().to_json().get("metadata", {}).get("dimension_separator", ".")
            except (ValueError, AttributeError):
                sep = "."

        def chunk_key(
            start: tuple[int, ...], name: str = name, chunk: tuple[int, ...] = chunk, sep: str = sep
        ) -> str:
            index = tuple(a // c for a, c in zip(start, chunk))
            return _where_chunk(found.item, name, use_ocdbt, use_zarr3, index, sep)

        shards = _grid(name, shape, chunk, dtype.itemsize, k, meta_where)
        offsets = [s.offset for s in shards]
        stored[name] = _Stored(name, array, None, shards, offsets, chunk_key, chunk)
        files.append(DataFile(sum(s.nbytes for s in shards), None, 0, key=name))
        sharding = shardings.get(name) if kind in (_tree.KIND_ARRAY, _tree.KIND_KEY) else None
        if sharding is not None and sharding["type"] == "named":
            _check_divides(sharding, shape, name, meta_where, join(found.item, SHARDING))
        entries.append(
            LeafEntry(
                path_name, dtype, shape, kind, sharding, tuple(shards), key_impl=key_impl, stored_name=name
            )
        )
    step_doc = None
    if found.step_folder is not None or STEP_METADATA in keys:
        step_store = open_store(found.step_folder, timeout_s) if found.step_folder else folder
        try:
            step_doc = _json(step_store, STEP_METADATA, required=False)
        except CorruptCheckpointError:
            step_doc = None  # metrics and times only: the arrays do not depend on it
    metrics = step_doc.get("metrics") if isinstance(step_doc, dict) else None
    custom = step_doc.get("custom_metadata") if isinstance(step_doc, dict) else None
    committed = step_doc.get("commit_timestamp_nsecs") if isinstance(step_doc, dict) else None
    created = committed / 1e9 if isinstance(committed, int) else (folder.mtime(marker) or 0.0)
    index = Index(
        global_step=found.step,
        created=created,
        checksums=Checksums.none(READ_CHUNK_BYTES),  # Orbax's data has none: lengths (decoding) only
        files=tuple(files),
        structure=structure,
        leaves=tuple(entries),
        format_version=0,
        metrics=metrics if isinstance(metrics, dict) and metrics else None,
        metadata=custom if isinstance(custom, dict) and custom else None,
        source=FORMAT_NAME,
        commit_key=marker,
    )
    return OrbaxArrays(folder, stored, marker), _name(found.item), index
