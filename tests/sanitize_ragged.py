"""Run every Pallas kernel on ragged shapes, for ``compute-sanitizer --tool memcheck`` on a GPU.

    XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false \
        compute-sanitizer --tool memcheck --error-exitcode 3 python3 tests/sanitize_ragged.py [attention]

The platform allocator gives every buffer its own cudaMalloc, so an access past an array's end lands
outside any allocation and memcheck reports it (with XLA's pooled allocator it would go unnoticed).
Shapes are chosen so no dimension is a multiple of any tile. The script imports ``bi_jax`` from the
repository it sits in (nothing needs installing). A module that does not import, or an op name that
matches no check, stops the run with an error: a run that checks nothing must not pass memcheck.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's bi_jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _randn(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def run_matmul(key):
    import bi_jax
    from bi_jax.matmul import shipped_configs

    mm = sys.modules["bi_jax.matmul"]  # bi_jax.matmul the attribute is the function
    shipped = mm._K_CHUNK, mm._K_CHUNK_ALIGN
    shapes = ((1, 100, 70), (3, 129, 33), (17, 64, 257), (130, 200, 190))
    try:
        # (64, 64): ragged K in several chunks (split-K kernels); (192, 64): even chunks, K = 200
        # as 128 + 72 and 256 as 128 + 128 (not 192 + the rest)
        for mm._K_CHUNK, mm._K_CHUNK_ALIGN in (shipped, (64, 64), (192, 64)):
            for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
                for m, k, n in shapes:
                    ka, kb, kc, key = jax.random.split(key, 4)
                    a, b = _randn(ka, (m, k), dtype), _randn(kb, (k, n), dtype)
                    bias = _randn(kc, (n,), dtype)
                    for cfg in shipped_configs(dtype):
                        out = bi_jax.matmul(a, b, bias=bias, implementation="pallas", config=cfg)
                        assert np.isfinite(np.asarray(out, np.float32)).all()
                # the Mosaic kernel (Hopper, no bias): tiles past the last row and column, M
                # not a multiple of 8, more tiles than CTAs, one item per K chunk (split_k), the
                # rows of the last tile in boxes of 64 / 32 / 16 / 8 rows (M = 181: 32 + 16 + 8)
                for m, k, n in ((133, 192, 320), (181, 192, 320), (264, 256, 448), (4100, 128, 4096)):
                    ka, kb, key = jax.random.split(key, 3)
                    a, b = _randn(ka, (m, k), dtype), _randn(kb, (k, n), dtype)
                    for cfg in shipped_configs(dtype):
                        if cfg.kernel == "mosaic":
                            out = bi_jax.matmul(a, b, implementation="pallas", config=cfg)
                            assert np.isfinite(np.asarray(out, np.float32)).all()
    finally:
        mm._K_CHUNK, mm._K_CHUNK_ALIGN = shipped
    return "matmul"


def run_rows(key):
    import bi_jax

    for dtype in (jnp.bfloat16, jnp.float32):
        for rows, n in ((1, 1000), (3, 4097), (5, 5120), (2, 40000), (130, 72)):
            kx, kr, kw, key = jax.random.split(key, 4)
            x, r = _randn(kx, (rows, n), dtype), _randn(kr, (rows, n), dtype)
            w = _randn(kw, (n,), dtype)
            outs = [
                *bi_jax.rms_norm(x, w, residual=r, implementation="pallas"),
                bi_jax.rms_norm(x, w, implementation="pallas"),
                bi_jax.layer_norm(x, w, w, implementation="pallas"),
                bi_jax.softmax(x, implementation="pallas"),
                bi_jax.log_softmax(x, implementation="pallas"),
                bi_jax.sum(x, implementation="pallas"),
                bi_jax.mean(x, implementation="pallas"),
            ]
            for out in outs:
                assert np.isfinite(np.asarray(out, np.float32)).all()
    return "norms and reductions"


def run_attention(key):
    import bi_jax
    from bi_jax import _backend as be
    from bi_jax.attention import attention_config

    for dtype in (jnp.bfloat16,):
        # (2, 4100, 32, 8, 128): 33.6 MB of K/V, the token-major prefill grid, a ragged last block
        # (16, 1100, 32, 8, 128): a decode whose 16 x 8 (row, KV head) items fill the SMs, so the
        # Mosaic kernel folds its 3 splits in the CTA (``_split_pays``)
        for b, t, hq, hkv, d in ((1, 1, 4, 1, 64), (3, 77, 8, 2, 128), (2, 600, 4, 4, 64),
                                 (2, 4100, 32, 8, 128), (16, 1100, 32, 8, 128)):
            kq, kk, kv, key = jax.random.split(key, 4)
            q, k = _randn(kq, (b, t, hq, d), dtype), _randn(kk, (b, t, hkv, d), dtype)
            v = _randn(kv, (b, t, hkv, d), dtype)
            with be.assume_not_hopper():  # the Triton kernels as well where Mosaic is default
                triton = attention_config(d, dtype)
            for cfg in {attention_config(d, dtype), triton}:
                out = bi_jax.attention(q, k, v, implementation="pallas", config=cfg)
                lengths = t - jnp.arange(b, dtype=jnp.int32) * 37 % t  # ragged, in [1, t]
                dec = bi_jax.decode_attention(q[:, -1:], k, v, lengths, implementation="pallas",
                                              config=cfg)
                assert np.isfinite(np.asarray(out, np.float32)).all()
                assert np.isfinite(np.asarray(dec, np.float32)).all()
    return "attention and decode"


CHECKS = {
    "bi_jax.matmul": run_matmul,
    "bi_jax.norm": run_rows,
    "bi_jax.attention": run_attention,
}


def main(only: list[str]) -> None:
    """Run the checks of every module, or of those whose name ends in one of ``only``."""
    unknown = [o for o in only if not any(m.endswith(o) for m in CHECKS)]
    if unknown:
        raise SystemExit(f"sanitize_ragged: {unknown} match no check (checks: {', '.join(CHECKS)})")
    print("backend:", jax.default_backend(), jax.devices()[0].device_kind)
    key = jax.random.key(0)
    for module, fn in CHECKS.items():
        if not only or any(module.endswith(o) for o in only):
            print("ran:", fn(key))  # each check imports bi_jax: an ImportError ends the run


if __name__ == "__main__":
    main(sys.argv[1:])
