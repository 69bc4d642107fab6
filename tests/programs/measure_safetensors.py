"""Host memory of a capped load_safetensors, measured in a fresh process.

    python tests/programs/measure_safetensors.py DIRECTORY CAP_MIB

The safetensors package writes a sharded set (two files and the index.json a
sharded Hugging Face model has): six 64 MiB layers and one 128 MiB tensor larger
than the cap. shardsave restores it onto a 4x2 mesh under max_host_bytes while
RSS is sampled (measure_restore.measure). Prints {"transient", ..., "ok"} as JSON.
"""

from __future__ import annotations

import gc
import json
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from measure_restore import measure
from safetensors.numpy import save_file

import shardsave

MIB = 1 << 20


def main() -> None:
    directory, cap = sys.argv[1], int(sys.argv[2]) * MIB
    rows = 1024
    layers = {
        f"model.layers.{i}.weight": np.full((rows, 64 * MIB // 4 // rows), i, np.float32) for i in range(6)
    }
    big = {"model.embed.weight": np.arange(128 * MIB // 4, dtype=np.float32).reshape(rows, -1)}
    files = {
        "model-00001-of-00002.safetensors": {**big, **dict(list(layers.items())[:2])},
        "model-00002-of-00002.safetensors": dict(list(layers.items())[2:]),
    }
    weight_map = {}
    for name, tensors in files.items():
        save_file(tensors, f"{directory}/{name}")
        weight_map.update(dict.fromkeys(tensors, name))
    with open(f"{directory}/model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": 512 * MIB}, "weight_map": weight_map}, f)
    expected = {k: float(v[-1, -1]) for tensors in files.values() for k, v in tensors.items()}
    shapes = {k: v.shape for tensors in files.values() for k, v in tensors.items()}
    del files, layers, big
    gc.collect()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("d", "m"))
    target = {
        "model": {
            "embed": {
                "weight": jax.ShapeDtypeStruct(
                    shapes["model.embed.weight"], np.float32, sharding=NamedSharding(mesh, P("d", "m"))
                )
            },
            "layers": [
                {
                    "weight": jax.ShapeDtypeStruct(
                        shapes[f"model.layers.{i}.weight"],
                        np.float32,
                        sharding=NamedSharding(mesh, P("m", "d")),
                    )
                }
                for i in range(6)
            ],
        }
    }
    restored, measured = measure(lambda: shardsave.load_safetensors(directory, target, max_host_bytes=cap))
    values = {"model.embed.weight": restored["model"]["embed"]["weight"]}
    values.update(
        {f"model.layers.{i}.weight": layer["weight"] for i, layer in enumerate(restored["model"]["layers"])}
    )
    ok = all(float(values[k][-1, -1]) == v for k, v in expected.items())
    print(json.dumps({**measured, "ok": ok}))


if __name__ == "__main__":
    main()
