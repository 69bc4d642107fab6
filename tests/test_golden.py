"""A golden checkpoint holds the code to FORMAT.md, read by an independent reader.

tests/golden/v2 is what this shardsave writes; tests/golden/v3 is what it writes
with compression="zstd"; tests/golden/v1 (format version 1) must stay readable.
Regenerate v2 and v3 (only when the format changes): python tests/test_golden.py
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np

GOLDEN = pathlib.Path(__file__).parent / "golden" / "v2"  # what this shardsave writes
PREFIX = GOLDEN / "model-7"
PREFIX_V1 = pathlib.Path(__file__).parent / "golden" / "v1" / "model-7"  # format version 1, still read
ENVELOPE_HEAD = b'{"format":"shardsave","format_version":2,"crc32c":"'
GOLDEN_V3 = pathlib.Path(__file__).parent / "golden" / "v3"  # compression="zstd"
PREFIX_V3 = GOLDEN_V3 / "model-7"


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


def golden_tree_v2():
    """Version 2 adds typed PRNG keys, empty nodes and the index's own checksum."""
    import jax

    return {**golden_tree(), "rng": jax.random.key(3), "opt": {"empty": {}, "count": ()}}


def _independent_read(prefix: pathlib.Path) -> dict[str, np.ndarray]:
    """A reader written from FORMAT.md alone: json, numpy and a crc32c."""
    import google_crc32c
    import ml_dtypes

    raw = prefix.with_name(prefix.name + ".index").read_bytes()
    index = json.loads(raw)
    assert index["format"] == "shardsave"
    if index["format_version"] == 2:
        # The envelope: fixed bytes, 8 hex digits, fixed bytes, the body, "}".
        assert raw.startswith(ENVELOPE_HEAD) and raw.endswith(b"}")
        body_at = len(ENVELOPE_HEAD) + 8 + len(b'","index":')
        assert raw[len(ENVELOPE_HEAD) + 8 : body_at] == b'","index":'
        assert int(raw[len(ENVELOPE_HEAD) : len(ENVELOPE_HEAD) + 8], 16) == google_crc32c.value(
            raw[body_at:-1]
        )
        index = index["index"]
    else:
        assert index["format_version"] == 1
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
        if leaf["kind"] == "key":
            out[leaf["name"] + ":impl"] = leaf["key_impl"]
    return out


def _independent_read_v3(prefix: pathlib.Path) -> dict[str, np.ndarray]:
    """Version 3 from FORMAT.md alone: each chunk a zstd frame, checked as stored, then decoded."""
    import google_crc32c
    import ml_dtypes
    import zstandard

    raw = prefix.with_name(prefix.name + ".index").read_bytes()
    head = b'{"format":"shardsave","format_version":3,"crc32c":"'
    assert raw.startswith(head) and raw.endswith(b"}")
    body_at = len(head) + 8 + len(b'","index":')
    assert int(raw[len(head) : len(head) + 8], 16) == google_crc32c.value(raw[body_at:-1])
    index = json.loads(raw)["index"]
    assert index["compression"] == "zstd"
    n = len(index["files"])
    files = [prefix.with_name(f"{prefix.name}.data-{k:05d}-of-{n:05d}").read_bytes() for k in range(n)]
    chunk = index["crc_chunk_bytes"]
    out = {}
    for leaf in index["leaves"]:
        name = leaf["dtype"]
        dtype = np.dtype(getattr(ml_dtypes, name) if hasattr(ml_dtypes, name) else name).newbyteorder("<")
        array = np.zeros(leaf["shape"], dtype)
        for file, offset, nbytes, start, stop, crcs, stored in leaf["shards"]:
            assert len(stored) == len(crcs)
            decoded, at = b"", offset
            for j, (crc, size) in enumerate(zip(crcs, stored)):
                frame = files[file][at : at + size]
                assert google_crc32c.value(frame) == crc
                part = zstandard.ZstdDecompressor().decompress(frame, max_output_size=chunk)
                assert len(part) == min(chunk, nbytes - j * chunk)
                decoded, at = decoded + part, at + size
            assert len(decoded) == nbytes
            box = tuple(slice(a, b) for a, b in zip(start, stop))
            array[box] = np.frombuffer(decoded, dtype).reshape([b - a for a, b in zip(start, stop)])
        out[leaf["name"]] = array
    return out


def test_independent_reader_reads_the_golden_compressed_checkpoint():
    v3 = _independent_read_v3(PREFIX_V3)
    assert sorted(v3) == ["params/bias", "params/kernel", "rng", "scale", "step", "table"]
    _check_v1_values(v3)


def test_shardsave_reads_the_golden_compressed_checkpoint_and_writes_its_layout(tmp_path):
    import shardsave

    restored = shardsave.Saver().restore(str(PREFIX_V3))
    np.testing.assert_array_equal(np.asarray(restored["params"]["kernel"]), np.arange(32).reshape(4, 8))
    assert restored["opt"] == {"empty": {}, "count": ()} and restored["step"] == 7
    # The same index but for the frames' bytes (a newer zstd may encode them otherwise).
    shardsave.Saver(async_save=False, compression="zstd").save(
        golden_tree_v2(), str(tmp_path / "model"), global_step=7
    )
    new, old = (json.loads((d / "model-7.index").read_bytes()) for d in (tmp_path, GOLDEN_V3))
    assert new["format_version"] == old["format_version"] == 3
    for doc in (new["index"], old["index"]):
        doc.pop("created")
        for f in doc["files"]:
            f.pop("nbytes")
        for leaf in doc["leaves"]:
            leaf["shards"] = [s[:3] + s[3:5] for s in leaf["shards"]]  # offsets follow frame sizes
            for s in leaf["shards"]:
                s[1] = None
    assert new["index"] == old["index"]
    assert _independent_read_v3(tmp_path / "model-7").keys() == _independent_read_v3(PREFIX_V3).keys()


def _check_v1_values(values: dict) -> None:
    np.testing.assert_array_equal(values["params/kernel"], np.arange(32, dtype=np.float32).reshape(4, 8))
    np.testing.assert_array_equal(values["params/bias"], np.linspace(-1, 1, 8, dtype=np.float32))
    assert values["scale"].astype(np.float32).tolist() == [1.5, -2.25]
    assert int(values["step"]) == 7 and values["step"].dtype == np.int64
    np.testing.assert_array_equal(values["table"], np.arange(6, dtype=np.int16).reshape(2, 3))


def test_independent_reader_reads_the_golden_checkpoints():
    v1 = _independent_read(PREFIX_V1)
    assert sorted(v1) == ["params/bias", "params/kernel", "scale", "step", "table"]
    _check_v1_values(v1)
    v2 = _independent_read(PREFIX)
    assert sorted(v2) == ["params/bias", "params/kernel", "rng", "rng:impl", "scale", "step", "table"]
    _check_v1_values(v2)
    assert v2["rng:impl"] == "threefry2x32" and v2["rng"].dtype == np.uint32 and v2["rng"].shape == (2,)


def test_shardsave_reads_the_golden_checkpoints():
    import jax

    import shardsave

    for prefix in (PREFIX_V1, PREFIX):
        restored = shardsave.Saver().restore(str(prefix))
        np.testing.assert_array_equal(np.asarray(restored["params"]["kernel"]), np.arange(32).reshape(4, 8))
        assert restored["step"] == 7 and isinstance(restored["step"], int)
        assert restored["params"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("data", "model")
    assert restored["opt"] == {"empty": {}, "count": ()}
    np.testing.assert_array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(jax.random.key(3))
    )
    assert restored["rng"].dtype == jax.random.key(3).dtype


def test_shardsave_still_writes_the_golden_bytes(tmp_path):
    import shardsave

    path = shardsave.Saver(async_save=False).save(golden_tree_v2(), str(tmp_path / "model"), global_step=7)
    golden_files = sorted(p.name for p in GOLDEN.iterdir() if p.name.startswith("model-7."))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model-7.")) == golden_files
    for name in golden_files:
        new, old = (tmp_path / name).read_bytes(), (GOLDEN / name).read_bytes()
        if name.endswith(".index"):
            new_doc, old_doc = json.loads(new)["index"], json.loads(old)["index"]
            new_doc.pop("created"), old_doc.pop("created")
            assert new_doc == old_doc
        else:
            assert new == old, name
    assert math.isfinite(json.loads((tmp_path / "model-7.index").read_bytes())["index"]["created"])
    assert path == str(tmp_path / "model-7")


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import shutil

    import shardsave

    for folder, options in ((GOLDEN, {}), (GOLDEN_V3, {"compression": "zstd"})):
        shutil.rmtree(folder, ignore_errors=True)
        shardsave.Saver(async_save=False, **options).save(
            golden_tree_v2(), str(folder / "model"), global_step=7
        )
        os.remove(folder / "checkpoint")
