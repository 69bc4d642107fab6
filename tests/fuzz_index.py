"""Coverage-guided fuzzing of the index decoder with atheris.

Every input must decode to a consistent index or raise a ShardsaveError; any other
exception is a crash. Run longer by hand, e.g.:

    python tests/fuzz_index.py -max_total_time=600 tests/golden/v2
"""

from __future__ import annotations

import sys

import atheris
import jax  # noqa: F401  (imported first, so only shardsave's own code is instrumented)
import ml_dtypes  # noqa: F401
import numpy  # noqa: F401
import tensorstore  # noqa: F401

import shardsave.formats.shardsave

with atheris.instrument_imports(include=["shardsave"]):
    import shardsave
    from shardsave.errors import ShardsaveError


def test_one_input(data: bytes) -> None:
    try:
        index = shardsave.formats.shardsave.decode_index(data, "fuzz")
    except ShardsaveError:
        return
    for leaf in index.leaves:
        assert sum(s.nbytes for s in leaf.shards) == leaf.nbytes
        for s in leaf.shards:
            assert s.offset + s.nbytes <= index.files[s.file].nbytes


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
