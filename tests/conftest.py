"""Shared test setup: GPU marker handling and fresh random inputs.

Tests run the Pallas kernels in interpret mode on a machine without a GPU (``implementation="pallas"``)
and on the real GPU when there is one; ``@pytest.mark.gpu`` tests are skipped without a GPU.
"""

from __future__ import annotations

import os

# GPU interpret mode runs a Mosaic kernel's warpgroups as threads whose host callbacks block on
# simulated barriers until every warpgroup arrives; the callbacks run on the XLA CPU client's
# thread pool, sized by default to the machine's cores. On a 2-core machine under load the pool
# filled with blocked callbacks and the race-detection test hung (CI timed out; reproduced here
# with PJRT_NPROC=1 every time, and with the default 2 in 3 of 11 loaded runs). A pool wider than
# the kernels' threads (a launch callback + 3 warpgroups) removes the wait; set before jax starts.
os.environ.setdefault("PJRT_NPROC", str(max(16, os.cpu_count() or 1)))

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import pytest

from bi_jax import _backend


def pytest_collection_modifyitems(config, items):
    if _backend.has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_counter = iter(range(1 << 62))


def fresh_key() -> jax.Array:
    """A new PRNG key per call (seeded from the OS), so inputs differ from run to run."""
    seed = int(np.random.SeedSequence().entropy % (1 << 31)) ^ next(_counter)
    return jax.random.key(seed)


def randn(shape, dtype, key=None, scale=1.0) -> jax.Array:
    """Random normal input (never zeros), rounded to ``dtype``."""
    key = fresh_key() if key is None else key
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


@pytest.fixture
def key():
    return fresh_key()
