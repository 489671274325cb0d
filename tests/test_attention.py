"""Tests of bi_jax.attention: accuracy vs float64, the three contracts (bitwise), GQA/MQA, padding,
mixed decode/prefill batches, input validation and the CUDA lowering of every shipped config.

On a machine without a GPU, ``implementation="pallas"`` runs the kernels in Pallas interpret mode;
the shapes are small and the config uses a small ``block_k``/``split_size`` so several blocks and
splits (and both launch strategies, fold and split-KV + combine) are exercised. ``@pytest.mark.gpu``
tests run the contracts at realistic sizes with the default config on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import f64, randn

from bi_jax import _backend as be
from bi_jax import testing
from bi_jax.attention import (
    AttentionConfig,
    attention,
    attention_config,
    decode_attention,
    shipped_configs,
)

am = sys.modules["bi_jax.attention"]  # the module (bi_jax.attention is the function)
IMPLS = ("pallas", "reference")
# Small blocks so that a few dozen tokens cross several blocks and splits.
CFG = AttentionConfig(block_q=16, block_k=16, split_size=32)
CFG_SPLIT = AttentionConfig(block_q=16, block_k=16, split_size=32, split_kv=True)
CFG_FOLD = AttentionConfig(block_q=16, block_k=16, split_size=32, split_kv=False)
# The bitwise contract tests run in float32: a bf16 output rounds away most fp32-level differences
# in accumulation order (a wrong block or split structure would pass unnoticed).
CONTRACT_DTYPE = jnp.float32


# ------------------------------------------------------------------------------------- helpers


def _n_valid(tq, tk, *, causal=True, q_start=None, q_len=None, kv_len=None, batch=1):
    """[B, Tq] valid keys per query token (the module's position rule, in numpy)."""
    q_start = np.full(batch, tk - tq) if q_start is None else np.asarray(q_start)
    q_len = np.full(batch, tq) if q_len is None else np.asarray(q_len)
    kv_len = np.full(batch, tk) if kv_len is None else np.asarray(kv_len)
    t = np.arange(tq)[None, :]
    n = np.minimum(kv_len[:, None], q_start[:, None] + t + 1) if causal else \
        np.broadcast_to(kv_len[:, None], (batch, tq))
    return np.where(t < q_len[:, None], np.maximum(n, 0), 0)


def attention_f64(q, k, v, n, scale=None):
    """Float64 softmax attention where token (b, t) sees keys 0..n[b, t]-1; zeros if none."""
    q, k, v = f64(q), f64(k), f64(v)
    _, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    mask = np.arange(tk)[None, None, :] < np.asarray(n)[:, :, None]  # [B, Tq, Tk]
    keep = mask.any(-1)[:, :, None, None]
    k = np.nan_to_num(np.repeat(k, hq // hkv, axis=2))  # slots past the lengths may hold NaN
    v = np.nan_to_num(np.repeat(v, hq // hkv, axis=2))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = np.where(mask[:, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0)) * mask[:, None]
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.where(keep, np.einsum("bhqk,bkhd->bqhd", p, v), 0.0)


def qkv(b, tq, tk, hq, hkv, d, dtype):
    kv = (b, tk, hkv, d)
    return randn((b, tq, hq, d), dtype), randn(kv, dtype), randn(kv, dtype)


def with_garbage(cache, lengths):
    """Cache with NaN in every slot at or past ``lengths`` (must never reach an output)."""
    slots = jnp.arange(cache.shape[1])[None, :, None, None]
    return jnp.where(slots < jnp.asarray(lengths)[:, None, None, None], cache, jnp.nan)


def jit_attention(impl, cfg=CFG, **kw):
    return jax.jit(lambda q, k, v, *a: attention(q, k, v, *a, implementation=impl, config=cfg,
                                                 **kw))


def jit_decode(impl, cfg=CFG):
    return jax.jit(lambda q, k, v, lengths, q_lengths: decode_attention(
        q, k, v, lengths, q_lengths=q_lengths, implementation=impl, config=cfg))


# ------------------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "dtype,hq,hkv",  # MHA, GQA, a group of 3 (not a power of two), MQA; every dtype
    [(jnp.bfloat16, 4, 4), (jnp.bfloat16, 4, 2), (jnp.bfloat16, 6, 2), (jnp.bfloat16, 4, 1),
     (jnp.float16, 4, 2), (jnp.float32, 6, 2)],
    ids=lambda x: jnp.dtype(x).name if not isinstance(x, int) else str(x),
)
def test_attention_accuracy(impl, dtype, hq, hkv):
    q, k, v = qkv(2, 40, 40, hq, hkv, 64, dtype)
    out = attention(q, k, v, implementation=impl, config=CFG)
    assert out.shape == q.shape and out.dtype == dtype
    testing.assert_close(out, attention_f64(q, k, v, _n_valid(40, 40, batch=2)), dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_accuracy_options(impl, causal):
    """Tq != Tk, q_offset, kv_lengths (with NaN past them), custom scale, D=128."""
    b, tq, tk = 3, 9, 50
    q, k, v = qkv(b, tq, tk, 4, 2, 128, jnp.bfloat16)
    kv_len = np.array([50, 23, 0])
    k, v = with_garbage(k, kv_len), with_garbage(v, kv_len)
    kw = dict(causal=causal, scale=0.3, kv_lengths=jnp.asarray(kv_len, jnp.int32))
    out = attention(q, k, v, implementation=impl, config=CFG, **kw)
    n = _n_valid(tq, tk, causal=causal, kv_len=kv_len, batch=b)
    testing.assert_close(out, attention_f64(q, k, v, n, scale=0.3), dtype=jnp.bfloat16)
    assert not np.asarray(out[2]).any()  # kv_lengths == 0: zeros
    if causal:
        offs = np.array([5, 40, 0])
        out = attention(q, k, v, implementation=impl, config=CFG, q_offset=jnp.asarray(offs), **kw)
        n = _n_valid(tq, tk, q_start=offs, kv_len=kv_len, batch=b)
        testing.assert_close(out, attention_f64(q, k, v, n, scale=0.3), dtype=jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_more_queries_than_keys(impl):
    """Causal with Tq > Tk: the first Tq - Tk queries sit before position 0 and give zeros."""
    q, k, v = qkv(1, 20, 12, 2, 2, 64, jnp.float16)
    out = attention(q, k, v, implementation=impl, config=CFG)
    testing.assert_close(out, attention_f64(q, k, v, _n_valid(20, 12)), dtype=jnp.float16)
    assert not np.asarray(out[0, :8]).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_accuracy_mixed_batch(impl):
    """Decoding rows, prefilling rows, padding query rows, lengths == 0, NaN past lengths."""
    b, tq, cap = 5, 6, 70
    q, k, v = qkv(b, tq, cap, 4, 2, 64, jnp.bfloat16)
    lengths = np.array([1, 37, 70, 0, 6])
    q_lengths = np.array([1, 6, 3, 0, 6])
    k, v = with_garbage(k, lengths), with_garbage(v, lengths)
    out = decode_attention(q, k, v, jnp.asarray(lengths), q_lengths=jnp.asarray(q_lengths),
                           implementation=impl, config=CFG)
    n = _n_valid(tq, cap, q_start=lengths - q_lengths, q_len=q_lengths, kv_len=lengths, batch=b)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    testing.assert_close(out, attention_f64(q, k, v, n), dtype=jnp.bfloat16)
    for row, ql in enumerate(q_lengths):  # padding query rows and lengths == 0 give zeros
        assert not np.asarray(out[row, ql:]).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_large_group_mqa(impl):
    """MQA with more query heads than block_q rows: a tile holds heads of one token (bt == 1)."""
    q, k, v = qkv(2, 3, 40, 32, 1, 64, jnp.bfloat16)
    lengths = jnp.array([40, 17])
    out = decode_attention(q, k, v, lengths, implementation=impl, config=CFG)
    n = _n_valid(3, 40, q_start=np.array([37, 14]), kv_len=np.array([40, 17]), batch=2)
    testing.assert_close(out, attention_f64(q, k, v, n), dtype=jnp.bfloat16)
    out = attention(q, k, v, implementation=impl, config=CFG)
    testing.assert_close(out, attention_f64(q, k, v, _n_valid(3, 40, batch=2)), dtype=jnp.bfloat16)


def test_xla_implementation_accuracy():
    q, k, v = qkv(2, 10, 30, 4, 2, 64, jnp.bfloat16)
    kv_len = np.array([30, 11])
    out = attention(q, k, v, kv_lengths=jnp.asarray(kv_len), implementation="xla")
    n = _n_valid(10, 30, kv_len=kv_len, batch=2)
    testing.assert_close(out, attention_f64(q, k, v, n), dtype=jnp.bfloat16)
    out = decode_attention(q, k, v, jnp.array([30, 0]), implementation="xla")
    assert not np.asarray(out[1]).any()


# ------------------------------------------------------------------------ contract 1: batch


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_batch_invariant(impl):
    b, t = 5, 40
    q, k, v = qkv(b, t, t, 4, 2, 64, CONTRACT_DTYPE)
    kv_len = jnp.array([40, 3, 33, 17, 0], jnp.int32)
    fn = jax.jit(lambda q, k, v, n: attention(q, k, v, kv_lengths=n, implementation=impl,
                                              config=CFG))
    testing.assert_batch_invariant(fn, q, k, v, kv_len, batched_argnums=(0, 1, 2, 3),
                                   sizes=(2,), num_permutations=1, num_embeddings=2)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_batch_invariant_any_capacity(impl):
    """A row gives the same bits alone, among other rows of other lengths, at any position and with
    any cache capacity S."""
    b, tq, cap = 4, 3, 80
    q, k, v = qkv(b, tq, cap, 4, 2, 64, CONTRACT_DTYPE)
    lengths = jnp.array([80, 35, 3, 50], jnp.int32)
    q_lengths = jnp.array([1, 3, 3, 2], jnp.int32)
    fn = jit_decode(impl)
    full = np.asarray(fn(q, k, v, lengths, q_lengths))
    testing.assert_batch_invariant(fn, q, k, v, lengths, q_lengths,
                                   batched_argnums=(0, 1, 2, 3, 4), sizes=(1,),
                                   num_permutations=1, num_embeddings=2)
    row = 1  # alone, with the cache cut to exactly its length or grown past 80
    n = int(lengths[row])
    for cap2 in (n, 2 * cap + 5):
        kk = jnp.zeros((1, cap2, 2, 64), k.dtype).at[:, :n].set(k[row:row + 1, :n])
        vv = jnp.zeros((1, cap2, 2, 64), v.dtype).at[:, :n].set(v[row:row + 1, :n])
        got = fn(q[row:row + 1], with_garbage(kk, [n]), with_garbage(vv, [n]),
                 lengths[row:row + 1], q_lengths[row:row + 1])
        testing.assert_bitwise_equal(got, full[row:row + 1], axis=1,
                                     what=f"row {row} alone, capacity {cap2}")


# ---------------------------------------------------------------- contract 3: sequence slicing


def test_prefill_launch_order_is_bit_neutral(monkeypatch):
    """Head-major and token-major grids of the prefill kernel (picked from the K/V size) agree."""
    q, k, v = qkv(2, 70, 90, 4, 2, 64, CONTRACT_DTYPE)
    head_major = np.asarray(jit_attention("pallas")(q, k, v))
    monkeypatch.setattr(am, "_TOKEN_MAJOR_KV_BYTES", 0)
    f = jit_attention("pallas")
    testing.assert_bitwise_equal(f(q, k, v), head_major, what="token-major grid")
    assert be.triton_kernel_count(be.export_for_cuda(f, q, k, v)) == 1


def _sequence(t, hq=4, hkv=2, d=64, dtype=CONTRACT_DTYPE):
    q, k, v = qkv(1, t, t, hq, hkv, d, dtype)
    return q[0], k[0], v[0]


def test_combine_column_split_keeps_the_bits(monkeypatch):
    """The combine's head-dim columns per program follow the grid size (so the batch); every
    split must give the bits of the whole head dim in one program."""
    import importlib
    attn = importlib.import_module("bi_jax.attention")
    q, k, v = qkv(3, 1, 150, 8, 2, 64, CONTRACT_DTYPE)
    lengths = jnp.array([150, 37, 96], jnp.int32)
    geo = attn._geometry(q.shape, k.shape, 4)  # the combine's tile: 4 heads of one token

    def run():
        return np.asarray(jit_decode("pallas", CFG_SPLIT)(q, k, v, lengths, None))

    assert attn._combine_cols(geo) == 32  # 6 programs: 2 column slices each
    sliced = run()
    monkeypatch.setattr(be, "sm_count", lambda: 0)  # no programs needed per SM: all 64 columns
    assert attn._combine_cols(geo) == 64
    testing.assert_bitwise_equal(run(), sliced, what="combine over 64 columns vs 2 x 32")


@pytest.mark.parametrize("impl", IMPLS)
def test_slicing_invariance(impl):
    """Full prefill == chunked prefill (decode_attention, any chunks, any capacity) == chunked
    prefill through attention (default offsets and q_offset) == token-by-token decode, bitwise."""
    t, cap = 110, 128
    q, k, v = _sequence(t)
    full = np.asarray(jit_attention(impl)(q[None], k[None], v[None]))[0]
    # The two launch strategies of the prefill kernel agree (only Pallas has both).
    forced = np.asarray(jit_attention(impl, CFG_SPLIT)(q[None], k[None], v[None]))[0]
    testing.assert_bitwise_equal(forced, full, what="prefill with split_kv=True")

    decode = jit_decode(impl)
    kc = jnp.full((1, cap, 2, 64), jnp.nan, k.dtype).at[0, :t].set(k)
    vc = jnp.full((1, cap, 2, 64), jnp.nan, v.dtype).at[0, :t].set(v)
    for chunks in ([1, 7, 64, 38], [64, 38, 1, 7]):  # same shapes, other boundaries
        pos, outs = 0, []
        for c in chunks:
            n = pos + c
            out = decode(q[None, pos:n], with_garbage(kc, [n]), with_garbage(vc, [n]),
                         jnp.array([n]), jnp.array([c]))
            outs.append(np.asarray(out)[0])
            pos = n
        testing.assert_bitwise_equal(np.concatenate(outs), full, what=f"chunks {chunks}")

    # Chunks through attention: queries are the last Tq positions of k[:n], or q_offset into a
    # padded key array with kv_lengths.
    att = jit_attention(impl)
    att_off = jax.jit(lambda q, k, v, o, n: attention(q, k, v, q_offset=o, kv_lengths=n,
                                                      implementation=impl, config=CFG))
    outs = [np.asarray(att(q[None, :40], k[None, :40], v[None, :40]))[0],
            np.asarray(att(q[None, 40:], k[None], v[None]))[0]]
    testing.assert_bitwise_equal(np.concatenate(outs), full, what="attention chunks")
    pos, outs = 0, []
    for c in (7, 64, 1, 38):
        n = pos + c
        outs.append(np.asarray(att_off(q[None, pos:n], kc, vc, jnp.array([pos]),
                                       jnp.array([n])))[0])
        pos = n
    testing.assert_bitwise_equal(np.concatenate(outs), full, what="attention q_offset chunks")

    # Token-by-token decode, all tokens at once: row i decodes token i over a cache of length i+1.
    rows = jnp.arange(t)
    kb = with_garbage(jnp.broadcast_to(kc, (t, cap, 2, 64)), rows + 1)
    vb = with_garbage(jnp.broadcast_to(vc, (t, cap, 2, 64)), rows + 1)
    out = decode(q[:, None], kb, vb, rows + 1, jnp.ones(t, jnp.int32))
    testing.assert_bitwise_equal(np.asarray(out)[:, 0], full, what="batched decode of every token")
    # ... and a few single decode steps, one row, tokens at block and split edges.
    for i in (0, 15, 16, 31, 32, 33, 63, 64, 109):
        out = decode(q[None, i:i + 1], with_garbage(kc, [i + 1]), with_garbage(vc, [i + 1]),
                     jnp.array([i + 1]), jnp.array([1]))
        testing.assert_bitwise_equal(np.asarray(out)[0, 0], full[i], what=f"decode of token {i}")


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_decode_prefill_batch_matches_prefill(impl):
    """One decode_attention call mixing decoding rows and prefilling rows of three sequences gives
    the bits of each sequence's own full prefill."""
    t, cap, tq = 90, 96, 8
    seqs = [_sequence(t) for _ in range(3)]
    prefill = jit_attention(impl)
    fulls = [np.asarray(prefill(q[None], k[None], v[None]))[0] for q, k, v in seqs]
    # row 0 decodes token 70; row 1 prefills tokens 33..40; row 2 prefills tokens 86..89 (4 of 8).
    plan = [(71, 1), (41, 8), (90, 4)]
    qs, ks, vs = [], [], []
    for (q, k, v), (n, ql) in zip(seqs, plan):
        qs.append(jnp.zeros((tq, 4, 64), q.dtype).at[:ql].set(q[n - ql:n]))
        ks.append(jnp.zeros((cap, 2, 64), k.dtype).at[:n].set(k[:n]))
        vs.append(jnp.zeros((cap, 2, 64), v.dtype).at[:n].set(v[:n]))
    lengths = jnp.array([n for n, _ in plan])
    q_lengths = jnp.array([ql for _, ql in plan])
    out = np.asarray(jit_decode(impl)(jnp.stack(qs), with_garbage(jnp.stack(ks), lengths),
                                      with_garbage(jnp.stack(vs), lengths), lengths, q_lengths))
    for row, (full, (n, ql)) in enumerate(zip(fulls, plan)):
        testing.assert_bitwise_equal(out[row, :ql], full[n - ql:n], what=f"row {row}")
        assert not out[row, ql:].any()


# ------------------------------------------------------------------------ contract 2: runs


@pytest.mark.parametrize("impl", IMPLS)
def test_run_to_run_deterministic(impl):
    q, k, v = qkv(2, 40, 40, 4, 2, 64, CONTRACT_DTYPE)
    for cfg in (CFG_FOLD, CFG_SPLIT):
        fn = jit_attention(impl, cfg)
        first = np.asarray(fn(q, k, v))
        for _ in range(2):
            testing.assert_bitwise_equal(fn(q, k, v), first, what=f"repeat, {cfg}")


def test_default_implementation_and_config():
    q, k, v = qkv(1, 5, 5, 2, 2, 64, jnp.bfloat16)
    out = attention(q, k, v, config=AttentionConfig(block_q=16, block_k=16, split_size=32))
    expect = "pallas" if be.has_gpu() else "reference"
    ref = attention(q, k, v, implementation=expect,
                    config=AttentionConfig(block_q=16, block_k=16, split_size=32))
    testing.assert_bitwise_equal(out, ref)
    assert attention_config(128, jnp.bfloat16) == attention_config(128, "bfloat16")


def test_decode_under_jit_with_traced_lengths():
    q, k, v = qkv(2, 1, 40, 4, 2, 64, jnp.bfloat16)
    fn = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, implementation="reference",
                                                     config=CFG))
    out = fn(q, k, v, jnp.array([40, 9]))
    n = _n_valid(1, 40, q_start=np.array([39, 8]), kv_len=np.array([40, 9]), batch=2)
    testing.assert_close(out, attention_f64(q, k, v, n), dtype=jnp.bfloat16)


# ---------------------------------------------------------------------------------- bad inputs


def _raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def test_bad_inputs():
    q, k, v = qkv(2, 4, 8, 4, 2, 64, jnp.bfloat16)
    att = attention
    _raises(ValueError, r"multiple of KV heads.*\(2, 4, 3, 64\)", att, q[:, :, :3], k, v)
    _raises(ValueError, r"head dims differ.*\(2, 8, 2, 32\)", att, q, k[..., :32], v[..., :32])
    _raises(ValueError, r"batch sizes differ.*\(1, 8, 2, 64\)", att, q, k[:1], v[:1])
    _raises(ValueError, r"same shape.*\(2, 7, 2, 64\)", att, q, k, v[:, :7])
    _raises(ValueError, r"rank 4.*\(4, 4, 64\)", att, q[0], k, v)
    _raises(ValueError, r"D=48 is not supported", att, q[..., :48], k[..., :48], v[..., :48])
    _raises(TypeError, r"q has dtype int32", att, q.astype(jnp.int32), k, v)
    _raises(ValueError, r"kv_lengths\[1\]=9 is out of range \[0, 8\]", att, q, k, v,
            kv_lengths=jnp.array([8, 9]))
    _raises(TypeError, r"kv_lengths must be an integer array", att, q, k, v,
            kv_lengths=jnp.array([8.0, 3.0]))
    _raises(ValueError, r"kv_lengths has shape \(3,\)", att, q, k, v,
            kv_lengths=jnp.array([1, 2, 3]))
    _raises(ValueError, r"q_offset only applies to causal", att, q, k, v, causal=False,
            q_offset=jnp.array([0, 0]))
    _raises(ValueError, r"unknown implementation 'cudnn'", att, q, k, v, implementation="cudnn")
    _raises(TypeError, r"config must be an AttentionConfig", att, q, k, v, config={"block_k": 64})
    _raises(TypeError, r"scale must be a static", jax.jit(lambda s: att(q, k, v, scale=s)), 0.5)

    dec = decode_attention
    lengths = jnp.array([8, 3])
    _raises(ValueError, r"lengths\[0\]=9 is out of range \[0, 8\]", dec, q, k, v, jnp.array([9, 3]))
    _raises(ValueError, r"lengths\[1\]=-1 is out of range", dec, q, k, v, jnp.array([8, -1]))
    _raises(ValueError, r"lengths has shape \(1,\)", dec, q, k, v, jnp.array([8]))
    _raises(ValueError, r"q_lengths\[0\]=5 is out of range \[0, 4\]", dec, q, k, v, lengths,
            q_lengths=jnp.array([5, 1]))
    _raises(ValueError, r"q_lengths\[1\]=4 exceeds lengths\[1\]=3", dec, q, k, v, lengths,
            q_lengths=jnp.array([1, 4]))
    _raises(ValueError, r"multiple of KV heads.*k_cache", dec, q[:, :, :3], k, v, lengths)
    _raises(ValueError, r"k_cache and v_cache must have the same shape", dec, q, k, v[:, :5],
            lengths)

    for kw in (dict(block_k=48), dict(block_q=8), dict(split_size=40, block_k=16),
               dict(num_warps=3), dict(split_kv="yes")):
        _raises(ValueError, r"AttentionConfig", AttentionConfig, **kw)


def test_empty_inputs():
    q, k, v = qkv(2, 4, 8, 4, 2, 64, jnp.bfloat16)
    assert attention(q[:, :0], k, v, implementation="pallas").shape == (2, 0, 4, 64)
    assert not np.asarray(attention(q, k[:, :0], v[:, :0], implementation="pallas")).any()


# -------------------------------------------------------------------------- CUDA lowering


@pytest.mark.parametrize("d,dtype,cfg", shipped_configs(),
                         ids=lambda x: str(x) if not isinstance(x, AttentionConfig) else "")
def test_shipped_configs_lower_for_cuda(d, dtype, cfg):
    """Every default config (Triton; Mosaic for Hopper) lowers for CUDA: prefill (fold) and decode
    (split + combine), for MHA, GQA, a non power-of-two group and MQA with more heads than block_q
    rows."""
    s = jax.ShapeDtypeStruct
    mosaic = cfg.kernel == "mosaic"
    for hq, hkv in ((8, 8), (8, 2), (12, 4), (2 * cfg.block_q, 1)):
        kv = s((2, 2 * cfg.split_size + 7, hkv, d), dtype)
        exported = be.export_for_cuda(
            lambda q, k, v: attention(q, k, v, implementation="pallas", config=cfg),
            s((2, 100, hq, d), dtype), kv, kv)
        if mosaic:
            assert be.mosaic_kernel_count(exported) == 1
        else:
            assert be.triton_kernel_count(exported) >= 1
        exported = be.export_for_cuda(
            lambda q, k, v, n: decode_attention(q, k, v, n, implementation="pallas", config=cfg),
            s((2, 1, hq, d), dtype), kv, kv, s((2,), jnp.int32))
        if mosaic:  # split kernel + Triton combine, or (group > 64 heads) one fold-mode kernel
            assert be.mosaic_kernel_count(exported) == 1
            assert be.triton_kernel_count(exported) == (hq // hkv <= cfg.block_q)
        else:
            assert be.triton_kernel_count(exported) >= 2


def test_mosaic_decode_step_launches_nothing_but_its_kernels():
    """A Hopper decode step (one token, a power-of-two group, whole 8-key rows of cache) is the
    Mosaic kernel and the Triton combine, with no XLA op beside them (each would be a kernel
    launch of its own, ~1.2 us): q is read as it lies and the lengths reach the kernels as given,
    q_lengths included."""
    s = jax.ShapeDtypeStruct
    cfg = AttentionConfig(block_q=64, block_k=128, split_size=512, num_stages=2, kernel="mosaic")
    kv = s((3, 1024, 8, 128), jnp.bfloat16)
    n = s((3,), jnp.int32)
    for hq in (8, 32, 64):
        exported = be.export_for_cuda(
            lambda q, k, v, n, ql: decode_attention(q, k, v, n, q_lengths=ql,
                                                    implementation="pallas", config=cfg),
            s((3, 1, hq, 128), jnp.bfloat16), kv, kv, n, n)
        ops = set(re.findall(r"stablehlo\.(\w+)", exported.mlir_module()))
        assert ops <= {"custom_call", "reshape"}, (hq, ops)
        assert (be.mosaic_kernel_count(exported), be.triton_kernel_count(exported)) == (1, 1)


@pytest.mark.parametrize("b,s,split", [(1, 1024, True), (1, 32768, True), (8, 16384, True),
                                         (9, 4096, True), (17, 4096, True), (16, 1024, False),
                                         (16, 16384, False), (31, 4096, False),
                                         (256, 32768, False), (8, 512, False)])
def test_mosaic_decode_folds_where_its_items_fill_the_sms(b, s, split):
    """split_kv=None on Hopper (132 SMs): decode (32/8 heads) folds in one CTA per (batch row, KV
    head) where those items keep 90% of the SMs busy, else splits the cache over the SMs; one
    split is always folded. Launch only: either way the bits are the same (GPU tests)."""
    assert am._split_pays(b * 8, -(-s // am._mosaic_config().split_size)) is split
    sd = jax.ShapeDtypeStruct
    kv = sd((b, s, 8, 128), jnp.bfloat16)
    exported = be.export_for_cuda(
        lambda q, k, v, n: decode_attention(q, k, v, n, implementation="pallas",
                                            config=am._mosaic_config()),
        sd((b, 1, 32, 128), jnp.bfloat16), kv, kv, sd((b,), jnp.int32))
    assert (be.mosaic_kernel_count(exported), be.triton_kernel_count(exported)) == (1, int(split))


@pytest.mark.parametrize("ctas", [None, 3, 1], ids=["one item per CTA", "3 CTAs", "1 CTA"])
def test_mosaic_kernel_keeps_the_contract_in_interpret_mode(ctas, monkeypatch):
    """The Mosaic GPU kernel (GPU interpret mode on the CPU): a full prefill, chunks (packed and
    token-tiled rows, split and fold mode) and single-token decode steps over a larger cache with
    NaN past the lengths give the same bits; the result is within the reference's error of a
    float64 softmax attention. The persistent CTAs walk several items each when there are fewer
    of them than items (``ctas``), reusing q across the splits of one row tile."""
    if ctas is not None:
        monkeypatch.setattr(be, "sm_count", lambda: ctas)
    cfg = AttentionConfig(block_q=64, block_k=128, split_size=512, num_stages=2, kernel="mosaic")
    t, hq, hkv, d = 600, 4, 2, 64
    q, k, v = qkv(1, t, t, hq, hkv, d, jnp.bfloat16)
    full = np.asarray(attention(q, k, v, implementation="pallas", config=cfg))
    ref = np.asarray(attention(q, k, v, implementation="reference", config=cfg), np.float64)
    exact = np.asarray(jax.nn.dot_product_attention(
        *(np.asarray(x, np.float64) for x in (q, k, v)), is_causal=True))
    assert np.abs(full - exact).max() <= np.abs(ref - exact).max() + 2.0**-8
    cap = t + 40
    kc = with_garbage(jnp.pad(k, ((0, 0), (0, 40), (0, 0), (0, 0))), [t])
    vc = with_garbage(jnp.pad(v, ((0, 0), (0, 40), (0, 0), (0, 0))), [t])
    assert kc.shape[1] == cap
    for lo, hi in ((0, 1), (1, 9), (9, 49), (49, 120), (120, 599), (599, 600)):
        out = decode_attention(q[:, lo:hi], with_garbage(kc, [hi]), with_garbage(vc, [hi]),
                               jnp.array([hi]), implementation="pallas", config=cfg)
        testing.assert_bitwise_equal(np.asarray(out)[0], full[0, lo:hi], what=f"tokens {lo}..{hi}")


@pytest.mark.parametrize("ctas", [3, 1])
def test_mosaic_kernel_has_no_data_races(ctas, monkeypatch):
    """jax's race detector (GPU interpret mode) finds no unordered SMEM/GMEM accesses in the
    persistent kernel's barrier protocol when CTAs run several items: fold-mode prefill (the
    output tile in the total's SMEM, q reloaded per item) and split-mode decode (q kept across
    the splits of one row tile) and fold-mode decode and a short chunk (one compute warpgroup,
    the output in its total's SMEM); the decoded tokens equal their prefill rows."""
    monkeypatch.setattr(be, "sm_count", lambda: ctas)
    cfg = AttentionConfig(block_q=64, block_k=128, split_size=256, num_stages=2, kernel="mosaic")
    q, k, v = qkv(1, 300, 300, 4, 2, 64, jnp.bfloat16)
    with be.race_detection() as races_found:
        full = np.asarray(attention(q, k, v, implementation="pallas", config=cfg))
        assert not races_found(), "prefill"
        for split_kv, (lo, hi) in ((True, (290, 291)), (False, (290, 291)), (False, (270, 286))):
            out = decode_attention(q[:, lo:hi], k, v, jnp.array([hi]), implementation="pallas",
                                   config=dataclasses.replace(cfg, split_kv=split_kv))
            assert not races_found(), f"decode split_kv={split_kv} tokens {lo}..{hi}"
            testing.assert_bitwise_equal(np.asarray(out)[0], full[0, lo:hi],
                                         what=f"split_kv={split_kv} tokens {lo}..{hi} vs prefill")


@pytest.mark.parametrize("b,t,hq,hkv,ctas", [(8, 1024, 32, 8, 132), (1, 300, 4, 2, 3),
                                              (2, 70, 12, 4, 5)])
def test_mosaic_schedule_runs_every_item_once_and_balances(b, t, hq, hkv, ctas):
    """The fold-mode work lists hold every item exactly once; for a causal prefill the busiest
    CTA's estimated work is within one item of the mean (the lists fill the CTA that frees first)."""
    cfg = am._mosaic_config()
    geo = am._MosaicGeometry(u=-(-t // 8) * 8, u_valid=t, h2=hq, group2=hq // hkv, r=1, group=1,
                             d=128, n_wg=2)
    n_items = geo.n_pairs * geo.n_tblk * b
    table = am._mosaic_schedule(geo, nb=b, n_cta=min(ctas, n_items), causal=True, tq=t, tk=t,
                                bk=cfg.block_k)
    items = np.concatenate([row[1:1 + row[0]] for row in table])
    assert np.array_equal(np.sort(items), np.arange(n_items))
    tile = geo.n_tblk - 1 - (np.arange(n_items) // geo.n_pairs) % geo.n_tblk  # longest first
    rows = 64 if geo.pair_heads else 128  # query tokens per item
    cost = -(-np.minimum(t, (tile + 1) * rows) // cfg.block_k) + 1  # its key blocks, plus one
    work = np.array([cost[row[1:1 + row[0]]].sum() for row in table])
    assert work.max() - work.mean() <= cost.max()


# ------------------------------------------------------------------------ GPU, realistic sizes

GPU_T, GPU_HQ, GPU_HKV, GPU_D = 2048, 32, 8, 128


@pytest.fixture(scope="module")
def gpu_sequence():
    q, k, v = qkv(1, GPU_T, GPU_T, GPU_HQ, GPU_HKV, GPU_D, jnp.bfloat16)
    full = np.asarray(jax.jit(lambda q, k, v: attention(q, k, v, implementation="pallas"))(q, k, v))
    return q[0], k[0], v[0], full[0]


@pytest.mark.gpu
def test_gpu_accuracy_and_determinism(gpu_sequence):
    q, k, v, full = gpu_sequence
    idx = np.r_[0:64, 500:530, GPU_T - 48:GPU_T]
    n = _n_valid(GPU_T, GPU_T)[:, idx]
    ref = attention_f64(q[None, idx], k[None], v[None], n)
    testing.assert_close(full[None, idx], ref, dtype=jnp.bfloat16)
    again = attention(q[None], k[None], v[None], implementation="pallas")
    testing.assert_bitwise_equal(np.asarray(again)[0], full, what="second run")


@pytest.mark.gpu
def test_gpu_prefill_fold_equals_split(gpu_sequence):
    """The two launch strategies (in-register fold, split-KV partials + combine) agree bitwise."""
    q, k, v, full = gpu_sequence
    cfg = dataclasses.replace(attention_config(GPU_D, jnp.bfloat16), split_kv=True)
    out = attention(q[None], k[None], v[None], implementation="pallas", config=cfg)
    testing.assert_bitwise_equal(np.asarray(out)[0], full, what="split_kv=True")


@pytest.mark.gpu
def test_gpu_batch_invariance():
    b = 4
    q, k, v = qkv(b, GPU_T, GPU_T, GPU_HQ, GPU_HKV, GPU_D, jnp.bfloat16)
    kv_len = jnp.array([2048, 1000, 1, 1500], jnp.int32)
    fn = jax.jit(lambda q, k, v, n: attention(q, k, v, kv_lengths=n, implementation="pallas"))
    testing.assert_batch_invariant(fn, q, k, v, kv_len, batched_argnums=(0, 1, 2, 3),
                                   sizes=(1, 2, 3), num_permutations=1, num_embeddings=2)


@pytest.mark.gpu
def test_gpu_chunked_prefill_and_decode_match_prefill(gpu_sequence):
    q, k, v, full = gpu_sequence
    cap = 4096
    kc = jnp.zeros((1, cap, GPU_HKV, GPU_D), k.dtype).at[0, :GPU_T].set(k)
    vc = jnp.zeros((1, cap, GPU_HKV, GPU_D), v.dtype).at[0, :GPU_T].set(v)
    decode = jax.jit(lambda q, k, v, n, ql: decode_attention(q, k, v, n, q_lengths=ql,
                                                             implementation="pallas"))
    chunks, pos = [], 0
    for c in (1, 7, 64, 100, 513, 1, 300):  # ... and the rest in one chunk
        if pos + c < GPU_T:
            chunks.append(c)
            pos += c
    chunks.append(GPU_T - pos)
    pos, outs = 0, []
    for c in chunks:
        n = pos + c
        out = decode(q[None, pos:n], with_garbage(kc, [n]), with_garbage(vc, [n]), jnp.array([n]),
                     jnp.array([c]))
        outs.append(np.asarray(out)[0])
        pos = n
    testing.assert_bitwise_equal(np.concatenate(outs), full, what=f"chunks {chunks}")
    # Every token decoded (128 decode rows per call, each row its own length), capacity 2048.
    for start in range(0, GPU_T, 128):
        rows = jnp.arange(start, start + 128)
        kb = with_garbage(jnp.broadcast_to(k[None], (128, GPU_T, GPU_HKV, GPU_D)), rows + 1)
        vb = with_garbage(jnp.broadcast_to(v[None], (128, GPU_T, GPU_HKV, GPU_D)), rows + 1)
        out = decode(q[rows][:, None], kb, vb, rows + 1, jnp.ones(128, jnp.int32))
        testing.assert_bitwise_equal(np.asarray(out)[:, 0], full[start:start + 128],
                                     what=f"decode of tokens {start}..{start + 127}")
    # Single-row decode steps at split edges, with the larger cache.
    for i in [i for i in (0, 511, 512, 513, 1023, 1024) if i < GPU_T] + [GPU_T - 1]:
        out = decode(q[None, i:i + 1], with_garbage(kc, [i + 1]), with_garbage(vc, [i + 1]),
                     jnp.array([i + 1]), jnp.array([1]))
        testing.assert_bitwise_equal(np.asarray(out)[0, 0], full[i], what=f"decode of token {i}")
