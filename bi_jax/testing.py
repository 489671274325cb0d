"""Public test helpers: assert batch invariance bitwise, and accuracy against a float64 reference.

Use them in your own (pytest/chex) tests::

    from bi_jax import testing

    testing.assert_batch_invariant(lambda x: model_fn(params, x), x)         # rows of x are requests
    testing.assert_close(out, reference_f64, dtype=jnp.bfloat16)             # accuracy vs float64

``assert_batch_invariant`` checks, bitwise, the contract of DESIGN §1 for a function whose output row
``i`` should depend only on input row ``i``:

* prefix slices: ``fn(x[:s])[j] == fn(x)[j]`` for s in 1, 2, 3, 7, 16, 33, 64, 127, 256, ... and full;
* permutations: ``fn(x[perm]) == fn(x)[perm]``;
* embedding: a row placed at a random position among random neighbours (other rows of ``x``,
  perturbed with fresh noise for float inputs) gives the same bits as in ``fn(x)``;
* repeated runs: ``fn(x)`` twice gives the same bits (run-to-run determinism).

On failure the message names the check, the first differing row and the largest ULP distance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_SIZES = (1, 2, 3, 7, 16, 33, 64, 127, 256, 300, 1024)

__all__ = [
    "assert_batch_invariant",
    "assert_bitwise_equal",
    "assert_close",
    "relative_error",
    "tolerance",
    "ulp_distance",
]


# ----------------------------------------------------------------------------------------- bitwise


def _uint_view(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x).reshape(np.shape(x))  # ascontiguousarray makes 0-d arrays 1-d
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def ulp_distance(a: Any, b: Any) -> np.ndarray:
    """Elementwise distance in units in the last place between two float arrays of one dtype.

    Works for bfloat16, float16, float32 and float64; +0 and -0 are 0 apart, NaNs are reported as the
    distance of their bit patterns.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype:
        raise TypeError(f"ulp_distance: dtypes differ: {a.dtype} vs {b.dtype}")
    bits = a.dtype.itemsize * 8
    if bits == 64:
        sa, sb = a.view(np.int64), b.view(np.int64)
        lo = np.iinfo(np.int64).min
        oa, ob = np.where(sa < 0, lo - sa, sa), np.where(sb < 0, lo - sb, sb)
        same_sign = (oa < 0) == (
            ob < 0
        )  # exact int64 difference; float for huge opposite-sign gaps
        with np.errstate(over="ignore"):
            exact = np.abs(oa - ob).astype(np.float64)
        return np.where(same_sign, exact, np.abs(oa.astype(np.float64) - ob.astype(np.float64)))
    ua, ub = _uint_view(a).astype(np.int64), _uint_view(b).astype(np.int64)
    sign = np.int64(1) << (bits - 1)

    def ordered(u: np.ndarray) -> np.ndarray:  # monotone map of float bit patterns to integers
        return np.where(u & sign, sign - u, u)

    return np.abs(ordered(ua) - ordered(ub))


def _first_diff(a: np.ndarray, b: np.ndarray, axis: int) -> tuple[int, int] | None:
    """(first differing index along ``axis``, max ULP distance) or None when bitwise equal."""
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.dtype != b.dtype:
        raise AssertionError(f"dtypes differ: {a.dtype} vs {b.dtype}")
    neq = _uint_view(a) != _uint_view(b)
    if not neq.any():
        return None
    other = tuple(i for i in range(a.ndim) if i != axis)
    rows = np.nonzero(neq.any(axis=other) if other else neq)[0]
    if np.issubdtype(a.dtype, np.floating) or a.dtype == jnp.bfloat16:
        ulps = int(ulp_distance(a, b).max())
    else:
        ulps = -1
    return int(rows[0]), ulps


def assert_bitwise_equal(actual: Any, expected: Any, *, axis: int = 0, what: str = "") -> None:
    """Assert two arrays (or pytrees of arrays) have identical bits; name the first differing row."""
    la, lb = jax.tree.leaves(actual), jax.tree.leaves(expected)
    if len(la) != len(lb):
        raise AssertionError(f"{what}: outputs have {len(la)} vs {len(lb)} leaves")
    for leaf, (x, y) in enumerate(zip(la, lb)):
        x, y = np.asarray(x), np.asarray(y)
        d = _first_diff(x, y, axis if x.ndim else 0) if x.ndim else _first_diff(x[None], y[None], 0)
        if d is not None:
            row, ulps = d
            raise AssertionError(
                f"not bitwise equal{' (' + what + ')' if what else ''}: output leaf {leaf}, "
                f"first differing row {row} along axis {axis}, max distance {ulps} ULP"
            )


# ---------------------------------------------------------------------------------- invariance


def _take(x: Any, idx: np.ndarray, axis: int) -> Any:
    return jnp.take(x, jnp.asarray(idx), axis=axis)


def _noise_like(x: jax.Array, key: jax.Array) -> jax.Array:
    """Fresh random rows on the scale of ``x`` (for float inputs), to use as neighbours."""
    scale = jnp.std(x.astype(jnp.float32)) + 1e-3
    return (jax.random.normal(key, x.shape, jnp.float32) * scale).astype(x.dtype)


def assert_batch_invariant(
    fn: Callable[..., Any],
    *args: Any,
    batch_axis: int = 0,
    out_axis: int | None = None,
    batched_argnums: Sequence[int] = (0,),
    sizes: Sequence[int] = DEFAULT_SIZES,
    num_permutations: int = 2,
    num_embeddings: int = 3,
    repeats: int = 2,
    seed: int = 0,
) -> None:
    """Assert, bitwise, that each output row depends only on its own input row.

    Args:
      fn: the function under test; called as ``fn(*args)``; may return a pytree of arrays.
      *args: its arguments. Those named by ``batched_argnums`` carry the batch along ``batch_axis``
        (all with the same length); the others (weights, scales) are shared and passed unchanged.
      batch_axis: the batch axis of the batched arguments.
      out_axis: the batch axis of every output leaf (default: ``batch_axis``).
      sizes: prefix sizes to check (those larger than the batch are skipped; the full batch is
        always checked).
      num_permutations / num_embeddings / repeats: how many of each check to run.
      seed: seed of the permutations, positions and neighbour noise.

    Raises:
      AssertionError naming the failed check, the first differing row and the ULP distance.
    """
    out_axis = batch_axis if out_axis is None else out_axis
    batched = [a for i, a in enumerate(args) if i in batched_argnums]
    if not batched:
        raise ValueError("assert_batch_invariant: batched_argnums selects no argument")
    n = batched[0].shape[batch_axis]
    for a in batched:
        if a.shape[batch_axis] != n:
            raise ValueError(
                f"assert_batch_invariant: batched arguments disagree on the batch size along axis "
                f"{batch_axis}: shapes {[tuple(b.shape) for b in batched]}"
            )
    if n == 0:
        raise ValueError("assert_batch_invariant: the batch is empty")

    def call(idx: np.ndarray | None, replace: dict[int, Any] | None = None) -> Any:
        new = []
        for i, a in enumerate(args):
            if replace and i in replace:
                new.append(replace[i])
            elif i in batched_argnums and idx is not None:
                new.append(_take(a, idx, batch_axis))
            else:
                new.append(a)
        return jax.tree.map(np.asarray, fn(*new))

    def rows(out: Any, idx: np.ndarray) -> Any:
        return jax.tree.map(lambda o: np.take(o, idx, axis=out_axis), out)

    full = call(None)
    rng = np.random.default_rng(seed)

    for r in range(1, repeats):
        assert_bitwise_equal(call(None), full, axis=out_axis, what=f"repeated run {r}")

    for s in sorted({s for s in sizes if s < n} | {n}):
        idx = np.arange(s)
        assert_bitwise_equal(call(idx), rows(full, idx), axis=out_axis, what=f"prefix of {s} rows")

    for p in range(num_permutations if n > 1 else 0):
        perm = rng.permutation(n)
        assert_bitwise_equal(call(perm), rows(full, perm), axis=out_axis, what=f"permutation {p}")

    key = jax.random.key(seed)
    for _ in range(num_embeddings):
        row = int(rng.integers(n))
        m = int(rng.choice([s for s in (2, 3, 7, 16, 33, 64, n + 5) if s >= 2]))
        pos = int(rng.integers(m))
        idx = rng.integers(0, n, size=m)
        idx[pos] = row
        replace = {}
        for i in batched_argnums:
            taken = _take(args[i], idx, batch_axis)
            if jnp.issubdtype(taken.dtype, jnp.floating):
                key, sub = jax.random.split(key)
                noisy = _noise_like(taken, sub)
                keep = (jnp.arange(m) == pos).reshape(
                    [m if d == batch_axis else 1 for d in range(taken.ndim)]
                )
                taken = jnp.where(keep, taken, noisy)
            replace[i] = taken
        got = rows(call(None, replace), np.array([pos]))
        assert_bitwise_equal(
            got,
            rows(full, np.array([row])),
            axis=out_axis,
            what=f"row {row} embedded at position {pos} of {m} random neighbours",
        )


# ----------------------------------------------------------------------------------- accuracy


def relative_error(actual: Any, expected: Any) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (Frobenius norms); inf if NaNs differ."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if not np.array_equal(np.isnan(a), np.isnan(e)):
        return float("inf")
    finite = np.isfinite(e)
    if not np.array_equal(a[~finite], e[~finite], equal_nan=True):
        return float("inf")
    num = np.linalg.norm(a[finite] - e[finite])
    den = np.linalg.norm(e[finite])
    return float(num / den) if den > 0 else float(num)


def tolerance(dtype: Any, *, tf32: bool = False) -> float:
    """Relative-error tolerance of a result rounded to ``dtype`` with fp32 accumulation.

    bf16: 1e-2, fp16: 2e-3, fp32: 2e-5 (5e-3 when the GPU computed the product in TF32).
    """
    d = jnp.dtype(dtype)
    if d == jnp.bfloat16:
        return 1e-2
    if d == jnp.float16:
        return 2e-3
    if d == jnp.float32:
        return 5e-3 if tf32 else 2e-5
    raise TypeError(f"tolerance: no default tolerance for dtype {d}")


def assert_close(
    actual: Any, expected: Any, *, dtype: Any = None, rtol: float | None = None, tf32: bool = False
) -> None:
    """Assert ``relative_error(actual, expected) <= rtol`` (default: ``tolerance(dtype)``).

    ``expected`` should be a float64 reference. Non-finite values must match exactly (NaN where the
    reference has NaN, the same infinities).
    """
    if rtol is None:
        rtol = tolerance(np.asarray(actual).dtype if dtype is None else dtype, tf32=tf32)
    if np.shape(actual) != np.shape(expected):
        raise AssertionError(f"shapes differ: {np.shape(actual)} vs {np.shape(expected)}")
    err = relative_error(actual, expected)
    if not err <= rtol:
        raise AssertionError(f"relative error {err:.3e} exceeds tolerance {rtol:.1e}")
