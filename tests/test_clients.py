"""Real training states from real clients: optax, flax linen and nnx, equinox, typed PRNG keys.

Each case trains a few steps on a 2x4 mesh, saves asynchronously, keeps training
with donated buffers while the save commits, then restores from abstract targets
(jax.eval_shape, nnx.eval_shape under jax.set_mesh) onto a 4x2 mesh and onto 4
devices. The restored state must equal the saved one bit for bit, and the next
training step from it must give the loss the uninterrupted run gave.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave

X = np.linspace(-1, 1, 8 * 16, dtype=np.float32).reshape(8, 16)
Y = np.cos(X[:, :4] * 3)


def _meshes() -> dict[str, Mesh]:
    devices = np.array(jax.devices())
    return {
        "4x2": Mesh(devices.reshape(4, 2), ("data", "model")),
        "4 devices": Mesh(devices[:4].reshape(2, 2), ("data", "model")),
    }


def _onto(mesh: Mesh, abstract: Any) -> Any:
    """Abstract leaves laid out on another mesh with the same partition specs."""

    def move(leaf: Any) -> Any:
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        spec = leaf.sharding.spec if isinstance(leaf.sharding, NamedSharding) else P()
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(move, abstract)


def _host(tree: Any) -> list[np.ndarray]:
    """Every leaf's values on the host (typed keys as their key data), in order."""

    def value(leaf: Any) -> np.ndarray:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        return np.asarray(leaf)

    return [value(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def _assert_bit_exact(restored: Any, saved: list[np.ndarray], reference: Any) -> None:
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(reference)
    values = _host(restored)
    assert len(values) == len(saved)
    for got, want in zip(values, saved):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def _train_save_restore(
    tmp_path: Any,
    state: Any,
    step: Callable[[Any], tuple[Any, Any]],
    abstract_on: Callable[[Mesh], Any],
    under_mesh: bool = False,
) -> None:
    """The scenario every client goes through; step(state) -> (state, loss) donates state.

    under_mesh: restore inside `with jax.set_mesh(mesh)`, as code that builds its
    targets with nnx.eval_shape under a mesh does.
    """
    for _ in range(2):
        state, _ = step(state)
    saved = _host(state)
    structure = jax.tree_util.tree_structure(state)
    saver = shardsave.Saver(max_to_keep=2)
    path = saver.save(state, str(tmp_path / "ckpt" / "model"), global_step=2)
    state, expected_loss = step(state)  # donates the saved buffers while the save commits
    state, _ = step(state)
    saver.wait_until_finished()
    assert shardsave.latest_checkpoint(str(tmp_path / "ckpt")) == path
    for name, mesh in _meshes().items():
        target = abstract_on(mesh)
        if under_mesh:
            with jax.set_mesh(mesh):
                restored = saver.restore(path, target)
        else:
            restored = saver.restore(path, target)
        _assert_bit_exact(restored, saved, target)
        assert jax.tree_util.tree_structure(restored) == structure, name
        _, loss = step(restored)
        np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6, err_msg=name)
    saver.close()


# ---------------------------------------------------------------- optax


def _mlp_params(mesh: Mesh) -> dict[str, Any]:
    key = jax.random.key(0)
    k1, k2 = jax.random.split(key)
    params = {
        "dense1": {"kernel": jax.random.normal(k1, (16, 32)) * 0.3, "bias": jnp.zeros(32)},
        "dense2": {"kernel": jax.random.normal(k2, (32, 4)) * 0.3, "bias": jnp.zeros(4)},
    }
    specs = {
        "dense1": {"kernel": P(None, "model"), "bias": P("model")},
        "dense2": {"kernel": P(), "bias": P()},
    }
    return jax.tree_util.tree_map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
        params,
        specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def _mlp_loss(params: Any, x: Any, y: Any) -> Any:
    h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    return jnp.mean((h @ params["dense2"]["kernel"] + params["dense2"]["bias"] - y) ** 2)


OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-3),
    "sgd-momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "lion": lambda: optax.lion(1e-3),
    "adafactor": lambda: optax.adafactor(1e-2),
    "chain-masked": lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.masked(
            optax.add_decayed_weights(1e-3), lambda p: jax.tree_util.tree_map(lambda x: x.ndim > 1, p)
        ),
        optax.adam(1e-2),
    ),
    "multi-transform": lambda: optax.multi_transform(
        {"fast": optax.adam(1e-2), "frozen": optax.set_to_zero()},
        {"dense1": "fast", "dense2": "frozen"},
    ),
    "multi-steps": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
    "inject-hyperparams": lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=1e-2, weight_decay=1e-3
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optax_states(tmp_path, mesh24, name):
    tx = OPTIMIZERS[name]()
    params = _mlp_params(mesh24)
    # A Python-int step, as many training loops keep it: eval_shape asks for int32.
    state = {"params": params, "opt_state": tx.init(params), "step": 0}

    @functools.partial(jax.jit, donate_argnums=0)
    def train(state: Any) -> tuple[Any, Any]:
        loss, grads = jax.value_and_grad(_mlp_loss)(state["params"], X, Y)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }, loss

    def step(state: Any) -> tuple[Any, Any]:
        return train(state)

    # The first jitted step turns the Python int into an int32 array; save a Python int
    # anyway by training once outside the helper and putting it back.
    state, _ = step(state)
    state = {**state, "step": int(state["step"])}
    _train_save_restore(tmp_path, state, step, lambda mesh: _onto(mesh, jax.eval_shape(lambda: state)))


# ---------------------------------------------------------------- flax linen


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        return nn.Dense(4)(nn.tanh(nn.Dense(32)(x)))


def test_flax_linen_train_state(tmp_path, mesh24):
    model = _LinenMLP()
    params = model.init(jax.random.key(0), X)
    params = jax.device_put(params, NamedSharding(mesh24, P()))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adamw(1e-2))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: Any) -> tuple[Any, Any]:
        def loss_fn(p: Any) -> Any:
            return jnp.mean((state.apply_fn(p, X) - Y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    _train_save_restore(tmp_path, state, step, lambda mesh: _onto(mesh, jax.eval_shape(lambda: state)))


# ---------------------------------------------------------------- flax nnx


class _NNXModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.dense1 = nnx.Linear(16, 32, kernel_init=nnx.with_partitioning(init, (None, "model")), rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.dense2 = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return self.dense2(self.dropout(nnx.relu(self.norm(self.dense1(x)))))


def _nnx_create() -> tuple[_NNXModel, nnx.Optimizer]:
    model = _NNXModel(nnx.Rngs(params=0, dropout=1))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def test_flax_nnx_model_and_optimizer(tmp_path, mesh24):
    with jax.set_mesh(mesh24):
        model, optimizer = _nnx_create()
    graphdef, state = nnx.split((model, optimizer))
    assert any(
        jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) for leaf in jax.tree_util.tree_leaves(state)
    ), "the dropout's Rngs hold typed keys"

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: Any) -> tuple[Any, Any]:
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model: _NNXModel) -> Any:
            return jnp.mean((model(X) - Y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    def abstract_on(mesh: Mesh) -> Any:
        # What a user writes to restore: the abstract state, made under the new mesh.
        with jax.set_mesh(mesh):
            abstract = nnx.state(nnx.eval_shape(_nnx_create))
        leaf = jax.tree_util.tree_leaves(abstract)[0]
        assert isinstance(leaf.sharding.mesh, jax.sharding.AbstractMesh)
        return abstract

    def step_on_target_mesh(state: Any) -> tuple[Any, Any]:
        mesh = next(iter(jax.tree_util.tree_leaves(state))).sharding.mesh
        with jax.set_mesh(mesh):
            return step(state)

    _train_save_restore(tmp_path, state, step_on_target_mesh, abstract_on, under_mesh=True)

    # Outside any mesh an abstract mesh of another size than the devices is an error
    # naming the leaf, not jax's "_device_assignment is not implemented".
    path = shardsave.latest_checkpoint(str(tmp_path / "ckpt"))
    with pytest.raises(shardsave.errors.ShardingMismatchError, match=r"leaf '.*dense1.*' .*abstract mesh"):
        shardsave.Saver().restore(path, abstract_on(_meshes()["4 devices"]))


# ---------------------------------------------------------------- equinox


def test_equinox_model(tmp_path, mesh24):
    model = eqx.nn.MLP(16, 4, width_size=32, depth=2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    params = jax.device_put(params, NamedSharding(mesh24, P()))
    tx = optax.adam(1e-2)
    state = {"params": params, "opt_state": tx.init(params)}

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: Any) -> tuple[Any, Any]:
        def loss_fn(params: Any) -> Any:
            model = eqx.combine(params, static)
            return jnp.mean((jax.vmap(model)(X) - Y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": eqx.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    _train_save_restore(tmp_path, state, step, lambda mesh: _onto(mesh, jax.eval_shape(lambda: state)))


# ---------------------------------------------------------------- typed PRNG keys


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_sharded_typed_keys(tmp_path, mesh24, impl):
    keys = jax.random.split(jax.random.key(7, impl=impl), 8)
    state = {
        "keys": jax.device_put(keys, NamedSharding(mesh24, P("data"))),
        "one": jax.random.key(1, impl=impl),
    }

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: Any) -> tuple[Any, Any]:
        split = jax.vmap(jax.random.split)(state["keys"])
        draws = jax.vmap(lambda k: jax.random.normal(k, (3,)))(split[:, 1])
        return {"keys": split[:, 0], "one": jax.random.fold_in(state["one"], 1)}, jnp.sum(draws)

    _train_save_restore(tmp_path, state, step, lambda mesh: _onto(mesh, jax.eval_shape(lambda: state)))
    # Without a target, keys come back as typed keys of their implementation.
    path = shardsave.latest_checkpoint(str(tmp_path / "ckpt"))
    restored = shardsave.Saver().restore(path)
    assert restored["keys"].dtype == keys.dtype and restored["keys"].sharding.spec == P("data")
    assert str(jax.random.key_impl(restored["one"])) == impl
