"""A golden checkpoint holds the code to FORMAT.md, read by an independent reader.

Regenerate (only when the format version changes): python tests/test_golden.py
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np

GOLDEN = pathlib.Path(__file__).parent / "golden"
PREFIX = GOLDEN / "model-7"


def golden_tree():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    return {
        "params": {
            "kernel": jax.device_put(
                np.arange(32, dtype=np.float32).reshape(4, 8), NamedSharding(mesh, P("data", "model"))
            ),
            "bias": jax.device_put(np.linspace(-1, 1, 8, dtype=np.float32), NamedSharding(mesh, P())),
        },
        "step": 7,
        "scale": jnp.asarray([1.5, -2.25], dtype=jnp.bfloat16),
        "table": np.arange(6, dtype=np.int16).reshape(2, 3),
    }


def _independent_read(prefix: pathlib.Path) -> dict[str, np.ndarray]:
    """A reader written from FORMAT.md alone: json, numpy and a crc32c."""
    import google_crc32c
    import ml_dtypes

    index = json.loads(prefix.with_name(prefix.name + ".index").read_bytes())
    assert index["format"] == "shardsave" and index["format_version"] == 1
    n = len(index["files"])
    files = [prefix.with_name(f"{prefix.name}.data-{k:05d}-of-{n:05d}").read_bytes() for k in range(n)]
    chunk = index["crc_chunk_bytes"]
    out = {}
    for leaf in index["leaves"]:
        name = leaf["dtype"]
        dtype = np.dtype(getattr(ml_dtypes, name) if hasattr(ml_dtypes, name) else name).newbyteorder("<")
        array = np.zeros(leaf["shape"], dtype)
        for file, offset, nbytes, start, stop, crcs in leaf["shards"]:
            raw = files[file][offset : offset + nbytes]
            for j, crc in enumerate(crcs):
                assert google_crc32c.value(raw[j * chunk : (j + 1) * chunk]) == crc
            box = tuple(slice(a, b) for a, b in zip(start, stop))
            array[box] = np.frombuffer(raw, dtype).reshape([b - a for a, b in zip(start, stop)])
        out[leaf["name"]] = array
    return out


def test_independent_reader_reads_the_golden_checkpoint():
    values = _independent_read(PREFIX)
    assert sorted(values) == ["params/bias", "params/kernel", "scale", "step", "table"]
    np.testing.assert_array_equal(values["params/kernel"], np.arange(32, dtype=np.float32).reshape(4, 8))
    np.testing.assert_array_equal(values["params/bias"], np.linspace(-1, 1, 8, dtype=np.float32))
    assert values["scale"].astype(np.float32).tolist() == [1.5, -2.25]
    assert int(values["step"]) == 7 and values["step"].dtype == np.int64
    np.testing.assert_array_equal(values["table"], np.arange(6, dtype=np.int16).reshape(2, 3))


def test_shardsave_reads_the_golden_checkpoint():
    import jax

    import shardsave

    restored = shardsave.Saver().restore(str(PREFIX))
    np.testing.assert_array_equal(np.asarray(restored["params"]["kernel"]), np.arange(32).reshape(4, 8))
    assert restored["step"] == 7 and isinstance(restored["step"], int)
    assert restored["params"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("data", "model")


def test_shardsave_still_writes_the_golden_bytes(tmp_path):
    import shardsave

    path = shardsave.Saver(async_save=False).save(golden_tree(), str(tmp_path / "model"), global_step=7)
    golden_files = sorted(p.name for p in GOLDEN.iterdir() if p.name.startswith("model-7."))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model-7.")) == golden_files
    for name in golden_files:
        new, old = (tmp_path / name).read_bytes(), (GOLDEN / name).read_bytes()
        if name.endswith(".index"):
            new_doc, old_doc = json.loads(new), json.loads(old)
            new_doc.pop("created"), old_doc.pop("created")
            assert new_doc == old_doc
        else:
            assert new == old, name
    assert math.isfinite(json.loads((tmp_path / "model-7.index").read_bytes())["created"])
    assert path == str(tmp_path / "model-7")


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import shutil

    import shardsave

    shutil.rmtree(GOLDEN, ignore_errors=True)
    shardsave.Saver(async_save=False).save(golden_tree(), str(GOLDEN / "model"), global_step=7)
    os.remove(GOLDEN / "checkpoint")
