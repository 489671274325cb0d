"""Batch-invariant attention: ``attention`` (prefill) and ``decode_attention`` (over a KV cache).

Shapes:
  ``attention(q, k, v)``: q ``[B, Tq, Hq, D]``, k/v ``[B, Tk, Hkv, D]`` -> ``[B, Tq, Hq, D]``.
  ``decode_attention(q, k_cache, v_cache, lengths)``: q ``[B, Tq, Hq, D]`` (the new tokens),
  caches ``[B, S, Hkv, D]`` already holding the new tokens, ``lengths [B]`` -> ``[B, Tq, Hq, D]``.
  ``Hq % Hkv == 0`` (MHA, GQA, MQA): query head ``h`` reads KV head ``h // (Hq // Hkv)``. D is a
  power of two from 16 to 256 (64, 128 and 256 are the tuned ones).

Positions: keys sit at absolute positions ``0 .. Tk-1`` (cache slot = position). A query token has
an absolute position ``pos`` and a count ``n`` of valid keys: the keys ``0 .. n-1``, with
``n = min(kv_len, pos + 1)`` when causal and ``n = kv_len`` otherwise. In ``attention`` query
``i`` sits at ``Tk - Tq + i`` (or ``q_offset[b] + i``) and ``kv_len = kv_lengths[b]`` (default
``Tk``); in ``decode_attention`` new token ``j`` of row ``b`` sits at
``lengths[b] - q_lengths[b] + j`` and ``kv_len = lengths[b]``. Rows with ``n == 0``
(``lengths == 0``, padding query rows ``j >= q_lengths[b]``, causal queries before position 0)
give zeros, never NaN.

Dtypes: bfloat16, float16, float32 (q, k, v promoted to one dtype, the output dtype). Scores,
softmax statistics and the accumulator are fp32; ``p`` is rounded to the input dtype before the
``p @ v`` MMA (as in flash attention). fp32 inputs use IEEE fp32 products
(``Precision.HIGHEST``), not TF32.

Invariance:
  The numerics have two levels, both anchored at absolute key positions. The key axis is cut into
  splits of a fixed ``split_size`` (a config constant, never derived from a shape) starting at
  multiples of ``split_size``; each split is cut into blocks of a fixed ``block_k``. Inside a split
  an online softmax runs over its blocks in ascending order and yields a partial ``(m, l, acc)`` in
  fp32; the partials of splits 0, 1, 2, ... are folded in that order by one shared function
  (``_fold``), and the result is divided once (``_finalize``). Prefill (``attention``) runs the
  splits of a query tile one after another in one program and folds them in registers; decode
  (``decode_attention`` with few query rows) runs the splits in parallel (grid over splits), writes
  the partials in fp32 and folds them in a second small kernel, in the same order and with the same
  code. A token therefore goes through the same block and split boundaries and the same arithmetic
  whichever path computes it, with whatever other tokens share its tile: a block or split with no
  valid key for a row leaves that row's state untouched (``jnp.where`` on a per-row ``active``
  flag, so bits, -0 included, cannot move), and the first block of a valid split always holds a
  valid key (the split's first position), so every running max is finite where it is used. The
  running max is rounded up to an integer (log2 domain), so every rescale factor
  ``exp2(m_old - m_new)`` is a power of two and every ``factor * state`` product is exact: the
  result does not depend on whether a compiler fuses ``a * b + c`` into an FMA. The tile
  (``block_q`` rows = query tokens x query heads of one KV group), ``num_warps`` and ``num_stages``
  are the same constants in both paths (they could change the reduction layout on the GPU); only
  the launch strategy (``split_kv``) differs, and it is chosen from shapes freely because it does
  not change bits. The reference path has the same two-level structure in plain jnp (elementwise
  products, fixed pairwise trees over ``D`` and over the keys of a block, sequential scans over
  blocks and splits), so it is batch-, slicing- and run-invariant by construction on every backend;
  its bits differ from the Pallas kernel's. ``implementation="xla"`` promises nothing.
  On Hopper (bf16/fp16, D = 64 or 128) the default config selects the Mosaic GPU kernel
  (``kernel="mosaic"``, block_k 128): the same two levels with its own instructions, in fold mode
  (the running total's accumulator in SMEM, beside the registers of a 128-key block) for every
  geometry (token tiles or heads packed as rows: bit-neutral) and in split mode for decode at
  small batches, whose partials the Triton combine folds with the Mosaic kernel's ``exp2``;
  prefill, chunks and decode agree bitwise with each other, not with the Triton kernel. The kernel is
  persistent (one CTA per SM walks a list of row tiles or splits); which CTA runs a tile never
  changes its arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bi_jax import _backend as be
from bi_jax import _checks
from bi_jax.reductions import exact_f32

__all__ = [
    "HEAD_DIMS",
    "AttentionConfig",
    "attention",
    "attention_config",
    "attention_reference",
    "decode_attention",
    "decode_attention_reference",
    "shipped_configs",
]

HEAD_DIMS = (16, 32, 64, 128, 256)
_NEG_INF = float("-inf")
_LOG2E = math.log2(math.e)

# ------------------------------------------------------------------------------------------ config


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and launch parameters of the Pallas kernels (the reference uses the blocks too).

    Part of the numerics (keep them equal across every call whose bits you compare; the defaults of
    ``attention_config`` depend on the head dim and dtype only):
      block_k: keys per block of the online softmax.
      split_size: keys per split (a multiple of ``block_k``); splits start at multiples of it.
      block_q: rows per tile (query tokens x query heads of one KV group). Rows never mix in the
        MMA, but the tile changes the register layout of the row sums on the GPU: measured on an
        H100 (2026-11-24, jax 0.11.2), block_q=32 differed from 64 by 1 ULP (128 matched), so
        every path uses the same value.
      num_warps, num_stages: launch parameters of the main kernel (same reason; for the Mosaic
        kernel num_stages is the depth of its K/V TMA pipeline and num_warps is unused).
      kernel: "triton" (Pallas-Triton kernels, any CUDA GPU) or "mosaic" (the Hopper kernel:
        TMA, wgmma, two compute warpgroups and a producer; bf16/fp16, D = 64 or 128, block_q 64).
        Their bits differ: compare calls of one kernel.
    Not part of the numerics:
      split_kv: None (auto: split the KV axis over the grid when one query tile covers all rows and
        the context is longer than one split; for the Mosaic kernel only where one CTA per batch
        row and KV head would leave more than 10% of the SMs idle, ``_split_pays``), True
        (always: partials + combine kernel) or False (never: every program folds its splits
        itself). Both strategies give identical bits.
      combine_num_warps: warps of the combine kernel (elementwise only).
    """

    block_q: int = 64
    block_k: int = 64
    split_size: int = 512
    num_warps: int = 4
    num_stages: int = 2
    split_kv: bool | None = None
    combine_num_warps: int = 4
    kernel: str = "triton"

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or not _is_pow2(v):
                raise ValueError(f"AttentionConfig.{name}={v!r} must be a power of two >= 16")
        if (not isinstance(self.split_size, int) or self.split_size < self.block_k
                or self.split_size % self.block_k):
            raise ValueError(
                f"AttentionConfig.split_size={self.split_size!r} must be a positive multiple of "
                f"block_k={self.block_k}"
            )
        for name in ("num_warps", "combine_num_warps"):
            v = getattr(self, name)
            if not isinstance(v, int) or not _is_pow2(v) or v > 32:
                raise ValueError(f"AttentionConfig.{name}={v!r} must be a power of two <= 32")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"AttentionConfig.num_stages={self.num_stages!r} must be >= 1")
        if self.kernel not in ("triton", "mosaic"):
            raise ValueError(f"AttentionConfig.kernel={self.kernel!r} must be 'triton' or 'mosaic'")
        if self.kernel == "mosaic" and (self.block_q != _WG_ROWS or self.block_k not in (64, 128)):
            raise ValueError(f"AttentionConfig: the Mosaic kernel needs block_q=64 and block_k 64 or "
                             f"128, got block_q={self.block_q}, block_k={self.block_k}")
        if self.split_kv not in (None, True, False):
            raise ValueError(f"AttentionConfig.split_kv={self.split_kv!r} must be None or a bool")


def _mosaic_config() -> AttentionConfig:
    # H100, 2026-11-24: block_k 128 + 2 stages beat 64 (any stages) by 10-15% in the prefill sweep
    return AttentionConfig(block_q=64, block_k=128, split_size=512, num_warps=4, num_stages=2,
                           kernel="mosaic")


def attention_config(head_dim: int, dtype: Any) -> AttentionConfig:
    """The default config: depends on the head dim, the dtype and the GPU only (never on batch or
    lengths): the Mosaic kernel on Hopper for bf16/fp16 with D = 64 or 128, else Triton."""
    dtype = jnp.dtype(dtype)
    if be.is_hopper() and dtype in (jnp.bfloat16, jnp.float16) and head_dim in (64, 128):
        return _mosaic_config()
    if dtype == jnp.float32:  # IEEE fp32 dots run on FMA units: small tiles, bounded registers
        return AttentionConfig(block_q=32, block_k=32, split_size=512,
                               num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    # num_stages 3: -7% decode time at B=1, S <= 4096, and -3..7% prefill, vs 2 (H100, same bits)
    return AttentionConfig(block_q=64, block_k=64, split_size=512,
                           num_warps=4 if head_dim <= 128 else 8, num_stages=3)


def shipped_configs() -> tuple[tuple[int, jnp.dtype, AttentionConfig], ...]:
    """``(head_dim, dtype, config)`` for every default config on any GPU (for the lowering tests)."""
    with be.assume_not_hopper():
        triton = tuple(
            (d, jnp.dtype(t), attention_config(d, t))
            for t in (jnp.bfloat16, jnp.float16, jnp.float32)
            for d in (64, 128, 256)
        )
    mosaic = tuple((d, jnp.dtype(t), _mosaic_config())
                   for t in (jnp.bfloat16, jnp.float16) for d in (64, 128))
    return triton + mosaic


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static layout of the row tiles: a tile is ``bt`` query tokens x ``bg`` heads of one group."""

    batch: int
    tq: int
    hq: int
    hkv: int
    group: int  # query heads per KV head
    d: int
    tk: int
    bg: int  # heads per tile
    bt: int  # tokens per tile
    n_hsub: int  # head sub-groups per KV head (when the group exceeds block_q)
    n_tblk: int  # token blocks

    @property
    def rows(self) -> int:
        return self.bt * self.bg

    @property
    def programs(self) -> int:
        return self.batch * self.hkv * self.n_hsub


def _geometry(q_shape: tuple[int, ...], k_shape: tuple[int, ...], block_q: int) -> _Geometry:
    batch, tq, hq, d = q_shape
    tk, hkv = k_shape[1], k_shape[2]
    group = hq // hkv
    gp = 1 << (group - 1).bit_length()
    bg = min(gp, block_q)
    bt = block_q // bg
    return _Geometry(batch, tq, hq, hkv, group, d, tk, bg, bt, gp // bg, be.cdiv(tq, bt))


# ----------------------------------------------------------------- shared arithmetic (all paths)


def _online_step(state, s, active, pv_fn, row_sum):
    """One block of the online softmax for every row; rows with ``active`` False keep their state.

    ``active=None``: every row active (the same bits as an all-true ``active``).

    ``s``: ``[..., block_k]`` scores (already scaled by ``scale * log2(e)``), ``-inf`` where masked.
    ``pv_fn(p)``: ``p [..., block_k]`` -> ``p @ v [..., D]`` in fp32; ``row_sum``: the key sum.
    """
    m, l, acc = state
    m_new = jnp.maximum(m, jnp.ceil(jnp.max(s, axis=-1)))  # integer-valued (or -inf)
    m_use = jnp.where(m_new == _NEG_INF, 0.0, m_new)
    alpha = jnp.exp2(m - m_use)  # a power of two: alpha * state is exact
    p = jnp.exp2(s - m_use[..., None])
    l_new = alpha * l + row_sum(p)
    acc_new = alpha[..., None] * acc + pv_fn(p)
    if active is None:  # every row active (a block valid for every row)
        return m_new, l_new, acc_new
    return (
        jnp.where(active, m_new, m),
        jnp.where(active, l_new, l),
        jnp.where(active[..., None], acc_new, acc),
    )


def _fold(state, part, ok, exp2=jnp.exp2):
    """Fold split partial ``part`` into the running ``state`` for the rows where ``ok`` holds."""
    big_m, big_l, big_a = state
    m, l, acc = part
    m_new = jnp.maximum(big_m, m)
    m_use = jnp.where(m_new == _NEG_INF, 0.0, m_new)
    a = exp2(big_m - m_use)  # powers of two (integer-valued maxima): exact products below
    b = exp2(m - m_use)
    l_new = big_l * a + l * b
    a_new = big_a * a[..., None] + acc * b[..., None]
    return (
        jnp.where(ok, m_new, big_m),
        jnp.where(ok, l_new, big_l),
        jnp.where(ok[..., None], a_new, big_a),
    )


def _finalize(state):
    """``acc / l``; rows that saw no valid key (``l == 0``) give exact zeros."""
    _, l, acc = state
    has = l > 0
    return jnp.where(has[..., None], acc / jnp.where(has, l, 1.0)[..., None], 0.0)


def _ex2_ftz(x):  # Triton: the instruction of the Mosaic kernel's exp2 (approx_math)
    if be.interpret_mode():  # no PTX on the CPU (interpret mode checks logic, not GPU bits)
        return jnp.exp2(x)
    return be.inline_asm("ex2.approx.ftz.f32 $0, $1;", x)


def _init_state(rows_shape: tuple[int, ...], d: int):
    return (
        jnp.full(rows_shape, _NEG_INF, jnp.float32),
        jnp.zeros(rows_shape, jnp.float32),
        jnp.zeros((*rows_shape, d), jnp.float32),
    )


# ------------------------------------------------------------------------------------ row lengths


@dataclasses.dataclass(frozen=True)
class _Lens:
    """Where a batch row's ``(q_start, q_len, kv_len)`` comes from: the caller's ``[B]`` length
    arrays, passed to the kernels as they are (``count`` of them, ahead of q/k/v), and shape
    constants. No XLA op combines them first: each would be a kernel launch of its own (~1.2 us, a
    tenth of a decode step's attention at B = 1).

    Decode: ``kv_len = lengths``, ``q_len = q_lengths`` (or Tq), ``q_start = kv_len - q_len``.
    Prefill: ``kv_len = kv_lengths`` (or Tk), ``q_len = Tq``, ``q_start = q_offset`` (or Tk - Tq).
    Lengths are clipped where they are read, to ``[0, Tk]`` and ``[0, Tq]`` (traced values cannot
    be range-checked at trace time).
    """

    decode: bool
    has_kv: bool  # kv_len from an array (decode: always)
    has_q: bool  # decode: q_lengths given; prefill: q_offset given
    tq: int
    tk: int

    @property
    def count(self) -> int:
        return int(self.has_kv) + int(self.has_q)

    def row(self, refs, b):
        """``(q_start, q_len, kv_len)`` of row ``b`` (``refs``: the length refs or arrays)."""
        it = iter(refs)
        i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
        kv_len = jnp.clip(next(it)[b], 0, self.tk) if self.has_kv else i32(self.tk)
        if self.decode:
            q_len = jnp.clip(next(it)[b], 0, self.tq) if self.has_q else i32(self.tq)
            return kv_len - q_len, q_len, kv_len
        q_start = next(it)[b] if self.has_q else i32(self.tk - self.tq)
        return q_start, i32(self.tq), kv_len

    def stacked(self, arrays, nb: int):
        """``[B, 3]`` int32: ``(q_start, q_len, kv_len)`` of every row (the jnp paths)."""
        return jnp.stack([jnp.broadcast_to(x, (nb,)) for x in self.row(arrays, slice(None))], 1)

    def kernel(self, body):
        """``body(meta, *refs)`` as a kernel taking the length refs first; ``meta(b)`` reads row
        ``b``'s ``(q_start, q_len, kv_len)``."""
        def wrapped(*refs):
            return body(functools.partial(self.row, refs[:self.count]), *refs[self.count:])

        return wrapped


# ----------------------------------------------------------------------------------------- kernels


def _tile_rows(meta, pid0, tb, *, geo: _Geometry, causal: bool):
    """Bookkeeping of tile (pid0, tb): batch row, KV head, first head, row validity, ``n``."""
    per_b = geo.hkv * geo.n_hsub
    b = lax.div(pid0, per_b)
    kvh = lax.div(lax.rem(pid0, per_b), geo.n_hsub)
    g0 = lax.rem(pid0, geo.n_hsub) * geo.bg
    q_start, q_len, kv_len = meta(b)
    r = jnp.arange(geo.rows, dtype=jnp.int32)
    t = tb * geo.bt + lax.div(r, geo.bg)
    g = g0 + lax.rem(r, geo.bg)
    valid = (t < q_len) & (g < geo.group)
    n = jnp.minimum(kv_len, q_start + t + 1) if causal else jnp.zeros_like(t) + kv_len
    n = jnp.where(valid, jnp.maximum(n, 0), 0)  # [rows] valid keys per row
    return b, kvh, g0, kv_len, valid, n


def _q_block(ref, b, tb, kvh, g0, *, geo: _Geometry, col0=None):
    """(ref view, mask, 3-D shape or None) of the q/o block of a tile: rows = (token, head);
    columns ``col0 .. col0 + geo.d`` (``col0=None``: all of them)."""
    t0, h0 = tb * geo.bt, kvh * geo.group + g0
    cols = slice(None) if col0 is None else be.ds(col0, geo.d)
    tok_ok = (t0 + jnp.arange(geo.bt)) < geo.tq
    head_ok = (g0 + jnp.arange(geo.bg)) < geo.group
    if geo.bg == 1:  # MHA: rows are tokens of one head
        mask = jnp.broadcast_to(tok_ok[:, None], (geo.bt, geo.d))
        return ref.at[b, be.ds(t0, geo.bt), h0, cols], mask, None
    if geo.bt == 1:  # the tile is heads of one token
        mask = jnp.broadcast_to(head_ok[:, None], (geo.bg, geo.d))
        return ref.at[b, t0, be.ds(h0, geo.bg), cols], mask, None
    shape3 = (geo.bt, geo.bg, geo.d)
    mask = jnp.broadcast_to(tok_ok[:, None, None] & head_ok[None, :, None], shape3)
    return ref.at[b, be.ds(t0, geo.bt), be.ds(h0, geo.bg), cols], mask, shape3


def _load_q(q_ref, b, tb, kvh, g0, *, geo):
    view, mask, shape3 = _q_block(q_ref, b, tb, kvh, g0, geo=geo)
    q = be.load(view, mask=mask, other=0.0)  # [bt, bg, D] or [rows, D]
    return q if shape3 is None else q.reshape(geo.rows, geo.d)  # [rows, D]


def _store_o(o_ref, out, b, tb, kvh, g0, *, geo, col0=None):
    view, mask, shape3 = _q_block(o_ref, b, tb, kvh, g0, geo=geo, col0=col0)
    out = out.astype(o_ref.dtype)  # [rows, D]
    be.store(view, out if shape3 is None else out.reshape(shape3), mask=mask)


def _block_step(state, q, k_ref, v_ref, b, kvh, k0, kv_len, n, *, geo, cfg, c, precision,
                masked: bool):
    """One ``block_k`` block of keys starting at ``k0`` folded into ``state`` (every row).

    ``masked=False`` is for blocks whose keys are valid for every valid row of the tile (below the
    smallest ``n``): unmasked loads, every row active. It is the same arithmetic as the masked form
    with an all-true mask, so the bits are the same; rows outside the tile's valid rows compute
    garbage there and are never stored.
    """
    bk, d = cfg.block_k, geo.d
    k_view, v_view = k_ref.at[b, be.ds(k0, bk), kvh, :], v_ref.at[b, be.ds(k0, bk), kvh, :]
    keys = k0 + jnp.arange(bk, dtype=jnp.int32)
    if masked:
        kv_mask = jnp.broadcast_to((keys < kv_len)[:, None], (bk, d))
        k_blk = be.load(k_view, mask=kv_mask, other=0.0)  # [bk, D]
        v_blk = be.load(v_view, mask=kv_mask, other=0.0)  # [bk, D]
    else:
        k_blk, v_blk = be.load(k_view), be.load(v_view)  # [bk, D]
    s = lax.dot_general(  # [rows, bk]
        q, k_blk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
        precision=precision,
    ) * c
    # The key mask stays in both forms: besides masking it keeps ``s * c`` rounded before the
    # ``- m`` of the exponent (no FMA contraction across the select), identically in every path.
    s = jnp.where(keys[None, :] < n[:, None], s, _NEG_INF)

    def pv(p):  # [rows, bk] -> [rows, D]
        return jnp.dot(p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32,
                       precision=precision)

    return _online_step(state, s, k0 < n if masked else None, pv,
                        functools.partial(jnp.sum, axis=-1))


def _split_partial(q, k_ref, v_ref, b, kvh, j, kv_len, n, *, geo, cfg, c, precision):
    """Online softmax over the blocks of split ``j`` -> partial ``(m, l, acc)`` for every row.

    Every block runs masked: an unmasked first loop (as in the fold kernel) made this 8-block loop
    36% slower in a decode step (H100), and the two forms give the same bits.
    """
    bk = cfg.block_k
    per_split = cfg.split_size // bk
    first = j * per_split
    end = jnp.maximum(jnp.minimum(first + per_split, be.cdiv(jnp.max(n), bk)), first)
    step = functools.partial(_block_step, q=q, k_ref=k_ref, v_ref=v_ref, b=b, kvh=kvh,
                             kv_len=kv_len, n=n, geo=geo, cfg=cfg, c=c, precision=precision)
    return lax.fori_loop(first, end, lambda i, st: step(st, k0=i * bk, masked=True),
                         _init_state((geo.rows,), geo.d))


def _attention_kernel(meta, q_ref, k_ref, v_ref, o_ref, *, geo, cfg, causal, c, precision,
                      token_major: bool):
    """Fold mode: one program owns a tile of rows and runs all its splits, folding in registers.

    One flat loop over the tile's blocks (so the software pipeline never drains at a split edge):
    at the first block of split ``j > 0`` the partial of split ``j - 1`` is folded into the total
    and a fresh partial starts. Blocks valid for every row run unmasked (a first loop), the rest
    (the causal diagonal, a ragged end) masked: the same per-split sequence of block steps and
    folds as the split kernel, hence the same bits.
    """
    if token_major:  # grid (token blocks, KV-head tiles); see _attend_pallas
        tb, pid0 = be.program_id(0), be.program_id(1)
    else:  # grid (KV-head tiles, token blocks)
        pid0, tb = be.program_id(0), be.program_id(1)
    b, kvh, g0, kv_len, valid, n = _tile_rows(meta, pid0, tb, geo=geo, causal=causal)
    q = _load_q(q_ref, b, tb, kvh, g0, geo=geo)  # [rows, D]
    bk = cfg.block_k
    per_split = cfg.split_size // bk
    n_blocks = be.cdiv(jnp.max(n), bk)
    # blocks from key 0 valid for every valid row: min(n) // bk
    n_full = jnp.minimum(lax.div(jnp.min(jnp.where(valid, n, n_blocks * bk)), bk), n_blocks)
    step = functools.partial(_block_step, q=q, k_ref=k_ref, v_ref=v_ref, b=b, kvh=kvh,
                             kv_len=kv_len, n=n, geo=geo, cfg=cfg, c=c, precision=precision)
    fresh = _init_state((geo.rows,), geo.d)

    def body(i, carry, masked):
        total, part = carry
        j = lax.div(i, per_split)
        total, part = lax.cond(
            (i > 0) & (lax.rem(i, per_split) == 0),
            lambda: (_fold(total, part, (j - 1) * cfg.split_size < n), fresh),
            lambda: (total, part),
        )
        return total, step(part, k0=i * bk, masked=masked)

    carry = (fresh, fresh)
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    total, part = lax.fori_loop(n_full, n_blocks, functools.partial(body, masked=True), carry)
    last = lax.div(n_blocks - 1, per_split)  # the split of the last block (no block: every n is 0)
    state = _fold(total, part, last * cfg.split_size < n)
    _store_o(o_ref, _finalize(state), b, tb, kvh, g0, geo=geo)


def _split_kernel(meta, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *, geo, cfg, causal, c,
                  precision, part_rows):
    """Split mode, phase 1: program (tile, j) writes the fp32 partial of split ``j``."""
    pid0, tb, j = be.program_id(0), be.program_id(1), be.program_id(2)
    b, kvh, g0, kv_len, _, n = _tile_rows(meta, pid0, tb, geo=geo, causal=causal)
    q = _load_q(q_ref, b, tb, kvh, g0, geo=geo)  # [rows, D]
    m, l, acc = _split_partial(q, k_ref, v_ref, b, kvh, j, kv_len, n, geo=geo, cfg=cfg, c=c,
                               precision=precision)
    ok = (j * cfg.split_size < n) & (jnp.arange(geo.rows) < part_rows)  # [rows]
    rows = be.ds(0, geo.rows)
    be.store(m_ref.at[pid0, tb, j, rows], m, mask=ok)  # [rows]
    be.store(l_ref.at[pid0, tb, j, rows], l, mask=ok)  # [rows]
    be.store(acc_ref.at[pid0, tb, j, rows, :], acc,  # [rows, D]
             mask=jnp.broadcast_to(ok[:, None], acc.shape))


def _combine_unroll(geo: _Geometry, cfg: AttentionConfig) -> int:
    """Partials the combine loads together before folding them one by one (no numerics): the
    splits of the context rounded up to a power of two, a group of the whole head dim taking at
    most 64 fp32 registers per thread (two groups are in registers at once). Measured with fixed
    groups (H100, decode B=1, 32/8 heads): more than the splits costs (1k context: 1.31x XLA's time
    with 8, 1.44x with 32). At 32k the combine took 9.5 us with groups of 32 loaded and folded in
    turn; loading the next group before folding one took 8.6 / 6.5 / 7.3 us with groups of 32 / 16
    / 8 (ptxas otherwise issues a partial's loads only a few folds ahead of it)."""
    n = be.cdiv(geo.tk, cfg.split_size)
    cap = max(1, 64 * 32 * cfg.combine_num_warps // (geo.rows * geo.d))
    return min(1 << (n - 1).bit_length(), 1 << (cap.bit_length() - 1))


def _combine_kernel(meta, m_ref, l_ref, acc_ref, o_ref, *, geo, cfg, causal, unroll):
    """Split mode, phase 2: fold the partials of splits 0, 1, 2, ... in order and normalise.

    The loads of ``_combine_unroll`` consecutive partials are issued together (they do not depend
    on the running state), one group ahead of the folds, which take the partials in split order:
    the loads of group i + 1 are in flight while group i folds. A split past the row's keys is
    masked (``ok`` False) and leaves the state as is. A program takes ``geo.d`` columns of the head
    dim (``_combine_cols``), from column ``program_id(2) * geo.d``; ``unroll`` is
    ``_combine_unroll`` of the whole head dim.
    Behind the Mosaic kernel it folds with that kernel's ``ex2.approx.ftz`` (its division is the
    same as Triton's ``/``: an IEEE ``div.rn`` here gave 39 of 8.4M bf16 outputs 1 ULP apart from the
    Mosaic kernel's fold mode on the H100; plain ``/`` gave none).
    """
    fold = functools.partial(_fold, exp2=_ex2_ftz) if cfg.kernel == "mosaic" else _fold
    pid0, tb, col0 = be.program_id(0), be.program_id(1), be.program_id(2) * geo.d
    b, kvh, g0, _, _, n = _tile_rows(meta, pid0, tb, geo=geo, causal=causal)
    num_splits = lax.div(jnp.max(n) + (cfg.split_size - 1), cfg.split_size)
    rows, cols = be.ds(0, geo.rows), be.ds(col0, geo.d)

    def ok_of(j):  # [rows]: split j holds keys of the row (implies the row was written)
        return j * cfg.split_size < n

    def load(j):  # masked past the row's splits: no memory access
        ok = ok_of(j)
        m = be.load(m_ref.at[pid0, tb, j, rows], mask=ok, other=_NEG_INF)  # [rows]
        l = be.load(l_ref.at[pid0, tb, j, rows], mask=ok, other=0.0)  # [rows]
        acc = be.load(acc_ref.at[pid0, tb, j, rows, cols],  # [rows, geo.d]
                      mask=jnp.broadcast_to(ok[:, None], (geo.rows, geo.d)), other=0.0)
        return m, l, acc

    def group(i):
        return tuple(load(i * unroll + u) for u in range(unroll))

    def body(i, carry):
        state, parts = carry
        ahead = group(i + 1)  # loop-carried: the next group's loads fly while this group folds
        for u, part in enumerate(parts):
            state = fold(state, part, ok_of(i * unroll + u))
        return state, ahead

    groups = lax.div(num_splits + (unroll - 1), unroll)
    init = _init_state((geo.rows,), geo.d)
    first = group(jnp.int32(0))  # a traced index: interpret mode cannot discharge a Python int
    state, _ = lax.fori_loop(0, groups, body, (init, first))
    _store_o(o_ref, _finalize(state), b, tb, kvh, g0, geo=geo, col0=col0)


# ------------------------------------------------------------------ Mosaic GPU kernel (Hopper)

_WG_ROWS = 64  # rows of one compute warpgroup (the wgmma M)
_TWO23 = float(2**23)


def _ceil_exact(x):
    """``ceil`` of an fp32 array without a ceil instruction (Mosaic GPU has none); -inf stays."""
    small = jnp.abs(x) < _TWO23  # larger magnitudes (and the infinities) are integers already
    xs = jnp.where(small, x, 0.0)
    t = xs.astype(jnp.int32).astype(jnp.float32)  # truncation toward zero
    return jnp.where(small, t + jnp.where(t < xs, 1.0, 0.0), x)


@dataclasses.dataclass(frozen=True)
class _MosaicGeometry:
    """Rows of the Mosaic kernel: ``q2 [B, U, H2, D]`` with ``U`` row slots per head ``h2``.

    Token-tiled (``r == 1``): ``q2 = q``; a warpgroup owns 64 tokens of one query head. Packed
    (``r = bg``): ``q2[b, t * bg + g, kvh] = q[b, t, kvh * group + g]`` (heads padded to the power
    of two ``bg``), so a warpgroup owns 64 / bg tokens x bg heads of one KV head (decode: the heads
    of one token). A CTA runs two warpgroups on one KV head's K/V: two heads of a group (``pair_heads``)
    or two consecutive 64-row blocks of one head.
    """

    u: int  # row slots along axis 1 of q2 (padded to a multiple of 8)
    u_valid: int  # row slots that can hold a token (tq * r)
    h2: int  # heads of q2
    group2: int  # heads of q2 per KV head
    r: int  # row slots per token
    group: int  # real query heads per row group (r == 1: 1)
    d: int
    n_wg: int  # compute warpgroups per CTA (1 where every row fits one: decode, short chunks)
    heads_first: bool = False  # q2 is [B, H2, U, D] (one decode token: q as it lies)

    def rows_at(self, ref, b, u0, h2):
        """The 64 row slots from ``u0`` of head ``h2`` of batch row ``b`` in q2-shaped ``ref``."""
        if self.heads_first:
            return ref.at[b, h2, be.ds(u0, _WG_ROWS)]
        return ref.at[b, be.ds(u0, _WG_ROWS), h2]

    @property
    def pair_heads(self) -> bool:
        return self.n_wg == 2 and self.group2 % 2 == 0

    @property
    def n_pairs(self) -> int:
        return self.h2 // 2 if self.pair_heads else self.h2

    @property
    def n_tblk(self) -> int:
        return be.cdiv(self.u, _WG_ROWS if self.pair_heads else self.n_wg * _WG_ROWS)


def _mosaic_rows(meta, b, u0, *, geo: _MosaicGeometry, causal: bool):
    """Per-row valid-key counts ``n [64]`` of rows ``u0 ..`` and the tile's smallest/largest n."""
    q_start, q_len, kv_len = meta(b)
    u = u0 + be.mgpu.broadcasted_iota(jnp.int32, (_WG_ROWS, 8), 0,
                                      layout=be.mgpu.Layout.WGMMA).max(axis=1)
    t = lax.div(u, jnp.int32(geo.r))
    valid = t < q_len
    if geo.r > 1:
        valid &= lax.rem(u, jnp.int32(geo.r)) < geo.group
    n = jnp.minimum(kv_len, q_start + t + 1) if causal else jnp.zeros_like(t) + kv_len
    n = jnp.where(valid, jnp.maximum(n, 0), 0)

    def n_of(tok):
        return jnp.maximum(jnp.minimum(kv_len, q_start + tok + 1) if causal else kv_len, 0)

    t_first = lax.div(u0, jnp.int32(geo.r))
    t_last = jnp.minimum(q_len, lax.div(u0 + (_WG_ROWS - 1), jnp.int32(geo.r)) + 1) - 1
    any_valid = t_last >= t_first
    return n, jnp.where(any_valid, n_of(t_first), 0), jnp.where(any_valid, n_of(t_last), 0)


def _mosaic_kernel(meta, sched_ref, q_ref, k_ref, v_ref, out_refs, scratch, *,
                   geo: _MosaicGeometry, cfg: AttentionConfig, causal: bool, c: float,
                   n_splits: int, n_bj: int, n_cta: int):
    """Warp-specialised, persistent attention: two compute warpgroups and one TMA producer per CTA.

    The numerics are those of the module docstring with this kernel's own instructions: per block
    ``s = q k^T`` (wgmma, fp32; masked keys -inf), the integer running max
    ``m = max(m, ceil(max(s) * c))``, ``p = exp2(s * c - m)`` (``s * c - m`` is one FMA in the
    PTX, then ``ex2.approx.ftz``), ``l`` as the row sum of ``p``, ``acc = alpha * acc + p16 @ v``
    (the rescaled accumulator is the wgmma's accumulator). Splits of ``split_size`` keys fold as
    ``_fold``; the total's accumulator lives in SMEM (the registers are full beside a 128-key
    block) and split ``j`` joins it during the first q k^T of split ``j + 1``. Every path (prefill,
    chunk, decode) runs this same block step, so the bits agree. ``n_splits == 0``: fold mode (an
    item is a row tile: its CTA runs all its splits and writes the output); otherwise split mode
    (an item is one split ``j`` of a row tile; its partial goes to the Triton combine kernel).

    Persistent (no numerics: an item's arithmetic does not depend on the CTA that runs it): each
    of the ``n_cta`` CTAs runs a list of items in turn. Fold mode: CTA ``c`` runs
    ``sched_ref[c, 1:1 + sched_ref[c, 0]]`` (``_mosaic_schedule``); split mode: a run of
    consecutive items (the split index fastest, so q stays across a row tile's splits). The
    producer loads the next item's first K/V block while the compute warpgroups finish the current
    one, and its q once they no longer read theirs.
    """
    plgpu, lay = be.mgpu, be.mgpu.Layout.WGMMA
    bk, d, stages = cfg.block_k, geo.d, cfg.num_stages
    per_split = cfg.split_size // bk
    dtype = q_ref.dtype
    wg, cta = lax.axis_index("wg"), lax.axis_index("cta")
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    if n_splits:  # a run of consecutive items, the first ``rest`` CTAs one more
        per, rest = divmod(geo.n_pairs * geo.n_tblk * n_bj, n_cta)
        first = cta * per + jnp.minimum(cta, rest)
        n_mine = per + (cta < rest).astype(jnp.int32)
    else:
        n_mine = sched_ref[cta, 0]

    def item_index(k):  # the launch-order index of this CTA's item k (see ``_mosaic_schedule``)
        return first + k if n_splits else sched_ref[cta, 1 + k]

    def plan(k):
        """(pair, tblk, b, split or None) of this CTA's item k."""
        w = item_index(k)
        j = None
        if n_splits:
            j, w = lax.rem(w, i32(n_splits)), lax.div(w, i32(n_splits))
        pair, w = lax.rem(w, i32(geo.n_pairs)), lax.div(w, i32(geo.n_pairs))
        tb, b = lax.rem(w, i32(geo.n_tblk)), lax.div(w, i32(geo.n_tblk))
        if causal and not n_splits:  # the longest causal row tiles of a sequence first
            tb = geo.n_tblk - 1 - tb
        return pair, tb, b, j

    def need_q(k):  # item k's rows differ from item k - 1's (split mode: a new row tile)
        if not n_splits:
            return jnp.bool_(True)
        prev = item_index(jnp.maximum(k - 1, 0))
        return (k == 0) | (lax.div(item_index(k), i32(n_splits)) != lax.div(prev, i32(n_splits)))

    def tile(pair, tb, w):  # (q2 head, first row slot) of compute warpgroup w
        if geo.pair_heads:
            return 2 * pair + w, tb * _WG_ROWS
        return pair, tb * (geo.n_wg * _WG_ROWS) + w * _WG_ROWS

    def block_range(j, n_max):  # blocks [lo, hi) of an item for rows with largest n n_max
        hi = be.cdiv(n_max, i32(bk))
        if n_splits:
            lo = j * per_split
            return lo, jnp.maximum(jnp.minimum(hi, lo + per_split), lo)
        return i32(0), hi

    def cta_range(pair, tb, b, j):  # blocks the CTA loads for an item (the union of its rows')
        ranges = [block_range(j, _mosaic_rows(meta, b, tile(pair, tb, w)[1], geo=geo,
                                              causal=causal)[2]) for w in range(geo.n_wg)]
        return ranges[0][0], functools.reduce(jnp.maximum, [r[1] for r in ranges])

    (q_smem2, k_smem, v_smem, tot_smem2, ml_smem, k_bar, v_bar, q_bar, q_free, k_free,
     v_free, turn) = scratch
    if n_splits:
        out_smem2 = None
    else:  # fold mode: the output tile shares the total's SMEM (see ``_attend_mosaic``)
        tot_smem2, out_smem2 = tot_smem2

    def take_turn():  # the two compute warpgroups alternate on the tensor cores
        if geo.n_wg == 2:
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

    @be.when(wg < geo.n_wg)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem, tot_smem = q_smem2.at[wg], tot_smem2.at[wg]

        def fresh():
            return (
                plgpu.layout_cast(jnp.full((_WG_ROWS,), _NEG_INF, jnp.float32), lay.reduce(1)),
                plgpu.layout_cast(jnp.full((_WG_ROWS,), 0.0, jnp.float32), lay.reduce(1)),
                plgpu.layout_cast(jnp.full((_WG_ROWS, d), 0.0, jnp.float32), lay),
            )

        def rows(x, like):  # [64] -> broadcast over the columns of ``like``
            return lax.broadcast_in_dim(x, like.shape, [0])

        def item(k, g):  # g: the CTA's K/V blocks before this item (the pipeline's position)
            pair, tb, b, j_only = plan(k)
            h2, u0 = tile(pair, tb, wg)
            n, n_min, n_max = _mosaic_rows(meta, b, u0, geo=geo, causal=causal)
            kv_len = meta(b)[2]
            lo, hi = block_range(j_only, n_max)
            cta_lo, cta_hi = cta_range(pair, tb, b, j_only)

            def key_ok(i):  # [64, bk]: key i * bk + column is valid for the row (built where used)
                kcol = plgpu.broadcasted_iota(jnp.int32, (_WG_ROWS, bk), 1, layout=lay)
                return kcol < lax.broadcast_in_dim(n - i * bk, (_WG_ROWS, bk), [0])

            def fold(part, big, j):  # the running total (m, l in registers, acc in SMEM) += split j
                big_a = plgpu.load(tot_smem, layout=lay)
                m, l, a = _fold((*big, big_a), part, j * cfg.split_size < n)
                tot_smem[...] = a
                return m, l

            def step(i, carry):
                part, big = carry
                slot = lax.rem(g + i - cta_lo, i32(stages))
                plgpu.barrier_wait(k_bar.at[slot])

                def qk(acc_ref):
                    scores = be.wgmma(acc_ref, q_smem, k_smem.at[slot], transpose_b=True)
                    take_turn()
                    if n_splits:
                        return scores(), part, big
                    # fold mode: at the first block of split j > 0, split j - 1 joins the total
                    # while the tensor cores run this block's q k^T
                    new_split = (lax.rem(i, i32(per_split)) == 0) & (i > 0)
                    part2, big2 = lax.cond(
                        new_split,
                        lambda: (fresh(), fold(part, big, lax.div(i, i32(per_split)) - 1)),
                        lambda: (part, big))
                    return scores(), part2, big2

                s, (m, l, acc), big = be.run_scoped(qk, plgpu.ACC((_WG_ROWS, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                s = lax.cond(
                    (i + 1) * bk > n_min,  # some row of the tile has keys of this block masked
                    lambda: jnp.where(key_ok(i), s, _NEG_INF),
                    lambda: s)
                # max(s * c) == max(s) * c (c > 0, rounding is monotonic): one multiply per row
                m_new = jnp.maximum(m, _ceil_exact(s.max(axis=1) * c))  # integer-valued (or -inf)
                m_use = jnp.where(m_new == _NEG_INF, 0.0, m_new)
                alpha = jnp.exp2(m - m_use)  # a power of two: alpha * state is exact
                # s * c - m: one FMA (seen in the PTX, jax 0.11.2); every path compiles this step
                p = jnp.exp2(s * c - rows(m_use, s))
                l_new = alpha * l + p.sum(axis=1)
                acc = acc * rows(alpha, acc)
                p16 = p.astype(dtype)
                if geo.n_wg == 2:
                    plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_bar.at[slot])
                if geo.n_wg == 2:
                    plgpu.barrier_wait(turn)

                @be.when((i + 1) * bk > kv_len)  # slots past kv_len may hold NaN: p = 0 must win
                def _():
                    v_blk = v_smem.at[slot]
                    vals = plgpu.load(v_blk, layout=lay)
                    key = plgpu.broadcasted_iota(jnp.int32, (bk, d), 0, layout=lay)
                    v_blk[...] = jnp.where(i * bk + key < kv_len, vals, jnp.zeros_like(vals))
                    plgpu.commit_smem()

                acc = _mosaic_pv(acc, p16, v_smem.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                return (m_new, l_new, acc), big

            be.when(need_q(k))(lambda: plgpu.barrier_wait(q_bar.at[wg]))
            be.when(wg == 1)(take_turn)
            if n_splits:  # split mode: one split, its partial goes to the combine kernel
                (m, l, acc), _ = lax.fori_loop(lo, hi, step, (fresh(), ()))
            else:  # fold mode
                m, l, acc = fresh()
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last output left the SMEM
                tot_smem[...] = acc
                part, big = lax.fori_loop(0, hi, step, (fresh(), (m, l)))

            @be.when(k + 1 < n_mine)
            def _():  # this warpgroup's q k^T are done: the producer may load the next rows
                be.when(need_q(k + 1))(lambda: plgpu.barrier_arrive(q_free))

            if not n_splits:
                last = jnp.maximum(be.cdiv(hi, i32(per_split)) - 1, 0)
                m, l = fold(part, big, last)  # hi == 0: no row has keys, the fold keeps the zeros
                acc = plgpu.load(tot_smem, layout=lay)

            @be.loop(hi, cta_hi)  # blocks only the other warpgroup needs: take part in the protocol
            def _drain(i):
                slot = lax.rem(g + i - cta_lo, i32(stages))
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                take_turn()
                take_turn()

            be.when(wg == 0)(take_turn)
            if n_splits:
                m_ref, l_ref, acc_ref = out_refs
                pid0 = b * geo.h2 + lax.div(h2, i32(geo.group2))  # the combine's program index
                rows_, rows4 = geo.u_valid, -(-geo.u_valid // 4) * 4  # TMA: 16-byte rows

                @be.when(wg == 0)  # split mode: every valid row is in warpgroup 0 (u_valid <= 64)
                def _():
                    tot_smem[...] = acc
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(tot_smem.at[be.ds(0, rows_)],
                                            acc_ref.at[pid0, 0, j_only, be.ds(0, rows_)])
                    # m and l go through rows 0 and 1 of the same buffer (SMEM is full)
                    m_smem, l_smem = ml_smem.at[0], ml_smem.at[1]
                    m_smem[...] = m
                    l_smem[...] = l
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(m_smem.at[be.ds(0, rows4)],
                                            m_ref.at[pid0, 0, j_only, be.ds(0, rows4)])
                    plgpu.copy_smem_to_gmem(l_smem.at[be.ds(0, rows4)],
                                            l_ref.at[pid0, 0, j_only, be.ds(0, rows4)])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # before the next partial
            else:
                out_smem = out_smem2.at[wg, 0]
                plgpu.commit_smem()  # every thread has read the total before the output aliases it
                out_smem[...] = _finalize((m, l, acc)).astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, geo.rows_at(out_refs[0], b, u0, h2))
            return g + (cta_hi - cta_lo)

        lax.fori_loop(0, n_mine, item, i32(0))
        plgpu.wait_smem_to_gmem(0)

    @be.when(wg == geo.n_wg)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def item(k, g):
            pair, tb, b, j_only = plan(k)
            cta_lo, cta_hi = cta_range(pair, tb, b, j_only)
            kvh = lax.div(tile(pair, tb, 0)[0], i32(geo.group2))

            def load(i):
                gi = g + i - cta_lo
                slot = lax.rem(gi, i32(stages))
                src = (b, be.ds(i * bk, bk), kvh)

                @be.when(gi >= stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_bar.at[slot])

                @be.when(gi >= stages)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])

                plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_bar.at[slot])

            def load_q():
                for w in range(geo.n_wg):
                    h2, u0 = tile(pair, tb, w)
                    plgpu.copy_gmem_to_smem(geo.rows_at(q_ref, b, u0, h2), q_smem2.at[w],
                                            q_bar.at[w])

            be.when(k == 0)(load_q)
            be.when(cta_hi > cta_lo)(lambda: load(cta_lo))  # in flight while the last item ends

            @be.when((k > 0) & need_q(k))
            def _():  # once the compute warpgroups are done with the last item's q
                plgpu.barrier_wait(q_free)
                load_q()

            be.loop(cta_lo + 1, cta_hi)(load)
            return g + (cta_hi - cta_lo)

        g_end = lax.fori_loop(0, n_mine, item, i32(0))

        @be.loop(jnp.maximum(g_end - stages, 0), g_end)
        def _last(gi):  # see the last slots released before the CTA's barriers go away
            slot = lax.rem(gi, i32(stages))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


def _mosaic_pv(acc, p16, v_smem):
    """``acc + p16 @ v`` with the sum inside the wgmma accumulator; ``be.ordered_dot`` in
    interpret mode (jax's GPU interpreter has neither a register A operand nor a pre-initialised
    accumulator)."""
    if be.interpret_mode():
        return be.ordered_dot(p16, be.wgmma_operand(v_smem), acc)
    return be.run_state(lambda r: be.mgpu.wgmma(r, p16, v_smem))(be.mgpu.ACC.init(acc))


def _mosaic_schedule(geo: _MosaicGeometry, *, nb: int, n_cta: int, causal: bool, tq: int, tk: int,
                     bk: int) -> np.ndarray:
    """Fold mode's work lists for the persistent kernel: ``[n_cta, 1 + most]`` int32, row ``c`` =
    (count, items). Items are numbered in launch order: the head pair fastest, then the row tile
    (causal: longest first) and the batch row, the order a one-item-per-CTA grid would launch them,
    which keeps the CTAs in flight on one sequence's K/V in L2. Each item in turn goes to the CTA
    that would be free first (the blocks of its tile from the shapes, as if the queries were the
    last ``tq`` of ``tk`` keys, plus one for the item's start), as the hardware's block scheduler
    would. Only the speed depends on this table, never the bits. (Split mode needs no table: its
    items are equal, each CTA takes a run of consecutive ones.)
    """
    rows = _WG_ROWS if geo.pair_heads else geo.n_wg * _WG_ROWS  # row slots per item
    cost = []
    for tb in range(geo.n_tblk):
        t_last = min(geo.u_valid, (tb + 1) * rows) // geo.r - 1  # the tile's last token
        keys = min(tk, max(tk - tq, 0) + t_last + 1) if causal else tk
        cost.append(-(-keys // bk) + 1)
    lists: list[list[int]] = [[] for _ in range(n_cta)]
    heap = [(0, c) for c in range(n_cta)]
    for w in range(geo.n_pairs * geo.n_tblk * nb):
        tb = (w // geo.n_pairs) % geo.n_tblk
        free_at, cta = heapq.heappop(heap)
        lists[cta].append(w)
        heapq.heappush(heap, (free_at + cost[geo.n_tblk - 1 - tb if causal else tb], cta))
    table = np.zeros((n_cta, 1 + max(map(len, lists))), np.int32)
    for c, items in enumerate(lists):
        table[c, 0] = len(items)
        table[c, 1:1 + len(items)] = items
    return table


def _split_pays(items: int, n_splits: int) -> bool:
    """Split mode (True) or fold mode for rows that fit one warpgroup (decode, short chunks) under
    ``split_kv=None``; the launch only, never the bits. ``items``: fold mode's work items (batch
    rows x KV heads), each running all ``n_splits`` splits of its row. Split mode spreads the
    splits over the SMs, then writes fp32 partials and runs the combine kernel; fold mode keeps
    the running total in the CTA and, per split, runs 4-8% faster where both fill the SMs. So
    fold mode is taken when its items keep at least 90% of the SMs busy over its waves.

    H100, decode 32/8 heads, D = 128 (2026-11-26, equal bits), time with fold / split mode:
    B = 16 (128 items) at 1k / 4k / 16k / 32k 1.01 / 0.96 / 0.92 / 0.93; B = 32 at 1k / 4k / 16k /
    32k 0.97 / 0.94 / 0.94 / 0.94; B = 64 at 1k / 4k / 16k 0.96 / 0.94 / 0.94; B = 128 and 256 at
    1k and 4k 0.93-0.96. Split mode stays for B = 8 (64 items) at 1k / 4k / 16k: 1.09 / 1.03 /
    0.98, and for B = 1 (1k: 1.60). With one compute warpgroup in fold mode (f787370; H100,
    2026-12-07): B = 16 at 1k / 16k 0.96 / 0.93, B = 8 at 1k / 4k / 16k 1.03 / 1.00 / 0.98, B = 4
    at 4k / 16k 1.81 / 1.96, so the rule stands."""
    sms = be.sm_count()
    return n_splits > 1 and items < 0.9 * be.cdiv(items, sms) * sms


def _attend_mosaic(q, k, v, lengths, *, lens, causal, c, cfg):
    """Launcher of the Mosaic GPU kernel (+ the Triton combine in split mode); same I/O as
    ``_attend_pallas``. Pads (rows to a multiple of 8, keys to a multiple of 8 and at least one
    block: the TMA's tiling) and transposes q/o for the packed geometry, except for one decode
    token of a power-of-two group, whose q it reads as it lies; none of it moves bits."""
    nb, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    bg = 1 << (group - 1).bit_length()
    packed = bg <= _WG_ROWS and tq * bg <= 2 * _WG_ROWS  # one CTA covers every row
    heads_first = packed and tq == 1 and bg == group
    if heads_first:  # one token: q [B, 1, Hq, D] is q2 [B, Hkv, group, D] as it lies, no copy
        q2, r, h2, group2, u_valid = q.reshape(nb, hkv, group, d), bg, hkv, 1, group
    elif packed:  # rows (token, head of the group): q2 [B, tq * bg, Hkv, D]
        q2 = q.reshape(nb, tq, hkv, group, d).transpose(0, 1, 3, 2, 4)
        q2 = jnp.pad(q2, ((0, 0), (0, 0), (0, bg - group), (0, 0), (0, 0)))
        q2 = q2.reshape(nb, tq * bg, hkv, d)
        r, h2, group2, u_valid = bg, hkv, 1, tq * bg
    else:
        q2, r, h2, group2, u_valid = q, 1, hq, group, tq
    if heads_first:  # u = group: up to 8 rows are one short TMA tile, more are whole tiles (a
        u = u_valid  # power of two); the TMA fills the row slots past the group with zeros
    else:
        u = -(-u_valid // 8) * 8
        q2 = jnp.pad(q2, ((0, 0), (0, u - u_valid), (0, 0), (0, 0)))
    tk_pad = max(-(-tk // 8) * 8, cfg.block_k)
    if tk_pad != tk:  # a copy of K/V: only for key counts that are not a multiple of 8
        k, v = (jnp.pad(x, ((0, 0), (0, tk_pad - tk), (0, 0), (0, 0))) for x in (k, v))
    split = packed and u_valid <= _WG_ROWS and (
        cfg.split_kv if cfg.split_kv is not None
        else _split_pays(nb * hkv, be.cdiv(tk, cfg.split_size)))
    # every row in one warpgroup (decode, short chunks): a second one would hold no rows and only
    # take its turns on the tensor cores beside the first (fold mode); no numerics
    n_wg = 1 if packed and u_valid <= _WG_ROWS else 2
    geo = _MosaicGeometry(u, u_valid, h2, group2, r, group if packed else 1, d, n_wg, heads_first)
    n_splits = be.cdiv(tk, cfg.split_size) if split else 0
    dt = q.dtype
    itemsize = jnp.dtype(dt).itemsize
    swizzle = min(128, d * itemsize)
    tr = (be.mgpu.TilingTransform((8, swizzle // itemsize)), be.mgpu.SwizzleTransform(swizzle))
    st, bk = cfg.num_stages, cfg.block_k
    tot = be.mgpu.SMEM((n_wg, _WG_ROWS, d), jnp.float32)  # partial acc / running total
    # fold mode: the output tile [w, 0] lies in the bytes of total w (the first half), which are
    # free when it is written. Separate buffers in interpret mode: its race detector does not
    # tell the parts of a union apart.
    out = be.mgpu.SMEM((n_wg, 2, _WG_ROWS, d), dt, transforms=tr)
    union = not be.interpret_mode()
    scratch = (
        be.mgpu.SMEM((n_wg, _WG_ROWS, d), dt, transforms=tr),  # q
        be.mgpu.SMEM((st, bk, d), dt, transforms=tr),  # k
        be.mgpu.SMEM((st, bk, d), dt, transforms=tr),  # v
        tot if split else be.mgpu.RefUnion(tot, out) if union else (tot, out),
        be.mgpu.SMEM((2, _WG_ROWS), jnp.float32) if split else None,  # partial m, l
        be.mgpu.Barrier(num_barriers=st),  # k loaded
        be.mgpu.Barrier(num_barriers=st),  # v loaded
        be.mgpu.Barrier(num_barriers=n_wg),  # q loaded
        be.mgpu.Barrier(num_arrivals=n_wg),  # q free (the q k^T of an item are done)
        be.mgpu.Barrier(num_arrivals=n_wg, num_barriers=st),  # k slot free
        be.mgpu.Barrier(num_arrivals=n_wg, num_barriers=st),  # v slot free
        be.mgpu.Barrier(num_arrivals=2) if n_wg == 2 else None,  # tensor-core turn
    )
    if split:
        rows4 = -(-u_valid // 4) * 4
        lead = (nb * hkv, 1, n_splits)
        out_type = (jax.ShapeDtypeStruct((*lead, rows4), jnp.float32),
                    jax.ShapeDtypeStruct((*lead, rows4), jnp.float32),
                    jax.ShapeDtypeStruct((*lead, u_valid, d), jnp.float32))
    else:
        out_type = (jax.ShapeDtypeStruct(q2.shape, dt),)

    n_bj = nb * max(n_splits, 1)
    n_cta = min(geo.n_pairs * geo.n_tblk * n_bj, be.sm_count())  # persistent: one CTA per SM
    sched = () if split else (jnp.asarray(_mosaic_schedule(
        geo, nb=nb, n_cta=n_cta, causal=causal, tq=tq, tk=tk, bk=bk)),)

    def entry(meta, *refs):
        sched_ref = None if split else refs[0]
        q_ref, k_ref, v_ref, *outs = refs[len(sched):]
        be.run_scoped(
            lambda *sc: _mosaic_kernel(meta, sched_ref, q_ref, k_ref, v_ref, outs, sc, geo=geo,
                                       cfg=cfg, causal=causal, c=c, n_splits=n_splits, n_bj=n_bj,
                                       n_cta=n_cta),
            *scratch, collective_axes="wg")

    res = be.mosaic_kernel(
        lens.kernel(entry), out_type=out_type, grid=(n_cta,), grid_names=("cta",),
        num_threads=n_wg + 1, thread_name="wg",
    )(*lengths, *sched, q2, k, v)
    if split:
        geo_c = _geometry(q.shape, (nb, tk, hkv, d), 1 << (u_valid - 1).bit_length())
        return _combine(lengths, res, lens=lens, geo=geo_c, cfg=cfg, causal=causal,
                        out_shape=jax.ShapeDtypeStruct(q.shape, dt))
    if heads_first:
        return res[0].reshape(nb, tq, hq, d)
    o2 = res[0][:, :u_valid]
    if packed:
        o2 = o2.reshape(nb, tq, bg, hkv, d)[:, :, :group].transpose(0, 1, 3, 2, 4)
    return o2.reshape(nb, tq, hq, d)


# ---------------------------------------------------------------------------------------- launcher


def _precision(dtype) -> lax.Precision:
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _use_split_kv(cfg: AttentionConfig, geo: _Geometry) -> bool:
    if cfg.split_kv is not None:
        return cfg.split_kv
    return geo.n_tblk == 1 and geo.tk > cfg.split_size


_TOKEN_MAJOR_KV_BYTES = 32 << 20  # prefill launch order (H100, measured 2026-11-24); no numerics


def _combine_cols(geo: _Geometry) -> int:
    """Head-dim columns per combine program: D halved (down to 32) while the grid has fewer than
    two programs per SM. No numerics: the fold is elementwise over D, and every program folds its
    rows' ``m`` and ``l`` alike. H100, decode 32/8 heads, D=128 (2026-11-25), combine time with
    128 / 32 / 16 columns: B=1 32k 6.7 / 5.9 / 5.7 us, 16k 4.1 / 3.5 / 3.6, 4k 2.0 / 1.9 / 1.9;
    B=8 32k 8.2 / 7.4 / 12.9. Bits equal at every point."""
    cols = geo.d
    while cols > 32 and geo.programs * geo.n_tblk * (geo.d // cols) < 2 * be.sm_count():
        cols //= 2
    return cols


def _combine(lengths, parts, *, lens, geo, cfg, causal, out_shape):
    """Launch ``_combine_kernel`` on the split partials ``parts`` (m, l, acc), one program per row
    tile of ``geo`` and ``_combine_cols`` columns: behind the Triton split kernel and behind the
    Mosaic kernel alike."""
    cols = _combine_cols(geo)
    return be.pallas_call(
        lens.kernel(functools.partial(_combine_kernel, geo=dataclasses.replace(geo, d=cols),
                                      cfg=cfg, causal=causal, unroll=_combine_unroll(geo, cfg))),
        out_shape=out_shape,
        grid=(geo.programs, geo.n_tblk, geo.d // cols),
        num_warps=cfg.combine_num_warps,
        num_stages=1,
        name="bi_jax_attention_combine",
    )(*lengths, *parts)


def _attend_pallas(q, k, v, lengths, *, lens, causal, c, cfg):
    """Launcher: q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D], ``lengths`` (``lens.count`` int32 [B])
    -> [B, Tq, Hq, D]."""
    geo = _geometry(q.shape, k.shape, cfg.block_q)
    common = dict(geo=geo, cfg=cfg, causal=causal)
    precision = _precision(q.dtype)
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    if not _use_split_kv(cfg, geo):
        # CUDA runs grid axis 0 fastest. Past _TOKEN_MAJOR_KV_BYTES of K/V, neighbouring token
        # blocks of one KV head go first, so the programs in flight share that head's K/V in L2
        # (head-major made them re-read K/V from HBM: 3.0x cuDNN at B=8, T=16k, 1.7x token-major);
        # below it head-major is faster (B=1, T=1k: 1.42x vs 1.59x cuDNN). No effect on the bits.
        kv_bytes = 2 * k.size * k.dtype.itemsize
        token_major = kv_bytes > _TOKEN_MAJOR_KV_BYTES
        call = be.pallas_call(
            lens.kernel(functools.partial(_attention_kernel, c=c, precision=precision,
                                          token_major=token_major, **common)),
            out_shape=out_shape,
            grid=(geo.n_tblk, geo.programs) if token_major else (geo.programs, geo.n_tblk),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            name="bi_jax_attention",
        )
        return call(*lengths, q, k, v)
    n_splits = be.cdiv(geo.tk, cfg.split_size)
    part_rows = geo.rows if geo.n_tblk > 1 else geo.tq * geo.bg  # rows that can ever be valid
    lead = (geo.programs, geo.n_tblk, n_splits, part_rows)
    parts = be.pallas_call(
        lens.kernel(functools.partial(_split_kernel, c=c, precision=precision, part_rows=part_rows,
                                      **common)),
        out_shape=(
            jax.ShapeDtypeStruct(lead, jnp.float32),  # m
            jax.ShapeDtypeStruct(lead, jnp.float32),  # l
            jax.ShapeDtypeStruct((*lead, geo.d), jnp.float32),  # acc
        ),
        grid=(geo.programs, geo.n_tblk, n_splits),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        name="bi_jax_attention_split",
    )(*lengths, q, k, v)
    # The combine is elementwise per row, so its tile needs only the rows that can be valid (a
    # decode step: the heads of one token, not block_q rows): same partials, same bits, less work.
    geo_c = _geometry(q.shape, k.shape, min(cfg.block_q, 1 << (part_rows - 1).bit_length()))
    return _combine(lengths, parts, lens=lens, geo=geo_c, cfg=cfg, causal=causal,
                    out_shape=out_shape)


# --------------------------------------------------------------------------------------- reference


def _tree_sum(x, axis: int):
    """Sum over ``axis`` (a power of two) by a fixed pairwise tree of elementwise adds."""
    axis = axis % x.ndim
    while x.shape[axis] > 1:
        h = x.shape[axis] // 2
        x = lax.slice_in_dim(x, 0, h, axis=axis) + lax.slice_in_dim(x, h, 2 * h, axis=axis)
    return lax.squeeze(x, (axis,))


def _row_counts(meta, tq: int, causal: bool):
    """meta [B, 3] -> n [B, Tq]: valid keys of every query token (0 for padding rows)."""
    q_start, q_len, kv_len = meta[:, 0:1], meta[:, 1:2], meta[:, 2:3]
    t = jnp.arange(tq, dtype=jnp.int32)[None, :]
    if causal:
        n = jnp.minimum(kv_len, q_start + t + 1)
    else:
        n = jnp.broadcast_to(kv_len, (len(meta), tq))
    return jnp.where(t < q_len, jnp.maximum(n, 0), 0)


def _attend_reference(q, k, v, meta, *, causal, c, cfg):
    """Plain-jnp two-level online softmax, invariant by construction (see the module docstring).

    No dot and no XLA reduction over a summed axis: products are elementwise (behind an
    optimization barrier, so no FMA can fuse them into the sums), sums are fixed pairwise trees,
    blocks and splits run in sequential scans at absolute positions, and the softmax arithmetic
    is the kernel's.
    """
    nb, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    bk, split = cfg.block_k, cfg.split_size
    n_splits = -(-tk // split)
    per_split = split // bk
    rows = tq * group
    qf = exact_f32(q).reshape(nb, tq, hkv, group, d).transpose(0, 2, 1, 3, 4)
    qf = qf.reshape(nb, hkv, rows, d)
    n = jnp.repeat(_row_counts(meta, tq, causal), group, axis=1)[:, None, :]  # [B, 1, rows]
    kv_ok = (jnp.arange(tk)[None, :] < meta[:, 2:3])[:, :, None, None]  # [B, Tk, 1, 1]

    def blocks(x):  # [B, Tk, Hkv, D] -> [n_splits, per_split, B, Hkv, bk, D], zero past kv_len
        x = jnp.where(kv_ok, exact_f32(x), 0.0)
        x = jnp.pad(x, ((0, 0), (0, n_splits * split - tk), (0, 0), (0, 0)))
        return x.reshape(nb, n_splits, per_split, bk, hkv, d).transpose(1, 2, 0, 4, 3, 5)

    p_dtype = q.dtype

    def block(state, xs):
        k_blk, v_blk, k0 = xs  # [B, Hkv, bk, D] x2, scalar
        prod = lax.optimization_barrier(qf[:, :, :, None, :] * k_blk[:, :, None, :, :])
        s = _tree_sum(prod, -1) * c  # [B, Hkv, rows, bk]
        keys = k0 + jnp.arange(bk, dtype=jnp.int32)
        # Materialised, so ``s * c`` is rounded before ``s - m`` whatever XLA fuses (no FMA).
        s = lax.optimization_barrier(jnp.where(keys < n[..., None], s, _NEG_INF))

        def pv(p):  # [B, Hkv, rows, bk] -> [B, Hkv, rows, D]
            p = exact_f32(p.astype(p_dtype))
            return _tree_sum(lax.optimization_barrier(p[..., None] * v_blk[:, :, None]), -2)

        return _online_step(state, s, k0 < n, pv, functools.partial(_tree_sum, axis=-1)), None

    def split_step(state, xs):
        k_s, v_s, j = xs
        k0s = j * split + jnp.arange(per_split, dtype=jnp.int32) * bk
        part, _ = lax.scan(block, _init_state(n.shape[:1] + (hkv, rows), d), (k_s, v_s, k0s))
        return _fold(state, part, j * split < n), None

    state, _ = lax.scan(
        split_step,
        _init_state((nb, hkv, rows), d),
        (blocks(k), blocks(v), jnp.arange(n_splits, dtype=jnp.int32)),
    )
    out = _finalize(state).reshape(nb, hkv, tq, group, d).transpose(0, 2, 1, 3, 4)
    return out.reshape(nb, tq, hq, d).astype(q.dtype)


def _attend_xla(q, k, v, meta, *, causal, scale):
    """XLA's default: einsum + jax.nn.softmax with a mask (promises nothing)."""
    nb, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    qg = q.reshape(nb, tq, hkv, group, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    n = _row_counts(meta, tq, causal)  # [B, Tq]
    mask = (jnp.arange(tk)[None, None, :] < n[:, :, None])[:, None, None]  # [B, 1, 1, Tq, Tk]
    p = jax.nn.softmax(jnp.where(mask, s, jnp.finfo(jnp.float32).min), axis=-1)
    p = jnp.where(mask, p, 0.0).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v, preferred_element_type=jnp.float32)
    return out.reshape(nb, tq, hq, d).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("lens", "causal", "scale", "impl", "cfg", "key"))
def _attend(q, k, v, lengths, *, lens, causal, scale, impl, cfg, key):
    """The one core op: ``lengths`` (a tuple of int32 [B]) read as ``lens`` says; ``key``
    (``be.trace_key()``) only keys the jit cache."""
    del key
    c = scale * _LOG2E  # scores in the log2 domain: exp2 everywhere
    if impl == "pallas" and cfg.kernel == "mosaic":
        return _attend_mosaic(q, k, v, lengths, lens=lens, causal=causal, c=c, cfg=cfg)
    if impl == "pallas":
        return _attend_pallas(q, k, v, lengths, lens=lens, causal=causal, c=c, cfg=cfg)
    meta = lens.stacked(lengths, q.shape[0])
    if impl == "reference":
        return _attend_reference(q, k, v, meta, causal=causal, c=c, cfg=cfg)
    return _attend_xla(q, k, v, meta, causal=causal, scale=scale)


# -------------------------------------------------------------------------------------- validation


def _check_qkv(op: str, q, k, v, k_name: str, v_name: str):
    names = ("q", k_name, v_name)
    for name, x in zip(names, (q, k, v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{op}: {name} must be an array, got {type(x).__name__}")
        _checks.check_float(op, name, x)
    shapes = f"q {tuple(q.shape)}, {k_name} {tuple(k.shape)}, {v_name} {tuple(v.shape)}"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"{op}: expected q [B, Tq, Hq, D] and {k_name}/{v_name} [B, Tk, Hkv, D] (rank 4), "
            f"got {shapes}"
        )
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"{op}: {k_name} and {v_name} must have the same shape, got {shapes}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: batch sizes differ (q has {q.shape[0]}, {k_name} has "
                         f"{k.shape[0]}): {shapes}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: head dims differ (q has D={q.shape[3]}, {k_name} has "
                         f"D={k.shape[3]}): {shapes}")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"{op}: head dim D={q.shape[3]} is not supported (use one of "
                         f"{HEAD_DIMS}): {shapes}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"{op}: query heads Hq={q.shape[2]} must be a multiple of KV heads "
            f"Hkv={k.shape[2]}: {shapes}"
        )
    dtype = jnp.dtype(jnp.result_type(q, k, v))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), dtype


def _concrete(x) -> np.ndarray | None:
    """The values of ``x`` when known at trace time, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _check_lengths(op: str, name: str, x, batch: int, lo: int, hi: int | None, hint: str):
    """Integer ``[B]`` array; static values (when known) must lie in ``[lo, hi]``."""
    if not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{op}: {name} must be an integer array, got dtype {x.dtype} "
                        f"(shape {tuple(x.shape)})")
    _checks.check_shape(op, name, x, (batch,), f"one entry per batch row, B={batch}")
    vals = _concrete(x)
    if vals is not None and vals.size:
        bad = (vals < lo) | (vals > hi) if hi is not None else vals < lo
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{op}: {name}[{i}]={int(vals[i])} is out of range [{lo}, "
                             f"{hi if hi is not None else 'inf'}] ({hint})")
    return x.astype(jnp.int32)


def _resolve(op: str, config, scale, d: int, dtype) -> tuple[AttentionConfig, float]:
    if config is None:
        config = attention_config(d, dtype)
    elif not isinstance(config, AttentionConfig):
        raise TypeError(f"{op}: config must be an AttentionConfig or None, got "
                        f"{type(config).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, jax.core.Tracer):
        raise TypeError(f"{op}: scale must be a static Python number, got a traced value")
    try:
        scale = float(scale)
    except TypeError as e:
        raise TypeError(f"{op}: scale must be a Python number, got {scale!r}") from e
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale={scale} must be finite")
    return config, scale


# -------------------------------------------------------------------------------------- public API


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    scale: float | None = None,
    q_offset: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    implementation: str | None = None,
    config: AttentionConfig | None = None,
) -> jax.Array:
    """Batch-invariant (flash) attention: ``softmax(q k^T * scale + mask) v``.

    Args:
      q: ``[B, Tq, Hq, D]`` queries.
      k, v: ``[B, Tk, Hkv, D]`` keys and values, ``Hq % Hkv == 0`` (GQA/MQA).
      causal: query ``i`` sees keys ``<= its position``; the queries are the last ``Tq`` positions
        (query ``i`` sits at ``Tk - Tq + i``, or ``q_offset[b] + i``). Queries whose position is
        negative see no key and give zeros.
      scale: static softmax scale (default ``1/sqrt(D)``).
      q_offset: optional int ``[B]``, absolute position of query 0 of each row (causal only).
      kv_lengths: optional int ``[B]``, valid keys per row (padded batches); keys at and past it are
        never read into the result (they may hold anything, NaN included). Traced values past
        ``[0, Tk]`` are clipped.
      implementation: None (Pallas on GPU, reference elsewhere), "pallas", "reference" or "xla".
      config: an ``AttentionConfig`` (default ``attention_config(D, dtype)``); its numerics fields
        must match between calls whose bits you compare.

    Returns:
      ``[B, Tq, Hq, D]`` in the promoted input dtype; rows with no valid key are zeros.

    Invariance: a token's output depends only on its own query, its row's keys/values up to its
    ``n`` and the config: not on the batch, its position in the batch, ``Tk`` beyond ``n``, or how
    the sequence was sliced into calls of ``attention``/``decode_attention`` (module docstring).
    """
    impl = be.resolve_implementation(implementation, "attention")
    q, k, v, dtype = _check_qkv("attention", q, k, v, "k", "v")
    nb, tq, _, d = q.shape
    tk = k.shape[1]
    cfg, scale = _resolve("attention", config, scale, d, dtype)
    lengths = []
    if kv_lengths is not None:
        lengths.append(_check_lengths("attention", "kv_lengths", kv_lengths, nb, 0, tk,
                                      f"k has Tk={tk} positions"))
    if q_offset is not None:
        if not causal:
            raise ValueError("attention: q_offset only applies to causal attention (causal=True)")
        lengths.append(_check_lengths("attention", "q_offset", q_offset, nb, -(2**30), None,
                                      "absolute position of query 0"))
    if nb == 0 or tq == 0 or tk == 0:
        return jnp.zeros(q.shape, dtype)
    lens = _Lens(decode=False, has_kv=kv_lengths is not None, has_q=q_offset is not None, tq=tq,
                 tk=tk)
    return _attend(q, k, v, tuple(lengths), lens=lens, causal=bool(causal), scale=scale,
                   impl=impl, cfg=cfg, key=be.trace_key())


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    q_lengths: jax.Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    config: AttentionConfig | None = None,
) -> jax.Array:
    """Batch-invariant attention of new tokens over a KV cache (decode and chunked prefill).

    Args:
      q: ``[B, Tq, Hq, D]`` new tokens (``Tq = 1``: decode; ``Tq > 1``: a prefill chunk, causal
        within it).
      k_cache, v_cache: ``[B, S, Hkv, D]``, already holding the new tokens at their positions.
      lengths: int ``[B]``, valid cache tokens of each row (``0 <= lengths <= S``); slots at and
        past it are never read into the result.
      q_lengths: optional int ``[B]``, valid new tokens of each row (``<= Tq`` and ``<= lengths``;
        default ``Tq``): new token ``j`` of row ``b`` sits at ``lengths[b] - q_lengths[b] + j``, so
        one batch mixes decoding rows (``q_lengths = 1``) and prefilling rows.
      scale, implementation, config: as ``attention``.

    Returns:
      ``[B, Tq, Hq, D]``; padding query rows (``j >= q_lengths[b]``) and rows with ``lengths == 0``
      are zeros.

    Traced ``lengths``/``q_lengths`` cannot be range-checked: values past the ranges are clipped
    (``lengths`` to ``[0, S]``, ``q_lengths`` to ``[0, Tq]``). Invariance: as ``attention``: a token
    gives the same bits here as in a full ``attention`` prefill, for any cache capacity ``S``.
    """
    impl = be.resolve_implementation(implementation, "decode_attention")
    q, k_cache, v_cache, dtype = _check_qkv("decode_attention", q, k_cache, v_cache, "k_cache",
                                            "v_cache")
    nb, tq, _, d = q.shape
    cap = k_cache.shape[1]
    cfg, scale = _resolve("decode_attention", config, scale, d, dtype)
    kv_len = _check_lengths("decode_attention", "lengths", lengths, nb, 0, cap,
                            f"the cache holds S={cap} slots")
    arrays = (kv_len,)
    if q_lengths is not None:
        q_len = _check_lengths("decode_attention", "q_lengths", q_lengths, nb, 0, tq,
                               f"q has Tq={tq} tokens")
        ql, kl = _concrete(q_len), _concrete(kv_len)
        if ql is not None and kl is not None and (ql > kl).any():
            i = int(np.argmax(ql > kl))
            raise ValueError(f"decode_attention: q_lengths[{i}]={int(ql[i])} exceeds "
                             f"lengths[{i}]={int(kl[i])} (the cache must hold the new tokens)")
        arrays = (kv_len, q_len)
    if nb == 0 or tq == 0 or cap == 0:
        return jnp.zeros(q.shape, dtype)
    lens = _Lens(decode=True, has_kv=True, has_q=q_lengths is not None, tq=tq, tk=cap)
    return _attend(q, k_cache, v_cache, arrays, lens=lens, causal=True, scale=scale, impl=impl,
                   cfg=cfg, key=be.trace_key())


def attention_reference(q, k, v, *, causal=True, scale=None, q_offset=None, kv_lengths=None,
                        config=None) -> jax.Array:
    """The plain-jnp path of ``attention`` (invariant by construction on every backend)."""
    return attention(q, k, v, causal=causal, scale=scale, q_offset=q_offset,
                     kv_lengths=kv_lengths, implementation="reference", config=config)


def decode_attention_reference(q, k_cache, v_cache, lengths, *, q_lengths=None, scale=None,
                               config=None) -> jax.Array:
    """The plain-jnp path of ``decode_attention`` (invariant by construction on every backend)."""
    return decode_attention(q, k_cache, v_cache, lengths, q_lengths=q_lengths, scale=scale,
                            implementation="reference", config=config)
