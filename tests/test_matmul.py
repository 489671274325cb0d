"""bi_jax.matmul / bi_jax.dot_general: accuracy vs float64, bitwise invariance, lowering, bad input."""

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
from bi_jax.matmul import MatmulConfig, matmul_config, shipped_configs

_mm = sys.modules["bi_jax.matmul"]  # the module (bi_jax.matmul the attribute is the function)


@pytest.fixture(params=[None, 64], ids=["chunk-default", "chunk-64"])
def k_chunk(request, monkeypatch):
    """Run a test with the shipped K chunk and with a 64-element one (small K, several chunks)."""
    if request.param is not None:
        monkeypatch.setattr(_mm, "_K_CHUNK", request.param)
    return _mm._K_CHUNK

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]
INVARIANT_IMPLS = ["pallas", "reference"]
HIGHEST = jax.lax.Precision.HIGHEST


def _tf32(dtype, precision) -> bool:
    """fp32 with DEFAULT precision is TF32 on the GPU (exact fp32 in interpret mode on the CPU)."""
    return jnp.dtype(dtype) == jnp.float32 and precision != HIGHEST and be.has_gpu()


# ------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", INVARIANT_IMPLS + ["xla"])
@pytest.mark.parametrize("mkn", [(1, 70, 33), (37, 200, 130), (129, 64, 257)])
def test_matmul_matches_float64(dtype, impl, mkn):
    m, k, n = mkn
    a, b, bias = randn((m, k), dtype), randn((k, n), dtype), randn((n,), dtype)
    out = bi_jax.matmul(a, b, bias=bias, precision=HIGHEST, implementation=impl)
    assert out.shape == (m, n) and out.dtype == dtype
    testing.assert_close(out, f64(a) @ f64(b) + f64(bias), dtype=dtype)


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_fp32_default_precision(impl):
    a, b = randn((20, 96), jnp.float32), randn((96, 40), jnp.float32)
    out = bi_jax.matmul(a, b, implementation=impl)
    testing.assert_close(out, f64(a) @ f64(b), tf32=_tf32(jnp.float32, None))


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_out_dtype_and_leading_dims(impl):
    a, b = randn((2, 3, 5, 48), jnp.bfloat16), randn((48, 24), jnp.bfloat16)
    out = bi_jax.matmul(a, b, out_dtype=jnp.float32, implementation=impl)
    assert out.shape == (2, 3, 5, 24) and out.dtype == jnp.float32
    testing.assert_close(out, f64(a) @ f64(b), dtype=jnp.float32)
    # fp32 output of bf16 products with fp32 accumulation is as accurate as fp32 itself
    one_d = bi_jax.matmul(a[0, 0, 0], b, implementation=impl)
    assert one_d.shape == (24,)


@pytest.mark.parametrize("impl", INVARIANT_IMPLS + ["xla"])
@pytest.mark.parametrize("mkn", [(0, 8, 8), (8, 0, 8), (8, 8, 0), (0, 0, 0)])
def test_empty_dims(impl, mkn):
    m, k, n = mkn
    a, b, bias = randn((m, k), jnp.float32), randn((k, n), jnp.float32), randn((n,), jnp.float32)
    out = bi_jax.matmul(a, b, bias=bias, implementation=impl)
    assert out.shape == (m, n)
    np.testing.assert_array_equal(
        np.asarray(out),
        np.broadcast_to(f64(bias), (m, n)) if k == 0 else f64(a) @ f64(b) + f64(bias),
    )


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_nonfinite_rows_propagate_and_stay_local(impl):
    a, b = randn((9, 40), jnp.float32), randn((40, 17), jnp.float32)
    clean = np.asarray(bi_jax.matmul(a, b, implementation=impl))
    a_bad = a.at[3, 5].set(jnp.nan).at[6, 0].set(jnp.inf)
    out = np.asarray(bi_jax.matmul(a_bad, b, implementation=impl))
    assert np.isnan(out[3]).all()
    assert not np.isfinite(out[6]).any()
    keep = [i for i in range(9) if i not in (3, 6)]
    testing.assert_bitwise_equal(out[keep], clean[keep])


# ----------------------------------------------------------------------------------- invariance


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_batch_invariant(dtype, impl, k_chunk):
    a, b, bias = randn((300, 96), dtype), randn((96, 72), dtype), randn((72,), dtype)
    fn = jax.jit(functools.partial(bi_jax.matmul, b=b, bias=bias, implementation=impl))
    testing.assert_batch_invariant(lambda x: fn(x), a)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_shipped_config_gives_the_same_bits(dtype, k_chunk):
    """The tile policy may follow M only because every config it can pick gives the same bits,
    in both launch modes (one program per tile, or per tile and K chunk + an ordered sum)."""
    a, b, bias = randn((150, 300), dtype), randn((300, 200), dtype), randn((200,), dtype)
    configs = shipped_configs(dtype)
    assert len(configs) >= 3 and {c.split_k for c in configs} == {False, True}
    outs = [bi_jax.matmul(a, b, bias=bias, implementation="pallas", config=c) for c in configs]
    for c, o in zip(configs[1:], outs[1:]):
        testing.assert_bitwise_equal(o, outs[0], what=f"{c} vs {configs[0]} (K chunk {k_chunk})")
    testing.assert_close(outs[0], f64(a) @ f64(b) + f64(bias), dtype=dtype)


def test_k_chunks_follow_k_alone():
    """The fewest chunks of at most 8192, as even as a multiple of 512 allows."""
    for k, chunk in ((1, 512), (4096, 4096), (8192, 8192), (8193, 4608), (11008, 5632),
                     (14336, 7168), (16384, 8192), (28672, 7168)):
        assert _mm._k_chunk(k) == chunk, k
        chunks = -(-k // chunk)
        assert chunks == -(-k // 8192) and chunk % 512 == 0 and 0 < k - (chunks - 1) * chunk <= chunk


@pytest.mark.parametrize("align", [64, 256])
def test_k_chunk_sizes_set_the_sum_order(align, monkeypatch):
    """The chunk sizes are the numerics: K = 384 in chunks of at most 256 is 192 + 192 (multiples
    of 64) or 256 + 128 (multiples of 256). Each row holds 2^23 at k = 0 and 1 (with small even
    pairs (x, -x) in the rest of that 64-block), ones at k = 192 and 256, and small random pairs on
    a 2^-20 grid elsewhere, so every sum inside a block or chunk is exact in any order, on any
    MMA. 192 + 192: the chunk partials are 2^24 and ~2, and their sum rounds to the float64
    result. 256 + 128: the one at k = 192 meets 2^24 inside the first chunk and is lost (2^24 + 1
    - x, x > 0, rounds down), so the row comes out 2 short. Every Triton config (both launch
    modes) and the Mosaic kernel follow the same chunks."""
    monkeypatch.setattr(_mm, "_K_CHUNK", 256)
    monkeypatch.setattr(_mm, "_K_CHUNK_ALIGN", align)
    balanced = align == 64
    assert _mm._k_chunk(384) == (192 if balanced else 256)
    r = np.asarray(randn((128, 192), jnp.float32))
    pairs = np.sign(r) * np.minimum(1 + np.floor(np.abs(r) * 64), 255) * 2.0**-20  # bf16-exact
    pairs[:, :32] = np.sign(r[:, :32]) * (2 + 2 * np.floor(np.abs(r[:, :32])))  # even, beside 2^23
    pairs[:, [96, 128]] = np.abs(pairs[:, [96, 128]])  # the ones' partners: 1 - x just below 1
    a = np.stack([pairs, -pairs], axis=-1).reshape(128, 384)
    a[:, 0], a[:, 1], a[:, 192], a[:, 256] = 2.0**23, 2.0**23, 1.0, 1.0
    a, b = jnp.asarray(a, jnp.bfloat16)[None], jnp.ones((1, 384, 256), jnp.bfloat16)
    want = np.float32(f64(a[0]) @ f64(b[0]))
    assert (want == 2.0**24 + 2).all()
    for cfg in (*shipped_configs(jnp.bfloat16), MOSAIC_CONFIGS[0], MOSAIC_CONFIGS[3]):
        out = np.asarray(_mm._bmm(a, b, None, jnp.dtype(jnp.float32), None, "pallas", cfg)[0])
        np.testing.assert_array_equal(out, want if balanced else want - 2, err_msg=str(cfg))


def test_policy_keeps_block_k_fixed():
    for dtype in DTYPES:
        assert len({c.block_k for c in shipped_configs(dtype)}) == 1
        chosen = {matmul_config(m, n, k, dtype) for m in range(1, 600) for n, k in
                  ((4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (512, 2048),
                   (2048, 2048), (3072, 2048), (2048, 8192), (8192, 2048))}
        assert chosen <= set(shipped_configs(dtype))


def test_small_m_policy_narrows_tiles_for_small_n():
    """M <= 32: the widest 16-row tile that gives at least 96 programs (small N needs the
    programs to keep the SMs reading the weights)."""
    def tile(m, n, k=2048):
        c = matmul_config(m, n, k, jnp.bfloat16)
        return c.block_m, c.block_n

    assert tile(8, 2048, 8192) == (16, 16) and tile(8, 512) == (16, 16)  # 128 and 32 programs
    assert tile(16, 4096, 4096) == (16, 32) and tile(32, 2048) == (16, 32)  # 128 programs
    assert tile(1, 6144, 4096) == (16, 64) and tile(32, 4096, 4096) == (16, 64)  # 96, 128


@settings(max_examples=12, deadline=None)
@given(
    m=st.integers(1, 80),
    k=st.integers(1, 150),
    n=st.integers(1, 90),
    split=st.floats(0, 1),
    impl=st.sampled_from(INVARIANT_IMPLS),
)
def test_property_prefix_equals_full(m, k, n, split, impl):
    a, b = randn((m, k), jnp.bfloat16), randn((k, n), jnp.bfloat16)
    full = bi_jax.matmul(a, b, implementation=impl)
    s = max(1, int(split * m))
    testing.assert_bitwise_equal(bi_jax.matmul(a[:s], b, implementation=impl), full[:s])
    testing.assert_bitwise_equal(bi_jax.matmul(a[s - 1 :], b, implementation=impl), full[s - 1 :])
    testing.assert_close(full, f64(a) @ f64(b), dtype=jnp.bfloat16)


def test_reference_differs_from_xla_on_cpu_only_by_rounding():
    """The reference is not jnp.dot (which varies with M even on the CPU), but it is as accurate."""
    a, b = randn((64, 1024), jnp.float32), randn((1024, 64), jnp.float32)
    ref = bi_jax.matmul(a, b, implementation="reference", precision=HIGHEST)
    testing.assert_close(ref, f64(a) @ f64(b))


# ----------------------------------------------------------------------------------- dot_general

DOT_CASES = [
    # (lhs shape, rhs shape, dimension numbers)
    ((5, 7, 32), (32, 12), (((2,), (0,)), ((), ()))),  # nnx.Linear on [batch, seq, in]
    ((32, 9), (32, 12), (((0,), (0,)), ((), ()))),  # contract the leading dim of lhs
    ((9, 32), (12, 32), (((1,), (1,)), ((), ()))),  # x @ w.T
    ((3, 9, 16), (3, 16, 5), (((2,), (1,)), ((0,), (0,)))),  # batched matmul
    ((4, 6, 8, 10), (4, 10, 8, 3), (((2, 3), (2, 1)), ((0,), (0,)))),  # two contracting dims
    ((2, 5, 3, 16), (3, 2, 16, 7), (((3,), (2,)), ((0, 2), (1, 0)))),  # two batch dims, permuted
]


@pytest.mark.parametrize("impl", INVARIANT_IMPLS + ["xla"])
@pytest.mark.parametrize("case", DOT_CASES)
def test_dot_general_matches_lax(impl, case):
    ls, rs, dn = case
    lhs, rhs = randn(ls, jnp.float32), randn(rs, jnp.float32)
    out = bi_jax.dot_general(lhs, rhs, dn, precision=HIGHEST, implementation=impl)
    expect = _np_dot_general(f64(lhs), f64(rhs), dn)
    assert out.shape == expect.shape
    testing.assert_close(out, expect)


def _np_dot_general(lhs, rhs, dn):
    """float64 lax.dot_general semantics through np.einsum (batch, lhs free, rhs free)."""
    (lc, rc), (lb, rb) = dn
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    ls = [next(letters) for _ in range(lhs.ndim)]
    rs = [next(letters) for _ in range(rhs.ndim)]
    for i, j in zip(lc + lb, rc + rb):
        rs[j] = ls[i]
    out = (
        [ls[i] for i in lb]
        + [ls[i] for i in range(lhs.ndim) if i not in lc + lb]
        + [rs[j] for j in range(rhs.ndim) if j not in rc + rb]
    )
    return np.einsum(f"{''.join(ls)},{''.join(rs)}->{''.join(out)}", lhs, rhs)


def test_dot_general_flax_kwargs_and_preferred_type():
    lhs, rhs = randn((4, 32), jnp.bfloat16), randn((32, 8), jnp.bfloat16)
    out = bi_jax.dot_general(
        lhs,
        rhs,
        (((1,), (0,)), ((), ())),
        precision=None,
        preferred_element_type=jnp.float32,
        out_sharding=None,
        implementation="pallas",
    )
    assert out.dtype == jnp.float32
    testing.assert_close(out, f64(lhs) @ f64(rhs), dtype=jnp.float32)


def test_dot_general_in_flax_linear():
    from flax import nnx

    layer = nnx.Linear(
        48,
        20,
        dot_general=functools.partial(bi_jax.dot_general, implementation="pallas"),
        rngs=nnx.Rngs(0),
    )
    x = randn((6, 48), jnp.float32)
    out = layer(x)
    ref = f64(x) @ f64(layer.kernel[...]) + f64(layer.bias[...])
    testing.assert_close(out, ref, tf32=be.has_gpu())


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_dot_general_batch_dim_invariance(impl, k_chunk):
    """Batch elements of a batched dot_general never mix: prefix over the batch dim (with a 64-wide
    K chunk, K = 200 takes the split-K kernels with several batch elements)."""
    lhs, rhs = randn((40, 5, 200), jnp.bfloat16), randn((40, 200, 6), jnp.bfloat16)
    fn = lambda l, r: bi_jax.dot_general(l, r, (((2,), (1,)), ((0,), (0,))), implementation=impl)
    testing.assert_batch_invariant(
        fn, lhs, rhs, batched_argnums=(0, 1), sizes=(1, 3, 17), num_embeddings=1
    )
    testing.assert_close(fn(lhs, rhs), np.einsum("bmk,bkn->bmn", f64(lhs), f64(rhs)),
                         dtype=jnp.bfloat16)


# ----------------------------------------------------------------------------- jit / vmap / grad


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_jit_vmap(impl):
    a, b = randn((3, 10, 40), jnp.float32), randn((40, 16), jnp.float32)
    f = jax.jit(jax.vmap(lambda x: bi_jax.matmul(x, b, precision=HIGHEST, implementation=impl)))
    out = f(a)
    testing.assert_close(out, f64(a) @ f64(b))
    testing.assert_bitwise_equal(
        out[1], bi_jax.matmul(a[1], b, precision=HIGHEST, implementation=impl)
    )


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_grad_matches_float64(impl):
    a, b, bias = (
        randn((12, 40), jnp.float32),
        randn((40, 16), jnp.float32),
        randn((16,), jnp.float32),
    )
    w = randn((12, 16), jnp.float32)

    def loss(a, b, bias):
        out = bi_jax.matmul(a, b, bias=bias, precision=HIGHEST, implementation=impl)
        return jnp.sum(out * w)

    da, db, dbias = jax.grad(loss, argnums=(0, 1, 2))(a, b, bias)
    testing.assert_close(da, f64(w) @ f64(b).T)
    testing.assert_close(db, f64(a).T @ f64(w))
    testing.assert_close(dbias, f64(w).sum(0))


def test_grad_of_rows_is_batch_invariant():
    a, b = randn((70, 48), jnp.bfloat16), randn((48, 24), jnp.bfloat16)
    g = jax.jit(
        jax.grad(
            lambda x: jnp.sum(
                bi_jax.matmul(x, b, out_dtype=jnp.float32, implementation="pallas") ** 2
            )
        )
    )
    testing.assert_batch_invariant(g, a, sizes=(1, 7, 33), num_embeddings=1)


# ---------------------------------------------------------------------------------- bad input


def test_bad_shapes_name_both():
    a, b = randn((4, 8), jnp.float32), randn((9, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(9, 3\)"):
        bi_jax.matmul(a, b)
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        bi_jax.matmul(a, randn((8, 3, 2), jnp.float32))
    with pytest.raises(ValueError, match="bias"):
        bi_jax.matmul(a, randn((8, 3), jnp.float32), bias=randn((4,), jnp.float32))
    with pytest.raises(ValueError, match=r"lhs \(4, 8\), rhs \(9, 3\)"):
        bi_jax.dot_general(a, b, (((1,), (0,)), ((), ())))
    with pytest.raises(ValueError, match="out of range"):
        bi_jax.dot_general(a, b, (((2,), (0,)), ((), ())))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64, jnp.int8])
def test_bad_dtypes(dtype):
    a = jnp.ones((4, 8), dtype)
    with pytest.raises(TypeError, match="dtype"):
        bi_jax.matmul(a, jnp.ones((8, 3), jnp.float32))
    with pytest.raises(TypeError, match="dtype"):
        bi_jax.dot_general(jnp.ones((4, 8), jnp.float32), a.T, (((1,), (0,)), ((), ())))


def test_unknown_implementation_lists_valid_names():
    a, b = randn((4, 8), jnp.float32), randn((8, 3), jnp.float32)
    with pytest.raises(ValueError, match="'pallas', 'reference', 'xla'"):
        bi_jax.matmul(a, b, implementation="cublas")


def test_bad_config():
    with pytest.raises(ValueError, match="power of two"):
        MatmulConfig(48, 64, 64)
    a, b = randn((4, 64), jnp.bfloat16), randn((64, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_k=16384 must divide the K chunk"):
        bi_jax.matmul(a, b, implementation="pallas", config=MatmulConfig(16, 16, 16384))


def test_errors_raise_at_trace_time():
    f = jax.jit(lambda a, b: bi_jax.matmul(a, b, implementation="pallas"))
    with pytest.raises(ValueError):
        f.trace(
            jax.ShapeDtypeStruct((4, 8), jnp.bfloat16), jax.ShapeDtypeStruct((7, 2), jnp.bfloat16)
        )


# ------------------------------------------------------------------------- Mosaic GPU kernel

MOSAIC_CONFIGS = [MatmulConfig(128, bn, 64, num_stages=st, split_k=split, kernel="mosaic")
                  for split in (False, True) for bn, st in ((256, 4), (192, 4), (128, 6), (64, 8))]
MOSAIC_IDS = [f"128x{c.block_n}{'-split' if c.split_k else ''}" for c in MOSAIC_CONFIGS]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("cfg", MOSAIC_CONFIGS, ids=MOSAIC_IDS)
def test_mosaic_kernel(dtype, cfg, k_chunk, monkeypatch):
    """The Hopper kernel (interpreted without a GPU): accuracy on ragged edges (rows and columns
    past a tile, M not a multiple of 8) with a batch dimension, and rows whose bits do not depend
    on M or on how many tiles each persistent CTA runs (2 CTAs vs one per tile), with a CTA's
    items whole tiles or (``split_k``, several K chunks) one chunk of a tile each. Its bits equal
    the Triton kernel's on the GPU (``test_gpu_every_config_same_bits``); jax's interpreter does
    not emulate the tensor cores' rounding, so that is not asserted here."""
    a, b = randn((2, 200, 192), dtype), randn((2, 192, 320), dtype)
    def mm(a, b, out=dtype):  # the batched core op ([B, M, K] @ [B, K, N]), the config forced
        return _mm._bmm(a, b, None, jnp.dtype(out), None, "pallas", cfg)

    assert be.mosaic_kernel_count(be.export_for_cuda(mm, a, b)) == 1
    full = mm(a, b)
    testing.assert_close(full, np.einsum("bmk,bkn->bmn", f64(a), f64(b)), dtype=dtype)
    testing.assert_bitwise_equal(mm(a[:, :181], b), full[:, :181], what="M=181 vs M=200")
    wide = mm(a, b, jnp.float32)  # fp32 output (e.g. logits): one rounding of the same total
    testing.assert_bitwise_equal(wide.astype(dtype), full, what="fp32 output, rounded")
    monkeypatch.setattr(be, "sm_count", lambda: 2)
    testing.assert_bitwise_equal(mm(a, b), full, what="2 persistent CTAs vs one per tile")


@pytest.mark.parametrize("cfg", MOSAIC_CONFIGS, ids=MOSAIC_IDS)
def test_mosaic_kernel_has_no_data_races(cfg, monkeypatch):
    """jax's GPU-interpret race detector over the barrier protocol: 2 CTAs of 3-4 tiles each, two
    K blocks per tile (the producer runs ahead), so the epilogue's SMEM slots and the K ring turn
    over between tiles. (With the output slots alternating per tile instead of across tiles, the
    128x192 tile's odd piece count raced here.) The split configs get two K chunks per tile."""
    a, b = randn((260, 128), jnp.bfloat16), randn((128, 384), jnp.bfloat16)
    monkeypatch.setattr(be, "sm_count", lambda: 2)
    if cfg.split_k:
        monkeypatch.setattr(_mm, "_K_CHUNK", 64)
    with be.race_detection() as races_found:
        out = bi_jax.matmul(a, b, implementation="pallas", config=cfg)
        jax.block_until_ready(out)
        assert not races_found(), cfg
    testing.assert_close(out, f64(a) @ f64(b), dtype=jnp.bfloat16)


def test_mosaic_smem_fits_an_h100():
    """Every Mosaic config with every input / output dtype fits the 227 KiB of a CTA's SMEM (an
    fp32 output takes a pipeline stage away instead of overflowing it)."""
    for cfg in MOSAIC_CONFIGS:
        for dtype in (jnp.bfloat16, jnp.float16):
            for out in (dtype, jnp.float32):
                stages, used = _mm._mosaic_smem(cfg, dtype, out)
                assert 2 <= stages <= cfg.num_stages and used <= 227 * 1024, (cfg, out, stages)
    assert _mm._mosaic_smem(MOSAIC_CONFIGS[0], jnp.bfloat16, jnp.float32)[0] == 3


def test_mosaic_config_falls_back_to_triton_where_it_cannot_run(monkeypatch):
    """A bias, or a shape the TMA cannot tile, runs the Triton kernel (the same bits)."""
    cfg = MOSAIC_CONFIGS[0]
    a, b = jax.ShapeDtypeStruct((300, 128), jnp.bfloat16), jax.ShapeDtypeStruct((128, 256), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((256,), jnp.bfloat16)
    run = lambda *x: bi_jax.matmul(x[0], x[1], bias=x[2] if len(x) > 2 else None,
                                   implementation="pallas", config=cfg)
    grids = []
    pallas_call = be.pallas_call

    def spy(*args, **kw):
        grids.append(kw["grid"])
        return pallas_call(*args, **kw)

    monkeypatch.setattr(be, "pallas_call", spy)
    for args, mosaic in (((a, b), 1), ((a, b, bias), 0),
                         ((jax.ShapeDtypeStruct((300, 100), jnp.bfloat16),
                           jax.ShapeDtypeStruct((100, 256), jnp.bfloat16)), 0)):
        exported = be.export_for_cuda(run, *args)
        assert (be.mosaic_kernel_count(exported), be.triton_kernel_count(exported)) == (
            mosaic, 1 - mosaic), args
    # the Triton launches use the Triton policy's tile, not the Mosaic config's
    want = _mm._triton_config(300, 256, 128, jnp.bfloat16)
    assert grids[0] == (1, -(-300 // want.block_m) * -(-256 // want.block_n)), (grids, want)
    with pytest.raises(ValueError, match="block_m=128"):
        MatmulConfig(64, 256, 64, kernel="mosaic")


def test_hopper_policy_picks_mosaic_for_large_m(monkeypatch):
    """On Hopper the policy takes the Mosaic kernel from M = 129 where it can run, with the tile
    that wastes least of the last wave, one item per K chunk up to M = 256; elsewhere the Triton
    kernel."""
    monkeypatch.setattr(be, "_device_is_hopper", lambda: True)
    for k, n in ((4096, 4096), (14336, 4096)):
        cfgs = {m: matmul_config(m, n, k, jnp.bfloat16) for m in (1, 128, 129, 256, 257, 4096)}
        assert {m for m, c in cfgs.items() if c.kernel == "mosaic"} == {129, 256, 257, 4096}, cfgs
        assert {m for m, c in cfgs.items() if c.kernel == "mosaic" and c.split_k} == (
            {129, 256} if k > _mm._K_CHUNK else set()), cfgs
    # down projection, M = 256: 64 tiles of 128x128, two chunks each: 128 items, one wave
    assert matmul_config(256, 4096, 14336, jnp.bfloat16).block_n == 128
    for shape in ((4096, 4096, 100), (4096, 200, 4096)):  # K or N the TMA cannot tile
        assert matmul_config(*shape, jnp.bfloat16).kernel == "triton", shape
    assert matmul_config(4096, 4096, 4096, jnp.float32).kernel == "triton"
    assert _mm._mosaic_config(64, 4096, 4096, jnp.bfloat16) is None  # less than one row tile
    # QKV, M = 512: 96 tiles of 128x256 (one wave, 2 units each) lose to 128 of 128x192
    assert matmul_config(512, 6144, 4096, jnp.bfloat16).block_n == 192
    assert matmul_config(4096, 4096, 4096, jnp.bfloat16).block_n == 256
    assert {c for c in shipped_configs(jnp.bfloat16) if c.kernel == "mosaic"} == set(MOSAIC_CONFIGS)
    with be.assume_not_hopper():
        assert {c.kernel for c in shipped_configs(jnp.bfloat16)} == {"triton"}


# ------------------------------------------------------------------------------ CUDA lowering


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_config_lowers_for_cuda(dtype):
    """The real Pallas -> Triton lowering of every shipped config, on ragged shapes, with bias."""
    for cfg in shipped_configs(dtype):
        a = jax.ShapeDtypeStruct((3, 37, 100), dtype)
        b = jax.ShapeDtypeStruct((100, 70), dtype)
        bias = jax.ShapeDtypeStruct((70,), dtype)
        fn = lambda a, b, bias, cfg=cfg: bi_jax.matmul(
            a, b, bias=bias, implementation="pallas", config=cfg, precision=HIGHEST
        )
        exported = be.export_for_cuda(fn, a, b, bias)
        assert be.triton_kernel_count(exported) == 1, cfg


def test_split_k_lowers_for_cuda(monkeypatch):
    """Several K chunks: the split launch is two kernels (partials, ordered sum), fused is one."""
    monkeypatch.setattr(_mm, "_K_CHUNK", 64)
    a = jax.ShapeDtypeStruct((37, 200), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((200, 70), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((70,), jnp.float32)
    for split, kernels in ((True, 2), (False, 1)):
        cfg = MatmulConfig(16, 64, 64, split_k=split)
        fn = lambda a, b, bias, cfg=cfg: bi_jax.matmul(
            a, b, bias=bias, implementation="pallas", config=cfg
        )
        assert be.triton_kernel_count(be.export_for_cuda(fn, a, b, bias)) == kernels, cfg


def test_dot_general_and_grad_lower_for_cuda():
    lhs = jax.ShapeDtypeStruct((3, 9, 16), jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((3, 16, 5), jnp.bfloat16)
    dn = (((2,), (1,)), ((0,), (0,)))
    fwd = lambda l, r: bi_jax.dot_general(l, r, dn, implementation="pallas")
    assert be.triton_kernel_count(be.export_for_cuda(fwd, lhs, rhs)) == 1
    grad = jax.value_and_grad(lambda l, r: fwd(l, r).astype(jnp.float32).sum(), argnums=(0, 1))
    assert be.triton_kernel_count(be.export_for_cuda(grad, lhs, rhs)) == 3


# --------------------------------------------------------------------------------- GPU only

# (K, N): Llama-3-8B's projections, then a Llama-3.2-1B one (the narrow tiles of small N)
LLAMA_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (8192, 2048)]
# Ragged and power-of-two M from 1 to 8192 (each M is one compilation, so not every M).
GPU_MS = [1, 2, 3, 5, 8, 13, 16, 17, 33, 64, 100, 128, 136, 192, 257, 511, 1000, 2047, 4096, 8192]


@pytest.mark.gpu
@pytest.mark.parametrize("kn", LLAMA_SHAPES)
def test_gpu_llama_shapes_invariant_over_m(kn):
    """Row bits equal the M=8192 result for every M in GPU_MS, under the shipped policy."""
    k, n = kn
    a, b = randn((8192, k), jnp.bfloat16), randn((k, n), jnp.bfloat16, scale=k**-0.5)
    f = jax.jit(lambda x: bi_jax.matmul(x, b, implementation="pallas"))
    full = np.asarray(f(a))
    for m in GPU_MS:
        testing.assert_bitwise_equal(np.asarray(f(a[:m])), full[:m], what=f"M={m}, K={k}, N={n}")
    rows = np.asarray(jax.random.choice(jax.random.key(0), 8192, (64,), replace=False))
    testing.assert_close(full[rows], f64(a[rows]) @ f64(b), dtype=jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kn", LLAMA_SHAPES)
def test_gpu_every_config_same_bits(dtype, kn):
    k, n = kn
    a, b = randn((512, k), dtype), randn((k, n), dtype, scale=k**-0.5)
    outs = {  # on Hopper the shipped configs include every Mosaic config (the policy test)
        c: np.asarray(bi_jax.matmul(a, b, implementation="pallas", config=c))
        for c in shipped_configs(dtype)
    }
    first = next(iter(outs.values()))
    for c, o in outs.items():
        testing.assert_bitwise_equal(o, first, what=f"{c}, K={k}, N={n}, {jnp.dtype(dtype)}")


@pytest.mark.parametrize("impl", INVARIANT_IMPLS)
def test_chained_bf16_ops_stay_invariant_under_fusion(impl):
    """A SwiGLU of three matmuls in bf16 under one jit: XLA may keep excess precision across the
    bf16 roundings between ops, depending on the fusion (hence on the shape); the reference pins
    every rounding (exact_f32), so rows still match bitwise."""
    x = randn((4, 8, 64), jnp.bfloat16)
    wg, wu = randn((64, 96), jnp.bfloat16, scale=0.125), randn((64, 96), jnp.bfloat16, scale=0.125)
    wd = randn((96, 64), jnp.bfloat16, scale=0.1)
    mm = functools.partial(bi_jax.matmul, implementation=impl)
    f = jax.jit(lambda x: mm(jax.nn.silu(mm(x, wg)) * mm(x, wu), wd))
    testing.assert_batch_invariant(f, x, sizes=(1, 2, 3), num_embeddings=2)
