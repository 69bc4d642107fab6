"""PyTorch DCP checkpoints, read without torch: restores, the reader, the CLI, hostile input.

The checkpoints under tests/fixtures/dcp were written by real torch (the
version in its VERSION file) with make_fixtures.py there: two gloo processes
saving DTensor shards with dcp.save, in each of DCP's layouts. Beside each,
expected.npz holds what torch itself read back (bfloat16 and float8 as their
bits) and expected.json the dtypes and the non-tensor values. torch is not
installed here; every comparison is bit for bit against torch's read-back.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import uuid
import zipfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import gcs_bucket, s3_bucket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
from shardsave.cli import main
from shardsave.errors import CorruptCheckpointError, ShardsaveError, StructureMismatchError
from shardsave.formats import dcp, open_checkpoint
from shardsave.storage import open_store

FIXTURES = Path(__file__).parent / "fixtures" / "dcp"
VARIANTS = ["torch_save", "zstd", "safetensors", "hf", "strided"]
BITS = {"bfloat16": (ml_dtypes.bfloat16, np.uint16), "float8_e4m3fn": (ml_dtypes.float8_e4m3fn, np.uint8)}


def _expected(variant: str) -> tuple[dict[str, np.ndarray], dict]:
    """What torch read back, by DCP name, in the stored dtype."""
    doc = json.loads((FIXTURES / variant / "expected.json").read_text())
    with np.load(FIXTURES / variant / "expected.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    for name, dtype in doc["dtypes"].items():
        if dtype in BITS:
            arrays[name] = arrays[name].view(BITS[dtype][0])
    return arrays, doc["objects"]


def _same_bits(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), what


def _spec(shape: tuple[int, ...], mesh: Mesh) -> P:
    """Each dimension over the first mesh axis that divides it, not reused."""
    free = list(mesh.axis_names)
    spec = []
    for d in shape:
        axis = next((a for a in free if d % mesh.shape[a] == 0 and mesh.shape[a] > 1), None)
        if axis is not None:
            free.remove(axis)
        spec.append(axis)
    return P(*spec)


def _target(path: str, mesh: Mesh) -> dict:
    """The saved tree on the mesh; 64-bit tensors (which jax would narrow) as numpy arrays."""

    def leaf(s):
        if np.dtype(s.dtype) != jax.dtypes.canonicalize_dtype(s.dtype):
            return np.zeros(s.shape, s.dtype)
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, _spec(s.shape, mesh)))

    return jax.tree.map(leaf, shardsave.load_structure(path))


def _stored_names(path: str) -> dict[str, str]:
    _, _, index = open_checkpoint(path)
    return {leaf.name: leaf.stored_name for leaf in index.leaves}


def _check_placed(restored: dict, path: str, expected: dict[str, np.ndarray]) -> int:
    names = _stored_names(path)
    checked = 0
    for keypath, array in jax.tree_util.tree_leaves_with_path(restored):
        name = jax.tree_util.keystr(keypath, simple=True, separator="/")
        want = expected[names[name]]
        _same_bits(np.asarray(array), want, name)
        for shard in getattr(array, "addressable_shards", []):  # each device holds its own box, bit for bit
            _same_bits(np.asarray(shard.data), want[shard.index], f"{name} on {shard.device}")
        checked += 1
    return checked


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mesh_shape", [(8,), (2, 4)])
def test_each_layout_restores_bit_exact_onto_another_mesh(variant, mesh_shape):
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), ("a", "b")[: len(mesh_shape)])
    path = str(FIXTURES / variant)
    expected, _ = _expected(variant)
    restored = shardsave.Saver().restore(path, _target(path, mesh))
    # every tensor torch read back, and nothing else, is in the restored tree
    assert _check_placed(restored, path, expected) == len(expected)


@pytest.mark.parametrize("variant", ["torch_save", "zstd", "strided"])
def test_a_capped_sequential_restore_is_bit_exact(variant, mesh24):
    path = str(FIXTURES / variant)
    expected, _ = _expected(variant)
    restored = shardsave.Saver().restore(
        path, _target(path, mesh24), restore_sequentially=True, max_host_bytes=32 << 20
    )
    assert _check_placed(restored, path, expected) == len(expected)


def test_a_read_of_part_of_a_tensor_reads_only_its_chunks_bytes(io_stats):
    path = str(FIXTURES / "torch_save")
    expected, _ = _expected("torch_save")
    with shardsave.CheckpointReader(path) as reader:  # the index: .metadata and each record's zip
        io_stats.reset()
        rows = reader.get("model/w_even", (slice(4, 8),))  # rank 1's chunk, 4 x 6 float32
    _same_bits(rows, expected["model.w_even"][4:], "rows")
    assert io_stats.bytes_read == 96


def test_partial_restore_names_reshape_and_cast(mesh24):
    path = str(FIXTURES / "torch_save")
    expected, _ = _expected("torch_save")
    target = {
        "flat": jax.ShapeDtypeStruct((48,), np.float32, sharding=NamedSharding(mesh24, P(("data", "model")))),
        "emb": np.zeros((5, 4), np.float32),
        "model": {"ids": np.zeros((2, 5), np.int64)},  # by its tree path
    }
    restored = shardsave.Saver().restore(
        path, target, names={"flat": "model.w_even", "emb": "model/emb_bf16"}, reshape=True, cast=True
    )
    _same_bits(np.asarray(restored["flat"]), expected["model.w_even"].reshape(48), "flat")
    _same_bits(restored["emb"], expected["model.emb_bf16"].astype(np.float32), "emb")
    _same_bits(restored["model"]["ids"], expected["model.ids"], "ids")
    with pytest.raises(StructureMismatchError, match="cast=True"):
        shardsave.Saver().restore(path, {"e": np.zeros((5, 4), np.float32)}, names={"e": "model.emb_bf16"})


def test_a_restore_without_target_returns_the_tensors_in_the_planner_data_tree():
    path = str(FIXTURES / "torch_save")
    expected, _ = _expected("torch_save")
    restored = shardsave.Saver().restore(path)
    assert set(restored) == {"model", "optim"}  # "step" and param_groups are not tensors
    assert set(restored["optim"]) == {"state"}
    assert set(restored["optim"]["state"]["w_even"]) == {"exp_avg", "exp_avg_sq", "step"}
    _same_bits(
        restored["optim"]["state"]["w_uneven"]["exp_avg_sq"], expected["optim.state.w_uneven.exp_avg_sq"], "m"
    )
    _same_bits(restored["model"]["scale"], expected["model.scale"], "replicated")


@pytest.mark.parametrize("variant", ["torch_save", "zstd", "safetensors"])
def test_the_reader_lists_non_tensor_entries_and_decodes_them_without_running_code(variant):
    path = str(FIXTURES / variant)
    expected, objects = _expected(variant)
    with shardsave.CheckpointReader(path) as reader:
        listed = {v.name: v for v in reader.variables()}
        assert listed["optim/param_groups/0/lr"].dtype_name in dcp.OBJECT_DTYPES
        assert listed["model/emb_bf16"].dtype_name == "bfloat16"
        for fqn, value in objects.items():
            got = reader.get(fqn)  # its DCP name; the tree path finds it too
            assert json.loads(json.dumps(got)) == value, fqn
        assert reader.get("optim/param_groups/0/betas") == (0.9, 0.99)
        assert reader.get("step") == 7
        _same_bits(reader.get("model.w_uneven", (slice(3, 6),)), expected["model.w_uneven"][3:6], "rows")
        assert reader.verify() == []


@pytest.mark.parametrize("variant", ["torch_save", "zstd"])
def test_a_target_that_names_param_groups_takes_their_stored_values(variant, mesh24):
    """A torch optimizer's state_dict as the target: tensors onto the mesh, param_groups'
    Python values (a tuple's items, a list of names) as torch stored them."""
    path = str(FIXTURES / variant)
    expected, objects = _expected(variant)
    sharding = NamedSharding(mesh24, P("data"))
    exp_avg = jax.ShapeDtypeStruct(
        expected["optim.state.w_even.exp_avg"].shape, np.float32, sharding=sharding
    )
    group = {"lr": 0.0, "betas": (0.0, 0.0), "eps": 0.0, "weight_decay": 1, "amsgrad": True, "foreach": None}
    target = {
        "optim": {"state": {"w_even": {"exp_avg": exp_avg}}, "param_groups": [{**group, "params": ["", ""]}]},
        "step": 0,
    }
    restored = shardsave.Saver().restore(path, target)
    got = restored["optim"]["param_groups"][0]
    assert got["lr"] == objects["optim.param_groups.0.lr"] == 0.01
    assert got["betas"] == (0.9, 0.99) and isinstance(got["betas"], tuple)  # the target's tuple, filled
    assert got["eps"] == 1e-08 and got["weight_decay"] == 0 and got["amsgrad"] is False
    assert got["params"] == ["w_even", "w_uneven"] and got["foreach"] is None
    assert restored["step"] == 7
    _same_bits(
        np.asarray(restored["optim"]["state"]["w_even"]["exp_avg"]),
        expected["optim.state.w_even.exp_avg"],
        "m",
    )
    # a whole value into one leaf, through names=
    whole = shardsave.Saver().restore(path, {"b": 0}, names={"b": "optim.param_groups.0.betas"})
    assert whole == {"b": (0.9, 0.99)}
    with pytest.raises(
        StructureMismatchError, match=r"has no item '2'.*give the target the value's structure"
    ):
        shardsave.Saver().restore(path, {"optim": {"param_groups": [{"betas": (0.0, 0.0, 0.0)}]}})
    with pytest.raises(StructureMismatchError, match="holds a Python value there"):
        shardsave.Saver().restore(path, {"step": np.zeros((), np.int64)})


def test_load_structure_and_inspect_verify_convert(tmp_path, mesh24):
    path = str(FIXTURES / "zstd")
    expected, _ = _expected("zstd")
    structure = shardsave.load_structure(path)
    assert structure["model"]["emb_bf16"].shape == (5, 4)
    assert structure["model"]["emb_bf16"].dtype == ml_dtypes.bfloat16
    out = io.StringIO()
    assert main(["inspect", path], out=out) == 0
    assert "a PyTorch DCP checkpoint: 25 leaves" in out.getvalue()
    assert "optim/param_groups/0/params" in out.getvalue()
    out = io.StringIO()
    assert main(["inspect", "--json", str(FIXTURES / "torch_save" / ".metadata")], out=out) == 0
    assert json.loads(out.getvalue())["source"] == "dcp"
    out = io.StringIO()
    assert main(["verify", path], out=out) == 0 and out.getvalue().startswith("OK")
    # to a shardsave checkpoint: the tensors, in the same tree; the rest named as left out
    out = io.StringIO()
    assert main(["convert", path, str(tmp_path / "ckpt" / "model")], out=out) == 0
    assert "left out" in out.getvalue() and "optim/param_groups/0/lr (pickle+zstd)" in out.getvalue()
    converted = shardsave.Saver().restore(str(tmp_path / "ckpt" / "model"))
    _same_bits(converted["model"]["emb_bf16"], expected["model.emb_bf16"], "converted")
    # to safetensors: tensors named by their DCP names ("." joins the tree path)
    assert main(["convert", path, str(tmp_path / "st"), "--to", "safetensors"], out=io.StringIO()) == 0
    loaded = shardsave.load_safetensors(str(tmp_path / "st"))
    _same_bits(loaded["optim"]["state"]["w_even"]["exp_avg"], expected["optim.state.w_even.exp_avg"], "st")


def _copy_to(url: str, variant: str) -> None:
    store = open_store(url)
    for f in (FIXTURES / variant).iterdir():
        if not f.name.startswith("expected"):
            store.write(f.name, f.read_bytes()).result()


@pytest.mark.parametrize("variant", ["torch_save", "zstd", "hf"])
def test_restores_from_memory_urls(variant, mesh24):
    url = f"memory://{uuid.uuid4().hex}/dcp"
    _copy_to(url, variant)
    expected, _ = _expected(variant)
    assert dcp.is_dcp(url)
    restored = shardsave.Saver().restore(
        url, _target(url, mesh24), restore_sequentially=True, max_host_bytes=32 << 20
    )
    assert _check_placed(restored, url, expected) == len(expected)


def test_restores_from_s3(s3_env, mesh24):
    url = f"s3://{s3_bucket(s3_env)}/runs/dcp"
    _copy_to(url, "torch_save")
    expected, _ = _expected("torch_save")
    restored = shardsave.Saver().restore(url, _target(url, mesh24))
    assert _check_placed(restored, url, expected) == len(expected)


@pytest.mark.parametrize("variant", ["torch_save", "zstd", "hf"])
def test_restores_from_gcs(gcs_server, variant, mesh24):
    url = f"gs://{gcs_bucket(gcs_server)}/runs/dcp"
    _copy_to(url, variant)
    expected, objects = _expected(variant)
    assert dcp.is_dcp(url)
    restored = shardsave.Saver().restore(url, _target(url, mesh24))
    assert _check_placed(restored, url, expected) == len(expected)
    capped = shardsave.Saver().restore(
        url, _target(url, mesh24), restore_sequentially=True, max_host_bytes=32 << 20
    )
    assert _check_placed(capped, url, expected) == len(expected)
    with shardsave.CheckpointReader(url) as reader:
        assert reader.verify() == []
        for name, value in objects.items():  # the non-tensor entries, decoded as on local disk
            assert json.loads(json.dumps(reader.get(name))) == value, name


# ---------------------------------------------------------------- hostile input


class _Touch:
    """Unpickled, this would create a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_metadata_pickle_that_would_create_a_file_is_refused_and_never_run(tmp_path):
    victim = tmp_path / "created-by-the-pickle"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "torch_save", ckpt)
    for payload in (_Touch(str(victim)), {"state_dict_metadata": [_Touch(str(victim))]}):
        (ckpt / ".metadata").write_bytes(pickle.dumps(payload))
        with pytest.raises(
            CorruptCheckpointError, match=r"ckpt/\.metadata: the pickle names the global (io|builtins)\.open"
        ):
            shardsave.Saver().restore(str(ckpt))
        assert not victim.exists()
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata"):
        shardsave.CheckpointReader(str(ckpt))
    assert not victim.exists()


def test_a_record_or_entry_whose_pickle_names_another_global_is_refused(tmp_path):
    victim = tmp_path / "created"
    record = io.BytesIO()
    with zipfile.ZipFile(record, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Touch(str(victim)), protocol=2))
        z.writestr("archive/byteorder", "little")
    with pytest.raises(CorruptCheckpointError, match="the pickle names the global"):
        dcp._object_value(record.getvalue(), "x.distcp")
    with pytest.raises(CorruptCheckpointError, match="the pickle names the global"):
        raw = record.getvalue()
        dcp._tensor_layout(lambda a, b: raw[a:b], len(raw), "x.distcp", "float32", (2,))
    assert not victim.exists()


def test_a_big_endian_record_is_decoded_to_the_same_values():
    # the pickle torch.save wrote for model.w_even's first chunk, with a big-endian storage
    raw = (FIXTURES / "torch_save" / "__0_0.distcp").read_bytes()
    source = zipfile.ZipFile(io.BytesIO(raw[: _first_record_length()]))
    pickled = source.read("archive/data.pkl")  # model.w_even's first chunk: 4 x 6 float32
    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    record = io.BytesIO()
    with zipfile.ZipFile(record, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "big")
        z.writestr("archive/data/0", values.astype(">f4").tobytes())
    rec = record.getvalue()
    layout = dcp._tensor_layout(lambda a, b: rec[a:b], len(rec), "x", "float32", (4, 6))
    assert layout.big_endian
    out = dcp._chunk_bytes(rec, layout, np.dtype(np.float32), "x")
    assert out.tobytes() == values.tobytes()


def _first_record_length() -> int:
    raw = (FIXTURES / "torch_save" / ".metadata").read_bytes()
    md = dcp._unpickle(raw, dcp._METADATA_GLOBALS, "m")
    for key, info in md.get("storage_data").items():
        if key.get("fqn") == "model.w_even" and info.get("offset") == 0:
            return info.get("length")
    raise AssertionError


@pytest.mark.parametrize("variant", ["torch_save", "safetensors", "hf"])
def test_a_truncated_chunk_is_refused_naming_its_file(tmp_path, variant):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / variant, ckpt)
    victim = sorted(ckpt.glob("*.distcp") if variant != "hf" else ckpt.glob("*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match=rf"{victim.name}.*truncated"):
        shardsave.Saver().restore(str(ckpt))


def test_a_truncated_chunk_on_an_object_store_is_refused_when_read(mesh24):
    url = f"memory://{uuid.uuid4().hex}/dcp"
    _copy_to(url, "zstd")
    store = open_store(url)
    data = (FIXTURES / "zstd" / "__1_0.distcp").read_bytes()
    store.write("__1_0.distcp", data[: len(data) // 2]).result()
    with pytest.raises(CorruptCheckpointError, match=r"__1_0\.distcp"):
        shardsave.Saver().restore(url, _target(url, mesh24))


def _read_everything(path: str) -> None:
    with shardsave.CheckpointReader(path) as reader:
        for v in reader.variables():
            if v.dtype != object or v.dtype_name in dcp.OBJECT_DTYPES:
                reader.get(v.name)
        reader.verify()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_metadata_is_read_or_refused_with_a_shardsave_error(tmp_path_factory, data):
    ckpt = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(FIXTURES / "zstd", ckpt)
    raw = bytearray((ckpt / ".metadata").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    (ckpt / ".metadata").write_bytes(bytes(raw[: max(cut, len(raw) - data.draw(st.integers(0, 3)))]))
    try:
        _read_everything(str(ckpt))
    except ShardsaveError as e:
        assert str(ckpt) in str(e)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(variant=st.sampled_from(["torch_save", "zstd", "strided"]), data=st.data())
def test_fuzzed_zip_records_are_read_or_refused_with_a_shardsave_error(tmp_path_factory, variant, data):
    ckpt = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(FIXTURES / variant, ckpt)
    victim = ckpt / "__0_0.distcp"
    raw = bytearray(victim.read_bytes())
    # the zip around each record: local headers, data.pkl, directory (the first record's)
    end = min(len(raw), 1700)
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, end - 1))] = data.draw(st.integers(0, 255))
    victim.write_bytes(bytes(raw))
    try:
        _read_everything(str(ckpt))
    except ShardsaveError as e:
        assert str(ckpt) in str(e)


def test_a_chunk_that_disagrees_with_the_metadata_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "torch_save", ckpt)
    raw = (ckpt / "__0_0.distcp").read_bytes()
    # model.emb_bf16's record (bfloat16 3 x 4) written over model.w_uneven's (float32 4 x 3),
    # both 1577 bytes, at 4795 and 1641
    (ckpt / "__0_0.distcp").write_bytes(raw[:1641] + raw[4795 : 4795 + 1577] + raw[1641 + 1577 :])
    with pytest.raises(
        CorruptCheckpointError,
        match=r"__0_0\.distcp \('model.w_uneven' at \[0, 0\]\): the record holds a bfloat16 tensor "
        r"\[3, 4\], but \.metadata records this chunk as float32 \[4, 3\]",
    ):
        shardsave.CheckpointReader(str(ckpt))


def test_is_dcp_recognises_directories_and_nothing_else(tmp_path):
    assert dcp.is_dcp(str(FIXTURES / "torch_save"))
    assert dcp.is_dcp(str(FIXTURES / "torch_save" / ".metadata"))
    assert dcp.is_dcp(str(FIXTURES / "hf"))
    assert not dcp.is_dcp(str(tmp_path))
    assert not dcp.is_dcp(str(tmp_path / "model-10"))
    assert not dcp.is_dcp(f"memory://{uuid.uuid4().hex}/nothing")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not dcp.is_dcp(str(tmp_path / "model.safetensors"))
