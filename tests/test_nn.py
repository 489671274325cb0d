"""bi_jax.nn: parity with the flax.nnx modules it replaces, batch invariance, the KV cache."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bi_jax import _backend, testing

nnx = pytest.importorskip("flax.nnx")
from bi_jax import nn as bnn  # noqa: E402

# Inputs come from NumPy (fresh OS entropy every run, never zeros): no eager jax op, so no per-shape
# compilation in the test setup.
_RNG = np.random.default_rng()


def randn(shape, dtype=np.float32, scale=1.0):
    return jnp.asarray((_RNG.standard_normal(shape) * scale).astype(dtype))


def f64(x):
    return np.asarray(x, dtype=np.float64)


def _seed() -> int:
    return int(_RNG.integers(2**30))


def _mask(p, shape):
    """A random boolean mask whose first key is always visible."""
    m = _RNG.random(shape) < p
    m[..., 0] = True
    return jnp.asarray(m)


IMPLS = ("reference", "pallas", "xla")
GPU = _backend.has_gpu()  # fp32 products are TF32 there (DEFAULT precision), as XLA's
RTOL_VS_FLAX = 5e-3 if GPU else 1e-5


def _randomize(module, scale=0.5):
    """Give every parameter fresh random values (never the ones/zeros of the initialisers)."""
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            var[...] = randn(var.shape, var.dtype, scale=scale)
    return module


def _invariant(fn, *args, **kw):
    """A quick assert_batch_invariant (few shapes: each one is a compilation)."""
    kw = dict(sizes=(1,), num_permutations=1, num_embeddings=1, repeats=1) | kw
    testing.assert_batch_invariant(jax.jit(fn), *args, **kw)


def _same_params(a, b):
    sa = jax.tree.map(jnp.shape, nnx.state(a, nnx.Param))
    sb = jax.tree.map(jnp.shape, nnx.state(b, nnx.Param))
    assert sa == sb


# ------------------------------------------------------------------------------------------ linear


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_matches_nnx(impl, use_bias):
    seed = _seed()
    ours = bnn.Linear(96, 40, use_bias=use_bias, implementation=impl, rngs=nnx.Rngs(seed))
    theirs = nnx.Linear(96, 40, use_bias=use_bias, rngs=nnx.Rngs(seed))
    _same_params(ours, theirs)
    _randomize(theirs)
    nnx.update(ours, nnx.state(theirs))
    x = randn((3, 5, 96), jnp.float32)
    y = ours(x)
    assert y.shape == (3, 5, 40) and y.dtype == jnp.float32
    w = f64(theirs.kernel[...])
    ref = f64(x) @ w + (f64(theirs.bias[...]) if use_bias else 0.0)
    testing.assert_close(y, ref, tf32=GPU or impl == "xla")
    testing.assert_close(theirs(x), ref, tf32=True)


def test_linear_bf16_and_preferred_element_type():
    lin = bnn.Linear(64, 32, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                     preferred_element_type=jnp.float32, rngs=nnx.Rngs(_seed()))
    _randomize(lin)
    x = randn((7, 64), jnp.bfloat16)
    y = lin(x)
    assert y.dtype == jnp.float32
    testing.assert_close(y, f64(x) @ f64(lin.kernel[...]) + f64(lin.bias[...]), rtol=1e-5)


def test_linear_batch_invariant():
    lin = _randomize(bnn.Linear(128, 48, rngs=nnx.Rngs(_seed())))
    x = randn((40, 128), jnp.float32)
    _invariant(lambda x: lin(x), x, sizes=(1, 3))


def test_linear_bf16_fused_producer_batch_invariant():
    """A bf16 input produced by a fused elementwise op (XLA may keep it in fp32, shape-dependently,
    under xla_allow_excess_precision) still gives batch-invariant bits."""
    lin = _randomize(bnn.Linear(704, 256, use_bias=False, dtype=jnp.bfloat16,
                                param_dtype=jnp.bfloat16, implementation="reference",
                                rngs=nnx.Rngs(_seed())), scale=0.04)
    x = randn((8, 16, 704), jnp.bfloat16)  # [batch, tokens, features]
    fn = jax.jit(lambda x: lin(jax.nn.silu(x) * x))  # a SwiGLU-like producer fused into the input
    testing.assert_batch_invariant(fn, x, sizes=(1, 3), num_permutations=0, num_embeddings=0,
                                   repeats=1)


def test_nnx_linear_with_bi_jax_dot_general():
    """The documented alternative: keep flax's module, pass bi_jax's dot_general."""
    import bi_jax

    lin = _randomize(nnx.Linear(64, 24, dot_general=bi_jax.dot_general, rngs=nnx.Rngs(_seed())))
    x = randn((9, 64), jnp.float32)
    testing.assert_close(lin(x), f64(x) @ f64(lin.kernel[...]) + f64(lin.bias[...]), tf32=GPU)
    _invariant(lambda x: lin(x), x, num_embeddings=0)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_einsum_matches_nnx(impl):
    seed = _seed()
    ours = bnn.Einsum("btd,dhf->bthf", (32, 4, 8), (4, 8), implementation=impl,
                      rngs=nnx.Rngs(seed))
    theirs = nnx.Einsum("btd,dhf->bthf", (32, 4, 8), (4, 8), rngs=nnx.Rngs(seed))
    _same_params(ours, theirs)
    _randomize(theirs)
    nnx.update(ours, nnx.state(theirs))
    x = randn((2, 6, 32), jnp.float32)
    ref = np.einsum("btd,dhf->bthf", f64(x), f64(theirs.kernel[...])) + f64(theirs.bias[...])
    testing.assert_close(ours(x), ref, tf32=GPU or impl == "xla")
    if impl == "reference":
        _invariant(lambda x: ours(x), x, num_embeddings=0)


def test_embed_attend():
    seed = _seed()
    ours = _randomize(bnn.Embed(50, 32, rngs=nnx.Rngs(seed)))
    theirs = nnx.Embed(50, 32, rngs=nnx.Rngs(seed))
    _same_params(ours, theirs)
    nnx.update(theirs, nnx.state(ours))
    ids = jnp.asarray(_RNG.integers(0, 50, (3, 4)))
    np.testing.assert_array_equal(ours(ids), theirs(ids))
    q = randn((3, 4, 32), jnp.float32)
    testing.assert_close(ours.attend(q), f64(q) @ f64(ours.embedding[...]).T, tf32=GPU)
    _invariant(lambda q: ours.attend(q), q, num_embeddings=0)


# ----------------------------------------------------------------------------------- normalization


@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_matches_nnx(impl):
    seed = _seed()
    ours = bnn.RMSNorm(96, epsilon=1e-5, implementation=impl, rngs=nnx.Rngs(seed))
    theirs = nnx.RMSNorm(96, epsilon=1e-5, rngs=nnx.Rngs(seed))
    _same_params(ours, theirs)
    _randomize(theirs)
    nnx.update(ours, nnx.state(theirs))
    x = randn((4, 6, 96), jnp.float32, scale=3.0)
    r = randn((4, 6, 96), jnp.float32)
    testing.assert_close(ours(x), theirs(x))
    y, s = ours(x, residual=r)
    testing.assert_close(s, f64(x) + f64(r))
    testing.assert_close(y, theirs(s))
    if impl != "xla":
        _invariant(lambda x, r: ours(x, residual=r), x, r, batched_argnums=(0, 1))


def test_rms_norm_default_epsilon_and_dtype():
    seed = _seed()
    ours = bnn.RMSNorm(64, rngs=nnx.Rngs(seed))
    theirs = nnx.RMSNorm(64, rngs=nnx.Rngs(seed))
    assert ours.epsilon == theirs.epsilon == 1e-6
    x = randn((5, 64), jnp.bfloat16, scale=1e-3)  # small rows: epsilon matters
    y = ours(x)
    assert y.dtype == theirs(x).dtype  # promoted with the fp32 scale, as flax
    testing.assert_close(y, f64(theirs(x)), rtol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fast_variance", [True, False])
def test_layer_norm_matches_nnx(impl, fast_variance):
    seed = _seed()
    kw = dict(epsilon=1e-5, use_fast_variance=fast_variance)
    ours = bnn.LayerNorm(80, implementation=impl, rngs=nnx.Rngs(seed), **kw)
    theirs = nnx.LayerNorm(80, rngs=nnx.Rngs(seed), **kw)
    _same_params(ours, theirs)
    _randomize(theirs)
    nnx.update(ours, nnx.state(theirs))
    x = randn((3, 7, 80), jnp.float32, scale=2.0) + 1.5
    testing.assert_close(ours(x), theirs(x), rtol=RTOL_VS_FLAX)


def test_norm_unsupported_options_raise():
    with pytest.raises(NotImplementedError):
        bnn.RMSNorm(8, reduction_axes=(-2, -1), rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError):
        bnn.RMSNorm(8, rngs=nnx.Rngs(0))(randn((2, 8), jnp.float32), mask=jnp.ones((2, 8), bool))
    with pytest.raises(ValueError, match="unknown implementation"):
        bnn.LayerNorm(8, implementation="cudnn", rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------- attention


def _qkv(b, tq, tk, hq, hkv, d, dtype=jnp.float32):
    return (randn((b, tq, hq, d), dtype), randn((b, tk, hkv, d), dtype),
            randn((b, tk, hkv, d), dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_fn_matches_nnx(impl, causal):
    q, k, v = _qkv(2, 6, 9, 4, 2, 16)  # Tq != Tk: flax's causal mask is top-left aligned
    ours = jax.jit(functools.partial(bnn.dot_product_attention, is_causal=causal,
                                     implementation=impl))(q, k, v)
    theirs = nnx.dot_product_attention(q, k, v, is_causal=causal)
    testing.assert_close(ours, theirs, rtol=RTOL_VS_FLAX)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_attention_fn_mask_and_bias(impl):
    q, k, v = _qkv(2, 5, 7, 4, 4, 8)  # D=8: not a flash head dim -> the dense path
    mask = _mask(0.7, (2, 1, 5, 7))
    bias = randn((2, 4, 5, 7), jnp.float32)
    ours = jax.jit(functools.partial(bnn.dot_product_attention, implementation=impl))(
        q, k, v, bias, mask)
    theirs = nnx.dot_product_attention(q, k, v, bias, mask)
    testing.assert_close(ours, theirs, rtol=RTOL_VS_FLAX)


@pytest.mark.filterwarnings("ignore:.*sow.*:DeprecationWarning")
def test_attention_fn_sows_weights():
    q, k, v = _qkv(2, 5, 7, 4, 2, 16)
    mask = _mask(0.7, (2, 1, 5, 7))

    class Holder(nnx.Module):
        pass

    @nnx.jit
    def run(h, q, k, v):
        return bnn.dot_product_attention(q, k, v, mask=mask, module=h)

    h = Holder()
    out = run(h, q, k, v)
    w = h.attention_weights[0]
    assert w.shape == (2, 4, 5, 7)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-5)
    assert not np.asarray(w)[np.broadcast_to(~mask, w.shape)].any()
    testing.assert_close(out, nnx.dot_product_attention(q, k, v, mask=mask), rtol=RTOL_VS_FLAX)


def test_attention_fn_batch_invariant_with_mask():
    q, k, v = _qkv(6, 4, 4, 4, 2, 16)
    mask = jnp.tril(jnp.ones((4, 4), bool))[None, None]
    _invariant(lambda q, k, v: bnn.dot_product_attention(q, k, v, mask=mask), q, k, v,
               batched_argnums=(0, 1, 2))
    _invariant(lambda q, k, v: bnn.dot_product_attention(q, k, v, is_causal=True), q, k, v,
               batched_argnums=(0, 1, 2), num_embeddings=0)


def test_attention_fn_rejects_dropout():
    q, k, v = _qkv(1, 2, 2, 2, 2, 16)
    with pytest.raises(NotImplementedError, match="dropout"):
        bnn.dot_product_attention(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0))


def test_multi_head_attention_matches_nnx():
    seed = _seed()
    kw = dict(num_heads=4, in_features=64, num_kv_heads=2, decode=False)
    ours = bnn.MultiHeadAttention(**kw, rngs=nnx.Rngs(seed))
    theirs = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(seed))
    _same_params(ours, theirs)
    _randomize(theirs, scale=0.2)
    nnx.update(ours, nnx.state(theirs))
    x = randn((2, 6, 64), jnp.float32)
    call = nnx.jit(lambda m, x, **kw: m(x, **kw), static_argnames="is_causal")
    want = theirs(x, is_causal=True)
    testing.assert_close(call(ours, x, is_causal=True), want, rtol=RTOL_VS_FLAX)
    mask = _mask(0.8, (2, 1, 6, 6))
    testing.assert_close(call(ours, x, mask=mask), theirs(x, mask=mask), rtol=RTOL_VS_FLAX)

    # flax's own decode mode (a cache and an occupancy mask) runs on the dense path.
    ours.init_cache((2, 6, 64))
    step = nnx.jit(lambda m, x: m(x, decode=True))
    steps = [step(ours, x[:, t:t + 1]) for t in range(4)]
    testing.assert_close(jnp.concatenate(steps, 1), want[:, :4], rtol=RTOL_VS_FLAX)


def test_set_implementation_switches_every_layer():
    mha = bnn.MultiHeadAttention(2, 32, decode=False, rngs=nnx.Rngs(0))
    lin = bnn.Linear(32, 32, rngs=nnx.Rngs(0))
    model = nnx.List([mha, lin, bnn.RMSNorm(32, rngs=nnx.Rngs(0))])
    bnn.set_implementation(model, "xla")
    assert mha.implementation == lin.implementation == model[2].implementation == "xla"
    assert mha.attention_fn.keywords["implementation"] == "xla"
    assert mha.query.dot_general.keywords["implementation"] == "xla"
    assert lin.dot_general.keywords["implementation"] == "xla"
    with pytest.raises(ValueError):
        bnn.set_implementation(model, "fast")


# ----------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_cached_attention_chunked_equals_full_bitwise(impl):
    """Ragged rows prefilled in chunks through the cache give the bits of one full attention."""
    b, t, hq, hkv, d, cap = 3, 11, 4, 2, 16, 16
    q, k, v = _qkv(b, t, t, hq, hkv, d)
    full = bnn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    lens = np.array([11, 4, 7])  # row lengths
    rng = np.random.default_rng(_seed())
    cache = bnn.KVCache.create(b, cap, hkv, d)
    done = np.zeros(b, int)
    outs = [[] for _ in range(b)]
    step = jax.jit(functools.partial(bnn.cached_attention, implementation=impl))
    qn, kn, vn = (np.asarray(x) for x in (q, k, v))
    while (done < lens).any():
        n = np.minimum(rng.integers(1, 5, b), lens - done)  # 0 for finished rows
        # A fixed padded width of 4 new tokens per call: one compilation.
        idx = np.clip(done[:, None] + np.arange(4)[None, :], 0, t - 1)
        rows = np.arange(b)[:, None]
        o, cache = step(jnp.asarray(qn[rows, idx]), jnp.asarray(kn[rows, idx]),
                        jnp.asarray(vn[rows, idx]), cache, jnp.asarray(n, jnp.int32))
        for i in range(b):
            outs[i].append(np.asarray(o[i, : n[i]]))
        done += n
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens)
    for i in range(b):
        got = np.concatenate(outs[i])
        testing.assert_bitwise_equal(got, np.asarray(full[i, : lens[i]]), what=f"row {i}")


def test_kv_cache_append_and_reset():
    cache = bnn.KVCache.create(2, 6, 1, 16)
    k = randn((2, 3, 1, 16), jnp.float32)
    cache = cache.append(k, -k, jnp.array([3, 1]))
    np.testing.assert_array_equal(cache.lengths, [3, 1])
    np.testing.assert_array_equal(cache.k[0, :3], k[0])
    np.testing.assert_array_equal(cache.v[1, :1], -k[1, :1])
    assert not np.asarray(cache.k[1, 1:]).any()  # padding tokens are not written
    np.testing.assert_array_equal(cache.positions(2), [[3, 4], [1, 2]])
    np.testing.assert_array_equal(cache.reset(jnp.array([False, True])).lengths, [3, 0])
    with pytest.raises(ValueError, match="q_lengths"):
        cache.append(k, k, jnp.array([1, 1, 1]))
