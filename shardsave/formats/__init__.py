"""One reader per format, each turning a location into index records; a registry picks one.

A reader recognises its checkpoints either by their location's name (a
safetensors file) or by the bytes of the prefix's `.index` file (TensorFlow's is
a LevelDB table, shardsave's is JSON), and returns the same records: a Store, the
checkpoint's base name and a validated Index whose data files are named
(DataFile.key). The rest of the package asks open_checkpoint(path) and never
which format it got. A new format is one module here and one FormatReader in
READERS, in the manner of fsspec's registry; a format that lives in a directory
of its own (Orbax's, DCP's) recognises it by name (a marker file in it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from shardsave.errors import CheckpointNotFoundError
from shardsave.formats import dcp as _dcp
from shardsave.formats import orbax as _orbax
from shardsave.formats import safetensors as _safetensors
from shardsave.formats import shardsave as _shardsave
from shardsave.formats import tf_bundle as _tf_bundle
from shardsave.formats import zstd_chunks as _zstd_chunks
from shardsave.index import Index, LeafEntry
from shardsave.storage import open_store, readable, split_prefix
from shardsave.storage.base import DEFAULT_STORAGE_TIMEOUT_S, Store, join


@dataclass(frozen=True)
class FormatReader:
    """How one format is recognised and read.

    Attributes:
      name: the format's name, as Index.source records it.
      claims: recognises the format from a location alone.
      lists: claims() looks inside the location (a directory format: a LIST on an
        object store), so it is asked only once the prefix has no `.index` file;
        otherwise claims() goes by the name alone and is asked first.
      open: reads a location that claims() recognised: (store, base, index).
      claims_index: recognises the format from the bytes of the prefix's `.index` file.
      from_index: reads the index from those bytes: (raw, where, base, mtime) -> Index,
        where mtime() is the `.index` file's modification time (a request of its
        own on an object store, made only by the readers that need it).
      view: how the data files of an index from_index read are served:
        (store, index) -> (store, index), for data that is not raw bytes at offsets
        (a compressed checkpoint's frames, decoded by a store of its own).
    """

    name: str
    claims: Callable[[str], bool] | None = None
    lists: bool = False
    open: Callable[[str, float], tuple[Store, str, Index]] | None = None
    claims_index: Callable[[bytes], bool] | None = None
    from_index: Callable[[bytes, str, str, Callable[[], float | None]], Index] | None = None
    view: Callable[[Store, Index], tuple[Store, Index]] | None = None


def _shardsave_index(raw: bytes, where: str, base: str, mtime: Callable[[], float | None]) -> Index:
    return _shardsave.located(_shardsave.decode_index(raw, where), base)


def _shardsave_view(store: Store, index: Index) -> tuple[Store, Index]:
    return _zstd_chunks.uncompressed(store, index) if index.compression is not None else (store, index)


def _tf_index(raw: bytes, where: str, base: str, mtime: Callable[[], float | None]) -> Index:
    return _tf_bundle.bundle_index(raw, where, base, mtime())


# Tried in order; shardsave's own format last, as the one that takes any other `.index`.
READERS: list[FormatReader] = [
    FormatReader("safetensors", claims=_safetensors.is_safetensors, open=_safetensors.safetensors_index),
    FormatReader("dcp", claims=_dcp.is_dcp, lists=True, open=_dcp.dcp_index),
    FormatReader("orbax", claims=_orbax.is_orbax, lists=True, open=_orbax.orbax_index),
    FormatReader("tensorflow", claims_index=_tf_bundle.is_tf_index, from_index=_tf_index),
    FormatReader(
        "shardsave", claims_index=lambda raw: True, from_index=_shardsave_index, view=_shardsave_view
    ),
]


def claimed(path: str) -> bool:
    """Whether a reader recognises the location by itself (a safetensors file, an Orbax
    directory): it is a checkpoint as it is, not a directory of prefixes."""
    return any(reader.claims is not None and reader.claims(path) for reader in READERS)


def _opener(path: str, lists: bool) -> Callable[[str, float], tuple[Store, str, Index]] | None:
    """The open() of the first reader whose claims() (of the kind `lists` says) takes path."""
    for reader in READERS:
        if (
            reader.open is not None
            and reader.claims is not None
            and reader.lists == lists
            and reader.claims(path)
        ):
            return reader.open
    return None


def open_checkpoint(path: str, timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S) -> tuple[Store, str, Index]:
    """The directory, base name and validated index of the checkpoint at path, in any format read.

    The order is the cheapest first: a name that says its format (a safetensors
    file), then the prefix's `.index` file (shardsave's and TensorFlow's), read
    with one request, and only then the directory formats, which list the location
    (an object store's LIST costs a round trip of its own before the first read).

    Raises:
      CheckpointNotFoundError: nothing committed is at path.
      CorruptCheckpointError: what is there is damaged (the message names the file).
    """
    opener = _opener(path, lists=False)
    if opener is not None:
        return opener(path, timeout_s)
    parent, base = split_prefix(path)
    raw = None
    if base:
        directory = open_store(parent, timeout_s)
        key = _shardsave.index_key(base)
        raw = directory.read_all(key)
    if raw is None:
        opener = _opener(path, lists=True)
        if opener is not None:
            return opener(path, timeout_s)
        if not base:
            raise CheckpointNotFoundError(f"{readable(path)!r} names a directory, not a checkpoint prefix")
        leftovers = _shardsave.Listing.of(directory).data.get(base, [])
        hint = (
            f" ({len(leftovers)} data files exist without it: a save that never committed)"
            if leftovers
            else ""
        )
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {readable(path)!r}: {path}{_shardsave.INDEX_SUFFIX} does not exist{hint}"
        )
    where = f"{path}{_shardsave.INDEX_SUFFIX}"
    for reader in READERS:
        if reader.claims_index is not None and reader.from_index is not None and reader.claims_index(raw):
            index = reader.from_index(raw, where, base, partial(directory.mtime, key))
            store: Store = directory
            if reader.view is not None:
                store, index = reader.view(directory, index)
            return store, base, index
    raise AssertionError("shardsave's own reader takes every index")  # unreachable: it is last


def holds_value(index: Index, entry: LeafEntry) -> bool:
    """Whether entry is a Python value rather than an array: a DCP entry that is not a
    tensor (param_groups' numbers, lists and strings), which read_value reads."""
    return index.source == "dcp" and entry.stored_dtype in _dcp.OBJECT_DTYPES


def read_value(store: Store, index: Index, entry: LeafEntry) -> Any:
    """The Python value of an entry for which holds_value() is true, decoded with only
    plain containers allowed (a pickle naming any class is refused, never run).

    Raises:
      ValueError: entry is an array (restore or CheckpointReader.get reads it).
      CorruptCheckpointError: the stored record is damaged or names a class.
    """
    if not holds_value(index, entry):
        raise ValueError(f"{entry.name!r} is an array, not a stored Python value")
    (shard,) = entry.shards
    key = str(index.files[shard.file].key)
    where = f"{join(store.path, key)} (entry {entry.stored_name!r})"
    return _dcp.read_object(store, key, shard, str(entry.stored_dtype), where)
