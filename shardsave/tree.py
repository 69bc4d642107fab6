"""Pytrees <-> named leaves, and the JSON form of a tree's structure.

A leaf is named by its key path joined with "/" ("params/dense/kernel"); a flat
dict {"a/b": x} therefore names its leaves directly. The structure is recorded
as nested JSON so that a checkpoint can be restored without the code that built
the tree: dicts, lists, tuples and None come back as themselves, and any other
pytree node (a dataclass, a NamedTuple, a flax struct) comes back as a dict
keyed by its children's names.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from shardsave.errors import LeafNotFoundError

__all__ = [
    "LeafSpec",
    "flatten",
    "encode_structure",
    "decode_structure",
    "structure_leaf_indices",
    "leaf_kind",
]


# What kind of Python object a leaf was, so that target=None gives back the same kind.
KIND_ARRAY = "jax"  # jax.Array


KIND_NUMPY = "numpy"  # np.ndarray


KIND_NUMPY_SCALAR = "numpy_scalar"  # np.generic


KIND_INT = "int"


KIND_FLOAT = "float"


KIND_BOOL = "bool"


KIND_COMPLEX = "complex"


KIND_KEY = "key"  # a typed PRNG key array (jax.random.key), stored as its key data


# A Python str, stored as its UTF-8 bytes (a uint8 vector). Foreign formats hold such
# leaves (Orbax's _strings.json); shardsave's own writer stores none.
KIND_STR = "str"


KINDS = frozenset(
    {KIND_ARRAY, KIND_NUMPY, KIND_NUMPY_SCALAR, KIND_INT, KIND_FLOAT, KIND_BOOL, KIND_COMPLEX, KIND_KEY}
)


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_name(path: tuple[Any, ...]) -> str:
    return "/".join(_key_name(k) for k in path)


def is_key_dtype(dtype: Any) -> bool:
    """Whether dtype is a typed PRNG key dtype (key<fry>, key<rbg>, ...)."""
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def leaf_kind(leaf: Any) -> str:
    """The kind of a leaf, or TypeError naming what is not storable."""
    if isinstance(leaf, jax.Array):
        return KIND_KEY if is_key_dtype(leaf.dtype) else KIND_ARRAY
    if isinstance(leaf, np.ndarray):
        return KIND_NUMPY
    if isinstance(leaf, np.generic):
        return KIND_NUMPY_SCALAR
    if isinstance(leaf, bool):
        return KIND_BOOL
    if isinstance(leaf, int):
        return KIND_INT
    if isinstance(leaf, float):
        return KIND_FLOAT
    if isinstance(leaf, complex):
        return KIND_COMPLEX
    raise TypeError(type(leaf).__name__)


@dataclass(frozen=True)
class LeafSpec:
    """What the planner needs to know of one leaf: no data, only layout."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    kind: str
    sharding: jax.sharding.Sharding | None  # None for host leaves (numpy, scalars)
    key_impl: str | None = None  # KIND_KEY leaves: the PRNG implementation ("threefry2x32")


def flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Returns (names, leaves, treedef). Raises ValueError on a repeated name."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [path_name(p) for p, _ in with_paths]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise ValueError(
                    f"two leaves are both named {n!r}; leaf names (key paths joined "
                    "with '/') must be unique: rename one of them"
                )
            seen.add(n)
    return names, [leaf for _, leaf in with_paths], treedef


def _children(node: Any) -> list[tuple[Any, Any]] | None:
    """The (key, child) pairs of a pytree node, or None when node is a leaf.

    Flattens exactly one level: every strict descendant counts as a leaf. A leaf
    flattens to itself under the empty path; an empty container ({}, (), [],
    optax.EmptyState()) to nothing, which makes it a node without children, not
    a leaf.
    """
    kids, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if len(kids) == 1 and kids[0][0] == () and kids[0][1] is node:
        return None
    return [(path[0], child) for path, child in kids]


def _json_key(key: Any) -> str | int:
    if isinstance(key, jax.tree_util.DictKey):
        return key.key if isinstance(key.key, (str, int)) else str(key.key)
    return _key_name(key)


# The most containers nested in one another that a checkpoint holds (FORMAT.md): the
# index is JSON, and a reader's JSON parser has a depth limit of its own; a writer
# refuses a deeper tree before anything is written rather than commit what a reader
# might refuse.
MAX_STRUCTURE_DEPTH = 100


def encode_structure(tree: Any) -> Any:
    """The JSON form of a tree; leaves become their index in flatten() order.

    Raises:
      ValueError: containers are nested more than MAX_STRUCTURE_DEPTH deep.
    """
    counter = iter(range(1 << 62))

    def enc(node: Any, path: tuple[str, ...] = ()) -> Any:
        if node is None:
            return {"none": None}
        children = _children(node)
        if children is None:
            return next(counter)
        if len(path) >= MAX_STRUCTURE_DEPTH:
            raise ValueError(
                f"the tree nests containers more than {MAX_STRUCTURE_DEPTH} deep (at "
                f"{'/'.join(path[:3])}/.../{path[-1]}), more than a checkpoint holds (FORMAT.md): "
                "flatten part of it, for example into a dict keyed by 'a/b/c' paths"
            )
        kids = [(k, enc(c, (*path, _key_name(k)))) for k, c in children]
        if type(node) is dict:
            return {"dict": [[_json_key(k), c] for k, c in kids]}
        if type(node) is list:
            return {"list": [c for _, c in kids]}
        if type(node) is tuple:
            return {"tuple": [c for _, c in kids]}
        return {"node": type(node).__qualname__, "items": [[_key_name(k), c] for k, c in kids]}

    return enc(tree)


def decode_structure(structure: Any, leaves: list[Any]) -> Any:
    """Rebuilds a tree from encode_structure's output and the leaves in order."""

    def dec(s: Any) -> Any:
        if isinstance(s, int):
            return leaves[s]
        if "none" in s:
            return None
        if "dict" in s:
            return {k: dec(c) for k, c in s["dict"]}
        if "list" in s:
            return [dec(c) for c in s["list"]]
        if "tuple" in s:
            return tuple(dec(c) for c in s["tuple"])
        return {k: dec(c) for k, c in s["items"]}

    return dec(structure)


def structure_leaf_indices(structure: Any) -> list[int]:
    """The leaf indices a structure refers to, in order; ValueError if malformed."""
    indices: list[int] = []
    stack = [structure]
    while stack:
        s = stack.pop()
        if isinstance(s, bool) or not isinstance(s, (int, dict)):
            raise ValueError(f"structure node {s!r:.80} is neither a leaf index nor an object")
        if isinstance(s, int):
            indices.append(s)
            continue
        if "none" in s and len(s) == 1:
            continue
        if len(s) == 1 and ("list" in s or "tuple" in s) and isinstance(next(iter(s.values())), list):
            stack.extend(reversed(next(iter(s.values()))))
            continue
        pairs = s.get("dict") if len(s) == 1 else s.get("items") if set(s) == {"node", "items"} else None
        if not isinstance(pairs, list):
            raise ValueError(f"unknown structure node {s!r:.80}")
        for pair in reversed(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int))):
                raise ValueError(f"bad structure entry {pair!r:.80}")
            stack.append(pair[1])
    return indices


def missing_leaves_error(missing: list[str], saved: list[str], where: str) -> LeafNotFoundError:
    """An error listing every missing leaf name with the closest saved names."""
    lines = []
    renamed = False
    for name in missing:
        # Saved names that hold this one as whole path components ("model/kernel/.ATTRIBUTES/
        # VARIABLE_VALUE" for "kernel", as TF2 names them) come first: a names= mapping finds them.
        within = [s for s in saved if f"/{name}/" in f"/{s}/"][:3]
        close = within + [
            c for c in difflib.get_close_matches(name, saved, n=3, cutoff=0.5) if c not in within
        ]
        renamed = renamed or bool(within)
        hint = f" (closest saved: {', '.join(repr(c) for c in close[:3])})" if close else ""
        lines.append(f"  {name!r}{hint}")
    count = "1 leaf is" if len(missing) == 1 else f"{len(missing)} leaves are"
    fix = (
        "\nwhere the checkpoint names leaves otherwise, pass restore(..., names=) to map each target "
        "path to its stored name"
        if renamed
        else ""
    )
    return LeafNotFoundError(f"{count} not in checkpoint {where!r}:\n" + "\n".join(lines) + fix)
