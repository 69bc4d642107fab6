"""Every test sees 8 simulated CPU devices; XLA_FLAGS must be set before jax loads."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from shardsave import _storage  # noqa: E402


@pytest.fixture
def mesh24():
    return jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


@pytest.fixture
def io_stats():
    _storage.STATS.reset()
    return _storage.STATS
