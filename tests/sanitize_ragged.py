"""Run every Pallas kernel on ragged shapes, for ``compute-sanitizer --tool memcheck`` on a GPU.

    XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false \
        compute-sanitizer --tool memcheck --error-exitcode 3 python3 tests/sanitize_ragged.py

The platform allocator gives every buffer its own cudaMalloc, so an access past an array's end lands
outside any allocation and memcheck reports it (with XLA's pooled allocator it would go unnoticed).
Shapes are chosen so no dimension is a multiple of any tile. Ops whose module is missing are skipped.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np


def _randn(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def run_matmul(key):
    import bi_jax
    from bi_jax.matmul import shipped_configs

    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        for m, k, n in ((1, 100, 70), (3, 129, 33), (17, 64, 257), (130, 200, 190)):
            ka, kb, kc, key = jax.random.split(key, 4)
            a, b, bias = (
                _randn(ka, (m, k), dtype),
                _randn(kb, (k, n), dtype),
                _randn(kc, (n,), dtype),
            )
            for cfg in shipped_configs(dtype):
                out = bi_jax.matmul(a, b, bias=bias, implementation="pallas", config=cfg)
                assert np.isfinite(np.asarray(out, np.float32)).all()
    return "matmul"


CHECKS = {"bi_jax.matmul": run_matmul}


def main() -> None:
    print("backend:", jax.default_backend(), jax.devices()[0].device_kind)
    key = jax.random.key(0)
    for module, fn in CHECKS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            print("skip (module missing):", module)
            continue
        print("ran:", fn(key))


if __name__ == "__main__":
    main()
