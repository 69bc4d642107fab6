"""Save then restore gives back exactly what was saved: every dtype, shape, sharding and tree."""

from __future__ import annotations

import collections
import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import shardsave
import shardsave.index

DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.uint8,
    np.uint16,
    np.uint32,
    np.float16,
    np.float32,
    jnp.bfloat16,
    np.complex64,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
    ml_dtypes.int4,
]


def _values(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal(shape) * 8
    if np.dtype(dtype) == np.bool_:
        return raw > 0
    if np.issubdtype(np.dtype(dtype), np.complexfloating):
        return (raw + 1j * raw[::-1]).astype(dtype)
    if np.dtype(dtype).kind in "iu" or np.dtype(dtype) == ml_dtypes.int4:
        info = ml_dtypes.iinfo(dtype)
        return np.clip(raw, info.min, info.max).astype(dtype)
    return raw.astype(dtype)


def assert_tree_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array)), (x, y)
        xa, ya = np.asarray(x), np.asarray(y)
        assert xa.dtype == ya.dtype and xa.shape == ya.shape
        np.testing.assert_array_equal(xa.reshape(-1).view(np.uint8), ya.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_round_trips_bit_exact(tmp_path, mesh24, dtype):
    value = _values((8, 4), dtype)
    tree = {
        "sharded": jax.device_put(value, NamedSharding(mesh24, P("data", "model"))),
        "numpy": value,
        "scalar": jax.device_put(value[0, 0]),
    }
    saver = shardsave.Saver(async_save=False)
    path = saver.save(tree, str(tmp_path / "m"))
    assert_tree_equal(saver.restore(path), tree)


def test_float64_and_int64_numpy_leaves_keep_their_width(tmp_path):
    tree = {"f": np.linspace(0, 1, 7), "i": np.arange(5, dtype=np.int64) << 40, "u": np.uint64(2**63 + 5)}
    saver = shardsave.Saver(async_save=False)
    assert_tree_equal(saver.restore(saver.save(tree, str(tmp_path / "m"))), tree)


def test_zero_d_zero_size_scalars_and_containers(tmp_path, mesh24):
    Point = collections.namedtuple("Point", "x y")
    tree = {
        "empty": jnp.zeros((0, 4)),
        "empty_sharded": jax.device_put(jnp.zeros((8, 0)), NamedSharding(mesh24, P("data"))),
        "zero_d": jnp.float32(3.5),
        "python": [1, 2.5, True, 3 + 4j],
        "numpy_scalar": np.int16(-3),
        "tuple": (np.arange(3), None, {"deep": [jnp.ones(2)]}),
        "point": Point(np.float32(1), np.zeros(2)),
    }
    saver = shardsave.Saver(async_save=False)
    path = saver.save(tree, str(tmp_path / "m"))
    restored = saver.restore(path, tree)
    assert_tree_equal(restored, tree)
    # Without a target, containers come back as themselves and unknown nodes as dicts.
    saved = saver.restore(path)
    assert saved["python"] == [1, 2.5, True, 3 + 4j]
    assert isinstance(saved["tuple"], tuple) and saved["tuple"][1] is None
    assert set(saved["point"]) == {"x", "y"}
    assert isinstance(saved["numpy_scalar"], np.int16) and saved["numpy_scalar"] == -3


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: tuple


def test_flax_style_train_state(tmp_path, mesh24):
    def shard(x, spec):
        return jax.device_put(x, NamedSharding(mesh24, spec))

    params = {
        "dense": {"kernel": shard(jnp.ones((16, 8)), P("data", "model")), "bias": shard(jnp.zeros(8), P())},
        "embed": shard(jnp.arange(32.0).reshape(8, 4), P(None, "model")),
    }
    mu = jax.tree_util.tree_map(lambda x: x * 0.5, params)
    state = TrainState(step=jnp.int32(10), params=params, opt_state=(mu, {"count": jnp.int32(3)}))
    saver = shardsave.Saver(async_save=False)
    path = saver.save(state, str(tmp_path / "s"), global_step=10)
    assert path.endswith("s-10")
    assert_tree_equal(saver.restore(path, state), state)
    structure = shardsave.load_structure(path)
    assert structure["params"]["dense"]["kernel"].shape == (16, 8)
    assert structure["params"]["dense"]["kernel"].sharding == params["dense"]["kernel"].sharding


def test_restored_arrays_keep_target_shardings(tmp_path, mesh24):
    specs = [P("data", "model"), P("model"), P(None, "data"), P(), P(("data", "model"))]
    tree = {
        f"a{i}": jax.device_put(_values((8, 8), np.float32, i), NamedSharding(mesh24, s))
        for i, s in enumerate(specs)
    }
    tree["single"] = jax.device_put(_values((3, 5), np.float32), jax.devices()[5])
    saver = shardsave.Saver(async_save=False)
    path = saver.save(tree, str(tmp_path / "m"))
    restored = saver.restore(path, tree)
    for k, v in tree.items():
        assert restored[k].sharding == v.sharding
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(v))
    assert restored["single"].devices() == {jax.devices()[5]}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from([np.float32, np.int8, jnp.bfloat16, np.uint16]),
    mesh_shape=st.sampled_from([(2, 4), (4, 2), (8, 1), (1, 8)]),
    spec_choice=st.lists(st.sampled_from([None, "x", "y"]), min_size=0, max_size=3),
    sharded=st.booleans(),
)
def test_property_round_trip(tmp_path_factory, shape, dtype, mesh_shape, spec_choice, sharded):
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(mesh_shape), ("x", "y"))
    spec = []
    for axis, name in zip(shape, spec_choice):
        # jax needs a sharded dimension to divide evenly; use the axis only where it does.
        size = mesh.shape[name] if name else 1
        spec.append(name if name and axis % size == 0 and name not in spec else None)
    sharding = NamedSharding(mesh, P(*spec))
    value = _values(shape, dtype)
    tree = {"v": jax.device_put(value, sharding), "h": value}
    saver = shardsave.Saver(async_save=False, sharded=sharded)
    path = saver.save(tree, str(tmp_path_factory.mktemp("p") / "m"))
    assert_tree_equal(saver.restore(path, tree), tree)
    # And onto a different mesh, through an abstract target.
    other = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:2]), ("z",)), P())
    target = {"v": jax.ShapeDtypeStruct(shape, dtype, sharding=other)}
    np.testing.assert_array_equal(np.asarray(saver.restore(path, target)["v"]), value)


def test_memory_and_file_urls(tmp_path):
    tree = {"a": np.arange(10.0)}
    saver = shardsave.Saver(async_save=False)
    for prefix in ("memory://roundtrip/m", f"file://{tmp_path}/m"):
        path = saver.save(tree, prefix, global_step=1)
        assert_tree_equal(saver.restore(path), tree)
        assert shardsave.latest_checkpoint(prefix.rsplit("/", 1)[0]) == path
    assert os.path.exists(tmp_path / "m-1.index")


def test_sharding_round_trips_through_the_index(mesh24):
    for s in [
        NamedSharding(mesh24, P("data", ("model",))),
        NamedSharding(mesh24, P(None, ("data", "model"))),
        SingleDeviceSharding(jax.devices()[3]),
    ]:
        desc = shardsave.index.encode_sharding(s)
        assert shardsave.index.decode_sharding(desc, {d.id: d for d in jax.devices()}) == s
