"""Checkpoints written by others: TensorFlow's, read without TensorFlow, and safetensors.

The TF checkpoints under tests/fixtures/tf were written by TensorFlow itself
(make_tf_fixtures.py, run once with tensorflow-cpu), and expected.json holds what
TensorFlow's own reader showed of them: shardsave's reader must show the same.
The safetensors files are written here by the safetensors package, and what
shardsave writes is read back by it.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
import shardsave.formats.safetensors
import shardsave.formats.tf_bundle
import shardsave.index
import shardsave.restore
from shardsave.errors import CorruptCheckpointError, StructureMismatchError

TF = Path(__file__).parent / "fixtures" / "tf"
EXPECTED = json.loads((TF / "expected.json").read_text())


def _prefix(kind: str) -> str:
    return str(TF / kind / EXPECTED[kind]["prefix"])


def _value(entry: dict) -> np.ndarray:
    dtype = {"bfloat16": "float32", "string": object}.get(entry["dtype"], entry["dtype"])
    return np.array(entry["values"], dtype=dtype).reshape(entry["shape"])


@pytest.mark.parametrize("kind", ["v1", "sharded", "tf2"])
def test_the_reader_shows_what_tensorflows_reader_shows(kind):
    """Names, shapes, dtypes and values of every variable, the string tensors and
    TF2's object graph included, and a partitioned variable as one whole variable."""
    expected = EXPECTED[kind]["variables"]
    with shardsave.CheckpointReader(_prefix(kind)) as reader:
        variables = reader.variables()
        assert [v.name for v in variables] == sorted(expected)  # slice entries hidden, as TF hides them
        for v in variables:
            entry = expected[v.name]
            assert (list(v.shape), v.dtype_name) == (entry["shape"], entry["dtype"]), v.name
            value = reader.get(v.name)
            if entry["dtype"] == "string":
                assert [base64.b64encode(x).decode() for x in value.reshape(-1)] == entry["base64"]
            else:
                assert value.dtype.name == entry["dtype"] and value.shape == tuple(entry["shape"])
                np.testing.assert_array_equal(value.astype(_value(entry).dtype), _value(entry))
        assert reader.verify() == []
    if kind != "tf2":
        (part,) = [v for v in variables if v.name == "part"]
        assert part.num_shards == 3 and part.sharding == "3 slices"
    if kind == "sharded":
        assert len(reader.index.files) == 3  # sharded=True: one data file per device


def _targets(mesh: Mesh) -> tuple[dict, dict]:
    """A nested target whose paths are the TF names, and the values TF's reader gave."""
    v = {n: _value(e) for n, e in EXPECTED["v1"]["variables"].items() if e["dtype"] != "string"}
    specs = {
        "dense/kernel": P(None, mesh.axis_names[-1]),
        "dense/bias": P(mesh.axis_names[-1]),
        # Boxes that cross the partitioned variable's slices (rows 0-4, 4-7, 7-10).
        "part": P(*mesh.axis_names) if len(mesh.axis_names) == 2 else P(None, mesh.axis_names[0]),
        "f64": P(mesh.axis_names[0]),
        "ints/i64": P(mesh.axis_names[0]),
    }
    target: dict = {"dense": {}, "ints": {}}
    for name, value in v.items():
        sharding = NamedSharding(mesh, specs.get(name, P()))
        dtype = "bfloat16" if name == "bf16" else value.dtype
        leaf: Any = jax.ShapeDtypeStruct(value.shape, dtype, sharding=sharding)
        if value.dtype.itemsize == 8:  # 64-bit values: jax holds them only with jax_enable_x64
            leaf = np.zeros(value.shape, value.dtype)
        *outer, last = name.split("/")
        (target[outer[0]] if outer else target)[last] = leaf
    return target, v


@pytest.mark.parametrize("kind", ["v1", "sharded"])
@pytest.mark.parametrize("devices", [(2, 4), (4,)])
def test_restore_places_tensorflow_variables_exactly_onto_any_mesh(kind, devices):
    mesh = Mesh(np.array(jax.devices()[: int(np.prod(devices))]).reshape(devices), ("a", "b")[: len(devices)])
    target, values = _targets(mesh)
    if kind == "sharded":  # written by another run: the same names, other values
        values = {n: _value(EXPECTED[kind]["variables"][n]) for n in values}
    restored = shardsave.Saver().restore(_prefix(kind), target)
    flat = {
        jax.tree_util.keystr(p, simple=True, separator="/"): x
        for p, x in jax.tree_util.tree_leaves_with_path(restored)
    }
    assert set(flat) == set(values)
    wanted = {
        jax.tree_util.keystr(p, simple=True, separator="/"): x
        for p, x in jax.tree_util.tree_leaves_with_path(target)
    }
    for name, array in flat.items():
        if isinstance(wanted[name], np.ndarray):
            assert isinstance(array, np.ndarray)
            np.testing.assert_array_equal(array, values[name], err_msg=name)
            continue
        assert array.sharding == wanted[name].sharding
        np.testing.assert_array_equal(
            np.asarray(array).astype(values[name].dtype), values[name], err_msg=name
        )
        for shard in array.addressable_shards:  # each device holds its own box of the value
            np.testing.assert_array_equal(
                np.asarray(shard.data).astype(values[name].dtype), values[name][shard.index]
            )


def test_names_map_target_leaves_to_tf2_object_keys():
    expected = EXPECTED["tf2"]["variables"]
    prefix = _prefix("tf2")
    target = {"kernel": np.zeros((4, 2), np.float32), "bias": np.zeros(2, np.float32)}
    key = "model/{}/.ATTRIBUTES/VARIABLE_VALUE"
    restored = shardsave.Saver().restore(prefix, target, names=lambda n: key.format(n))
    np.testing.assert_array_equal(restored["kernel"], _value(expected[key.format("kernel")]))
    as_dict = shardsave.Saver().restore(
        prefix, {"step": 0}, names={"step": "step/.ATTRIBUTES/VARIABLE_VALUE"}
    )
    assert as_dict == {"step": 5}
    with pytest.raises(shardsave.errors.LeafNotFoundError, match=r"model/kernel/\.ATTRIBUTES/VARIABLE_VALUE"):
        shardsave.Saver().restore(prefix, {"kernel": target["kernel"]})  # unmapped: "kernel" is not stored
    # Without a target: every variable by its TF name; the object graph (metadata) left out.
    everything = shardsave.Saver().restore(prefix)
    assert sorted(everything) == sorted(n for n in expected if n != "_CHECKPOINTABLE_OBJECT_GRAPH")


def test_string_tensors_are_refused_by_restore_naming_them():
    with pytest.raises(StructureMismatchError, match=r"'words' \(string\)"):
        shardsave.Saver().restore(_prefix("v1"))
    with pytest.raises(StructureMismatchError, match=r"'words' \(string\).*CheckpointReader"):
        shardsave.Saver().restore(_prefix("v1"), {"words": np.zeros(3)})


def _copy(kind: str, tmp_path: Path) -> str:
    shutil.copytree(TF / kind, tmp_path / kind)
    return str(tmp_path / kind / EXPECTED[kind]["prefix"])


def _flip(prefix: str, name: str) -> None:
    """Flips one bit in the middle of a variable's bytes in its data file."""
    with shardsave.CheckpointReader(prefix) as reader:
        ((shard,),) = (leaf.shards for leaf in reader.index.leaves if leaf.name == name)
        path = f"{prefix}.data-{shard.file:05d}-of-{len(reader.index.files):05d}"
    data = bytearray(Path(path).read_bytes())
    data[shard.offset + shard.nbytes // 2] ^= 0x10
    Path(path).write_bytes(bytes(data))


class _StreamedReads(shardsave.restore.RestoreObserver):
    """Records the stored shards whose reads were streamed."""

    def __init__(self):
        self.shards = []

    def on_read(self, reads, streamed):
        if streamed:
            self.shards.extend(read.shard for read in reads)


@pytest.mark.parametrize(
    "streamed", ["", "cpu", "accelerator"], ids=["batched", "streamed", "streamed-onto-accelerators"]
)
def test_a_flipped_byte_is_caught_by_tensorflows_checksum_and_the_rest_restores(
    tmp_path, engine_restore, streamed
):
    import shardsave
    from shardsave.restore import Placement

    prefix = _copy("v1", tmp_path)
    _flip(prefix, "dense/kernel")
    target, values = _targets(Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b")))
    observer = _StreamedReads()
    kwargs: dict[str, Any] = {"observer": observer}
    if streamed:
        # The fixtures are bytes, not megabytes: a cap far below the smallest one a
        # restore accepts makes every tensor larger than 16 bytes stream, its
        # checksum carried from read to read (a TF tensor has one checksum).
        kwargs.update(restore_sequentially=True, max_host_bytes=16, min_sequential_bytes=16)
    if streamed == "accelerator":  # its own path: blocks written into device buffers (CPU devices here)
        kwargs["placement"] = Placement.ACCELERATOR
    with pytest.raises(
        CorruptCheckpointError, match=r"model.ckpt-7.data-00000-of-00001 \(leaf 'dense/kernel'\).*crc32c"
    ):
        engine_restore(prefix, target, **kwargs)
    del target["dense"]["kernel"]
    restored = engine_restore(prefix, target, **kwargs)
    np.testing.assert_array_equal(np.asarray(restored["dense"]["bias"]), values["dense/bias"])
    np.testing.assert_array_equal(np.asarray(restored["part"]), values["part"])
    # A TF tensor has one checksum: each streamed read carried it on to the next.
    assert shardsave.CheckpointReader(prefix).index.checksums.whole_shards
    assert bool(observer.shards) == bool(streamed)
    problems = shardsave.CheckpointReader(prefix).verify()
    assert len(problems) == 1 and "'dense/kernel'" in problems[0]


def test_a_streamed_read_of_part_of_a_tensor_still_verifies_all_of_it(tmp_path):
    """Streamed reads carry a tensor's checksum; where they do not cover the tensor
    (another process restores the rest), finish() reads what they skipped."""
    import shardsave
    from shardsave.restore.reads import plan_reads

    prefix = _copy("v1", tmp_path)
    directory, base, index = shardsave.formats.open_checkpoint(prefix)
    (entry,) = (leaf for leaf in index.leaves if leaf.name == "dense/kernel")
    (shard,) = entry.shards
    data_file = Path(f"{prefix}.data-00000-of-00001")
    data = bytearray(data_file.read_bytes())
    data[shard.offset + shard.nbytes - 1] ^= 0x01  # the last row's last byte
    data_file.write_bytes(bytes(data))
    fetcher = shardsave.restore.Fetcher(
        directory,
        base,
        index,
        {id(shard): entry.name},
        lambda n: np.empty(n, np.uint8),
    )
    (first_row,) = plan_reads(entry.shards, ((0, 1), (0, 4)), 4)
    span = fetcher.stream(first_row)
    rows = fetcher.verified(first_row, span, entry.dtype)  # the first row is sound
    np.testing.assert_array_equal(rows, _value(EXPECTED["v1"]["variables"]["dense/kernel"])[:1])
    with pytest.raises(CorruptCheckpointError, match=r"'dense/kernel'\): crc32c mismatch"):
        fetcher.finish()


def test_a_damaged_index_is_refused_naming_it(tmp_path):
    prefix = _copy("v1", tmp_path)
    index = Path(prefix + ".index")
    raw = bytearray(index.read_bytes())
    raw[40] ^= 0x01  # inside the first data block: its crc32c no longer matches
    index.write_bytes(bytes(raw))
    with pytest.raises(
        CorruptCheckpointError, match=r"model.ckpt-7.index: not a readable TensorFlow checkpoint index"
    ):
        shardsave.CheckpointReader(prefix)


def test_inspect_and_verify_show_a_tensorflow_checkpoint():
    import contextlib
    import io

    from shardsave.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", _prefix("v1")]) == 0
        assert main(["verify", _prefix("sharded")]) == 0
    text = out.getvalue()
    assert "a TensorFlow checkpoint: 13 leaves" in text and "words" in text and "3 slices" in text
    assert "OK" in text


# ---------------------------------------------------------------- safetensors


def _safetensors_set(directory: Path) -> dict[str, np.ndarray]:
    """A sharded set written by the safetensors package: two files and the index.json
    that Hugging Face's sharded checkpoints carry (transformers writes it as below)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    files = {
        "model-00001-of-00002.safetensors": {
            "model.embed_tokens.weight": rng.standard_normal((64, 16)).astype(np.float32),
            "model.layers.0.mlp.weight": rng.standard_normal((16, 32)).astype(np.float16),
        },
        "model-00002-of-00002.safetensors": {
            "model.layers.1.mlp.weight": rng.standard_normal((16, 32)).astype(np.float16),
            "model.norm.weight": np.ones(16, np.float32),
            "model.step": np.array(12, np.int64),
            "model.mask": rng.integers(0, 2, (8, 4)).astype(bool),
        },
    }
    for name, tensors in files.items():
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
    weight_map = {t: name for name, tensors in files.items() for t in tensors}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return {t: v for tensors in files.values() for t, v in tensors.items()}


def _by_path(tree):
    """{"a/b": leaf} of a nested tree: its leaves by key path joined with "/"."""
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_load_safetensors_of_a_sharded_set_lists_and_restores_every_tensor(tmp_path):
    values = _safetensors_set(tmp_path)
    everything = shardsave.load_safetensors(tmp_path)  # the directory: its index.json
    # One naming rule: "model.layers.0.mlp.weight" is the leaf at model/layers/0/mlp/weight.
    assert everything["model"]["layers"]["0"]["mlp"]["weight"].shape == (16, 32)
    loaded = _by_path(everything)
    assert sorted(loaded) == sorted(name.replace(".", "/") for name in values)
    for name, value in values.items():
        np.testing.assert_array_equal(loaded[name.replace(".", "/")], value)
        assert loaded[name.replace(".", "/")].dtype == value.dtype
    with shardsave.CheckpointReader(str(tmp_path / "model.safetensors.index.json")) as reader:
        listed = {v.name: (v.dtype_name, v.shape) for v in reader.variables()}
        assert listed["model/layers/0/mlp/weight"] == ("F16", (16, 32))
        assert listed["model/mask"] == ("BOOL", (8, 4))
        np.testing.assert_array_equal(
            reader.get("model.embed_tokens.weight", (slice(3, 5),)), values["model.embed_tokens.weight"][3:5]
        )
        assert reader.verify() == []


@pytest.mark.parametrize("devices", [(2, 4), (4,)])
def test_load_safetensors_places_each_devices_bytes_exactly(tmp_path, io_stats, devices):
    values = _safetensors_set(tmp_path)
    mesh = Mesh(np.array(jax.devices()[: int(np.prod(devices))]).reshape(devices), ("a", "b")[: len(devices)])
    first, last = mesh.axis_names[0], mesh.axis_names[-1]
    target = {
        "model": {
            "embed_tokens": {
                "weight": jax.ShapeDtypeStruct(
                    (64, 16),
                    np.float32,
                    sharding=NamedSharding(mesh, P(first, last) if first != last else P(None, first)),
                )
            },
            "layers": [
                {
                    "mlp": {
                        "weight": jax.ShapeDtypeStruct(
                            (16, 32), np.float16, sharding=NamedSharding(mesh, P(None, first))
                        )
                    }
                }
                for _ in range(2)
            ],
            "norm": {"weight": jax.ShapeDtypeStruct((16,), np.float32, sharding=NamedSharding(mesh, P()))},
        }
    }
    restored = shardsave.load_safetensors(tmp_path, target)
    got = {
        "model.embed_tokens.weight": restored["model"]["embed_tokens"]["weight"],
        "model.layers.0.mlp.weight": restored["model"]["layers"][0]["mlp"]["weight"],
        "model.layers.1.mlp.weight": restored["model"]["layers"][1]["mlp"]["weight"],
        "model.norm.weight": restored["model"]["norm"]["weight"],
    }
    for name, array in got.items():
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), values[name][shard.index], err_msg=name)
    # Only the tensors asked for were read (not the whole files), besides the headers.
    asked = sum(values[n].nbytes for n in got)
    assert asked <= io_stats.bytes_read < asked + 64 << 10


def test_load_safetensors_refuses_a_truncated_or_malformed_file_naming_it(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": np.ones((256, 256), np.float32)}, str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(CorruptCheckpointError, match=r"model.safetensors: .* \(the file is truncated\)"):
        shardsave.load_safetensors(path)
    path.write_bytes(raw[:8] + b"{not json" + raw[17:])
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors: the header is not JSON"):
        shardsave.load_safetensors(path)


def test_a_capped_load_of_a_tensor_larger_than_the_cap_stays_within_it(tmp_path):
    from conftest import run_program

    program = Path(__file__).parent / "programs" / "measure_safetensors.py"
    result = json.loads(
        run_program([str(program), str(tmp_path), "64"], timeout=600).strip().splitlines()[-1]
    )
    assert result["ok"]
    cap = 64 << 20
    assert result["transient"] < cap + (64 << 20), f"transient {result['transient'] >> 20} MiB"


def test_save_safetensors_is_read_back_equal_by_the_safetensors_package(tmp_path, mesh24):
    import ml_dtypes
    from safetensors import safe_open

    rng = np.random.default_rng(3)
    tree = {
        "embed": jax.device_put(
            rng.standard_normal((64, 64)).astype(np.float32), NamedSharding(mesh24, P("data", "model"))
        ),
        "blocks": [
            {
                "w": jax.device_put(
                    rng.standard_normal((32, 32)).astype(ml_dtypes.bfloat16),
                    NamedSharding(mesh24, P(None, "model")),
                )
            },
            {"w": rng.standard_normal((32, 32)).astype(np.float16)},
        ],
        "fp8": rng.standard_normal(16).astype(ml_dtypes.float8_e4m3fn),
        "step": np.int32(9),
    }
    # Leaves in tree order (blocks, embed, fp8, step) packed into files of at most 8 KiB,
    # but for the 16 KiB embedding, which has a file of its own.
    written = shardsave.save_safetensors(
        tree, str(tmp_path / "out"), max_shard_bytes=8 << 10, metadata={"format": "flax"}
    )
    assert [Path(w).name for w in written] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads(Path(written[-1]).read_text())
    loaded, dtypes = {}, {}
    for file in written[:-1]:
        with safe_open(file, framework="flax") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                dtypes[name] = f.get_slice(name).get_dtype()
                if name != "fp8":  # the package reads float8 through numpy, which has no such type
                    loaded[name] = np.asarray(f.get_tensor(name))
    names = [Path(w).name for w in written]
    assert index["weight_map"] == {
        "blocks.0.w": names[0],
        "blocks.1.w": names[0],
        "embed": names[1],
        "fp8": names[2],
        "step": names[2],
    }
    assert Path(written[1]).stat().st_size > 16 << 10
    np.testing.assert_array_equal(np.asarray(loaded["embed"]), np.asarray(tree["embed"]))
    np.testing.assert_array_equal(np.asarray(loaded["blocks.0.w"]), np.asarray(tree["blocks"][0]["w"]))
    np.testing.assert_array_equal(np.asarray(loaded["blocks.1.w"]), tree["blocks"][1]["w"])
    assert loaded["blocks.0.w"].dtype == "bfloat16"
    # bfloat16 and float8 keep their safetensors dtype names, as the package reads them.
    assert dtypes == {
        "blocks.0.w": "BF16",
        "blocks.1.w": "F16",
        "embed": "F32",
        "fp8": "F8_E4M3",
        "step": "I32",
    }
    np.testing.assert_array_equal(np.asarray(loaded["step"]), np.asarray(9, np.int32))
    with safe_open(written[0], framework="flax") as f:
        assert f.metadata() == {"format": "flax"}
    back = shardsave.load_safetensors(str(tmp_path / "out"))  # "blocks.0.w" is blocks/0/w again
    np.testing.assert_array_equal(back["blocks"]["0"]["w"], np.asarray(tree["blocks"][0]["w"]))
    np.testing.assert_array_equal(back["fp8"], tree["fp8"])


def test_save_safetensors_from_a_checkpoint_and_the_convert_command(tmp_path, mesh24):
    import contextlib
    import io

    from safetensors.numpy import load_file

    from shardsave.cli import main

    value = np.arange(4096, dtype=np.float32).reshape(64, 64)
    path = shardsave.Saver(async_save=False).save(
        {"layer": {"w": jax.device_put(value, NamedSharding(mesh24, P("data", "model")))}},
        str(tmp_path / "ck" / "m"),
        global_step=3,
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["convert", path, str(tmp_path / "st")]) == 0  # shardsave -> safetensors
        assert main(["convert", str(tmp_path / "st"), str(tmp_path / "back" / "m")]) == 0  # and back
        assert (
            main(["convert", _prefix("v1"), str(tmp_path / "tf" / "model")]) == 0
        )  # TensorFlow -> shardsave
        assert main(["inspect", str(tmp_path / "st")]) == 0
    np.testing.assert_array_equal(load_file(str(tmp_path / "st" / "model.safetensors"))["layer.w"], value)
    np.testing.assert_array_equal(
        shardsave.Saver().restore(str(tmp_path / "back" / "m"))["layer"]["w"], value
    )
    from_tf = shardsave.Saver().restore(str(tmp_path / "tf" / "model-7"))
    np.testing.assert_array_equal(from_tf["part"], _value(EXPECTED["v1"]["variables"]["part"]))
    text = out.getvalue()
    assert f"wrote to {tmp_path / 'st'}: model.safetensors" in text
    assert "left out, as no array can hold them: words (string)" in text
    assert "layer/w  F32" in text  # the tree path, as every command names leaves


# ---------------------------------------------------------------- damaged headers, fuzzed


def _data_blocks(raw: bytes) -> list[tuple[int, int]]:
    """The (offset, size) of each data block of a TF index (read through its index block).

    Decoded here from the table format itself (TensorFlow's tsl/lib/io/format.h and
    block_builder.cc, LevelDB's table_format.md), not with shardsave's parser: the
    test then holds shardsave to the format, not to itself."""
    import struct

    def varint(buf: bytes, pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7

    # The footer, the file's last 48 bytes: the meta-index and the index block's
    # handles (varint64 offset, varint64 size), zeros up to byte 40, the 8-byte magic.
    footer = raw[-48:]
    assert struct.unpack("<Q", footer[40:])[0] == 0xDB4775248B80FB57
    _, pos = varint(footer, 0)
    _, pos = varint(footer, pos)
    offset, pos = varint(footer, pos)
    size, pos = varint(footer, pos)
    assert not any(footer[pos:40])
    # A block: entries (varint32 shared key bytes, unshared key bytes, value bytes; the
    # key's unshared tail; the value), then uint32 restart offsets and their count, then
    # the trailer (a compression byte, 0 for none, and a masked crc32c). Each value of
    # the index block is a data block's handle.
    block = raw[offset : offset + size]
    assert raw[offset + size] == 0
    (restarts,) = struct.unpack("<I", block[-4:])
    limit = len(block) - 4 - 4 * restarts
    blocks = []
    pos = 0
    while pos < limit:
        _, pos = varint(block, pos)
        unshared, pos = varint(block, pos)
        nvalue, pos = varint(block, pos)
        pos += unshared
        o, p = varint(block, pos)
        blocks.append((o, varint(block, p)[0]))
        assert p <= pos + nvalue
        pos += nvalue
    assert pos == limit and blocks
    return blocks


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(["v1", "sharded", "tf2"]), data=st.data())
def test_a_tf_index_with_any_entry_bytes_is_read_or_refused_as_corrupt(kind, data):
    """Bytes changed inside an index's entries, with the block checksums made to match
    (so the parser, not the checksum, meets them): read, or CorruptCheckpointError."""
    import struct

    import shardsave

    raw = bytearray(Path(_prefix(kind) + ".index").read_bytes())
    offset, size = data.draw(st.sampled_from(_data_blocks(bytes(raw))))
    for _ in range(data.draw(st.integers(1, 3))):
        raw[offset + data.draw(st.integers(0, size - 1))] = data.draw(st.integers(0, 255))
    crc = shardsave.index.checksum(np.frombuffer(bytes(raw[offset : offset + size + 1]), np.uint8))
    raw[offset + size + 1 : offset + size + 5] = struct.pack("<I", shardsave.formats.tf_bundle.mask(crc))
    try:
        shardsave.formats.tf_bundle.bundle_index(bytes(raw), "model.ckpt.index", "model.ckpt-1", None)
    except CorruptCheckpointError as e:
        assert "model.ckpt.index" in str(e)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None)
@given(
    name=st.sampled_from(["a.w", "b", "__metadata__", "new"]),
    field=st.sampled_from(["dtype", "shape", "data_offsets", None]),
    value=_JSON,
    cut=st.integers(0, 100),
)
def test_a_safetensors_header_with_any_values_is_read_or_refused_as_corrupt(
    tmp_path_factory, name, field, value, cut
):
    import struct

    from safetensors.numpy import save_file

    import shardsave

    directory = tmp_path_factory.mktemp("st")
    save_file(
        {"a.w": np.ones((4, 3), np.float32), "b": np.arange(5, dtype=np.int64)},
        str(directory / "m.safetensors"),
    )
    raw = (directory / "m.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    if field is None or not isinstance(header.get(name), dict):
        header[name] = value
    else:
        header[name][field] = value
    text = json.dumps(header).encode()
    (directory / "f.safetensors").write_bytes(
        struct.pack("<Q", len(text)) + text + body[: len(body) * cut // 100]
    )
    try:
        shardsave.formats.safetensors.safetensors_index(str(directory / "f.safetensors"), 10)
    except CorruptCheckpointError as e:
        assert "f.safetensors" in str(e)


@pytest.mark.parametrize(
    "weight_map",
    [
        None,
        [],
        {"a": 1},
        {"a": "../p1.safetensors"},
        {"a": "missing.safetensors"},
        {"a": "p1.safetensors", "b": "p1.safetensors"},
    ],
    ids=["none", "list", "not-a-name", "outside", "missing", "not-in-the-file"],
)
def test_a_bad_safetensors_index_json_is_refused_naming_it(tmp_path, weight_map):
    from safetensors.numpy import save_file

    save_file({"a": np.ones(3, np.float32)}, str(tmp_path / "p1.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    error = (
        shardsave.errors.CheckpointNotFoundError
        if weight_map == {"a": "missing.safetensors"}
        else CorruptCheckpointError
    )
    with pytest.raises(error, match=r"safetensors"):
        shardsave.load_safetensors(tmp_path)


# ---------------------------------------------------------------- one naming rule, both ways


def test_a_converted_safetensors_file_restores_into_the_target_load_safetensors_takes(tmp_path, mesh24):
    """Written by the safetensors package; converted; restored into load_safetensors' nested target."""
    from safetensors.numpy import save_file

    from shardsave.cli import main

    values = {
        "model.layers.0.w": np.arange(64 * 8, dtype=np.float32).reshape(64, 8),
        "model.layers.1.w": np.ones((64, 8), np.float32),
        "model.embed": np.arange(16, dtype=np.int32),
        "lm_head": np.full((4, 4), 2.0, np.float32),
    }
    save_file(values, str(tmp_path / "model.safetensors"))
    sharded = NamedSharding(mesh24, P("data", "model"))
    target = {
        "model": {
            "layers": {
                str(i): {"w": jax.ShapeDtypeStruct((64, 8), np.float32, sharding=sharded)} for i in (0, 1)
            },
            "embed": np.zeros(16, np.int32),
        },
        "lm_head": np.zeros((4, 4), np.float32),
    }
    loaded = shardsave.load_safetensors(str(tmp_path / "model.safetensors"), target)
    assert main(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "ck" / "model")]) == 0
    restored = shardsave.Saver().restore(str(tmp_path / "ck" / "model"), target)
    for name, value in values.items():
        path = name.split(".")
        got, want = restored, loaded
        for part in path:
            got, want = got[part], want[part]
        np.testing.assert_array_equal(np.asarray(got), value)
        np.testing.assert_array_equal(np.asarray(want), value)
    assert restored["model"]["layers"]["0"]["w"].sharding == sharded
    # The stored names are the tree paths, as every command shows them.
    with shardsave.CheckpointReader(str(tmp_path / "ck" / "model")) as reader:
        assert sorted(v.name for v in reader.variables()) == sorted(n.replace(".", "/") for n in values)


def test_save_safetensors_then_convert_back_is_the_same_tree(tmp_path):
    from shardsave.cli import main

    tree = {
        "encoder": {"attn": {"q": np.ones((4, 2), np.float32), "k": np.zeros((4, 2), np.float32)}},
        "head": {"bias": np.arange(3, dtype=np.int64)},
        "scale": np.float32(0.5),
    }
    shardsave.save_safetensors(tree, str(tmp_path / "st"))
    assert main(["convert", str(tmp_path / "st"), str(tmp_path / "ck" / "m")]) == 0
    back = shardsave.Saver().restore(str(tmp_path / "ck" / "m"))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(np.asarray, tree)
    )
    for got, want in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_array_equal(got, np.asarray(want).reshape(np.shape(got)))
        assert np.asarray(got).dtype == np.asarray(want).dtype


def test_names_that_cannot_nest_stay_whole_and_still_map_back(tmp_path):
    """ "a" beside "a.b", and an empty part: each stays one key; "/" read as "." still finds it."""
    from safetensors.numpy import load_file, save_file

    values = {
        "a": np.ones(2, np.float32),
        "a.b": np.zeros(2, np.float32),
        "x..y": np.full(2, 3.0, np.float32),
    }
    save_file(values, str(tmp_path / "model.safetensors"))
    loaded = shardsave.load_safetensors(str(tmp_path / "model.safetensors"))
    assert sorted(loaded) == ["a", "a/b", "x//y"]
    shardsave.save_safetensors(loaded, str(tmp_path / "again"))
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert sorted(again) == sorted(values)
    for name, value in values.items():
        np.testing.assert_array_equal(again[name], value)


def test_a_capped_restore_of_a_tensorflow_checkpoint_below_the_floor_names_whole_tensors():
    target = {"part": np.zeros((10, 4), np.float32)}
    with pytest.raises(
        ValueError, match=r"verified in whole tensors \(this checkpoint has one checksum per tensor\)"
    ):
        shardsave.Saver().restore(_prefix("v1"), target, restore_sequentially=True, max_host_bytes=1 << 20)
