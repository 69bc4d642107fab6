"""CheckpointReader: look inside a checkpoint without restoring it onto devices."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from shardsave import tree as _tree
from shardsave.errors import CorruptCheckpointError
from shardsave.formats import holds_value, open_checkpoint, read_value
from shardsave.formats import tf_bundle as _tf_bundle
from shardsave.index import Box, decode_sharding
from shardsave.restore.engine import restore_leaves
from shardsave.restore.fetch import Fetcher
from shardsave.restore.files import DataFiles
from shardsave.restore.plan import LeafRequest
from shardsave.restore.targets import devices_by_id
from shardsave.storage.base import join, location
from shardsave.storage.buffers import aligned_empty


@dataclass(frozen=True)
class VariableInfo:
    """One stored leaf, as the index describes it."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    sharding: str  # a short description of how it was laid out when saved
    nbytes: int  # bytes stored (each replicated box once)
    num_shards: int
    dtype_name: str = ""  # the stored format's name for the dtype ("bfloat16"; TensorFlow's "string")


def describe_sharding(desc: dict[str, Any] | None) -> str:
    if desc is None:
        return "host"
    if desc.get("type") == "single":
        return f"device {desc.get('device')}"
    if desc.get("type") == "named":
        axes = ",".join(f"{n}={s}" for n, s in zip(desc["axis_names"], desc["mesh_shape"]))
        spec = ", ".join(
            "None" if e is None else e if isinstance(e, str) else "(" + ",".join(e) + ")"
            for e in desc["spec"]
        )
        return f"P({spec}) on mesh({axes})"
    return f"{len(desc.get('devices', []))} devices"


def _slices(leaf: Any) -> str:
    """How a foreign checkpoint stored a tensor: whole, or in slices (a TF partitioned variable)."""
    return f"{len(leaf.shards)} slices" if len(leaf.shards) > 1 else "whole"


def _index_box(index: Any, shape: tuple[int, ...]) -> tuple[Box, tuple[Any, ...]]:
    """The box covering a basic numpy index, and the index to apply to that box."""
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape):
        raise IndexError(f"too many indices ({len(index)}) for an array of shape {shape}")
    index = index + (slice(None),) * (len(shape) - len(index))
    box: list[tuple[int, int]] = []
    local: list[Any] = []
    for i, dim in zip(index, shape):
        if isinstance(i, (int, np.integer)):
            k = int(i) + dim if i < 0 else int(i)
            if not 0 <= k < dim:
                raise IndexError(f"index {i} is out of bounds for a dimension of size {dim}")
            box.append((k, k + 1))
            local.append(0)
        elif isinstance(i, slice):
            start, stop, step = i.indices(dim)
            if step < 0:
                raise IndexError("negative steps are not supported; read the range and reverse it")
            stop = max(start, stop)
            box.append((start, stop))
            local.append(slice(0, stop - start, step))
        else:
            raise IndexError(f"only integers and slices can index a stored leaf, found {type(i).__name__}")
    return tuple(box), tuple(local)


class CheckpointReader:
    """Reads the leaves of a checkpoint as numpy arrays, fetching only the bytes asked for.

    Args:
      path: a checkpoint prefix such as "ckpt/model-1000".

    Examples:
      >>> import numpy as np, shardsave, tempfile
      >>> p = shardsave.Saver(async_save=False).save({"w": np.arange(6.0).reshape(2, 3)}, tempfile.mkdtemp() + "/m")
      >>> with shardsave.CheckpointReader(p) as reader:
      ...     [v.name for v in reader.variables()], reader.get("w", (1, slice(0, 2))).tolist()
      (['w'], [3.0, 4.0])
    """

    def __init__(self, path: str):
        self.path = location(path)
        self._directory, self._base, self.index = open_checkpoint(self.path)
        # A foreign format's own names ("model.embed" in safetensors) also find their leaf.
        self._aliases = {e.stored_name: e for e in self.index.leaves if e.stored_name is not None}
        self._leaves = {leaf.name: leaf for leaf in self.index.leaves}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing is held open between reads; present for symmetry with `with`."""

    @property
    def global_step(self) -> int | None:
        """The step saved with the checkpoint (save(global_step=...)), or None."""
        return self.index.global_step

    @property
    def metrics(self) -> dict[str, Any] | None:
        """The metrics saved with the checkpoint (save(metrics=...)), read from the index alone."""
        return self.index.metrics

    @property
    def metadata(self) -> dict[str, Any] | None:
        """The metadata saved with the checkpoint (save(metadata=...)), read from the index alone."""
        return self.index.metadata

    def variables(self) -> list[VariableInfo]:
        """Every stored leaf, in tree order."""
        return [
            VariableInfo(
                leaf.name,
                leaf.dtype,
                leaf.shape,
                describe_sharding(leaf.sharding)
                if self.index.source == "shardsave" or leaf.sharding is not None  # (Orbax's _sharding)
                else _slices(leaf),
                sum(s.nbytes for s in leaf.shards),
                len(leaf.shards),
                leaf.stored_dtype or leaf.dtype.name,
            )
            for leaf in self.index.leaves
        ]

    def get(self, name: str, index: Any = None) -> np.ndarray:
        """A leaf (or index of it: integers and slices) as a numpy array.

        name is the leaf's tree path as variables() lists it; the format's own name
        finds it too: for safetensors and PyTorch DCP ("model.embed" for
        model/embed), for Orbax its param name ("params.dense.kernel"). A DCP entry
        that is not a tensor (dtype "pickle": param_groups' values) comes back as its
        Python value, unpickled with only plain containers allowed; a string leaf
        (Orbax's) as a str.

        Only the stored bytes that the index touches are read (in whole rows of
        each stored shard, widened to its checksum chunks).
        """
        entry = self._leaves.get(name) or self._aliases.get(name)
        if entry is None:
            raise _tree.missing_leaves_error([name], list(self._leaves), self.path)
        if entry.kind == _tree.KIND_STR:  # a Python str (Orbax's string leaves)
            request = LeafRequest(entry, entry.shape, entry.dtype, None)
            (data,), _ = restore_leaves(
                self._directory, self._base, self.index, [request], budget=None, sequential=False
            )
            text = data.tobytes().decode("utf-8")
            return text if index is None else text[index]
        if entry.stored_dtype == "string":
            strings = self._strings(entry)
            return strings if index is None else strings[index]
        if holds_value(self.index, entry):
            return read_value(self._directory, self.index, entry)
        if entry.dtype == np.dtype(object):
            raise ValueError(
                f"{self.path}: {name!r} is a TensorFlow {entry.stored_dtype} tensor, which has no "
                "value that numpy can hold"
            )
        if index is None:
            box = tuple((0, d) for d in entry.shape)
            local: tuple[Any, ...] = ()
        else:
            box, local = _index_box(index, entry.shape)
        shape = tuple(b - a for a, b in box)
        request = LeafRequest(entry, shape, entry.dtype, None, box)
        (array,), _ = restore_leaves(
            self._directory, self._base, self.index, [request], budget=None, sequential=False
        )
        return array[local] if local else array

    def _strings(self, entry: Any) -> np.ndarray:
        """A TensorFlow string tensor as an array of bytes objects, its checksum verified."""
        (shard,) = entry.shards
        files = DataFiles(self._directory, self._base, self.index)
        where = f"{join(self._directory.path, files.names[shard.file])} (leaf {entry.name!r})"
        data = files.read(shard.file, shard.offset, shard.offset + shard.nbytes).result()
        count = math.prod(entry.shape)
        return _tf_bundle.decode_strings(bytes(data), count, shard.crc32c[0], where).reshape(entry.shape)

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Reads every stored byte and checks it against the index.

        Args:
          progress: called with the number of bytes checked after each read.

        Returns:
          One line per bad shard or file (empty when the checkpoint is sound).

        Raises:
          StorageError: the store did not answer within its deadline (nothing
            is known about the bytes it did not return).
        """
        problems = []
        names = {id(shard): leaf.name for leaf in self.index.leaves for shard in leaf.shards}
        fetcher = Fetcher(self._directory, self._base, self.index, names, aligned_empty, name_shards=True)
        for leaf in self.index.leaves:
            if (
                leaf.stored_dtype == "string" and leaf.kind != _tree.KIND_STR
            ):  # TF: a checksum over the lengths
                try:
                    self._strings(leaf)
                except (CorruptCheckpointError, OSError) as e:
                    problems.append(str(e))
                continue
            for shard in leaf.shards:
                try:
                    fetcher.verify_shard(shard, progress)
                except CorruptCheckpointError as e:
                    problems.append(str(e))
        return problems


def load_structure(path: str) -> Any:
    """The saved tree with jax.ShapeDtypeStruct leaves, read from the index alone.

    Each leaf carries the saved sharding when its devices exist in this process,
    and no sharding otherwise. Pass the result (with shardings filled in where
    needed) as a restore target.

    Args:
      path: a checkpoint prefix.

    Examples:
      >>> import numpy as np, shardsave, tempfile
      >>> p = shardsave.Saver(async_save=False).save({"b": np.zeros(3)}, tempfile.mkdtemp() + "/m")
      >>> shardsave.load_structure(p)["b"].shape
      (3,)
    """
    _, _, index = open_checkpoint(location(path))
    devices = devices_by_id()
    leaves = [
        jax.ShapeDtypeStruct(e.shape, e.dtype, sharding=decode_sharding(e.sharding, devices))
        for e in index.leaves
    ]
    return _tree.decode_structure(index.structure, leaves)
