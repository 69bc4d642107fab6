"""`shardsave demo`: train, get preempted, crash, resume onto other meshes, compare.

The parent process runs four children, each with its own number of simulated CPU
devices (XLA reads the device count once, at start):

  reference  trains every step on the first mesh without saving: the losses to match;
  train      trains on the first mesh with the Saver's policies (an asynchronous save
             every few steps, save_on_preemption) and receives SIGTERM, as a scheduler
             preempts a job: it saves the agreed step and exits 0;
  resume     resumes on a different device count and mesh from that checkpoint, and is
             killed with SIGKILL right after a periodic save has started (a crash);
  finish     resumes on the first mesh from the latest committed checkpoint and trains
             to the end.

The resumed losses must equal the reference's from each restored step on. The two
meshes reduce in different orders, so "equal" allows a relative difference of
`tolerance` (configs/demo.yaml); the report prints the largest one seen, and how
many trained steps each interruption lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shardsave.formats.shardsave import step_of
from shardsave.lifecycle.state import latest_checkpoint
from shardsave.reader import CheckpointReader
from shardsave.storage import open_store

DEFAULT_CONFIG = Path(__file__).parent / "demo.yaml"  # package data: found in a wheel too


def load_config(path: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Reads the demo's settings (default: the packaged demo.yaml); flags override them."""
    import yaml

    candidate = Path(path) if path else DEFAULT_CONFIG
    if not candidate.is_file():
        raise FileNotFoundError(f"demo settings not found: {candidate}")
    config = yaml.safe_load(candidate.read_text())
    config.update(overrides)
    config["config_path"] = str(candidate)
    return config


def make_run_folder(parent: str) -> str:
    """Creates parent/run-N (the first N free) and returns it.

    The demo writes only inside the folder it creates, so it never deletes or
    overwrites anything a user keeps in parent.
    """
    os.makedirs(parent, exist_ok=True)
    for n in range(1, 100_000):
        run = os.path.join(parent, f"run-{n}")
        try:
            os.mkdir(run)  # exclusive: a folder that exists, ours or not, is never reused
        except FileExistsError:
            continue
        return run
    raise FileExistsError(f"no free run-N folder name in {parent}")


def _worker(role: str, config: dict[str, Any]) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import shardsave

    layout = config["resume"] if role == "resume" else config["first"]
    mesh = Mesh(np.array(jax.devices()).reshape(layout["mesh"]), ("data", "model"))
    width, layers, batch = config["width"] * config["size"], config["layers"], config["batch"]
    lr = config["learning_rate"]

    def sharding(spec: P) -> NamedSharding:
        return NamedSharding(mesh, spec)

    # Alternate column- and row-sharded kernels, as tensor parallelism does; biases replicated.
    param_specs = {
        f"layer{i}": {"kernel": P(None, "model") if i % 2 == 0 else P("model", None), "bias": P()}
        for i in range(layers)
    }
    state_specs = {
        "params": param_specs,
        "mu": param_specs,
        "nu": param_specs,
        "step": P(),
    }
    state_shardings = jax.tree_util.tree_map(sharding, state_specs, is_leaf=lambda x: isinstance(x, P))

    def init() -> dict[str, Any]:
        key = jax.random.PRNGKey(config["seed"])
        params = {}
        for i in range(layers):
            k = jax.random.fold_in(key, i)
            params[f"layer{i}"] = {
                "kernel": jax.random.normal(k, (width, width)) / np.sqrt(width),
                "bias": jnp.zeros(width),
            }
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return {"params": params, "mu": zeros, "nu": zeros, "step": jnp.int32(0)}

    teacher = jax.random.normal(jax.random.PRNGKey(config["seed"] + 1), (width, width)) / np.sqrt(width)

    def batch_for(step: int) -> jax.Array:
        x = jax.random.normal(
            jax.random.fold_in(jax.random.PRNGKey(config["seed"] + 2), step), (batch, width)
        )
        return jax.device_put(x, sharding(P("data", None)))

    def loss_fn(params: dict[str, Any], x: jax.Array) -> jax.Array:
        h = x
        for i in range(layers):
            layer = params[f"layer{i}"]
            h = h @ layer["kernel"] + layer["bias"]
            h = jnp.tanh(h) if i < layers - 1 else h
        return jnp.mean((h - jnp.tanh(x @ teacher)) ** 2)

    def train_step(state: dict[str, Any], x: jax.Array) -> tuple[dict[str, Any], jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], x)
        t = state["step"] + 1
        mu = jax.tree_util.tree_map(lambda m, g: 0.9 * m + 0.1 * g, state["mu"], grads)
        nu = jax.tree_util.tree_map(lambda v, g: 0.999 * v + 0.001 * g * g, state["nu"], grads)
        bias1, bias2 = 1 - 0.9**t, 1 - 0.999**t
        params = jax.tree_util.tree_map(
            lambda p, m, v: p - lr * (m / bias1) / (jnp.sqrt(v / bias2) + 1e-8), state["params"], mu, nu
        )
        return {"params": params, "mu": mu, "nu": nu, "step": t}, loss

    step_fn = jax.jit(train_step, out_shardings=(state_shardings, sharding(P())), donate_argnums=0)

    def emit(**record: Any) -> None:
        print(json.dumps(record), flush=True)

    saver = shardsave.Saver(
        max_to_keep=config["max_to_keep"],
        save_interval_steps=config["save_every"],
        save_on_preemption=role != "reference",
    )
    prefix = os.path.join(config["directory"], "model")
    if role in ("resume", "finish"):
        latest = shardsave.latest_checkpoint(config["directory"])
        if latest is None:
            raise SystemExit("no committed checkpoint to resume from")
        target = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(init),
            state_shardings,
        )
        began = time.perf_counter()
        state = saver.restore(latest, target)
        jax.block_until_ready(state)
        emit(event="restored", path=latest, step=int(state["step"]), seconds=time.perf_counter() - began)
    else:
        state = jax.jit(init, out_shardings=state_shardings)()

    for step in range(int(state["step"]) + 1, config["steps"] + 1):
        began = time.perf_counter()
        state, loss = step_fn(state, batch_for(step))
        loss_value = float(loss)  # waits for the step
        emit(step=step, loss=loss_value, seconds=time.perf_counter() - began)
        if role != "reference" and saver.should_save(step):  # periodic, or the preemption step
            previous = saver.last_save
            saver.save(state, prefix, global_step=step)  # waits for the previous save first
            info = saver.last_save
            assert info is not None
            emit(
                event="save",
                step=step,
                blocking=info.blocking_seconds,
                nbytes=info.nbytes,
                previous_commit=previous.commit_seconds if previous else None,
            )
        if saver.reached_preemption(step):
            saver.wait_until_finished()
            emit(event="preempted", step=step)
            break
    saver.wait_until_finished()
    saver.close()


def _spawn(role: str, config: dict[str, Any], devices: int) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "shardsave.demo", role, json.dumps(config)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _records(
    proc: subprocess.Popen[str], deadline: float, signal_after_step: int | None = None, kill: bool = False
) -> list[dict]:
    """The child's JSON lines until it exits; after step signal_after_step it gets SIGTERM
    (a preemption notice: it saves and exits) or, with kill, SIGKILL (a crash)."""
    records = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("the demo ran past its time limit (timeout_s in the config)")
        record = json.loads(line)
        records.append(record)
        if signal_after_step is not None and record.get("step") == signal_after_step and "loss" in record:
            if kill:
                proc.send_signal(signal.SIGKILL)  # a crash: no cleanup, a save may be in flight
                break
            proc.send_signal(signal.SIGTERM)
    proc.wait()
    return records


def run_demo(config: dict[str, Any], out: Any) -> int:
    """Runs the demo; prints a report to out; returns 0 when the resumed runs match."""
    if not 0 < config["preempt_at"] < config["crash_at"] < config["steps"]:
        raise ValueError(
            f"the demo needs 0 < preempt_at < crash_at < steps, found preempt_at={config['preempt_at']}, "
            f"crash_at={config['crash_at']}, steps={config['steps']}"
        )
    run = make_run_folder(config["directory"])
    directory = config["directory"] = os.path.join(run, "ckpt")
    first, resume = config["first"], config["resume"]
    n_first, n_resume = first["mesh"][0] * first["mesh"][1], resume["mesh"][0] * resume["mesh"][1]
    deadline = time.monotonic() + config["timeout_s"]
    print(
        f"shardsave demo: {config['layers']} layers of width {config['width'] * config['size']}, "
        f"{config['steps']} steps, async save every {config['save_every']} (max_to_keep={config['max_to_keep']}), "
        f"SIGTERM after step {config['preempt_at']}, SIGKILL after step {config['crash_at']}",
        file=out,
    )
    print(f"  checkpoints in {directory}", file=out)

    began = time.perf_counter()
    reference = {
        r["step"]: r["loss"] for r in _records(_spawn("reference", config, n_first), deadline) if "loss" in r
    }
    print(f"  reference run: {len(reference)} steps on {n_first} devices, mesh {first['mesh']}", file=out)

    train_proc = _spawn("train", config, n_first)
    train = _records(train_proc, deadline, signal_after_step=config["preempt_at"])
    preempted = next((r for r in train if r.get("event") == "preempted"), None)
    if train_proc.returncode != 0 or preempted is None:
        print(f"  the preempted run did not save and exit 0 (exit status {train_proc.returncode})", file=out)
        return 1
    print(
        f"  training run: SIGTERM after step {config['preempt_at']}; saved step {preempted['step']} "
        f"and exited {train_proc.returncode}",
        file=out,
    )

    runs: dict[str, list[dict]] = {}
    for role, layout, n in (("resume", resume, n_resume), ("finish", first, n_first)):
        proc = _spawn(role, config, n)
        runs[role] = _records(
            proc, deadline, signal_after_step=config["crash_at"] if role == "resume" else None, kill=True
        )
        if role == "finish" and proc.returncode != 0:
            print(f"  {role} failed with exit status {proc.returncode}", file=out)
            return 1
        restored = next((r for r in runs[role] if r.get("event") == "restored"), None)
        trained = [r["step"] for r in runs[role] if "loss" in r]
        if restored is None or not trained:
            print(f"  {role} run restored nothing or trained no step", file=out)
            return 1
        ending = "killed with SIGKILL after step" if role == "resume" else "trained to step"
        print(
            f"  resumed run: restored {os.path.basename(restored['path'])} (step {restored['step']}) onto {n} "
            f"devices, mesh {layout['mesh']}, {ending} {trained[-1]}",
            file=out,
        )

    def restored_step(role: str) -> int:
        return int(next(r for r in runs[role] if r.get("event") == "restored")["step"])

    def losses(records: list[dict]) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    # Losses of the resumed runs against the uninterrupted one, from each restored step on.
    after = {**losses(runs["resume"]), **losses(runs["finish"])}
    worst = max(abs(after[s] - reference[s]) / max(abs(reference[s]), 1e-30) for s in after)
    match = (
        worst <= config["tolerance"]
        and set(losses(runs["finish"])) == set(range(restored_step("finish") + 1, config["steps"] + 1))
        and restored_step("resume") == preempted["step"]
    )
    last_trained = {
        "train": max(r["step"] for r in train if "loss" in r),
        "resume": max(r["step"] for r in runs["resume"] if "loss" in r),
    }

    latest = latest_checkpoint(directory)
    size = CheckpointReader(latest).index.nbytes if latest else 0
    steps = [r for records in (train, runs["resume"], runs["finish"]) for r in records if "loss" in r]
    step_time = sorted(r["seconds"] for r in steps)[len(steps) // 2]
    saves = [
        r for records in (train, runs["resume"], runs["finish"]) for r in records if r.get("event") == "save"
    ]
    blocking = [s["blocking"] for s in saves]
    commits = [s["previous_commit"] for s in saves if s["previous_commit"] is not None]
    restores = [next(r for r in runs[role] if r.get("event") == "restored")["seconds"] for role in runs]
    kept = [k[: -len(".index")] for k in open_store(directory).list() if k.endswith(".index")]

    def lost(role: str, resumed_by: str) -> str:
        n = last_trained[role] - restored_step(resumed_by)
        return f"{n} step{'' if n == 1 else 's'} lost (trained to {last_trained[role]}, resumed from {restored_step(resumed_by)})"

    print("", file=out)
    print("report", file=out)
    rows = [
        ("steps", f"{config['steps']}"),
        ("preemption (SIGTERM)", lost("train", "resume")),
        ("crash (SIGKILL)", lost("resume", "finish")),
        (
            "checkpoint size",
            f"{size / 2**20:.2f} MiB in {len(CheckpointReader(latest).index.files) if latest else 0} data files",
        ),
        ("training step (median)", f"{step_time * 1e3:.1f} ms"),
        ("save blocking (mean)", f"{sum(blocking) / max(1, len(blocking)) * 1e3:.1f} ms"),
        (
            "background write (mean)",
            f"{sum(commits) / len(commits) * 1e3:.1f} ms"
            if commits
            else "- (no save finished before the next)",
        ),
        ("restore onto new mesh", " and ".join(f"{t * 1e3:.1f} ms" for t in restores)),
        ("checkpoints kept", ", ".join(sorted(kept, key=lambda k: step_of(k) or 0))),
        ("latest", os.path.basename(latest) if latest else "-"),
        (
            "resumed losses",
            f"{'MATCH' if match else 'MISMATCH'} the uninterrupted run (max relative difference {worst:.1e})",
        ),
        ("wall time", f"{time.perf_counter() - began:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}", file=out)
    return 0 if match else 1


if __name__ == "__main__":
    _worker(sys.argv[1], json.loads(sys.argv[2]))
