"""Planning without I/O: who writes what on save, which bytes each target reads on restore.

The plans are pure functions of shapes, dtypes and shardings, so they are tested
here by what they decide, with stored layouts made by hand, and nothing read.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardsave
import shardsave.formats.shardsave
import shardsave.index
import shardsave.tree
from shardsave.index import Checksums, LeafEntry, StoredShard
from shardsave.restore import DEFAULT_BATCH_BYTES, LeafRequest, plan_restore
from shardsave.restore.reads import plan_reads
from shardsave.save.plan import plan_save

F32 = np.dtype(np.float32)
BF16 = np.dtype(jax.numpy.bfloat16)


CHUNKED = Checksums.chunked(4 << 20)  # shardsave's own checksum chunks


def _stored(shape: tuple[int, ...], rows_per_shard: int, name: str = "w", offset: int = 0) -> LeafEntry:
    """A leaf stored in shards of whole rows, one file each (as a 1-D mesh saves it),
    at `offset` in each file (leaves of one checkpoint lie at different offsets)."""
    shards = []
    for k, start in enumerate(range(0, shape[0], rows_per_shard)):
        stop = min(start + rows_per_shard, shape[0])
        nbytes = (stop - start) * math.prod(shape[1:]) * F32.itemsize
        crcs = tuple(
            0 for _ in range(shardsave.index.crc_chunks(nbytes, shardsave.formats.shardsave.CRC_CHUNK_BYTES))
        )
        start_at = (start, *[0] * (len(shape) - 1))
        shards.append(StoredShard(k, offset, nbytes, start_at, (stop, *shape[1:]), crcs))
    return LeafEntry(name, F32, shape, shardsave.tree.KIND_ARRAY, None, tuple(shards))


def _covered(reads, box) -> np.ndarray:
    """How many times each element of the target box is written by the reads."""
    count = np.zeros([b - a for a, b in box], np.int32)
    for read in reads:
        count[read.dst] += 1
    return count


def test_a_replicated_leaf_is_written_once_and_writers_are_balanced(mesh24):
    specs = [
        shardsave.tree.LeafSpec(f"r{i}", (64, 64), F32, shardsave.tree.KIND_ARRAY, NamedSharding(mesh24, P()))
        for i in range(8)
    ] + [shardsave.tree.LeafSpec("host", (10,), F32, shardsave.tree.KIND_NUMPY, None)]
    plan = plan_save(specs, True, jax.devices())
    shards = [s for f in plan.files for s in f.shards]
    assert sorted(s.leaf for s in shards) == list(range(9))  # each leaf stored exactly once
    sizes = [f.nbytes for f in plan.files]
    assert len(plan.files) == 8 and max(sizes) - min(sizes) <= 64  # one replica per device
    assert all(s.offset % 64 == 0 for s in shards)


def test_a_shard_of_1_mib_or_more_starts_on_a_page_and_smaller_ones_pack_at_64_bytes():
    # A page-aligned shard can be read from a cold disk with O_DIRECT; padding smaller
    # ones as well would cost up to 4 KiB each for no read that could use it.
    specs = [
        shardsave.tree.LeafSpec("a", (10,), F32, shardsave.tree.KIND_NUMPY, None),
        shardsave.tree.LeafSpec("b", (256, 1024), F32, shardsave.tree.KIND_NUMPY, None),  # 1 MiB
        shardsave.tree.LeafSpec("c", (3,), F32, shardsave.tree.KIND_NUMPY, None),
        shardsave.tree.LeafSpec("d", (20,), F32, shardsave.tree.KIND_NUMPY, None),
    ]
    (file,) = plan_save(specs, False, jax.devices()).files
    offsets = [s.offset for s in sorted(file.shards, key=lambda s: s.leaf)]
    assert offsets == [0, 4096, 4096 + (1 << 20), 4096 + (1 << 20) + 64]


def test_reads_of_a_resharded_target_cover_it_exactly_once():
    entry = _stored((32, 8), rows_per_shard=8)
    box = ((5, 27), (2, 6))  # crosses three stored shards, part of their columns
    reads = plan_reads(entry.shards, box, F32.itemsize)
    assert {r.shard.start[0] for r in reads} == {0, 8, 16, 24}
    assert (_covered(reads, box) == 1).all()
    # Each read is whole rows of one shard: a contiguous byte span.
    for r in reads:
        assert (
            r.shard.start[0]
            <= r.shard.start[0] + r.row_start
            < r.shard.start[0] + r.row_stop
            <= r.shard.stop[0]
        )


def test_a_read_cap_cuts_spans_into_row_ranges():
    entry = _stored((1024, 256), rows_per_shard=1024)  # one 1 MiB shard
    reads = plan_reads(entry.shards, ((0, 1024), (0, 256)), F32.itemsize, max_read_bytes=64 << 10)
    assert len(reads) == 16 and all(r.nbytes <= 64 << 10 for r in reads)
    assert (_covered(reads, ((0, 1024), (0, 256))) == 1).all()


@pytest.mark.parametrize("cols", [256, 768])  # rows of 1 KiB, and of 3 KiB (no divisor of 4 MiB)
def test_cuts_fall_on_checksum_chunks_where_rows_allow(cols):
    chunk = 4 << 20
    entry = _stored((65536, cols), rows_per_shard=65536)  # one shard of 64 or 192 MiB
    row_bytes = cols * F32.itemsize
    for box in (((0, 65536), (0, cols)), ((1000, 60000), (0, cols))):  # the second starts off a chunk
        reads = plan_reads(entry.shards, box, F32.itemsize, max_read_bytes=16 << 20, align=chunk)
        assert (_covered(reads, box) == 1).all()
        assert all(r.nbytes <= 16 << 20 for r in reads)
        # Every cut between two reads is on a chunk boundary of the shard.
        assert all(r.row_start * row_bytes % chunk == 0 for r in reads[1:])
        assert all(r.row_stop * row_bytes % chunk == 0 for r in reads[:-1])
    # Without align, cuts fall every max_read_bytes of whole rows from the box's start.
    reads = plan_reads(entry.shards, ((1000, 60000), (0, cols)), F32.itemsize, max_read_bytes=16 << 20)
    assert reads[0].row_stop - reads[0].row_start == (16 << 20) // row_bytes


def test_a_default_restore_reads_a_large_stored_shard_in_chunk_aligned_pieces(mesh24):
    """Pieces of at most 16 MiB, each its own checksum chunks (they land in the
    shard's buffer directly); a shard whose rows cannot be cut on chunks is read whole."""
    sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)), P("x"))
    big = _stored((65536, 256), rows_per_shard=65536)  # 64 MiB
    (unit,) = plan_restore(
        [LeafRequest(big, big.shape, F32, sharding)], CHUNKED, budget=None, sequential=False
    ).units
    assert [r.nbytes for r in unit.reads] == [16 << 20] * 4
    odd = _stored((8, (5 << 20) // 4 + 1), rows_per_shard=8)  # rows of 5 MiB + 4 bytes
    (unit,) = plan_restore(
        [LeafRequest(odd, odd.shape, F32, sharding)], CHUNKED, budget=None, sequential=False
    ).units
    assert len(unit.reads) == 1 and unit.reads[0].fills_target


def test_a_cap_shrinks_only_the_reads_that_hold_transient_memory(mesh24):
    """On a CPU device a shard restored as saved is read into the buffer the device
    adopts (the restored array), so a capped restore reads it in the default's
    16 MiB pieces; into a host (numpy) target or a cast, reads are transient and
    a 64 MiB cap reads a quarter of half of it at a time."""
    sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)), P("x"))
    big = _stored((65536, 256), rows_per_shard=65536)  # 64 MiB
    for target, dtype, piece in ((sharding, F32, 16 << 20), (None, F32, 8 << 20), (sharding, BF16, 8 << 20)):
        (unit,) = plan_restore(
            [LeafRequest(big, big.shape, dtype, target)], CHUNKED, budget=64 << 20, sequential=True
        ).units
        assert [r.nbytes for r in unit.reads] == [piece] * ((64 << 20) // piece), (target, dtype)


def test_a_target_laid_out_as_saved_reads_each_stored_shard_whole(mesh24):
    entry = _stored((64, 16), rows_per_shard=8)
    sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("x",)), P("x"))
    plan = plan_restore([LeafRequest(entry, (64, 16), F32, sharding)], CHUNKED, budget=None, sequential=False)
    assert len(plan.units) == 8
    assert all(len(u.reads) == 1 and u.reads[0].fills_target for u in plan.units)


def test_a_default_restore_of_a_large_tree_reads_in_batches_of_at_most_256_mib(mesh24):
    """Two batches are in flight at once; 1 GiB batches read a cold disk more slowly
    than 256 MiB ones (README "Performance")."""
    sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("x",)), P("x"))
    entries = [_stored((65536, 256), 8192, f"l{i}", offset=i << 23) for i in range(64)]  # 4 GiB
    requests = [LeafRequest(e, e.shape, F32, sharding) for e in entries]
    plan = plan_restore(requests, CHUNKED, budget=None, sequential=False)
    assert plan.budget == DEFAULT_BATCH_BYTES == 256 << 20 and plan.ahead == 1
    assert all(sum(u.read_bytes() for u in batch) <= plan.budget for batch in plan.batches)
    assert sum(len(b) for b in plan.batches) == len(plan.units) == 64 * 8


@pytest.mark.parametrize("on_devices", [True, False], ids=["cpu-devices", "host-arrays"])
def test_a_capped_plan_keeps_every_batch_within_the_budget(mesh24, on_devices):
    """What a batch holds beyond the restored arrays stays within its budget.

    A CPU device adopts the assembled buffer as its own, so on CPU devices only the
    reads count; a host (numpy) target's assembly is counted too.
    """
    entries = [_stored((2048, 1024), 256, f"l{i}", offset=i << 20) for i in range(8)]  # 8 MiB each
    sharding = NamedSharding(mesh24, P(None, "model")) if on_devices else None  # a column split
    requests = [LeafRequest(e, e.shape, F32, sharding) for e in entries]
    cap = 32 << 20
    plan = plan_restore(requests, CHUNKED, budget=cap, sequential=True)
    assert len(plan.batches) > 1 and plan.budget * (plan.ahead + 1) <= cap
    chunk = 4 << 20
    for batch in plan.batches:
        # The stored bytes a batch reads: each read widened to whole checksum chunks,
        # bytes that several reads share read once.
        spans = sorted(
            (
                r.shard.file,
                r.shard.offset + (r.row_start * r.row_bytes) // chunk * chunk,
                r.shard.offset
                + min(-(-(r.row_start * r.row_bytes + r.nbytes) // chunk) * chunk, r.shard.nbytes),
            )
            for u in batch
            for r in u.reads
        )
        read, reach = 0, (-1, 0)
        for file, a, b in spans:
            start = max(a, reach[1]) if reach[0] == file else a
            read += max(0, b - start)
            reach = (file, max(b, reach[1]) if reach[0] == file else b)
        held = read + (0 if on_devices else sum(u.assembly_bytes(F32.itemsize) for u in batch))
        assert len(batch) == 1 or held <= plan.budget
    assert sum(len(b) for b in plan.batches) == len(plan.units)


def test_target_boxes_sharing_stored_rows_read_them_once(mesh24):
    """A column split of row-stored shards: every device needs all rows of some columns.

    Uncapped, capped, and capped so tightly that each box is streamed (its reads
    exceed a batch): the boxes sharing rows stream together.
    """
    entry = _stored((16384, 1024), rows_per_shard=2048)  # 64 MiB in 8 shards of whole rows
    sharding = NamedSharding(mesh24, P(None, "model"))
    for budget, sequential in ((None, False), (256 << 20, True), (MIN_CAP, True)):
        request = LeafRequest(entry, entry.shape, F32, sharding)
        plan = plan_restore([request], CHUNKED, budget=budget, sequential=sequential)
        # Each stored byte is asked for by 4 column boxes, and read by one batch only.
        readers: dict[tuple[int, int, int], set[int]] = {}
        for k, batch in enumerate(plan.batches):
            for u in batch:
                for r in u.reads:
                    readers.setdefault((r.shard.file, r.shard.offset, r.row_start), set()).add(k)
        assert all(len(batches) == 1 for batches in readers.values()), readers
        if budget == MIN_CAP:  # each box reads 64 MiB: streamed, the 4 boxes as one group
            assert [len(batch) for batch in plan.batches] == [4]
            assert plan.streamed == {0}


MIN_CAP = 32 << 20


def test_a_budget_a_capped_restore_cannot_keep_is_refused_before_reading():
    with pytest.raises(ValueError, match="below the 32 MiB"):
        plan_restore([], CHUNKED, budget=8 << 20, sequential=True)


def test_a_listing_groups_a_directorys_keys_by_checkpoint():
    from shardsave.formats.shardsave import Listing, names_of_save_path

    listing = Listing(
        [
            "checkpoint",
            ".model.lock",
            "model-1.index",
            "model-1.data-00000-of-00002",
            "model-1.data-00001-of-00002.part-00000",
            "model-2.data-00000-of-00001",  # a save that never committed
            "model-2.data-00000-of-00001.tmp-0a1b2c3d",
            "model--3.index.tmp-deadbeef",  # an interrupted commit of a negative step
            "best-7.index",
            "notes.txt.tmp-01234567",  # another program's temporary file: not a checkpoint's
        ]
    )
    assert listing.committed == {"model-1", "best-7"}
    assert listing.checkpoints() == ["best-7", "model-1", "model-2"]
    assert listing.files_of("model-1") == [
        "model-1.data-00000-of-00002",
        "model-1.data-00001-of-00002.part-00000",
    ]
    assert listing.leftovers(names_of_save_path("model")) == [
        "model--3.index.tmp-deadbeef",
        "model-2.data-00000-of-00001",
        "model-2.data-00000-of-00001.tmp-0a1b2c3d",
    ]
    assert listing.leftovers(names_of_save_path("best")) == []
