"""One reader per format, each turning a location into index records; a registry picks one.

shardsave's own checkpoints, TensorFlow's tensor bundles and safetensors. The
rest of the package asks open_checkpoint(path) for a (Store, base, Index) and
never which format it got.
"""

from __future__ import annotations

from shardsave.errors import CheckpointNotFoundError
from shardsave.formats import tf_bundle as _tf_bundle
from shardsave.formats.safetensors import is_safetensors, safetensors_index
from shardsave.formats.shardsave import INDEX_SUFFIX, Listing, decode_index, index_key
from shardsave.index import Index
from shardsave.storage import open_prefix
from shardsave.storage.base import DEFAULT_STORAGE_TIMEOUT_S, Store


def open_checkpoint(path: str, timeout_s: float = DEFAULT_STORAGE_TIMEOUT_S) -> tuple[Store, str, Index]:
    """The directory, base name and validated index of a committed checkpoint (or of
    a TensorFlow checkpoint, or of safetensors: a .safetensors file or index.json)."""
    if is_safetensors(path):
        return safetensors_index(path, timeout_s)
    directory, base = open_prefix(path, timeout_s)
    raw = directory.read_all(index_key(base))
    if raw is None:
        leftovers = Listing.of(directory).data.get(base, [])
        hint = (
            f" ({len(leftovers)} data files exist without it: a save that never committed)"
            if leftovers
            else ""
        )
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {path!r}: {path}{INDEX_SUFFIX} does not exist{hint}"
        )
    where = f"{path}{INDEX_SUFFIX}"
    if _tf_bundle.is_tf_index(raw):  # a TensorFlow checkpoint: its index is a LevelDB table
        return (
            directory,
            base,
            _tf_bundle.bundle_index(raw, where, base, directory.mtime(index_key(base))),
        )
    return directory, base, decode_index(raw, where)
