"""Correctness of shardsave on a real accelerator (run by benchmarks/gpu_check.sh).

Saves GPU-resident state asynchronously, donates (overwrites) the arrays as soon
as save() returns, and checks that the checkpoint holds the values of the moment
of the save; restores onto the GPU, onto the CPU, and under a memory cap; checks
that a flipped byte is caught.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import shardsave
from shardsave.errors import CorruptCheckpointError


def main() -> None:
    gpus = jax.devices()
    assert gpus[0].platform != "cpu", f"no accelerator: {gpus}"
    print("devices:", gpus, "jax", jax.__version__)
    mesh = Mesh(np.array(gpus).reshape(1, -1), ("data", "model"))
    rng = np.random.default_rng(0)
    values = {
        "w": rng.standard_normal((4096, 1024)).astype(np.float32),
        "b": rng.standard_normal((1024,)).astype(jnp.bfloat16),
        "q": rng.integers(-128, 127, (512, 512)).astype(np.int8),
    }
    tree = {
        "w": jax.device_put(values["w"], NamedSharding(mesh, P("data", "model"))),
        "b": jax.device_put(values["b"], NamedSharding(mesh, P())),
        "q": jax.device_put(values["q"], SingleDeviceSharding(gpus[0])),
        "host": np.arange(7),
        "step": 3,
    }
    directory = Path(tempfile.mkdtemp())
    saver = shardsave.Saver(max_to_keep=2)
    path = saver.save(tree, str(directory / "model"), global_step=3)

    @functools.partial(jax.jit, donate_argnums=0)
    def clobber(x: jax.Array) -> jax.Array:
        return x * 0 - 1

    tree["w"] = clobber(tree["w"])  # the donated buffer is reused while the save is in flight
    saver.wait_until_finished()
    restored = saver.restore(path)
    for k in values:
        np.testing.assert_array_equal(np.asarray(restored[k]), values[k])
        assert restored[k].sharding.device_set == set(gpus[:1]) or len(gpus) > 1
    assert restored["step"] == 3 and (restored["host"] == np.arange(7)).all()
    print("async save on the accelerator, donation after save(), restore: ok")

    cpu = jax.devices("cpu")[0]
    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=SingleDeviceSharding(cpu))
        for k, v in values.items()
    }
    on_cpu = shardsave.Saver().restore(path, target)
    for k in values:
        np.testing.assert_array_equal(np.asarray(on_cpu[k]), values[k])
    print("restore of an accelerator checkpoint onto the CPU: ok")

    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P()))
        for k, v in values.items()
    }
    capped = shardsave.Saver().restore(path, target, restore_sequentially=True, max_host_bytes=32 << 20)
    for k in values:
        np.testing.assert_array_equal(np.asarray(capped[k]), values[k])
    print("restore_sequentially with a 32 MiB cap (a 16 MiB leaf streams: batches hold 8 MiB of reads): ok")

    data = sorted(directory.glob("model-3.data-*"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    try:
        shardsave.Saver().restore(path)
    except CorruptCheckpointError as e:
        print("flipped byte detected:", str(e).splitlines()[0][:100])
    else:
        raise AssertionError("a flipped byte was not detected")
    streamed_timing(gpus)
    interop(gpus)
    print("GPU CHECK OK")


def streamed_timing(gpus: list[jax.Device]) -> None:
    """A leaf larger than the cap streams into its device buffer: time it against uncapped."""
    import statistics
    import time

    directory = Path(tempfile.mkdtemp(dir="/dev/shm"))
    sharding = SingleDeviceSharding(gpus[0])
    leaf = jax.device_put(jnp.arange(1 << 28, dtype=jnp.float32), sharding)  # 1 GiB
    saver = shardsave.Saver()
    path = saver.save({"w": leaf}, str(directory / "big"))
    saver.wait_until_finished()
    target = {"w": jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)}
    for label, kwargs in (
        ("uncapped", {}),
        ("capped 64 MiB", {"restore_sequentially": True, "max_host_bytes": 64 << 20}),
        ("capped 256 MiB", {"restore_sequentially": True, "max_host_bytes": 256 << 20}),
    ):
        times = []
        for _ in range(4):
            t = time.perf_counter()
            out = shardsave.Saver().restore(path, target, **kwargs)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t)
            assert bool((out["w"][-3:] == leaf[-3:]).all())
            del out
        print(
            f"restore of one 1 GiB leaf onto the GPU from tmpfs, {label}: "
            f"median {statistics.median(times[1:]):.3f} s [{min(times[1:]):.3f}-{max(times[1:]):.3f}]"
        )
    shutil.rmtree(directory)


def interop(gpus: list[jax.Device]) -> None:
    """A checkpoint TensorFlow wrote, and safetensors, restored onto the accelerator."""
    import json
    import statistics
    import time

    from safetensors.numpy import load_file, save_file

    fixtures = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tf"
    expected = json.loads((fixtures / "expected.json").read_text())["v1"]["variables"]
    sharding = SingleDeviceSharding(gpus[0])
    target = {
        "dense": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32, sharding=sharding)},
        "part": jax.ShapeDtypeStruct((10, 4), jnp.float32, sharding=sharding),
    }
    for capped in ({}, {"restore_sequentially": True, "max_host_bytes": 32 << 20}):
        restored = shardsave.Saver().restore(str(fixtures / "v1" / "model.ckpt-7"), target, **capped)
        for name, got in (("dense/kernel", restored["dense"]["kernel"]), ("part", restored["part"])):
            np.testing.assert_array_equal(np.asarray(got), np.array(expected[name]["values"], np.float32))
    print("a TensorFlow checkpoint restored onto the accelerator (default and capped): ok")

    directory = Path(tempfile.mkdtemp(dir="/dev/shm"))
    rng = np.random.default_rng(0)
    tensors = {f"model.layers.{i}.weight": rng.standard_normal((4096, 4096), np.float32) for i in range(16)}
    save_file(tensors, str(directory / "model.safetensors"))
    del tensors
    abstract = {
        "model": {
            "layers": [
                {"weight": jax.ShapeDtypeStruct((4096, 4096), jnp.float32, sharding=sharding)}
                for _ in range(16)
            ]
        }
    }

    def package() -> Any:
        loaded = load_file(str(directory / "model.safetensors"))
        return {name: jax.device_put(value, sharding) for name, value in loaded.items()}

    runs = {
        "load_safetensors": lambda: shardsave.load_safetensors(directory, abstract),
        "load_safetensors, 64 MiB cap": lambda: shardsave.load_safetensors(
            directory, abstract, max_host_bytes=64 << 20
        ),
        "safetensors load_file + device_put": package,
    }
    for label, fn in runs.items():
        times = []
        for _ in range(4):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t)
        print(
            f"1 GiB of safetensors (16 tensors) onto the GPU from tmpfs, {label}: "
            f"median {statistics.median(times[1:]):.3f} s [{min(times[1:]):.3f}-{max(times[1:]):.3f}]"
        )
    shutil.rmtree(directory)


if __name__ == "__main__":
    main()
