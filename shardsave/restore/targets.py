"""Matching a restore's target to a checkpoint's leaves: what to read, onto what, and into what.

Pure planning with no I/O: for each target leaf, the stored entry, the shape,
dtype and sharding to restore it as, and how to finish the value (typed PRNG
keys rebuilt from their data, Python numbers given back as numbers, a Python-int
step put into a narrower integer target, abstract-mesh shardings resolved
against the devices at hand). Errors name the leaf.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from shardsave import tree as _tree
from shardsave.errors import ShardingMismatchError, StructureMismatchError
from shardsave.index import Index, LeafEntry, decode_sharding
from shardsave.restore.plan import LeafRequest


def devices_by_id() -> dict[int, jax.Device]:
    return {d.id: d for d in jax.devices()}


def _as_kind(value: Any, kind: str) -> Any:
    if kind == _tree.KIND_NUMPY_SCALAR:
        return value[()]
    if kind == _tree.KIND_INT:
        return int(value)
    if kind == _tree.KIND_FLOAT:
        return float(value)
    if kind == _tree.KIND_BOOL:
        return bool(value)
    if kind == _tree.KIND_COMPLEX:
        return complex(value)
    if kind == _tree.KIND_STR:
        return np.asarray(value, np.uint8).tobytes().decode("utf-8")
    return value


def _refuse_unrestorable(entries: list[Any], path: str) -> None:
    """Tensors of a foreign checkpoint that no jax or numpy array can hold (TF strings, ...)."""
    bad = [f"{e.name!r} ({e.stored_dtype})" for e in entries if e.dtype == np.dtype(object)]
    if bad:
        raise StructureMismatchError(
            f"{path!r} holds {len(bad)} tensor(s) of a dtype that jax and numpy arrays cannot hold: "
            f"{', '.join(bad)}; restore a target without them (shardsave.CheckpointReader(path).get(name) "
            "reads them as Python bytes)"
        )


def _refuse_narrowing(name: str, dtype: np.dtype, path: str) -> None:
    """A jax target of a dtype jax would narrow (64-bit values without jax_enable_x64)."""
    held = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    if held != dtype:
        raise StructureMismatchError(
            f"leaf {name!r} of {path!r}: jax holds {dtype} as {held} unless jax_enable_x64 is set, so "
            f"its values would be narrowed without a word; set jax.config.update('jax_enable_x64', True), "
            f"restore it into a numpy array, or ask for {held} with cast=True"
        )


def requests_for_saved(index: Index, path: str) -> tuple[list[LeafRequest], Callable[[list[Any]], Any]]:
    devices = devices_by_id()
    requests = []
    # A foreign checkpoint's structure may leave metadata out (TF2's object graph).
    entries = [index.leaves[i] for i in _tree.structure_leaf_indices(index.structure)]
    _refuse_unrestorable(entries, path)
    for entry in entries:
        sharding = None
        if entry.kind in (_tree.KIND_ARRAY, _tree.KIND_KEY):
            _refuse_narrowing(entry.name, entry.dtype, path)
            sharding = decode_sharding(entry.sharding, devices)
            if sharding is None:
                raise ShardingMismatchError(
                    f"leaf {entry.name!r} of {path!r} was saved with a sharding over devices that do "
                    f"not exist here ({len(devices)} devices); pass a target with the shardings to "
                    "restore onto (shardsave.load_structure gives the saved shapes and dtypes)"
                )
        requests.append(LeafRequest(entry, entry.shape, entry.dtype, sharding))

    def finish(values: list[Any]) -> Any:
        leaves: list[Any] = [None] * len(index.leaves)
        for i, v, e in zip(_tree.structure_leaf_indices(index.structure), values, entries):
            leaves[i] = jax.random.wrap_key_data(v, impl=e.key_impl) if e.key_impl else _as_kind(v, e.kind)
        return _tree.decode_structure(index.structure, leaves)

    return requests, finish


def _concrete(sharding: jax.sharding.Sharding, name: str) -> jax.sharding.Sharding:
    """A target's sharding on real devices.

    Shardings made under jax.set_mesh by jax.eval_shape or nnx.eval_shape name an
    AbstractMesh (axis names and sizes, no devices). The mesh set now, if its axes
    agree, or else one laid over this process's devices in order, stands in for it.
    """
    if not isinstance(sharding, jax.sharding.NamedSharding) or not isinstance(
        sharding.mesh, jax.sharding.AbstractMesh
    ):
        return sharding
    abstract = sharding.mesh
    current = jax.sharding.get_mesh()
    if isinstance(current, jax.sharding.Mesh) and not current.empty and current.abstract_mesh == abstract:
        mesh = current
    else:
        devices = jax.devices()
        if math.prod(abstract.axis_sizes) != len(devices):
            raise ShardingMismatchError(
                f"target leaf {name!r} has a sharding over an abstract mesh "
                f"{dict(zip(abstract.axis_names, abstract.axis_sizes))} ({math.prod(abstract.axis_sizes)} "
                f"devices), but {len(devices)} devices exist here; restore inside `with "
                "jax.set_mesh(mesh)` or give the target concrete shardings"
            )
        mesh = jax.sharding.Mesh(
            np.array(devices, dtype=object).reshape(abstract.axis_sizes),
            abstract.axis_names,
            axis_types=abstract.axis_types,
        )
    return jax.sharding.NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)


@functools.cache
def _key_layout(impl: str) -> tuple[Any, tuple[int, ...]]:
    """The key dtype of a PRNG implementation, and the shape of one key's data."""
    key = jax.eval_shape(lambda: jax.random.key(0, impl=impl))
    return key.dtype, tuple(jax.eval_shape(jax.random.key_data, key).shape)


def _int_into(
    name: str, dtype: np.dtype, sharding: jax.sharding.Sharding | None, kind: str
) -> Callable[[Any], Any]:
    """Converts a stored Python int into an integer target, refusing a value that does not fit."""

    def convert(value: Any) -> Any:
        number = int(np.asarray(value)[()])
        info = np.iinfo(dtype)
        if not info.min <= number <= info.max:
            raise StructureMismatchError(
                f"leaf {name!r}: the checkpoint holds {number}, which does not fit the target's {dtype} "
                f"({info.min}..{info.max})"
            )
        array = np.asarray(number, dtype)
        if sharding is not None:
            return jax.device_put(array, sharding)
        return _as_kind(array, kind)

    return convert


def _key_data_sharding(sharding: jax.sharding.Sharding, ndim: int, name: str) -> jax.sharding.Sharding:
    """The sharding of a key array's key data: the key's trailing dimensions unsharded."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = (*sharding.spec, *[None] * (ndim - len(sharding.spec)))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise ShardingMismatchError(
        f"target leaf {name!r} is a PRNG key array with a {type(sharding).__name__}; give it a "
        "NamedSharding or a single device"
    )


def stored_names(names: list[str], mapping: Callable[[str], str] | dict[str, str] | None) -> list[str]:
    """The stored name of each target leaf: mapping(name), or mapping.get(name, name)."""
    if mapping is None:
        return names
    if isinstance(mapping, dict):
        return [mapping.get(n, n) for n in names]
    out = []
    for n in names:
        stored = mapping(n)
        if not isinstance(stored, str):
            raise TypeError(f"names({n!r}) returned {stored!r}; it must return the stored name, a str")
        out.append(stored)
    return out


@dataclass(frozen=True)
class StoredValues:
    """The entries of a checkpoint that are Python values, not arrays (a PyTorch DCP
    optimizer's param_groups), and how to read one: the format's business, handed in
    by the caller, since nothing under shardsave.restore reads a format."""

    holds: Callable[[LeafEntry], bool]
    read: Callable[[LeafEntry], Any]


def _value_leaf(
    name: str, by_name: dict[str, LeafEntry], values: StoredValues | None
) -> tuple[LeafEntry, tuple[str, ...]] | None:
    """The stored value that holds target leaf `name`, and the keys into it: the value
    itself ("optim/param_groups/0/lr"), or an item of it ("optim/param_groups/0/betas/1",
    where a target's tuple flattened into leaves of its own)."""
    if values is None:
        return None
    parts = name.split("/")
    for cut in range(len(parts), 0, -1):
        entry = by_name.get("/".join(parts[:cut]))
        if entry is not None and values.holds(entry):
            return entry, tuple(parts[cut:])
    return None


def _item(value: Any, keys: tuple[str, ...], name: str, entry: LeafEntry, path: str) -> Any:
    """value[keys[0]][keys[1]]..., a list or tuple indexed by the key's number."""
    for key in keys:
        try:
            if isinstance(value, dict):
                value = value[key] if key in value else value[int(key)]
            elif isinstance(value, (list, tuple)):
                value = value[int(key)]
            else:
                raise TypeError(type(value).__name__)
        except (KeyError, IndexError, ValueError, TypeError):
            raise StructureMismatchError(
                f"leaf {name!r}: {entry.name!r} of {path!r} holds the Python value {value!r:.200}, "
                f"which has no item {key!r}; give the target the value's structure"
            ) from None
    return value


def _ignoring_read(value_of: Callable[[str], Any], name: str, _read: Any) -> Any:
    return value_of(name)


def requests_for_target(
    index: Index,
    target: Any,
    reshape: bool,
    cast: bool,
    path: str,
    mapping: Callable[[str], str] | dict[str, str] | None = None,
    values: StoredValues | None = None,
) -> tuple[list[LeafRequest], Callable[[list[Any]], Any]]:
    """What to read for target, and how to finish what was read into target's tree.

    A target leaf that names a stored Python value (values.holds), or an item of
    one, takes that value as it was stored, whatever the target leaf held; it is
    read when the restore finishes, not through the engine (it has no bytes to
    place on a device).
    """
    target_names, leaves, treedef = _tree.flatten(target)
    names = stored_names(target_names, mapping)
    # A foreign format's own names ("model.embed" in safetensors) also find their leaf.
    by_name = {e.stored_name: e for e in index.leaves if e.stored_name is not None}
    by_name.update((e.name, e) for e in index.leaves)
    in_values = {n: found for n in names if (found := _value_leaf(n, by_name, values)) is not None}
    missing = [n for n in names if n not in by_name and n not in in_values]
    if missing:
        raise _tree.missing_leaves_error(missing, list(by_name), path)
    _refuse_unrestorable([by_name[n] for n in names if n not in in_values], path)
    devices = devices_by_id()
    requests: list[LeafRequest] = []
    finishers: list[Callable[[Any], Any]] = []
    positions: list[int | None] = []  # each target leaf's request, or None for a stored value
    read_values: dict[str, Any] = {}

    def stored_value(name: str) -> Any:
        entry, keys = in_values[name]
        if entry.name not in read_values:
            assert values is not None
            read_values[entry.name] = values.read(entry)
        return _item(read_values[entry.name], keys, name, entry, path)

    for name, leaf in zip(names, leaves):
        if name in in_values:
            if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
                raise StructureMismatchError(
                    f"leaf {name!r}: {path!r} holds a Python value there ({in_values[name][0].stored_dtype}), "
                    f"not a tensor; give the target a Python value (a number, a str, a list) in its place"
                )
            positions.append(None)
            finishers.append(functools.partial(_ignoring_read, stored_value, name))
            continue
        positions.append(len(requests))
        entry = by_name[name]
        finisher: Callable[[Any], Any] | None = None
        if isinstance(leaf, str) or (entry.kind == _tree.KIND_STR and isinstance(leaf, jax.ShapeDtypeStruct)):
            # A string leaf (its target a str, or load_structure's stand-in for it).
            if entry.kind != _tree.KIND_STR:
                raise StructureMismatchError(
                    f"leaf {name!r}: the target is a str, the checkpoint holds a {entry.dtype} array"
                )
            shape, dtype, sharding, kind = entry.shape, entry.dtype, None, _tree.KIND_STR
        elif isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
            shape, dtype = tuple(leaf.shape), leaf.dtype
            sharding = leaf.sharding
            if sharding is None:  # a ShapeDtypeStruct without one: the saved layout, else device 0
                sharding = decode_sharding(entry.sharding, devices) or jax.sharding.SingleDeviceSharding(
                    jax.devices()[0]
                )
            sharding = _concrete(sharding, name)
            kind = _tree.KIND_ARRAY
            if _tree.is_key_dtype(dtype):
                if entry.key_impl is None:
                    raise StructureMismatchError(
                        f"leaf {name!r}: the target is a PRNG key array ({dtype}), the checkpoint "
                        f"holds a {entry.dtype} array"
                    )
                stored_dtype, key_shape = _key_layout(entry.key_impl)
                if dtype != stored_dtype:
                    raise StructureMismatchError(
                        f"leaf {name!r}: the checkpoint holds {stored_dtype} keys "
                        f"({entry.key_impl}), the target has {dtype}"
                    )
                shape, dtype = (*shape, *key_shape), entry.dtype
                sharding = _key_data_sharding(sharding, len(shape), name)
                finisher = functools.partial(jax.random.wrap_key_data, impl=entry.key_impl)
            elif entry.kind == _tree.KIND_KEY:
                raise StructureMismatchError(
                    f"leaf {name!r}: the checkpoint holds PRNG keys ({entry.key_impl}); give the target "
                    "a key array (jax.random.key) or use its key data's shape and dtype "
                    f"{entry.shape} {entry.dtype} as a uint32 array"
                )
            dtype = np.dtype(dtype)
            _refuse_narrowing(name, dtype, path)
        elif isinstance(leaf, np.ndarray):
            shape, dtype, sharding, kind = leaf.shape, leaf.dtype.newbyteorder("="), None, _tree.KIND_NUMPY

        else:
            try:
                kind = _tree.leaf_kind(leaf)
            except TypeError:
                raise StructureMismatchError(
                    f"target leaf {name!r} is a {type(leaf).__name__}; use a jax.Array, "
                    "jax.ShapeDtypeStruct, numpy array or number"
                ) from None
            # Numbers take the stored dtype: a Python int has no width to match.
            shape, dtype, sharding = np.shape(leaf), entry.dtype, None
        same_size = math.prod(shape) == math.prod(entry.shape)
        if shape != entry.shape and not (reshape and same_size):
            hint = " (pass reshape=True to restore into a shape with as many elements)" if same_size else ""
            raise StructureMismatchError(
                f"leaf {name!r}: the checkpoint holds shape {entry.shape}, the target has {shape}{hint}"
            )
        if (
            dtype != entry.dtype
            and not cast
            and entry.kind == _tree.KIND_INT
            and np.issubdtype(dtype, np.integer)
        ):
            # A Python int has no width of its own (it was stored as int64): any integer
            # target that holds its value takes it, as jax.eval_shape of a state with a
            # Python-int step asks for int32.
            finisher = _int_into(name, dtype, sharding, kind)
            request = LeafRequest(entry, shape, entry.dtype, None)
        elif dtype != entry.dtype and not cast:
            raise StructureMismatchError(
                f"leaf {name!r}: the checkpoint holds dtype {entry.dtype}, the target has {dtype} "
                "(pass cast=True to convert)"
            )
        else:
            request = LeafRequest(entry, shape, dtype, sharding)
        requests.append(request)
        finishers.append(finisher or functools.partial(_as_kind, kind=kind))

    def finish(read: list[Any]) -> Any:
        out = [f(None if i is None else read[i]) for f, i in zip(finishers, positions)]
        return jax.tree_util.tree_unflatten(treedef, out)

    return requests, finish
