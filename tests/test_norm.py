"""bi_jax.rms_norm / layer_norm: accuracy, fused residual, bitwise invariance, lowering, errors."""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import f64, randn
from hypothesis import given, settings
from hypothesis import strategies as st

import bi_jax
from bi_jax import _backend as be
from bi_jax import testing
from bi_jax.reductions import RowConfig, row_config, shipped_configs

norm = sys.modules["bi_jax.norm"]  # the module (bi_jax.norm is the package's attribute)

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]
INVARIANT_IMPLS = ["pallas", "reference"]
# Small blocks so the multi-block (long-row) code path runs on small rows in interpret mode, with
# two rows per program so the last program of an odd batch has a masked row.
MULTI_BLOCK = RowConfig(block=128, block_rows=2, num_warps=4, num_stages=2)


def np_rms_norm(x, w=None, eps=1e-6):
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y if w is None else y * w


def np_layer_norm(x, w=None, b=None, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    y = y if w is None else y * w
    return y if b is None else y + b


def _rounded_sum(x, r):
    """The residual sum the kernels return: added in fp32, rounded to x's dtype."""
    return (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(x.dtype)


def _inputs(rows, n, dtype, wdtype=None):
    wdtype = wdtype or dtype
    x, r = randn((rows, n), dtype), randn((rows, n), dtype)
    w = (1.0 + 0.3 * randn((n,), jnp.float32)).astype(wdtype)
    b = randn((n,), wdtype)
    return x, r, w, b


# ------------------------------------------------------------------------------------- accuracy

CASES = [  # (rows, n, dtype): one ragged block, exact blocks, a multi-row tile, long rows
    (7, 1000, jnp.float32),
    (5, 4096, jnp.bfloat16),
    (2, 8192, jnp.bfloat16),
    (40, 128, jnp.bfloat16),
    (2, 40000, jnp.bfloat16),
]


def _impl_cases():  # every case for the invariant paths; a few for XLA's ops
    pairs = [(c, i) for c in CASES for i in INVARIANT_IMPLS] + [(c, "xla") for c in CASES[1::3]]
    return [pytest.param(c, i, id=f"{c[0]}x{c[1]}-{jnp.dtype(c[2])}-{i}") for c, i in pairs]


@pytest.mark.parametrize("case,impl", _impl_cases())
def test_rms_norm_matches_float64(case, impl):
    rows, n, dtype = case
    x, r, w, _ = _inputs(rows, n, dtype)
    out = bi_jax.rms_norm(x, w, implementation=impl)
    assert out.shape == x.shape and out.dtype == dtype
    testing.assert_close(out, np_rms_norm(f64(x), f64(w)), dtype=dtype)
    testing.assert_close(bi_jax.rms_norm(x, implementation=impl), np_rms_norm(f64(x)), dtype=dtype)
    normed, s = bi_jax.rms_norm(x, w, residual=r, implementation=impl)
    assert normed.dtype == s.dtype == dtype
    testing.assert_bitwise_equal(s, _rounded_sum(x, r))
    testing.assert_close(normed, np_rms_norm(f64(s), f64(w)), dtype=dtype)


@pytest.mark.parametrize("case,impl", _impl_cases())
def test_layer_norm_matches_float64(case, impl):
    rows, n, dtype = case
    x, _, w, b = _inputs(rows, n, dtype)
    x = x + 0.7  # a mean far from zero: the centring matters
    out = bi_jax.layer_norm(x, w, b, implementation=impl)
    assert out.shape == x.shape and out.dtype == dtype
    testing.assert_close(out, np_layer_norm(f64(x), f64(w), f64(b)), dtype=dtype)
    testing.assert_close(bi_jax.layer_norm(x, implementation=impl), np_layer_norm(f64(x)),
                         dtype=dtype)
    testing.assert_close(bi_jax.layer_norm(x, bias=b, implementation=impl),
                         np_layer_norm(f64(x), b=f64(b)), dtype=dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_layer_norm_one_pass_statistics_near_their_worst(dtype):
    """16-bit one-block rows take mean and variance from one reduction of the row shifted by its
    first element (``norm._shifted_stats``). Its cancellation is worst when the first element is
    an outlier: a spike of ~3000 row deviations, a spike over tiny noise, an offset mean of 100
    deviations. Every output stays within one ULP of the largest output of its row (float64
    reference), as well as within the dtype's usual relative tolerance."""
    n = 8192
    noise = randn((4, n), jnp.float32)
    spike = 0.01 * noise
    spike = spike.at[:, 0].set(30.0)
    tiny = 1e-3 * noise
    tiny = tiny.at[:, 0].set(64.0)
    for name, rows in (("spike", spike), ("spike over tiny noise", tiny), ("offset", noise + 100)):
        x = rows.astype(dtype)
        expected = np_layer_norm(f64(x))
        out = bi_jax.layer_norm(x, implementation="pallas")
        testing.assert_close(out, expected, dtype=dtype)
        err = np.abs(f64(out) - expected).max(axis=1)
        top = np.abs(expected).max(axis=1)
        ulp = float(jnp.finfo(dtype).eps) * np.exp2(np.floor(np.log2(top)))  # at the largest
        assert (err <= ulp).all(), (name, err, ulp)


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_multi_block_path_and_masked_rows(impl):
    x, r, w, b = _inputs(5, 1000, jnp.float32)
    x = x + 0.7
    kw = dict(implementation=impl, config=MULTI_BLOCK)
    testing.assert_close(bi_jax.rms_norm(x, w, **kw), np_rms_norm(f64(x), f64(w)))
    testing.assert_close(bi_jax.layer_norm(x, w, b, **kw), np_layer_norm(f64(x), f64(w), f64(b)))
    normed, s = bi_jax.rms_norm(x, w, residual=r, **kw)
    testing.assert_bitwise_equal(s, _rounded_sum(x, r))
    testing.assert_close(normed, np_rms_norm(f64(s), f64(w)))


@pytest.mark.parametrize("impl", INVARIANT_IMPLS + ["xla"])
def test_eps_and_small_rows(impl):
    """Rows with a mean square near eps: eps sits inside the square root, as in the formulas."""
    x = randn((4, 256), jnp.float32, scale=1e-3)
    testing.assert_close(bi_jax.rms_norm(x, eps=1e-6, implementation=impl),
                         np_rms_norm(f64(x), eps=1e-6))
    testing.assert_close(bi_jax.layer_norm(x, eps=1e-5, implementation=impl),
                         np_layer_norm(f64(x), eps=1e-5))


@pytest.mark.parametrize("config", [None, MULTI_BLOCK], ids=["policy", "multi_block"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_fused_residual_equals_unfused(impl, dtype, config):
    """(normed, s) from one kernel pass == the unfused computation, bit for bit."""
    x, r, w, _ = _inputs(9, 1000, dtype)
    normed, s = bi_jax.rms_norm(x, w, residual=r, implementation=impl, config=config)
    s_unfused = _rounded_sum(x, r)
    testing.assert_bitwise_equal(s, s_unfused)
    testing.assert_bitwise_equal(
        normed, bi_jax.rms_norm(s_unfused, w, implementation=impl, config=config))
    testing.assert_bitwise_equal(s, x + r)  # XLA adds 16-bit floats in fp32 too, rounds once


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_mixed_dtypes_and_leading_dims(impl):
    x = randn((2, 3, 5, 320), jnp.bfloat16)
    r = randn((2, 3, 5, 320), jnp.float32)
    w = (1.0 + 0.3 * randn((320,), jnp.float32))
    b = randn((320,), jnp.float16)
    normed, s = bi_jax.rms_norm(x, w, residual=r, implementation=impl)
    assert normed.shape == s.shape == x.shape and normed.dtype == s.dtype == jnp.bfloat16
    testing.assert_bitwise_equal(s, _rounded_sum(x, r))
    testing.assert_close(normed, np_rms_norm(f64(s), f64(w)), dtype=jnp.bfloat16)
    out = bi_jax.layer_norm(x, w, b, implementation=impl)
    assert out.shape == x.shape and out.dtype == jnp.bfloat16
    testing.assert_close(out, np_layer_norm(f64(x), f64(w), f64(b)), dtype=jnp.bfloat16)
    one_row = bi_jax.rms_norm(x[0, 0, 0], w, implementation=impl)
    testing.assert_bitwise_equal(one_row, bi_jax.rms_norm(x, w, implementation=impl)[0, 0, 0])


@pytest.mark.parametrize("impl", INVARIANT_IMPLS + ["xla"])
def test_empty(impl):
    x, r = randn((0, 64), jnp.float32), randn((0, 64), jnp.float32)
    assert bi_jax.rms_norm(x, implementation=impl).shape == (0, 64)
    normed, s = bi_jax.rms_norm(x, residual=r, implementation=impl)
    assert normed.shape == s.shape == (0, 64)
    assert bi_jax.layer_norm(x, implementation=impl).shape == (0, 64)


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_jit_vmap(impl):
    x, r, w, b = _inputs(12, 200, jnp.float32)
    x3 = x.reshape(3, 4, 200)
    # jit vs jit (XLA contracts a*b+c into FMAs inside a jit fusion; eager dispatch does not)
    f = functools.partial(bi_jax.rms_norm, weight=w, implementation=impl)
    testing.assert_bitwise_equal(jax.jit(jax.vmap(f))(x3), jax.jit(f)(x3))
    ln = functools.partial(bi_jax.layer_norm, weight=w, bias=b, implementation=impl)
    testing.assert_bitwise_equal(jax.vmap(ln)(x3), ln(x3))  # eager vs eager


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_grad_matches_xla_autodiff(impl, affine):
    """The explicit VJPs (fixed-order row sums) vs XLA's autodiff of the plain jnp formulas."""
    x, r, w, b = _inputs(12, 200, jnp.float32)
    w, b = (w, b) if affine else (None, None)
    t, t2 = randn((200,), jnp.float32), randn((200,), jnp.float32)

    def rms_loss(implementation, a, w, res):
        normed, s = bi_jax.rms_norm(a, w, residual=res, implementation=implementation)
        return (normed * t).sum() + (s * s * t2).sum()

    def ln_loss(implementation, a, w, b):
        return (bi_jax.layer_norm(a, w, b, implementation=implementation) * t).sum()

    for loss, args in ((rms_loss, (x, w, r)), (ln_loss, (x, w, b))):
        argnums = (0, 1, 2) if affine else (0,)
        g = jax.jit(jax.grad(functools.partial(loss, impl), argnums=argnums))(*args)
        g_xla = jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=argnums))(*args)
        for a, e in zip(g, g_xla):
            testing.assert_close(a, f64(e), rtol=1e-5)
    g = jax.grad(lambda a: bi_jax.rms_norm(a, implementation=impl).sum())(x)
    g_xla = jax.grad(lambda a: bi_jax.rms_norm(a, implementation="xla").sum())(x)
    testing.assert_close(g, f64(g_xla), rtol=1e-5)


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_row_gradients_batch_invariant(impl):
    x, r, w, b = _inputs(255, 300, jnp.bfloat16)
    t = randn((300,), jnp.float32)

    def loss(a, res):
        normed, s = bi_jax.rms_norm(a, w, residual=res, implementation=impl)
        y = bi_jax.layer_norm(normed, w, b, implementation=impl)
        return ((y.astype(jnp.float32) + s.astype(jnp.float32)) * t).sum()

    g = jax.jit(jax.grad(loss, argnums=(0, 1)))
    assert g(x, r)[0].dtype == jnp.bfloat16
    testing.assert_batch_invariant(g, x, r, batched_argnums=(0, 1), sizes=(1, 2, 7, 64),
                                   num_permutations=1, num_embeddings=1)


# ---------------------------------------------------------------------------- non-finite rows


@pytest.mark.parametrize("config", [None, MULTI_BLOCK], ids=["policy", "multi_block"])
@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_nonfinite_rows_stay_local(impl, config):
    x, r, w, b = _inputs(8, 300, jnp.float32)
    bad = x.at[1, 17].set(jnp.nan).at[3, 200].set(jnp.inf).at[6, 299].set(-jnp.inf)
    keep = [0, 2, 4, 5, 7]
    kw = dict(implementation=impl, config=config)
    for f in (lambda a: bi_jax.rms_norm(a, w, **kw),
              lambda a: bi_jax.rms_norm(a, w, residual=r, **kw)[0],
              lambda a: bi_jax.layer_norm(a, w, b, **kw)):
        clean, out = np.asarray(f(x)), np.asarray(f(bad))
        for row in (1, 3, 6):
            assert np.isnan(out[row]).any(), row
        testing.assert_bitwise_equal(out[keep], clean[keep])
    # a non-finite residual only touches its own row, in both outputs
    normed, s = jax.tree.map(np.asarray, bi_jax.rms_norm(x, w, residual=r.at[5, 3].set(jnp.nan),
                                                         **kw))
    normed_clean, s_clean = jax.tree.map(np.asarray, bi_jax.rms_norm(x, w, residual=r, **kw))
    assert np.isnan(normed[5]).all() and np.isnan(s[5, 3])
    rows = [0, 1, 2, 3, 4, 6, 7]
    testing.assert_bitwise_equal((normed[rows], s[rows]), (normed_clean[rows], s_clean[rows]))


@pytest.mark.parametrize("tiles", [2, 4, 8])
def test_write_tiles_keep_the_bits(tiles, monkeypatch):
    """Few rows: programs that each write a column tile (``write_tiles``) give the bits of one
    program per row, for both norms and the fused residual (ragged row, ragged last tile)."""
    x, r, w, b = _inputs(3, 4000, jnp.bfloat16)

    def run(t):
        monkeypatch.setattr(norm, "write_tiles", lambda rows, cfg, n: t)
        return (bi_jax.rms_norm(x, w, implementation="pallas"),
                bi_jax.rms_norm(x, w, residual=r, implementation="pallas"),
                bi_jax.layer_norm(x, w, b, implementation="pallas"))

    testing.assert_bitwise_equal(run(tiles), run(1))


@pytest.mark.parametrize("parts", [2, 4])
def test_layer_norm_write_parts_keep_the_bits(parts, monkeypatch):
    """A layer_norm program that writes its row in reloaded pieces (``_write_parts``) gives the
    bits of one that writes it whole (ragged row: the last piece is masked; with and without the
    affine vectors)."""
    x, _, w, b = _inputs(5, 8000, jnp.bfloat16)
    chosen = []

    monkeypatch.setattr(norm, "write_tiles", lambda rows, cfg, n: 1)  # a program per row

    def run(p):
        monkeypatch.setattr(norm, "_write_parts", lambda rows, cfg, n, dt: chosen.append(p) or p)
        return (bi_jax.layer_norm(x, w, b, implementation="pallas"),
                bi_jax.layer_norm(x, implementation="pallas"))

    testing.assert_bitwise_equal(run(parts), run(1))
    assert chosen == [parts, parts, 1, 1]  # the patched policy was consulted by every call


def test_write_parts_policy():
    """Pieces only where they save a wave: one-block 2-byte rows of 2048-8192 columns, between
    the programs per SM that fit with and without them."""
    sms = be.sm_count()
    for n, lo, hi, parts in ((8192, 3, 4, 4), (4096, 6, 8, 2), (2048, 12, 16, 2)):
        for dtype in (jnp.bfloat16, jnp.float16):
            cfg = row_config(n, dtype)
            got = [norm._write_parts(r, cfg, n, dtype)
                   for r in (lo * sms, lo * sms + 1, hi * sms, hi * sms + 1)]
            assert got == [1, parts, parts, 1], (n, dtype, got)
        assert norm._write_parts(hi * sms, row_config(n, jnp.float32), n, jnp.float32) == 1
    for n in (1024, 16384, 20480):
        assert norm._write_parts(4 * sms, row_config(n, jnp.bfloat16), n, jnp.bfloat16) == 1
    # a config of the caller's with other warps (32 elements per thread): not what was measured
    other = RowConfig(block=8192, block_rows=1, num_warps=8, num_stages=1)
    assert norm._write_parts(7 * sms, other, 8192, jnp.bfloat16) == 1


# ----------------------------------------------------------------------------------- invariance


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_add_rms_norm_batch_invariant(impl):
    x, r, w, _ = _inputs(300, 1000, jnp.bfloat16)
    f = jax.jit(lambda a, res: bi_jax.rms_norm(a, w, residual=res, implementation=impl))
    testing.assert_batch_invariant(f, x, r, batched_argnums=(0, 1), sizes=(1, 2, 7, 64, 255),
                                   num_permutations=1, num_embeddings=2)


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_rms_and_layer_norm_batch_invariant(impl):
    x, _, w, b = _inputs(48, 4096, jnp.bfloat16)
    f = jax.jit(lambda a: (bi_jax.rms_norm(a, w, implementation=impl),
                           bi_jax.layer_norm(a, w, b, implementation=impl)))
    testing.assert_batch_invariant(f, x, sizes=(1, 2, 7, 33), num_permutations=1,
                                   num_embeddings=1)


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_short_rows_many_per_program_batch_invariant(impl):
    """qk-norm shapes: 8 rows of 128 per program; 255 vs 300 rows end in different tiles."""
    x, r, w, b = _inputs(300, 128, jnp.float16)
    f = jax.jit(lambda a, res: (bi_jax.rms_norm(a, w, residual=res, implementation=impl),
                                bi_jax.layer_norm(a, w, b, implementation=impl)))
    testing.assert_batch_invariant(f, x, r, batched_argnums=(0, 1), sizes=(1, 2, 3, 7, 16, 255),
                                   num_permutations=1, num_embeddings=2)


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_multi_block_batch_invariant(impl):
    x, r, w, b = _inputs(101, 1000, jnp.float32)
    kw = dict(implementation=impl, config=MULTI_BLOCK)
    f = jax.jit(lambda a, res: (bi_jax.rms_norm(a, w, residual=res, **kw),
                                bi_jax.layer_norm(a, w, b, **kw)))
    testing.assert_batch_invariant(f, x, r, batched_argnums=(0, 1), sizes=(1, 2, 3, 64),
                                   num_permutations=1, num_embeddings=1)


@settings(max_examples=6, deadline=None)
@given(
    rows=st.integers(1, 24),
    n=st.one_of(st.integers(1, 300), st.sampled_from([1000, 4096, 5000])),
    split=st.floats(0, 1),
    op=st.sampled_from(["rms_norm", "add_rms_norm", "layer_norm"]),
    impl=st.sampled_from(INVARIANT_IMPLS),
)
def test_property_slices_and_permutations(rows, n, split, op, impl):
    x, r, w, b = _inputs(rows, n, jnp.bfloat16)
    if op == "rms_norm":
        f = lambda a, res: bi_jax.rms_norm(a, w, implementation=impl)
        expected = np_rms_norm(f64(x), f64(w))
    elif op == "add_rms_norm":
        f = lambda a, res: bi_jax.rms_norm(a, w, residual=res, implementation=impl)[0]
        expected = np_rms_norm(f64(_rounded_sum(x, r)), f64(w))
    else:
        f = lambda a, res: bi_jax.layer_norm(a, w, b, implementation=impl)
        expected = np_layer_norm(f64(x), f64(w), f64(b))
    full = np.asarray(f(x, r))
    s = max(1, int(split * rows))
    testing.assert_bitwise_equal(f(x[:s], r[:s]), full[:s])
    testing.assert_bitwise_equal(f(x[s - 1:], r[s - 1:]), full[s - 1:])
    perm = np.random.default_rng(rows * n).permutation(rows)
    testing.assert_bitwise_equal(f(x[perm], r[perm]), full[perm])
    testing.assert_close(full, expected, dtype=jnp.bfloat16)


# ----------------------------------------------------------------------------------- bad input


def test_shape_mismatches_name_the_shapes():
    x = randn((4, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"weight has shape \(63,\).*\(64,\).*\(4, 64\)"):
        bi_jax.rms_norm(x, jnp.ones((63,)))
    with pytest.raises(ValueError, match=r"residual has shape \(4, 32\).*\(4, 64\)"):
        bi_jax.rms_norm(x, residual=jnp.ones((4, 32)))
    with pytest.raises(ValueError, match=r"residual has shape \(64,\)"):
        bi_jax.rms_norm(x, residual=jnp.ones((64,)))  # no broadcasting
    with pytest.raises(ValueError, match=r"bias has shape \(1, 64\)"):
        bi_jax.layer_norm(x, jnp.ones((64,)), jnp.ones((1, 64)))
    with pytest.raises(ValueError, match=r"weight has shape \(4, 64\)"):
        bi_jax.layer_norm(x, jnp.ones((4, 64)))
    with pytest.raises(ValueError, match="at least one axis"):
        bi_jax.rms_norm(jnp.float32(1.0))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64, jnp.int8])
def test_bad_dtypes(dtype):
    x, bad = randn((4, 8), jnp.float32), jnp.ones((4, 8), dtype)
    with pytest.raises(TypeError, match="x has dtype"):
        bi_jax.rms_norm(bad)
    with pytest.raises(TypeError, match="x has dtype"):
        bi_jax.layer_norm(bad)
    with pytest.raises(TypeError, match="weight has dtype"):
        bi_jax.rms_norm(x, bad[0])
    with pytest.raises(TypeError, match="residual has dtype"):
        bi_jax.rms_norm(x, residual=bad)
    with pytest.raises(TypeError, match="bias has dtype"):
        bi_jax.layer_norm(x, bias=bad[0])


def test_unknown_implementation_and_trace_time_errors():
    x = randn((4, 8), jnp.float32)
    with pytest.raises(ValueError, match="'pallas', 'reference', 'xla'"):
        bi_jax.rms_norm(x, implementation="cudnn")
    with pytest.raises(ValueError, match="'pallas', 'reference', 'xla'"):
        bi_jax.layer_norm(x, implementation="triton")
    f = jax.jit(lambda a, w: bi_jax.rms_norm(a, w, implementation="pallas"))
    with pytest.raises(ValueError, match=r"\(7,\)"):
        f.trace(jax.ShapeDtypeStruct((4, 8), jnp.bfloat16), jax.ShapeDtypeStruct((7,), jnp.float32))


# ------------------------------------------------------------------------------ CUDA lowering


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_config_lowers_for_cuda(dtype):
    """The real Pallas -> Triton lowering of every shipped config and variant, ragged rows."""
    for n, cfg in shipped_configs(dtype):
        x = jax.ShapeDtypeStruct((5, n), dtype)
        v = jax.ShapeDtypeStruct((n,), jnp.float32)
        variants = [
            (lambda a, w, r: bi_jax.rms_norm(a, implementation="pallas"), 1),
            (lambda a, w, r: bi_jax.rms_norm(a, w, residual=r, implementation="pallas"), 1),
            (lambda a, w, r: bi_jax.layer_norm(a, implementation="pallas"), 1),
            (lambda a, w, r: bi_jax.layer_norm(a, w, w, implementation="pallas"), 1),
        ]
        for fn, kernels in variants:
            exported = be.export_for_cuda(fn, x, v, x)
            assert be.triton_kernel_count(exported) == kernels, (n, cfg)


def test_layer_norm_write_parts_lower_for_cuda():
    """The pieces path (``_write_parts``: 2 or 4 pieces at the top of its row window) lowers."""
    policy = norm._write_parts
    for n, per_sm, parts in ((8192, 4, 4), (4096, 8, 2)):
        rows = per_sm * be.sm_count()
        assert policy(rows, row_config(n, jnp.bfloat16), n, jnp.bfloat16) == parts
        x = jax.ShapeDtypeStruct((rows, n), jnp.bfloat16)
        v = jax.ShapeDtypeStruct((n,), jnp.bfloat16)
        exported = be.export_for_cuda(
            lambda a, w: bi_jax.layer_norm(a, w, w, implementation="pallas"), x, v)
        assert be.triton_kernel_count(exported) == 1


def test_grad_lowers_for_cuda():
    x = jax.ShapeDtypeStruct((3, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)

    def loss(a, w, r):
        normed, s = bi_jax.rms_norm(a, w, residual=r, implementation="pallas")
        return (normed.astype(jnp.float32) * s.astype(jnp.float32)).sum()

    exported = be.export_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), x, w, x)
    assert be.triton_kernel_count(exported) == 1


# --------------------------------------------------------------------------------- GPU only

GPU_ROWS = (1, 2, 3, 7, 16, 33, 128, 255, 300, 512, 1000, 2000, 4095)


@pytest.mark.gpu
@pytest.mark.parametrize("n,dtype", [(128, jnp.bfloat16), (2048, jnp.bfloat16), (4096, jnp.bfloat16),
                                     (8192, jnp.bfloat16), (8192, jnp.float32),
                                     (20480, jnp.bfloat16)])
def test_gpu_invariant_over_rows(n, dtype):
    """Row bits equal the 4096-row result for every row count in GPU_ROWS, and any position."""
    x, r, w, b = _inputs(4096, n, dtype)
    f = jax.jit(lambda a, res: (bi_jax.rms_norm(a, w, residual=res, implementation="pallas"),
                                bi_jax.layer_norm(a, w, b, implementation="pallas")))
    full = jax.tree.map(np.asarray, f(x, r))
    for m in GPU_ROWS:
        head = tuple(o[:m] for o in jax.tree.leaves(full))
        testing.assert_bitwise_equal(f(x[:m], r[:m]), head, what=f"{m} rows, n={n}")
    for m in (1, 7, 300):  # a later slice: the rows sit at other positions of the batch
        tail = tuple(o[-m:] for o in jax.tree.leaves(full))
        testing.assert_bitwise_equal(f(x[-m:], r[-m:]), tail, what=f"last {m} rows")
    testing.assert_batch_invariant(f, x[:1024], r[:1024], batched_argnums=(0, 1),
                                   sizes=(1, 3, 255, 300))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1000, 4096, 5120, 8192, 16384, 40000])
def test_gpu_accuracy_large(n, dtype):
    x, r, w, b = _inputs(4096, n, dtype)
    rows = np.arange(0, 4096, 97)
    normed, s = bi_jax.rms_norm(x, w, residual=r, implementation="pallas")
    testing.assert_bitwise_equal(np.asarray(s), np.asarray(_rounded_sum(x, r)))
    testing.assert_bitwise_equal(normed, bi_jax.rms_norm(s, w, implementation="pallas"))
    testing.assert_close(np.asarray(normed)[rows], np_rms_norm(f64(s[rows]), f64(w)), dtype=dtype)
    out = np.asarray(bi_jax.layer_norm(x + 0.7, w, b, implementation="pallas"))[rows]
    testing.assert_close(out, np_layer_norm(f64((x + 0.7)[rows]), f64(w), f64(b)), dtype=dtype)
