"""Metrics and metadata saved with a checkpoint: committed with it, read without any array."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import shardsave
from shardsave.cli import main


def test_metrics_and_metadata_round_trip_exactly(tmp_path, io_stats):
    metadata = {
        "loader": {"epoch": 3, "position": 12_345, "seed": None},
        "config": {"lr": 0.001, "tags": ["a", "b"]},
    }
    saver = shardsave.Saver(async_save=True)
    path = saver.save(
        {"w": np.ones(1000)},
        str(tmp_path / "m"),
        global_step=7,
        metrics={
            "loss": np.float32(0.25),
            "accuracy": jnp.float32(0.5),
            "tokens": np.int64(10**12),
            "ok": True,
        },
        metadata=metadata,
    )
    saver.wait_until_finished()
    io_stats.reset()
    reader = shardsave.CheckpointReader(path)
    assert reader.metrics == {"loss": 0.25, "accuracy": 0.5, "tokens": 10**12, "ok": True}
    assert reader.metadata == metadata
    index_bytes = (tmp_path / "m-7.index").stat().st_size
    assert io_stats.bytes_read == index_bytes  # the index alone, no array
    plain = shardsave.Saver(async_save=False).save({"w": np.ones(3)}, str(tmp_path / "plain"))
    assert (
        shardsave.CheckpointReader(plain).metrics is None
        and shardsave.CheckpointReader(plain).metadata is None
    )


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize(
    "metadata, match",
    [
        ({"x": np.ones(3)}, r"metadata\['x'\] is a ndarray"),
        ({1: "a"}, "has the key 1"),
        ({"nested": {"f": float("nan")}}, r"metadata\['nested'\]\['f'\] is nan"),
        ({"o": object()}, "is a object"),
        ("not a dict", "must be a dict"),
    ],
)
def test_what_json_cannot_hold_is_refused_before_anything_is_written(tmp_path, async_save, metadata, match):
    saver = shardsave.Saver(async_save=async_save)
    with pytest.raises(TypeError, match=match):
        saver.save({"w": np.ones(3)}, str(tmp_path / "d" / "m"), metadata=metadata)
    saver.wait_until_finished()
    assert not (tmp_path / "d").exists()


def test_inspect_shows_them(tmp_path):
    import io

    path = shardsave.Saver(async_save=False).save(
        {"w": np.ones(3)}, str(tmp_path / "m"), metrics={"loss": 1.5}, metadata={"run": "x"}
    )
    out = io.StringIO()
    assert main(["inspect", path], out=out) == 0
    assert 'metrics: {"loss": 1.5}' in out.getvalue() and 'metadata: {"run": "x"}' in out.getvalue()
    out = io.StringIO()
    assert main(["inspect", "--json", path], out=out) == 0
    assert json.loads(out.getvalue())["metrics"] == {"loss": 1.5}
