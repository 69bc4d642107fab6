"""Every test sees 8 simulated CPU devices; XLA_FLAGS must be set before jax loads."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pytest

from shardsave import _storage


@pytest.fixture
def mesh24():
    return jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


@pytest.fixture
def io_stats():
    _storage.STATS.reset()
    return _storage.STATS


def run_python(code: str, devices: int = 8, timeout: float = 300, env: dict | None = None) -> str:
    """Runs code in a fresh interpreter with `devices` simulated CPU devices; returns stdout.

    For the README's code blocks; the tests' own programs are modules under
    tests/programs, run with run_program.
    """
    return run_program(["-c", code], devices, timeout, env)


def run_program(argv: list[str], devices: int = 8, timeout: float = 300, env: dict | None = None) -> str:
    """Runs `python *argv` with `devices` simulated CPU devices; returns stdout."""
    import subprocess
    import sys

    full_env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
