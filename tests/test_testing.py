"""bi_jax.testing: the helpers must catch what they claim to catch."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randn

from bi_jax import testing


def test_rowwise_function_passes():
    x, w = randn((40, 16), jnp.float32), randn((16,), jnp.float32)
    testing.assert_batch_invariant(lambda x, w: x * w + 1.0, x, w)


def test_batch_dependent_function_is_caught():
    x = randn((40, 16), jnp.float32)
    with pytest.raises(AssertionError, match="prefix of 1 rows.*first differing row 0"):
        testing.assert_batch_invariant(lambda x: x - x.mean(0), x)


def test_position_dependent_function_is_caught():
    x = randn((5, 8), jnp.float32)
    shift = lambda x: x + jnp.arange(x.shape[0], dtype=x.dtype)[:, None] * 1e-3
    with pytest.raises(AssertionError, match="permutation|embedded"):
        testing.assert_batch_invariant(shift, x, sizes=())


def test_size_dependent_rounding_is_caught():
    x = randn((64, 8), jnp.float32)
    f = lambda x: x * (1.0 + 1e-6 * (x.shape[0] > 16))
    with pytest.raises(AssertionError, match="prefix of 1 rows"):
        testing.assert_batch_invariant(f, x)


def test_nondeterminism_is_caught():
    state = {"n": 0}

    def flaky(x):
        state["n"] += 1
        return x + state["n"] * 1e-3

    with pytest.raises(AssertionError, match="repeated run"):
        testing.assert_batch_invariant(flaky, randn((4, 3), jnp.float32))


def test_batch_axis_and_pytree_outputs():
    x = randn((6, 30, 4), jnp.bfloat16)
    f = lambda x: {"a": x * 2, "b": (x[..., 0], x.sum(-1))}
    testing.assert_batch_invariant(f, x, batch_axis=1)
    with pytest.raises(AssertionError):
        testing.assert_batch_invariant(lambda x: x.sum(1), x, batch_axis=1, out_axis=0)


def test_ulp_distance():
    for dtype in (np.float16, np.float32, np.float64, jnp.bfloat16):
        one = np.array([1.0], dtype)
        nxt = (
            np.nextafter(one.astype(np.float32), np.float32(2)).astype(dtype)
            if dtype in (np.float16, jnp.bfloat16)
            else np.nextafter(one, dtype(2))
        )
        if dtype in (np.float16, jnp.bfloat16):  # step by one bit pattern
            bits = one.view(np.uint16) + 1
            nxt = bits.view(dtype)
        assert testing.ulp_distance(one, nxt)[0] == 1
        assert testing.ulp_distance(np.array([0.0], dtype), np.array([-0.0], dtype))[0] == 0
        neg = -nxt
        assert testing.ulp_distance(-one, neg)[0] == 1


def test_assert_bitwise_equal_names_row_and_ulps():
    a = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    b = a.copy()
    b[2, 1] = np.nextafter(b[2, 1], np.float32(100))
    b[2, 1] = np.nextafter(b[2, 1], np.float32(100))
    with pytest.raises(AssertionError, match="first differing row 2.*2 ULP"):
        testing.assert_bitwise_equal(b, a)


def test_assert_close_and_nonfinite():
    e = np.array([1.0, 2.0, np.nan, np.inf])
    testing.assert_close(np.array([1.0, 2.0, np.nan, np.inf], np.float32), e)
    with pytest.raises(AssertionError):
        testing.assert_close(np.array([1.0, 2.0, 3.0, np.inf], np.float32), e)
    with pytest.raises(AssertionError, match="exceeds"):
        testing.assert_close(np.array([1.1, 2.0], np.float32), np.array([1.0, 2.0]))
    assert (
        testing.tolerance(jnp.bfloat16)
        > testing.tolerance(jnp.float16)
        > testing.tolerance(jnp.float32)
    )


def test_ulp_distance_keeps_shape():
    a = np.float32(1.0)
    b = np.nextafter(a, np.float32(2))
    assert testing.ulp_distance(a, b).shape == ()
    assert int(testing.ulp_distance(a, b)) == 1
    assert testing.ulp_distance(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32)).shape == (2, 3)
