"""Host memory during restore, measured in a fresh process (peak RSS minus RSS after)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_program

MIB = 1 << 20

MEASURE = Path(__file__).parent / "programs" / "measure_restore.py"


def _measure(tmp_path, total_mib, big_mib, sequential, cap):
    argv = [str(MEASURE), str(tmp_path), str(total_mib), str(big_mib), str(sequential), str(cap)]
    out = run_program(argv, timeout=600)
    return json.loads(out.strip().splitlines()[-1])


def test_restore_sequentially_holds_the_cap(tmp_path):
    cap = 32 * MIB
    result = _measure(tmp_path, total_mib=512, big_mib=128, sequential=True, cap=cap)
    assert result["ok"]
    bound = max(cap, 64 * MIB) + 64 * MIB
    assert result["transient"] < bound, (
        f"transient {result['transient'] / MIB:.0f} MiB >= {bound / MIB:.0f} MiB"
    )


def test_default_restore_stays_near_the_bytes_restored(tmp_path):
    result = _measure(tmp_path, total_mib=512, big_mib=64, sequential=False, cap=None)
    assert result["ok"]
    assert result["transient"] < 512 * MIB * 1.05


def test_buffers_of_a_capped_restore_return_their_memory_when_dropped():
    # restore_sequentially reads into mapped_empty buffers on the I/O threads and drops
    # them on the caller's. Buffers from malloc (aligned_empty) stay resident after
    # that: 64 MiB of them here, outside the restore's budget.
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    from shardsave._storage import mapped_empty

    def filled(nbytes):
        buffer = mapped_empty(nbytes)
        buffer.fill(1)
        return buffer

    proc = psutil.Process()
    kept = []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(6):
            base = proc.memory_info().rss
            buffers = list(pool.map(filled, [16 * MIB] * 4))
            assert proc.memory_info().rss > base + 56 * MIB
            del buffers
            kept.append(proc.memory_info().rss - base)
    assert max(kept) < 8 * MIB, f"{max(kept) / MIB:.0f} MiB stayed resident after the buffers were dropped"
