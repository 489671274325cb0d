"""bi_jax.parallel: data and tensor parallelism over several (simulated CPU) devices.

The multi-device checks need ``--xla_force_host_platform_device_count=4`` before jax initialises, and
the rest of the suite has initialised jax with one device already. So this file runs itself as a
worker in a subprocess (``python tests/test_parallel.py worker``) with that flag: the worker runs every
check, prints ``PASS <name>`` or ``FAIL <name>: <error>`` per check, and each pytest test below asserts
on its own line. Checks that need one device only (the combine against a numpy fold, validation) run
in the pytest process.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import multidevice
import numpy as np
import pytest

NUM_DEVICES = 4


def _randn(seed, shape, dtype, scale=1.0):
    return (jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale).astype(dtype)


def _f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


# ------------------------------------------------------------------------------ the worker (4 devices)

# assert_batch_invariant options: every new batch size is a fresh compile, so few of them
INV = dict(sizes=(1, 5), num_permutations=1, num_embeddings=1)


def _check_dp_matmul(impl):
    from bi_jax import matmul, parallel, testing

    mesh = parallel.make_mesh(NUM_DEVICES)
    w = _randn(1, (64, 48), jnp.bfloat16)
    b = _randn(2, (48,), jnp.bfloat16)
    x = _randn(3, (21, 64), jnp.bfloat16)

    def fn(x, w, b):
        return matmul(x, w, bias=b, implementation=impl)

    dp = parallel.data_parallel(fn, mesh)
    one = jax.jit(fn)(x, w, b)
    for m in (1, 3, 4, 13, 21):  # batches smaller than, not divisible by and divisible by D
        testing.assert_bitwise_equal(dp(x[:m], w, b), one[:m], what=f"data parallel M={m}")


def _check_dp_rms_norm(impl):
    from bi_jax import parallel, rms_norm, testing

    mesh = parallel.make_mesh(NUM_DEVICES)
    x = _randn(4, (2, 11, 96), jnp.bfloat16, scale=3.0)
    r = _randn(5, (2, 11, 96), jnp.bfloat16)
    g = _randn(6, (96,), jnp.float32)

    def fn(x, r, g):
        return rms_norm(x, g, residual=r, implementation=impl)

    dp = parallel.data_parallel(fn, mesh, batched_argnums=(0, 1))
    testing.assert_bitwise_equal(dp(x, r, g), jax.jit(fn)(x, r, g), what="data parallel rms_norm [2, 11]")
    x2, r2 = x.reshape(22, 96), r.reshape(22, 96)
    one = jax.jit(fn)(x2, r2, g)
    for m in (1, 5, 22):
        testing.assert_bitwise_equal(dp(x2[:m], r2[:m], g), (one[0][:m], one[1][:m]), what=f"M={m}")


def _check_row_parallel(impl, combine="fixed", dtype=jnp.bfloat16):
    from bi_jax import parallel, testing

    mesh = parallel.make_mesh(NUM_DEVICES)
    k, n = 128, 40
    w = _randn(7, (k, n), dtype, scale=k**-0.5)
    b = _randn(8, (n,), dtype)
    x = _randn(9, (21, k), dtype)

    def fn(x):
        return parallel.row_parallel_linear(x, w, b, mesh=mesh, combine=combine, implementation=impl)

    y = fn(x)
    assert y.dtype == dtype and y.shape == (21, n)
    testing.assert_close(y, _f64(x) @ _f64(w) + _f64(b), dtype=dtype)
    if combine == "fixed":
        testing.assert_batch_invariant(fn, x, **INV)


def _check_row_parallel_is_numpy_fold(impl):
    """The output is the numpy left fold, in fp32, of the per-device partials, + bias, rounded once."""
    from bi_jax import matmul, parallel, testing

    mesh = parallel.make_mesh(NUM_DEVICES)
    k, n, m = 128, 24, 9
    w = _randn(10, (k, n), jnp.bfloat16)
    b = _randn(11, (n,), jnp.bfloat16)
    x = _randn(12, (m, k), jnp.bfloat16)
    got = parallel.row_parallel_linear(x, w, b, mesh=mesh, implementation=impl)
    s = k // NUM_DEVICES
    parts = [
        np.asarray(matmul(x[:, i * s : (i + 1) * s], w[i * s : (i + 1) * s], out_dtype=jnp.float32,
                          implementation=impl))
        for i in range(NUM_DEVICES)
    ]
    acc = parts[0]
    for p in parts[1:]:
        acc = (acc + p).astype(np.float32)
    acc = (acc + np.asarray(b, np.float32)).astype(np.float32)
    testing.assert_bitwise_equal(got, jnp.asarray(acc).astype(jnp.bfloat16), what="fold of partials")


def _check_column_parallel(impl):
    from bi_jax import matmul, parallel, testing

    mesh = parallel.make_mesh(NUM_DEVICES)
    k, n = 96, 64
    w = _randn(13, (k, n), jnp.bfloat16)
    b = _randn(14, (n,), jnp.bfloat16)
    x = _randn(15, (2, 17, k), jnp.bfloat16)

    def fn(x):
        return parallel.column_parallel_linear(x, w, b, mesh=mesh, implementation=impl)

    y = fn(x)
    assert y.shape == (2, 17, n)
    testing.assert_bitwise_equal(y, matmul(x, w, bias=b, implementation=impl), what="vs one device")
    testing.assert_close(y, _f64(x) @ _f64(w) + _f64(b), dtype=jnp.bfloat16)
    testing.assert_batch_invariant(fn, x.reshape(34, k)[:, None], **INV)


def _check_mlp(impl):
    from bi_jax import parallel, testing

    mesh = parallel.make_mesh(NUM_DEVICES)
    h, f = 32, 64
    wg = _randn(16, (h, f), jnp.float32, scale=h**-0.5)
    wu = _randn(17, (h, f), jnp.float32, scale=h**-0.5)
    wd = _randn(18, (f, h), jnp.float32, scale=f**-0.5)
    x = _randn(19, (12, h), jnp.float32)

    def fn(x):
        return parallel.tensor_parallel_mlp(x, wg, wu, wd, mesh=mesh, implementation=impl)

    g, u = _f64(x) @ _f64(wg), _f64(x) @ _f64(wu)
    want = (g / (1 + np.exp(-g)) * u) @ _f64(wd)
    testing.assert_close(fn(x), want, dtype=jnp.float32)
    testing.assert_batch_invariant(fn, x, **INV)


def _check_two_device_mesh():
    """A sub-mesh of 2 of the 4 devices: the combine order follows the mesh, not jax.devices()."""
    from bi_jax import parallel, testing

    mesh = parallel.make_mesh(devices=jax.devices()[2:])
    w = _randn(20, (64, 16), jnp.bfloat16)
    x = _randn(21, (10, 64), jnp.bfloat16)
    y = parallel.row_parallel_linear(x, w, mesh=mesh, implementation="reference")
    testing.assert_close(y, _f64(x) @ _f64(w), dtype=jnp.bfloat16)
    testing.assert_batch_invariant(
        lambda x: parallel.row_parallel_linear(x, w, mesh=mesh, implementation="reference"),
        x, **INV,
    )


CHECKS = {
    "device_count": lambda: None,
    "dp_matmul_reference": lambda: _check_dp_matmul("reference"),
    "dp_matmul_pallas": lambda: _check_dp_matmul("pallas"),
    "dp_rms_norm_reference": lambda: _check_dp_rms_norm("reference"),
    "dp_rms_norm_pallas": lambda: _check_dp_rms_norm("pallas"),
    "row_parallel_reference": lambda: _check_row_parallel("reference"),
    "row_parallel_reference_f32": lambda: _check_row_parallel("reference", dtype=jnp.float32),
    "row_parallel_pallas": lambda: _check_row_parallel("pallas"),
    "row_parallel_psum_accurate": lambda: _check_row_parallel("reference", combine="psum"),
    "row_parallel_fold_reference": lambda: _check_row_parallel_is_numpy_fold("reference"),
    "row_parallel_fold_pallas": lambda: _check_row_parallel_is_numpy_fold("pallas"),
    "column_parallel_reference": lambda: _check_column_parallel("reference"),
    "column_parallel_pallas": lambda: _check_column_parallel("pallas"),
    "mlp_reference": lambda: _check_mlp("reference"),
    "two_device_submesh": _check_two_device_mesh,
}


# ------------------------------------------------------------------------------------ pytest side

worker_output, test_multi_device, test_worker_exit_code = multidevice.make_tests(
    CHECKS, NUM_DEVICES, __file__)


def test_fixed_order_combine_is_numpy_left_fold():
    from bi_jax import parallel

    rng = np.random.default_rng(0)
    for d in (1, 2, 3, 5, 8):
        # magnitudes spread over many binades so that different orders give different bits
        p = (rng.standard_normal((d, 7, 33)) * 10.0 ** rng.integers(-4, 5, (d, 7, 33))).astype(np.float32)
        want = p[0].copy()
        for i in range(1, d):
            want = (want + p[i]).astype(np.float32)
        got = np.asarray(jax.jit(parallel.fixed_order_combine)(jnp.asarray(p)))
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_one_device_mesh_and_errors():
    from bi_jax import matmul, parallel, testing

    mesh = parallel.make_mesh(1)
    x = _randn(30, (5, 32), jnp.bfloat16)
    w = _randn(31, (32, 8), jnp.bfloat16)
    y = parallel.row_parallel_linear(x, w, mesh=mesh, implementation="reference")
    # one device: the fold of one partial is the partial, so the bits are the one-device matmul's
    testing.assert_bitwise_equal(y, matmul(x, w, implementation="reference"))
    with pytest.raises(ValueError, match="combine"):
        parallel.row_parallel_linear(x, w, mesh=mesh, combine="tree")
    with pytest.raises(ValueError, match="no axis"):
        parallel.row_parallel_linear(x, w, mesh=mesh, axis="tp")
    with pytest.raises(ValueError, match="contraction"):
        parallel.row_parallel_linear(x, w[:16], mesh=mesh)
    with pytest.raises(ValueError, match="devices"):
        parallel.make_mesh(len(jax.devices()) + 1)


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    sys.exit(multidevice.run_checks(CHECKS, NUM_DEVICES))
