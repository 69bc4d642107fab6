"""Damaged checkpoints raise a specific error naming the file and leaf; never wrong data."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import index_doc
import jax
import numpy as np
import pytest
from conftest import evict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
import shardsave.formats.shardsave
from shardsave.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ShardsaveError,
    UnsupportedFormatError,
)


@pytest.fixture
def ckpt(tmp_path, mesh24):
    tree = {
        "w": jax.device_put(
            np.arange(256, dtype=np.float32).reshape(16, 16), NamedSharding(mesh24, P("data", "model"))
        ),
        "b": np.arange(10, dtype=np.int32),
    }
    path = shardsave.Saver(async_save=False).save(tree, str(tmp_path / "m"))
    return path, tree


def _data_files(path):
    d, base = os.path.split(path)
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.startswith(base + ".data-"))


def test_every_flipped_bit_is_detected(ckpt):
    path, tree = ckpt
    rng = random.Random(0)
    for file in _data_files(path):
        original = Path(file).read_bytes()
        for _ in range(8):
            pos = rng.randrange(len(original) * 8)
            damaged = bytearray(original)
            damaged[pos // 8] ^= 1 << (pos % 8)
            Path(file).write_bytes(bytes(damaged))
            with pytest.raises(CorruptCheckpointError, match=r"crc32c mismatch") as info:
                shardsave.Saver().restore(path, tree)
            assert os.path.basename(file) in str(info.value) and "leaf '" in str(info.value)
        Path(file).write_bytes(original)
    shardsave.Saver().restore(path, tree)  # and the repaired checkpoint restores


def test_truncated_and_missing_data_files(ckpt):
    path, tree = ckpt
    file = _data_files(path)[3]
    data = Path(file).read_bytes()
    Path(file).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=os.path.basename(file)):
        shardsave.Saver().restore(path, tree)
    os.remove(file)
    with pytest.raises(CorruptCheckpointError, match=f"{os.path.basename(file)}.*missing"):
        shardsave.Saver().restore(path, tree)


# Shards of whole 4 MiB checksum chunks are verified by the I/O threads that read them
# (small ones by the caller, as above); a stored shard over 16 MiB is read in
# chunk-aligned pieces that land in the restored buffer directly, each verified in
# place. The errors must be the same. (shape, sharded over "data" or on one device,
# byte flipped, the chunk it is in, bytes the truncated file keeps)
LARGE_DAMAGE = {
    # 12 MiB, 6 MiB per shard; the flip is in the shard's second chunk.
    "large-chunks": ((1536, 2048), True, 5 << 20, (4194304, 6291456), 5 << 20),
    # 48 MiB on one device; the flip is in the third piece (32..48 MiB), its chunk 40..44 MiB.
    "read-in-pieces": ((6144, 2048), False, (40 << 20) + 7, (41943040, 46137344), 20 << 20),
}


@pytest.mark.parametrize("cold", [False, True], ids=["cached", "cold"])
@pytest.mark.parametrize("case", LARGE_DAMAGE)
def test_damage_in_large_chunks_is_detected(tmp_path, mesh24, case, cold, io_stats):
    # cold: no page of the data file is cached, so its large reads come past the page
    # cache (O_DIRECT), as on a host resuming a job; the checks must be the same.
    shape, sharded, flip, (lo, hi), keep = LARGE_DAMAGE[case]
    w = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    where = NamedSharding(mesh24, P("data")) if sharded else jax.devices()[0]
    tree = {"w": jax.device_put(w, where)}
    path = shardsave.Saver(async_save=False).save(tree, str(tmp_path / "m"))
    files = _data_files(path)
    assert sharded or len(files) == 1  # one device, one data file
    file = files[0]

    def write(data: bytes) -> None:
        Path(file).write_bytes(data)
        if cold:
            evict(file)

    original = Path(file).read_bytes()
    damaged = bytearray(original)
    damaged[flip] ^= 0x10
    write(bytes(damaged))
    with pytest.raises(CorruptCheckpointError, match=rf"crc32c mismatch in bytes {lo}\.\.{hi}") as info:
        shardsave.Saver().restore(path, tree)
    assert os.path.basename(file) in str(info.value) and "leaf 'w'" in str(info.value)
    write(original[:keep])
    with pytest.raises(CorruptCheckpointError, match=r"truncated") as info:
        shardsave.Saver().restore(path, tree)
    assert os.path.basename(file) in str(info.value) and "leaf 'w'" in str(info.value)
    write(original)
    io_stats.reset()
    restored = shardsave.Saver().restore(path, tree)
    np.testing.assert_array_equal(np.asarray(restored["w"]), w)
    if cold:  # every byte of the file is in reads of whole pages of 1 MiB or more
        assert io_stats.bytes_read_uncached == len(original)
    else:
        assert io_stats.bytes_read_uncached == 0


def _rewrite_index(path, change):
    index_doc.rewrite(path, change)


def _rewrite_envelope(path, change):
    doc = json.loads(Path(path + ".index").read_bytes())
    change(doc)
    Path(path + ".index").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "damage, error, match",
    [
        (lambda p: Path(p + ".index").write_bytes(b""), CorruptCheckpointError, "not valid JSON"),
        (lambda p: os.truncate(p + ".index", 100), CorruptCheckpointError, "not valid JSON"),
        (
            lambda p: _rewrite_envelope(p, lambda d: d.update(format_version=99)),
            UnsupportedFormatError,
            "version 99",
        ),
        (
            lambda p: _rewrite_index(p, lambda d: d.pop("files")),
            CorruptCheckpointError,
            "missing field 'files'",
        ),
        (
            lambda p: _rewrite_index(p, lambda d: d["leaves"][0].pop("dtype")),
            CorruptCheckpointError,
            "'dtype'",
        ),
        (
            lambda p: _rewrite_index(p, lambda d: d["leaves"][0].update(dtype="object")),
            CorruptCheckpointError,
            "unknown dtype",
        ),
        (
            lambda p: _rewrite_index(p, lambda d: d["leaves"][0].update(shape=[10**18])),
            CorruptCheckpointError,
            "integer in",
        ),
        (
            lambda p: _rewrite_index(p, lambda d: d["leaves"][1]["shards"].pop()),
            CorruptCheckpointError,
            "elements",
        ),
        (
            lambda p: _rewrite_index(p, lambda d: d["leaves"][1]["shards"][0].__setitem__(1, 10**9)),
            CorruptCheckpointError,
            "past the end",
        ),
    ],
    ids=[
        "empty",
        "truncated",
        "newer-version",
        "missing-files",
        "missing-dtype",
        "object-dtype",
        "huge-shape",
        "gap",
        "offset",
    ],
)
def test_damaged_index(ckpt, damage, error, match):
    path, tree = ckpt
    damage(path)
    with pytest.raises(error, match=match) as info:
        shardsave.Saver().restore(path, tree)
    assert f"{path}.index" in str(info.value)


def test_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        shardsave.Saver().restore(str(tmp_path / "absent"))
    with pytest.raises(CheckpointNotFoundError):
        shardsave.load_structure(str(tmp_path / "absent"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_index_decodes_or_raises_a_shardsave_error(ckpt, data):
    path, _ = ckpt
    raw = Path(path + ".index").read_bytes()
    mode = data.draw(st.sampled_from(["bytes", "flip", "json"]))
    if mode == "bytes":
        mutated = data.draw(st.binary(max_size=2000))
    elif mode == "flip":
        mutated = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(mutated) - 1))
            mutated[i] = data.draw(st.integers(0, 255))
        mutated = bytes(mutated)
    else:
        doc = index_doc.body(raw)
        leaf = data.draw(st.sampled_from(doc["leaves"]))
        field = data.draw(st.sampled_from(["shape", "dtype", "shards", "name", "kind", "sharding"]))
        leaf[field] = data.draw(
            st.recursive(
                st.none() | st.integers(-(2**70), 2**70) | st.text(max_size=5), st.lists, max_leaves=8
            )
        )
        mutated = index_doc.envelope(doc)
    try:
        index = shardsave.formats.shardsave.decode_index(mutated, "fuzz")
    except ShardsaveError:
        return
    for leaf in index.leaves:  # whatever decodes is internally consistent
        assert sum(s.nbytes for s in leaf.shards) == leaf.nbytes
        for s in leaf.shards:
            assert s.offset + s.nbytes <= index.files[s.file].nbytes


def test_atheris_fuzzes_the_index_decoder(tmp_path):
    """A short coverage-guided run seeded with the golden index (see tests/fuzz_index.py)."""
    import shutil
    import subprocess
    import sys

    pytest.importorskip("atheris", reason="atheris is in the test extra; it has no wheel for every platform")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for version in ("v1", "v2"):
        shutil.copy(Path(__file__).parent / "golden" / version / "model-7.index", corpus / f"{version}.index")
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "fuzz_index.py"), "-runs=20000", "-seed=1", str(corpus)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 20000 runs" in result.stderr
