"""bi_jax.softmax / log_softmax / sum / mean: accuracy, bitwise invariance, lowering, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import f64, randn
from hypothesis import given, settings
from hypothesis import strategies as st

import bi_jax
from bi_jax import _backend as be
from bi_jax import reductions, testing
from bi_jax.reductions import REF_CHUNK, RowConfig, fixed_order_reduce, row_config, shipped_configs

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]
INVARIANT_IMPLS = ["pallas", "reference"]
# Small blocks so the multi-block (vocabulary) code path runs on small rows in interpret mode, with
# two rows per program so the last program of an odd batch has a masked row.
MULTI_BLOCK = RowConfig(block=128, block_rows=2, num_warps=4, num_stages=2)


def np_log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def np_softmax(x, axis=-1):
    return np.exp(np_log_softmax(x, axis))


def _softmax_fn(log):
    return bi_jax.log_softmax if log else bi_jax.softmax


# ------------------------------------------------------------------------------------- accuracy

SOFTMAX_CASES = [  # (rows, n, dtype): one block (ragged and exact), several blocks (vocabularies)
    (7, 1000, jnp.float32),
    (5, 4096, jnp.bfloat16),
    (2, 32000, jnp.bfloat16),
    (2, 32000, jnp.float32),
    (1, 151936, jnp.bfloat16),
]


def _impl_cases(cases):  # every case for the invariant paths; a few for XLA's ops
    pairs = [(c, i) for c in cases for i in INVARIANT_IMPLS] + [(c, "xla") for c in cases[1::3]]
    return [pytest.param(c, i, id=f"{c[0]}x{c[1]}-{jnp.dtype(c[2])}-{i}") for c, i in pairs]


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("case,impl", _impl_cases(SOFTMAX_CASES))
def test_softmax_matches_float64(case, impl, log):
    rows, n, dtype = case
    x = randn((rows, n), dtype, scale=3.0)
    out = _softmax_fn(log)(x, implementation=impl)
    assert out.shape == x.shape and out.dtype == dtype
    expected = np_log_softmax(f64(x)) if log else np_softmax(f64(x))
    testing.assert_close(out, expected, dtype=dtype)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_softmax_multi_block_path_and_masked_rows(impl, log):
    x = randn((5, 1000), jnp.float32, scale=3.0)
    out = _softmax_fn(log)(x, implementation=impl, config=MULTI_BLOCK)
    expected = np_log_softmax(f64(x)) if log else np_softmax(f64(x))
    testing.assert_close(out, expected, dtype=jnp.float32)


SUM_CASES = [(9, 1000, jnp.float32), (4, 4096, jnp.bfloat16), (3, 8192, jnp.float16),
             (2, 32000, jnp.float32), (2, 128256, jnp.bfloat16), (70, 33, jnp.bfloat16)]


@pytest.mark.parametrize("op", ["sum", "mean"])
@pytest.mark.parametrize("case,impl", _impl_cases(SUM_CASES))
def test_sum_mean_match_float64(case, impl, op):
    rows, n, dtype = case
    x = randn((rows, n), dtype) + 0.5  # nonzero mean: the sums are not all close to zero
    out = getattr(bi_jax, op)(x, implementation=impl)
    assert out.shape == (rows,) and out.dtype == dtype
    expected = getattr(np, op)(f64(x), axis=-1)
    testing.assert_close(out, expected, dtype=dtype)
    wide = getattr(bi_jax, op)(x, dtype=jnp.float32, implementation=impl)
    assert wide.dtype == jnp.float32
    testing.assert_close(wide, expected, dtype=jnp.float32)


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_sum_multi_block_path(impl):
    x = randn((5, 1000), jnp.float32) + 0.5
    testing.assert_close(bi_jax.sum(x, implementation=impl, config=MULTI_BLOCK),
                         f64(x).sum(-1), dtype=jnp.float32)
    testing.assert_close(bi_jax.mean(x, implementation=impl, config=MULTI_BLOCK),
                         f64(x).mean(-1), dtype=jnp.float32)


@pytest.mark.parametrize("impl", INVARIANT_IMPLS + ["xla"])
def test_axes_other_than_last(impl):
    x = randn((6, 5, 40), jnp.float32) + 0.25
    xn = f64(x)
    testing.assert_close(bi_jax.softmax(x, axis=0, implementation=impl), np_softmax(xn, 0))
    testing.assert_close(bi_jax.log_softmax(x, axis=(0, 2), implementation=impl),
                         np_log_softmax(xn, (0, 2)))
    testing.assert_close(bi_jax.sum(x, axis=1, implementation=impl), xn.sum(1))
    testing.assert_close(bi_jax.mean(x, axis=(0, 2), keepdims=True, implementation=impl),
                         xn.mean((0, 2), keepdims=True))
    total = bi_jax.sum(x, axis=None, implementation=impl)
    assert total.shape == ()
    testing.assert_close(total, xn.sum())
    one_d = bi_jax.softmax(x[0, 0], implementation=impl)
    testing.assert_close(one_d, np_softmax(xn[0, 0]))


@pytest.mark.parametrize("impl", INVARIANT_IMPLS + ["xla"])
def test_empty(impl):
    x = randn((0, 16), jnp.float32)
    assert bi_jax.softmax(x, implementation=impl).shape == (0, 16)
    assert bi_jax.sum(x, implementation=impl).shape == (0,)
    z = randn((3, 0), jnp.float32)
    np.testing.assert_array_equal(np.asarray(bi_jax.sum(z, implementation=impl)), np.zeros(3))
    assert np.isnan(np.asarray(bi_jax.mean(z, implementation=impl))).all()


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_jit_vmap(impl):
    x = randn((3, 4, 300), jnp.float32)
    sm = functools.partial(bi_jax.softmax, implementation=impl)
    testing.assert_bitwise_equal(jax.jit(jax.vmap(sm))(x), jax.jit(sm)(x))
    testing.assert_bitwise_equal(jax.vmap(functools.partial(bi_jax.sum, implementation=impl))(x),
                                 bi_jax.sum(x, implementation=impl))


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_grad_matches_xla_autodiff(impl):
    """The explicit VJPs (fixed-order row sums) vs XLA's autodiff of jax.nn / jnp in float64."""
    x = randn((3, 4, 300), jnp.float32, scale=2.0)
    t = randn((300,), jnp.float32)
    cases = [(bi_jax.softmax, jax.nn.softmax, t), (bi_jax.log_softmax, jax.nn.log_softmax, t),
             (bi_jax.sum, jnp.sum, 1.0), (bi_jax.mean, jnp.mean, 1.0)]

    def grad(fn, weight, a):
        return jax.jit(jax.grad(lambda a: (jnp.sin(fn(a, axis=-1)) * weight).sum()))(a)

    for ours, theirs, weight in cases:
        with jax.enable_x64(True):  # the float64 reference (a float32 one had errors of our size)
            expected = np.asarray(grad(theirs, f64(weight), f64(x)))
        testing.assert_close(grad(functools.partial(ours, implementation=impl), weight, x), expected)


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_row_gradients_batch_invariant(impl):
    x = randn((255, 700), jnp.bfloat16, scale=2.0)
    t = randn((700,), jnp.float32)

    def loss(a):
        p = bi_jax.softmax(a, implementation=impl).astype(jnp.float32)
        lp = bi_jax.log_softmax(a, implementation=impl).astype(jnp.float32)
        return ((p + lp) * t).sum() + jnp.sin(bi_jax.mean(a, implementation=impl)).sum()

    g = jax.jit(jax.grad(loss))
    assert g(x).dtype == jnp.bfloat16
    testing.assert_batch_invariant(g, x, sizes=(1, 2, 7, 64), num_permutations=1,
                                   num_embeddings=1)


# ---------------------------------------------------------------------------- non-finite rows


@pytest.mark.parametrize("config", [None, MULTI_BLOCK], ids=["policy", "multi_block"])
@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_nonfinite_rows_stay_local(impl, config):
    x = randn((8, 1000), jnp.float32, scale=2.0)
    bad = (x.at[1, 17].set(jnp.nan)
            .at[3, 500].set(jnp.inf)
            .at[5].set(-jnp.inf)
            .at[6, :300].set(-jnp.inf))  # masked logits filling whole leading blocks
    for log in (False, True):
        f = functools.partial(_softmax_fn(log), implementation=impl, config=config)
        clean, out = np.asarray(f(x)), np.asarray(f(bad))
        for r in (1, 3, 5):
            assert np.isnan(out[r]).all(), r
        expected = np_log_softmax(f64(bad[6])) if log else np_softmax(f64(bad[6]))
        testing.assert_close(out[6], expected, dtype=jnp.float32)
        keep = [0, 2, 4, 7]
        testing.assert_bitwise_equal(out[keep], clean[keep])
    s_clean = np.asarray(bi_jax.sum(x, implementation=impl, config=config))
    s = np.asarray(bi_jax.sum(bad, implementation=impl, config=config))
    assert np.isnan(s[1]) and s[3] == np.inf and s[5] == -np.inf and s[6] == -np.inf
    testing.assert_bitwise_equal(s[[0, 2, 4, 7]], s_clean[[0, 2, 4, 7]])


# ----------------------------------------------------------------------------------- invariance

INVARIANCE_CASES = [(300, 1000, jnp.bfloat16), (300, 64, jnp.float32), (40, 32000, jnp.bfloat16)]


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
@pytest.mark.parametrize("case", INVARIANCE_CASES, ids=lambda c: f"{c[0]}x{c[1]}")
def test_softmax_batch_invariant(case, impl):
    rows, n, dtype = case
    x = randn((rows, n), dtype, scale=3.0)
    f = jax.jit(functools.partial(bi_jax.softmax, implementation=impl))
    testing.assert_batch_invariant(f, x, num_permutations=1, num_embeddings=2)


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_log_softmax_sum_mean_batch_invariant(impl):
    x = randn((300, 700), jnp.float16)
    for fn in (bi_jax.log_softmax, bi_jax.sum, bi_jax.mean):
        f = jax.jit(functools.partial(fn, implementation=impl))
        testing.assert_batch_invariant(f, x, sizes=(1, 7, 255), num_permutations=1,
                                       num_embeddings=1)


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_multi_block_batch_invariant(impl):
    x = randn((255, 1000), jnp.bfloat16, scale=3.0)
    f = jax.jit(lambda a: (bi_jax.softmax(a, implementation=impl, config=MULTI_BLOCK),
                           bi_jax.sum(a, implementation=impl, config=MULTI_BLOCK)))
    testing.assert_batch_invariant(f, x, sizes=(1, 2, 3, 128), num_permutations=1,
                                   num_embeddings=2)


@pytest.mark.parametrize("n", [1000, 1100])  # 8 blocks; 9 (the last program's group is ragged)
def test_split_softmax_blocks_per_program_keep_the_bits(monkeypatch, n):
    """How many blocks one program of the split softmax kernels takes follows the row count (and
    the SM count); it must leave every bit as one block per program does."""
    x = randn((12, n), jnp.float32, scale=3.0)
    ops = (bi_jax.softmax, bi_jax.log_softmax)

    def run():
        return [np.asarray(op(x, implementation="pallas", config=MULTI_BLOCK)) for op in ops]

    assert reductions._blocks_per_program(12, be.cdiv(n, MULTI_BLOCK.block)) == 1
    one = run()
    monkeypatch.setattr(be, "sm_count", lambda: 0)  # no programs needed per SM: 8 per program
    assert reductions._blocks_per_program(12, be.cdiv(n, MULTI_BLOCK.block)) == 8
    for got, want, op in zip(run(), one, ops):
        testing.assert_bitwise_equal(got, want, what=f"{op.__name__}, 8 blocks per program")
    exported = be.export_for_cuda(
        functools.partial(bi_jax.log_softmax, implementation="pallas", config=MULTI_BLOCK), x)
    assert be.triton_kernel_count(exported) == 2


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_rows_along_a_leading_axis(impl):
    """Reducing axis 0 of ``[n, rows]``: the rows are the columns, still invariant."""
    x = randn((500, 40), jnp.float32)
    f = jax.jit(lambda a: bi_jax.softmax(a, axis=0, implementation=impl))
    testing.assert_batch_invariant(f, x, batch_axis=1, sizes=(1, 3, 33), num_permutations=1,
                                   num_embeddings=1)


@settings(max_examples=6, deadline=None)
@given(
    rows=st.integers(1, 40),
    n=st.one_of(st.integers(1, 300), st.sampled_from([1000, 4096, 5000])),
    split=st.floats(0, 1),
    op=st.sampled_from(["softmax", "log_softmax", "sum", "mean"]),
    impl=st.sampled_from(INVARIANT_IMPLS),
)
def test_property_slices_and_permutations(rows, n, split, op, impl):
    x = randn((rows, n), jnp.bfloat16, scale=2.0)
    f = functools.partial(getattr(bi_jax, op), implementation=impl)
    full = np.asarray(f(x))
    s = max(1, int(split * rows))
    testing.assert_bitwise_equal(f(x[:s]), full[:s])
    testing.assert_bitwise_equal(f(x[s - 1:]), full[s - 1:])
    perm = np.random.default_rng(rows * n).permutation(rows)
    testing.assert_bitwise_equal(f(x[perm]), full[perm])
    xn = f64(x)
    expected = {"softmax": np_softmax, "log_softmax": np_log_softmax,
                "sum": lambda a: a.sum(-1), "mean": lambda a: a.mean(-1)}[op](xn)
    testing.assert_close(full, expected, dtype=jnp.bfloat16)


# ---------------------------------------------------------------------- the fixed-order reduce


def _np_fixed_order(x: np.ndarray, kind: str) -> np.ndarray:
    """The documented order of ``fixed_order_reduce``, in numpy float32."""
    op = np.add if kind == "sum" else np.maximum
    n = x.shape[-1]
    padded = -(-max(n, 1) // REF_CHUNK) * REF_CHUNK
    fill = 0.0 if kind == "sum" else -np.inf
    xp = np.full(x.shape[:-1] + (padded,), fill, np.float32)
    xp[..., :n] = x
    chunks = xp.reshape(*x.shape[:-1], -1, REF_CHUNK)
    acc = chunks[..., 0, :]
    for i in range(1, chunks.shape[-2]):
        acc = op(acc, chunks[..., i, :])
    while acc.shape[-1] > 1:
        h = acc.shape[-1] // 2
        acc = op(acc[..., :h], acc[..., h:])
    return acc[..., 0]


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000, 4099])
@pytest.mark.parametrize("kind", ["sum", "max"])
def test_fixed_order_reduce_is_the_documented_order(n, kind):
    x = randn((3, 5, n), jnp.float32)
    out = np.asarray(fixed_order_reduce(x, kind))
    testing.assert_bitwise_equal(out, _np_fixed_order(np.asarray(x), kind))


def test_fixed_order_reduce_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        fixed_order_reduce(jnp.ones((2, 3)), "min")


# ------------------------------------------------------------------------------ config policy


def test_policy_depends_on_length_and_dtype_only():
    for dtype in DTYPES:
        shipped = {cfg for _, cfg in shipped_configs(dtype)}
        chosen = {row_config(n, dtype) for n in [*range(1, 2100), *range(2100, 200_000, 997)]}
        assert chosen == shipped
        for n, cfg in shipped_configs(dtype):
            assert row_config(n, dtype) == cfg
            assert cfg.block_rows == 1 or cfg.block * cfg.block_rows >= 1024
        assert row_config(128256, dtype).block == reductions._LONG_BLOCK[jnp.dtype(dtype)]


@pytest.mark.parametrize("kwargs", [dict(block=96), dict(block=128, block_rows=3),
                                    dict(block=128, num_warps=3), dict(block=128, num_stages=0)])
def test_bad_config(kwargs):
    with pytest.raises(ValueError, match="RowConfig"):
        RowConfig(**kwargs)


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64, jnp.int8])
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "sum", "mean"])
def test_bad_dtypes(op, dtype):
    with pytest.raises(TypeError, match="dtype"):
        getattr(bi_jax, op)(jnp.ones((4, 8), dtype))


def test_bad_arguments():
    x = randn((4, 8), jnp.float32)
    with pytest.raises(TypeError, match="int32"):
        bi_jax.sum(x, dtype=jnp.int32)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        bi_jax.softmax(x, axis=2)
    with pytest.raises(ValueError, match="repeated axis"):
        bi_jax.mean(x, axis=(1, -1))
    with pytest.raises(ValueError, match="'pallas', 'reference', 'xla'"):
        bi_jax.log_softmax(x, implementation="triton")


def test_errors_raise_at_trace_time():
    f = jax.jit(lambda a: bi_jax.softmax(a, implementation="pallas"))
    with pytest.raises(TypeError, match=r"\(4, 8\)"):
        f.trace(jax.ShapeDtypeStruct((4, 8), jnp.int32))


# ------------------------------------------------------------------------------ CUDA lowering


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_config_lowers_for_cuda(dtype):
    """The real Pallas -> Triton lowering of every shipped config, on ragged row lengths."""
    for n, cfg in shipped_configs(dtype):
        x = jax.ShapeDtypeStruct((5, n), dtype)
        for op in ("softmax", "log_softmax", "sum", "mean"):
            fn = functools.partial(getattr(bi_jax, op), implementation="pallas")
            exported = be.export_for_cuda(fn, x)
            split = "softmax" in op and n > reductions.MAX_SINGLE_BLOCK  # stats + write kernels
            assert be.triton_kernel_count(exported) == (2 if split else 1), (op, n, cfg)


def test_grad_lowers_for_cuda():
    x = jax.ShapeDtypeStruct((3, 40000), jnp.bfloat16)
    f = lambda a: bi_jax.log_softmax(a, implementation="pallas")[:, 0].astype(jnp.float32).sum()
    assert be.triton_kernel_count(be.export_for_cuda(jax.value_and_grad(f), x)) == 2


# --------------------------------------------------------------------------------- GPU only

GPU_ROWS = (1, 2, 3, 7, 16, 33, 128, 255, 300, 1000, 4095)


@pytest.mark.gpu
@pytest.mark.parametrize("n,dtype", [(4096, jnp.bfloat16), (8192, jnp.bfloat16),
                                     (128256, jnp.bfloat16), (128256, jnp.float32)])
def test_gpu_invariant_over_rows(n, dtype):
    """Row bits equal the 4096-row result for every row count in GPU_ROWS, and any position."""
    x = randn((4096, n), dtype, scale=3.0)
    f = jax.jit(lambda a: (bi_jax.softmax(a, implementation="pallas"),
                           bi_jax.log_softmax(a, implementation="pallas"),
                           bi_jax.sum(a, implementation="pallas")))
    full = [np.asarray(o) for o in f(x)]
    for m in GPU_ROWS:
        testing.assert_bitwise_equal(f(x[:m]), [o[:m] for o in full], what=f"{m} rows, n={n}")
    for m in (1, 7, 300):  # a later slice: the rows sit at other positions of the batch
        testing.assert_bitwise_equal(f(x[-m:]), [o[-m:] for o in full], what=f"last {m} rows")
    testing.assert_batch_invariant(f, x[:1024], sizes=(1, 3, 255, 300))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1000, 5120, 16384, 32000, 128256, 151936])
def test_gpu_accuracy_large(n, dtype):
    x = randn((512, n), dtype, scale=3.0)
    rows = np.arange(0, 512, 37)
    xn = f64(x[rows])
    for log in (False, True):
        out = np.asarray(_softmax_fn(log)(x, implementation="pallas"))[rows]
        testing.assert_close(out, np_log_softmax(xn) if log else np_softmax(xn), dtype=dtype)
    # fp32 output: a row sum of ~0.5 * n can exceed float16's range (inf would be the right answer).
    testing.assert_close(
        np.asarray(bi_jax.sum(x + 0.5, dtype=jnp.float32, implementation="pallas"))[rows],
        f64((x + 0.5)[rows]).sum(-1), dtype=jnp.float32)


def test_row_map_bits_do_not_depend_on_the_row_count():
    """Per-row statistics through ``row_map`` keep their bits when rows are sliced away (a plain
    ``a / 5000`` or ``rsqrt`` on a short array did not on XLA:CPU: the norm references' 1-ULP bug)."""
    from bi_jax.reductions import row_map

    ops = [lambda t: t / 5000, lambda t: jax.lax.rsqrt(t / 5000 + 1e-6), jnp.log, jnp.exp]
    for _ in range(50):
        a = jnp.abs(randn((10,), jnp.float32)) * 300 + 1
        for op in ops:
            full = np.asarray(row_map(op, a))
            for s in (1, 5, 9):
                testing.assert_bitwise_equal(row_map(op, a[s:]), full[s:], what=f"slice {s}:")
    testing.assert_close(row_map(jnp.log, a), np.log(f64(a)), dtype=jnp.float32)


def test_exact_f32_keeps_subnormals_and_values():
    """The reference upcast is value-preserving, float16 subnormals included."""
    from bi_jax.reductions import exact_f32

    for dtype in (jnp.float16, jnp.bfloat16):
        tiny = jnp.finfo(dtype).smallest_subnormal
        x = jnp.concatenate([jnp.array([tiny, 3 * tiny, -tiny], dtype), randn((61,), dtype)])
        for f in (exact_f32, jax.jit(exact_f32)):
            np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(x, np.float32))
