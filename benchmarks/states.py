"""Training states of a small decoder-only transformer, as optax.adamw leaves them.

A compressor's gain depends on what it is given: random float32 (as trained
weights look to zstd) gains nothing, while at step 0 adamw's moments are all
zeros, two thirds of the state's bytes. After some steps the moments are real
numbers again, and what remains is the redundancy of float32 in a trained
state. The model is small so that its 100 real optax steps (a next-token loss
on a sequence rule the model can learn) take seconds on two cores; the trained
state is kept in a cache file so that every case of a run restores the same
state without training again.

    states.adamw_training_state("adamw-100", mesh, cache_dir)   # trained 100 steps
    states.adamw_training_state("adamw-0", mesh, cache_dir)     # optimizer.init: zero moments
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# 8 layers of width 256 and a vocabulary of 8192: 10.5 M float32 parameters, and
# the state (parameters, mu, nu) 120 MiB in 203 leaves.
MODEL = {"layers": 8, "width": 256, "vocab": 8192, "heads": 4, "batch": 4, "seq": 64, "lr": 1e-3}


def steps_of(state: str) -> int:
    """The number of training steps a state's name asks for ('adamw-100': 100)."""
    prefix, _, steps = state.partition("-")
    if prefix != "adamw" or not steps.isdigit():
        raise ValueError(f"a training state is named adamw-STEPS (adamw-0, adamw-100), found {state!r}")
    return int(steps)


def init_params(model: dict[str, Any], key: jax.Array) -> dict[str, jax.Array]:
    width, vocab = model["width"], model["vocab"]
    shapes: dict[str, tuple[int, ...]] = {"embed": (vocab, width), "final_norm": (width,)}
    for i in range(model["layers"]):
        layer: tuple[tuple[str, tuple[int, ...]], ...] = (
            ("attn_norm", (width,)),
            ("q", (width, width)),
            ("k", (width, width)),
            ("v", (width, width)),
            ("o", (width, width)),
            ("mlp_norm", (width,)),
            ("mlp_in", (width, 4 * width)),
            ("mlp_out", (4 * width, width)),
        )
        for name, shape in layer:
            shapes[f"layer{i:02d}/{name}"] = shape
    shapes["unembed"] = (width, vocab)
    params = {}
    for i, (name, dims) in enumerate(shapes.items()):
        if name.endswith("norm"):
            params[name] = jnp.ones(dims, jnp.float32)
        else:
            scale = 1.0 / np.sqrt(dims[0])
            params[name] = jax.random.normal(jax.random.fold_in(key, i), dims, jnp.float32) * scale
    return params


def loss(params: dict[str, jax.Array], tokens: jax.Array, model: dict[str, Any]) -> jax.Array:
    """Next-token cross-entropy of a pre-norm decoder (causal attention, a 4x MLP)."""

    def norm(x: jax.Array, scale: jax.Array) -> jax.Array:
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale

    batch, seq = tokens.shape
    heads = model["heads"]
    x = params["embed"][tokens[:, :-1]]
    mask = jnp.tril(jnp.ones((seq - 1, seq - 1), bool))
    for i in range(model["layers"]):
        p = {k.split("/")[1]: v for k, v in params.items() if k.startswith(f"layer{i:02d}/")}
        h = norm(x, p["attn_norm"])

        def split(y: jax.Array) -> jax.Array:
            return y.reshape(batch, seq - 1, heads, -1)

        q, k, v = split(h @ p["q"]), split(h @ p["k"]), split(h @ p["v"])
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        attention = jax.nn.softmax(jnp.where(mask, scores, -1e9), -1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", attention, v).reshape(x.shape) @ p["o"]
        x = x + jax.nn.gelu(norm(x, p["mlp_norm"]) @ p["mlp_in"]) @ p["mlp_out"]
    logits = norm(x, params["final_norm"]) @ params["unembed"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))


def batch_of(step: int, model: dict[str, Any]) -> np.ndarray:
    """Sequences that follow a rule (each token 5 times the last plus 1, mod vocab),
    from random starts: a loss the model can lower, so the moments see real gradients."""
    tokens = np.empty((model["batch"], model["seq"]), np.int32)
    tokens[:, 0] = np.random.default_rng(step).integers(0, model["vocab"], model["batch"])
    for t in range(1, model["seq"]):
        tokens[:, t] = (tokens[:, t - 1] * 5 + 1) % model["vocab"]
    return tokens


def train(steps: int, model: dict[str, Any]) -> tuple[Any, list[float]]:
    """{"params", "opt_state"} after `steps` optax.adamw updates, and the losses on the way."""
    import optax

    optimizer = optax.adamw(model["lr"])
    params = init_params(model, jax.random.PRNGKey(0))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params: Any, opt_state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
        value, grads = jax.value_and_grad(partial(loss, model=model))(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    for i in range(steps):
        params, opt_state, value = step(params, opt_state, batch_of(i, model))
        losses.append(float(value))
    return {"params": params, "opt_state": opt_state}, losses


def _sharding(mesh: Mesh, x: Any) -> NamedSharding:
    # FSDP: the first axis split over every device where it divides, else replicated.
    spec = P(tuple(mesh.axis_names)) if x.ndim >= 1 and x.shape[0] % mesh.size == 0 else P()
    return NamedSharding(mesh, spec)


def adamw_training_state(state: str, mesh: Mesh, cache_dir: Path, model: dict[str, Any] = MODEL) -> Any:
    """The training state named `state` (adamw-STEPS), FSDP-sharded over the mesh.

    Trained once and kept in cache_dir as an .npz of the leaves (no pickles), keyed
    by the model's settings and code, the steps and the jax and optax versions.
    """
    import optax

    steps = steps_of(state)
    shaped = jax.eval_shape(lambda: train(0, model)[0])
    treedef = jax.tree.structure(shaped)
    count = len(jax.tree.leaves(shaped))
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # this model's code
    ident = json.dumps([model, steps, source, jax.__version__, optax.__version__], sort_keys=True)
    cache = Path(cache_dir) / f"adamw-{steps}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            leaves = [stored[f"leaf{i:05d}"] for i in range(count)]
    else:
        began = time.perf_counter()
        trained, losses = train(steps, model)
        if steps:
            print(
                f"  trained {state}: loss {losses[0]:.2f} -> {losses[-1]:.2f} "
                f"in {time.perf_counter() - began:.1f} s",
                file=sys.stderr,
            )
        leaves = [np.asarray(x) for x in jax.tree.leaves(trained)]
        cache.parent.mkdir(parents=True, exist_ok=True)
        written = cache.with_suffix(".partial.npz")
        np.savez(written, **{f"leaf{i:05d}": x for i, x in enumerate(leaves)})
        written.rename(cache)  # whole or absent, for the next case's process
    placed = [jax.device_put(x, _sharding(mesh, x)) for x in leaves]
    return jax.block_until_ready(jax.tree.unflatten(treedef, placed))
