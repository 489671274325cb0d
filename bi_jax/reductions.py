"""Batch-invariant reductions over one axis: ``softmax``, ``log_softmax``, ``sum`` and ``mean``.

Shapes:
  ``softmax(x, axis)`` / ``log_softmax(x, axis)``: x ``[...]`` -> the same shape, normalised along
  ``axis`` (an int or a tuple of ints, reduced together).
  ``sum(x, axis)`` / ``mean(x, axis)``: x ``[...]`` -> x's shape without ``axis`` (kept as size 1
  with ``keepdims=True``); ``axis=None`` reduces every axis.
  Internally every op works on a ``[rows, n]`` view: the reduced axes are moved last (a transpose
  when they are not already last) and flattened into ``n``; the other axes are flattened into rows.

Dtypes: bfloat16, float16 and float32 inputs; statistics and sums in float32. ``softmax`` and
``log_softmax`` return x's dtype; ``sum``/``mean`` return ``dtype`` (default: x's dtype, as
``jnp.sum``/``jnp.mean``).

Invariance:
  The Pallas kernels give each program ``block_rows`` whole rows and walk the reduced axis in
  ascending blocks of a fixed ``block`` (``RowConfig``). Rows up to ``MAX_SINGLE_BLOCK`` elements
  are one block: loaded once, reduced and written from registers. Longer rows (LLM vocabularies)
  take several blocks in a fixed order: ``sum``/``mean`` add the blocks lane by lane into one fp32
  block accumulator and reduce it once at the end. ``softmax``/``log_softmax`` cut longer rows into
  ``SPLIT_BLOCK`` pieces, each reduced on its own at every row count (so a single row of a 128k
  vocabulary still fills the GPU): a first kernel writes each piece's (max, sum of exp), a second
  combines the row's pieces with one fixed tree and writes its pieces. A program takes 1-8 pieces
  one after the other, by the row count (``_blocks_per_program``; no numerics). The config (block,
  rows per program, warps) is a function of ``n`` and the dtype only (``row_config``,
  ``softmax_config``), never of the row count, and no row ever shares a reduction with another, so
  row ``i`` of the output has the same bits whatever the other rows and the number of rows. The
  block and the warp count *are* part of the numerics (they fix the reduction tree), which is why
  they may not follow the row count.

  The reference path (``fixed_order_reduce``) pads the reduced axis with the reduction's identity to
  a multiple of ``REF_CHUNK`` lanes, adds (or maxes) the chunks into a ``[..., REF_CHUNK]`` fp32
  accumulator sequentially in a ``fori_loop`` and folds the lanes with a fixed pairwise tree of
  elementwise ops. Every step is elementwise, so nothing XLA chooses per shape (``jnp.sum`` picks a
  reduction strategy per shape, even on the CPU) can reorder it: invariant by construction on every
  backend. ``implementation="xla"`` (``jax.nn.softmax``, ``jnp.sum``, ...) promises nothing.

Gradients: custom VJPs in plain jnp (``softmax``: ``y * (g - sum(g * y))``, ``log_softmax``:
``g - exp(y) * sum(g)``, ``sum``/``mean``: a broadcast), shared by the Pallas and reference paths,
with every row sum done by ``fixed_order_reduce``: row gradients are batch-invariant by
construction.

Non-finite inputs stay in their row: a row holding NaN (or +inf, for softmax) gives NaN in that row
only; ``-inf`` logits are masked positions (probability 0); a row of only ``-inf`` gives NaN, as
``jax.nn.softmax``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bi_jax import _backend as be
from bi_jax import _checks

__all__ = [
    "MAX_SINGLE_BLOCK",
    "REF_CHUNK",
    "RowConfig",
    "fixed_order_reduce",
    "log_softmax",
    "log_softmax_reference",
    "mean",
    "mean_reference",
    "row_config",
    "shipped_configs",
    "softmax",
    "softmax_config",
    "softmax_reference",
    "sum",
    "sum_reference",
]

_F32 = jnp.float32
_NEG_INF = float("-inf")

# ------------------------------------------------------------------------------------------ config

MAX_SINGLE_BLOCK = 16384  # rows up to this length are one block, held in registers
SPLIT_BLOCK = 2048  # softmax of longer rows: elements per block (reduced on its own), any dtype
_MIN_BLOCK = 16
_TILE_ELEMENTS = 1024  # short rows: programs take several rows, at least this many elements
_LONG_BLOCK = {jnp.dtype(jnp.bfloat16): 8192, jnp.dtype(jnp.float16): 8192,
               jnp.dtype(jnp.float32): 4096}  # 16 KiB of input per block


@dataclasses.dataclass(frozen=True)
class RowConfig:
    """Launch shape of the row kernels (softmax, sums, norms): part of the numerics.

    ``block`` elements of the reduced axis per step and ``num_warps`` fix the in-kernel reduction
    tree, ``block_rows`` rows per program each reduce independently with the same code. Choose them
    from the row length and dtype only (``row_config``); never from the row count. ``num_stages``
    (software pipelining of the block loop) does not change the bits.
    """

    block: int
    block_rows: int = 1
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        for name in ("block", "block_rows"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"RowConfig.{name}={v} must be a power of two")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"RowConfig.num_warps={self.num_warps} must be 1, 2, 4, 8, 16 or 32")
        if self.num_stages < 1:
            raise ValueError(f"RowConfig.num_stages={self.num_stages} must be >= 1")


def row_config(n: int, dtype: Any) -> RowConfig:
    """The launch policy: a function of the reduced length ``n`` and the dtype only."""
    dtype = jnp.dtype(dtype)
    if n > MAX_SINGLE_BLOCK:
        return RowConfig(block=_LONG_BLOCK[dtype], block_rows=1, num_warps=8, num_stages=2)
    block = max(_MIN_BLOCK, 1 << max(n - 1, 0).bit_length())
    block_rows = max(1, _TILE_ELEMENTS // block)
    num_warps = 4 if block <= 2048 else 8 if block <= 4096 else 16
    return RowConfig(block=block, block_rows=block_rows, num_warps=num_warps, num_stages=1)


def shipped_configs(dtype: Any) -> tuple[tuple[int, RowConfig], ...]:
    """One ``(n, config)`` per config ``row_config`` can choose for ``dtype`` (for lowering tests).

    ``n`` is a ragged row length that selects the config (so the edge masks are exercised too).
    """
    out: dict[RowConfig, int] = {}
    b = _MIN_BLOCK
    while b <= MAX_SINGLE_BLOCK:
        n = max(1, b - 3) if b > _MIN_BLOCK else 5
        out.setdefault(row_config(n, dtype), n)
        b *= 2
    out.setdefault(row_config(32000, dtype), 32000)
    return tuple((n, cfg) for cfg, n in out.items())


# --------------------------------------------------------------------------- kernel building blocks


def load_tile(ref, r0, c0, *, rows, n, block_rows, block, other):
    """``ref[r0:r0+block_rows, c0:c0+block]`` of a ``[rows, n]`` ref, masked at both edges."""
    row_ok = (r0 + jnp.arange(block_rows)) < rows
    col_ok = (c0 + jnp.arange(block)) < n
    mask = row_ok[:, None] & col_ok[None, :]
    tile = be.load(ref.at[be.ds(r0, block_rows), be.ds(c0, block)], mask=mask, other=other)
    return tile, mask


def store_tile(ref, r0, c0, value, mask, *, block_rows, block):
    """Masked store of a ``[block_rows, block]`` tile (mask from ``load_tile``)."""
    be.store(ref.at[be.ds(r0, block_rows), be.ds(c0, block)], value.astype(ref.dtype), mask=mask)


def load_vector(ref, c0, *, n, block):
    """``ref[c0:c0+block]`` of an ``[n]`` ref (weights, biases) as an fp32 ``[1, block]`` row."""
    ok = (c0 + jnp.arange(block)) < n
    return be.load(ref.at[be.ds(c0, block)], mask=ok, other=0.0).astype(_F32)[None, :]


def write_tiles(rows: int, config: RowConfig, n: int) -> int:
    """Column tiles the output of a one-block row is written in (no numerics: the launch only).

    Few rows leave most SMs idle and each program writes a whole row after its reduction. With
    ``t`` tiles, ``t`` programs per row each reduce the whole row (the same code, so the same
    statistics, bit for bit) and write ``block / t`` of its columns, reloaded from memory. Up to 64
    rows: 64 / rows tiles, at least 2 and at most 8, of at least 512 columns. In a probe on an
    H100 (rms_norm and layer_norm over 8192 bf16 columns, 1-16 tiles, 2026-11-25) the fastest
    tile counts at 4-64 rows made 32-128 programs in all; at 128 rows one tile was fastest for
    layer_norm and within 4% for rms_norm.
    """
    if n > config.block or config.block_rows > 1 or rows > 64:
        return 1
    t = min(8, max(2, 64 // rows), config.block // 512)
    return 1 << (max(t, 1).bit_length() - 1)  # a power of two (it divides the block)


def launch_rows(kernel, operands, out_shape, *, rows, config, name, tiles=1, **params):
    """Run ``kernel`` over ``[rows, n]`` operands: ``cdiv(rows, block_rows)`` x ``tiles`` programs
    (``tiles > 1``: program ``(i, j)`` writes column tile ``j``, see ``write_tiles``)."""
    if tiles > 1:
        params["tiles"] = tiles
    call = be.pallas_call(
        functools.partial(
            kernel, rows=rows, block_rows=config.block_rows, block=config.block, **params
        ),
        out_shape=out_shape,
        grid=(be.cdiv(rows, config.block_rows), tiles),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        name=name,
    )
    return call(*operands)


# ----------------------------------------------------------------------------------------- kernels


def _softmax_kernel(x_ref, o_ref, *, rows, n, block_rows, block, log):
    """``block_rows`` rows of x ``[rows, n]`` -> softmax (log_softmax) rows of o ``[rows, n]``."""
    r0 = be.program_id(0) * block_rows
    tile = functools.partial(load_tile, rows=rows, n=n, block_rows=block_rows, block=block,
                             other=_NEG_INF)
    put = functools.partial(store_tile, o_ref, r0, block_rows=block_rows, block=block)
    assert n <= block, "longer rows take the (row, block) kernels"
    x, mask = tile(x_ref, r0, 0)  # [block_rows, block]: the whole row in registers
    x = x.astype(_F32)
    z = x - _shift_of(jnp.max(x, axis=1, keepdims=True))
    e = jnp.exp(z)
    s = jnp.sum(e, axis=1, keepdims=True)  # [block_rows, 1]
    put(0, z - jnp.log(s) if log else e / s, mask)


def _shift_of(m):
    """exp(x - shift) with shift 0 where the max is -inf (rows or blocks of only -inf): no inf - inf."""
    return jnp.where(m == _NEG_INF, 0.0, m)


def _block_stats_kernel(x_ref, m_ref, s_ref, *, n, block, num_blocks, per_program):
    """Program (row, g): max and sum of exp(x - max) of blocks ``g * per_program ..`` of the row,
    each block (``[1, block]``) on its own (a block past the row's last is skipped).

    Grid axis 0 has exactly one entry per row, so only the column edge needs a mask
    (``rows=row + 1`` below marks the program's own row valid).
    """
    row, g = be.program_id(0), be.program_id(1)
    for p in range(per_program):
        j = g * per_program + p
        x = load_tile(x_ref, row, j * block, rows=row + 1, n=n, block_rows=1, block=block,
                      other=_NEG_INF)[0].astype(_F32)
        m = jnp.max(x, axis=1, keepdims=True)  # [1, 1]
        s = jnp.sum(jnp.exp(x - _shift_of(m)), axis=1, keepdims=True)
        ok = jnp.full((1, 1), j < num_blocks)
        be.store(m_ref.at[be.ds(row, 1), be.ds(j, 1)], m, mask=ok)
        be.store(s_ref.at[be.ds(row, 1), be.ds(j, 1)], s, mask=ok)


def _block_write_kernel(x_ref, m_ref, s_ref, o_ref, *, n, block, num_blocks, stats_len, log,
                        per_program):
    """Program (row, g): combine the row's block stats (fixed tree), write blocks
    ``g * per_program ..`` of the output."""
    row, g = be.program_id(0), be.program_id(1)
    ok = (jnp.arange(stats_len) < num_blocks)[None, :]
    mb = be.load(m_ref.at[be.ds(row, 1), be.ds(0, stats_len)], mask=ok, other=_NEG_INF)
    sb = be.load(s_ref.at[be.ds(row, 1), be.ds(0, stats_len)], mask=ok, other=0.0)
    shift = _shift_of(jnp.max(mb, axis=1, keepdims=True))  # [1, 1]
    s = jnp.sum(sb * jnp.exp(mb - shift), axis=1, keepdims=True)
    for p in range(per_program):
        c0 = (g * per_program + p) * block
        x, mask = load_tile(x_ref, row, c0, rows=row + 1, n=n, block_rows=1, block=block,
                            other=_NEG_INF)
        z = x.astype(_F32) - shift
        store_tile(o_ref, row, c0, z - jnp.log(s) if log else jnp.exp(z) / s, mask,
                   block_rows=1, block=block)


def _sum_kernel(x_ref, o_ref, *, rows, n, block_rows, block, divide):
    """``block_rows`` rows of x ``[rows, n]`` -> their sums (means) in o ``[rows]``."""
    r0 = be.program_id(0) * block_rows
    tile = functools.partial(load_tile, x_ref, r0, rows=rows, n=n, block_rows=block_rows,
                             block=block, other=0.0)
    num_blocks = -(-n // block)
    acc = tile(0)[0].astype(_F32)  # [block_rows, block]: lane-wise fp32 accumulator
    if num_blocks > 1:
        acc = lax.fori_loop(1, num_blocks, lambda i, a: a + tile(i * block)[0].astype(_F32), acc)
    total = jnp.sum(acc, axis=1)  # [block_rows]
    if divide:
        total = total / n
    row_ok = (r0 + jnp.arange(block_rows)) < rows
    be.store(o_ref.at[be.ds(r0, block_rows)], total.astype(o_ref.dtype), mask=row_ok)


# --------------------------------------------------------------------------------------- launchers


def softmax_config(n: int, dtype: Any) -> RowConfig:
    """Launch policy of ``softmax``/``log_softmax``: ``row_config`` for rows that fit one block;
    longer rows (vocabularies) are cut into ``SPLIT_BLOCK`` pieces (``_blocks_per_program``)."""
    if n > MAX_SINGLE_BLOCK:
        return RowConfig(block=SPLIT_BLOCK, block_rows=1, num_warps=4, num_stages=1)
    return row_config(n, dtype)


def _softmax_pallas(x2, *, log, config):
    """x ``[rows, n]`` -> softmax / log_softmax ``[rows, n]`` in x's dtype."""
    rows, n = x2.shape
    cfg = config or softmax_config(n, x2.dtype)
    name = "bi_jax_log_softmax" if log else "bi_jax_softmax"
    if n <= cfg.block:
        return launch_rows(
            _softmax_kernel, (x2,), jax.ShapeDtypeStruct(x2.shape, x2.dtype), rows=rows,
            config=cfg, name=name, n=n, log=log,
        )
    # Rows longer than one block, at any row count: kernel 1 writes each block's (max, sum of exp);
    # kernel 2 combines a row's stats and writes its blocks. A program takes ``per`` blocks.
    num_blocks = be.cdiv(n, cfg.block)
    stats = jax.ShapeDtypeStruct((rows, num_blocks), _F32)
    per = _blocks_per_program(rows, num_blocks)
    m, s = be.pallas_call(
        functools.partial(_block_stats_kernel, n=n, block=cfg.block, num_blocks=num_blocks,
                          per_program=per),
        out_shape=(stats, stats), grid=(rows, be.cdiv(num_blocks, per)), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, name=name + "_stats",
    )(x2)
    return be.pallas_call(
        functools.partial(_block_write_kernel, n=n, block=cfg.block, num_blocks=num_blocks,
                          stats_len=1 << (num_blocks - 1).bit_length(), log=log, per_program=per),
        out_shape=jax.ShapeDtypeStruct(x2.shape, x2.dtype), grid=(rows, be.cdiv(num_blocks, per)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, name=name,
    )(x2, m, s)


def _blocks_per_program(rows: int, num_blocks: int) -> int:
    """Blocks of a long row that one program of the split softmax kernels takes, one after the
    other (no numerics: each block is reduced, or written, as by a program of its own): 8 where
    that leaves at least 64 programs per SM, else the most of 4 / 2 / 1 that leaves 12.
    H100, log_softmax over 128256 bf16 columns (63 blocks), 2026-11-25, bits equal; time with
    1 / 2 / 4 / 8 blocks per program (min of 3 rounds where given): 8192 rows 2.40 / 2.31 / 2.26 /
    2.23 ms; 2048 rows 574 / 572 / 563 / 562 us; 1024 rows 288 / 286 / 284 / 286; 512 rows 146 /
    145 / 145 / 147; 256 rows 75.7 / 75.3 / 75.3 / 78.1; 128 rows 38.1 / 37.6 / 38.0 / 38.3; 64
    rows 18.9 / 17.0 / 17.6 / 20.6."""
    per = 8
    while per > 1 and rows * be.cdiv(num_blocks, per) < (64 if per == 8 else 12) * be.sm_count():
        per //= 2
    return per


def _sum_pallas(x2, *, divide, out_dtype, config):
    """x ``[rows, n]`` -> row sums (means) ``[rows]`` in ``out_dtype``."""
    rows, n = x2.shape
    cfg = config or row_config(n, x2.dtype)
    return launch_rows(
        _sum_kernel, (x2,), jax.ShapeDtypeStruct((rows,), out_dtype), rows=rows, config=cfg,
        name="bi_jax_mean" if divide else "bi_jax_sum", n=n, divide=divide,
    )


# --------------------------------------------------------------------------------------- reference

REF_CHUNK = 256  # lanes of the reference accumulator

_IDENTITY = {"sum": 0.0, "max": _NEG_INF}
_COMBINE = {"sum": jnp.add, "max": jnp.maximum}


def exact_f32(x: jax.Array) -> jax.Array:
    """``x`` in fp32, holding exactly the values of its own (possibly narrower) dtype.

    XLA may keep excess precision across a ``bf16 -> f32`` convert pair inside a fusion
    (``xla_allow_excess_precision``), and which converts it elides depends on the fusion, hence on
    the shape. An optimization barrier on the 16-bit value makes it exist as rounded 16-bit data, so
    the reference paths see the same values whatever the batch. (``lax.reduce_precision`` would also
    pin the rounding but flushes float16 subnormals to zero.) A plain convert for fp32 inputs.
    """
    if x.dtype in (jnp.bfloat16, jnp.float16):
        x = lax.optimization_barrier(x)
    return x.astype(_F32)


def pad_lanes(x: jax.Array, fill: float) -> jax.Array:
    """Pad the last axis of ``x`` with ``fill`` to a multiple of ``REF_CHUNK``."""
    n = x.shape[-1]
    padded = -(-max(n, 1) // REF_CHUNK) * REF_CHUNK
    if padded == n:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded - n)], constant_values=fill)


def fixed_order_reduce(x: jax.Array, kind: str = "sum") -> jax.Array:
    """Reduce the last axis of ``x`` (cast to fp32) in one fixed order: ``[..., n] -> [...]``.

    The axis is padded with the identity (0 for "sum", -inf for "max") to ``c * REF_CHUNK`` lanes,
    the ``c`` chunks are combined one after the other into a ``[..., REF_CHUNK]`` accumulator, and
    the lanes are folded by a pairwise tree (``acc[..., :h] op acc[..., h:]``). Only elementwise
    operations: each output depends on its own row alone, in an order fixed by ``n``, on every
    backend. Pass an argument that is already computed (``x * x``, ``exp(z)``): the reduction only
    reads it.
    """
    if kind not in _COMBINE:
        raise ValueError(f"fixed_order_reduce: kind must be 'sum' or 'max', got {kind!r}")
    op = _COMBINE[kind]
    xp = pad_lanes(exact_f32(x), _IDENTITY[kind])
    chunks = xp.reshape(*xp.shape[:-1], xp.shape[-1] // REF_CHUNK, REF_CHUNK)  # [..., c, C]
    acc = chunks[..., 0, :]
    if chunks.shape[-2] > 1:
        acc = lax.fori_loop(
            1,
            chunks.shape[-2],
            lambda i, a: op(a, lax.dynamic_index_in_dim(chunks, i, axis=-2, keepdims=False)),
            acc,
        )
    width = REF_CHUNK
    while width > 1:
        width //= 2
        acc = op(acc[..., :width], acc[..., width:])
    return acc[..., 0]


def row_map(f, *stats: jax.Array) -> jax.Array:
    """``f(*stats)`` for per-row statistics ``[...]`` (outputs of ``fixed_order_reduce``), computed
    on ``REF_CHUNK``-wide rows so every value sits at the same vector lane whatever the row count.

    XLA:CPU's divide, rsqrt, exp and log give position-dependent bits on short arrays (vector body
    vs remainder; measured: ``(a / 5000)[9] != (a[9:] / 5000)[0]`` for some float32 ``a`` of 10
    elements): on a ``[rows]`` array that makes a row's statistic depend on the number of rows.
    The broadcast is materialised (an optimization barrier), so XLA cannot move ``f`` before it.
    """
    wide = lax.optimization_barrier(
        tuple(jnp.broadcast_to(s[..., None], (*s.shape, REF_CHUNK)) for s in stats)
    )
    return f(*wide)[..., 0]


def _softmax_ref(x2, *, log):
    """x ``[rows, n]`` -> softmax / log_softmax rows, invariant by construction."""
    n = x2.shape[-1]
    x = pad_lanes(exact_f32(x2), _NEG_INF)  # exp and log run on whole chunks
    m = lax.stop_gradient(fixed_order_reduce(x, "max")[:, None])
    z = x - jnp.where(m == _NEG_INF, 0.0, m)
    e = jnp.exp(z)
    s = fixed_order_reduce(e, "sum")
    out = z - row_map(jnp.log, s)[:, None] if log else e / s[:, None]
    return out[:, :n].astype(x2.dtype)


def _sum_ref(x2, *, divide, out_dtype):
    total = fixed_order_reduce(x2, "sum")
    if divide:
        total = row_map(lambda t: t / x2.shape[-1], total)
    return total.astype(out_dtype)


# -------------------------------------------------------------------------- canonical ops with VJP
#
# The kernels have no backward pass of their own: the gradients below are plain jnp, with every row
# reduction done by ``fixed_order_reduce``, so the gradient of a row is batch-invariant by
# construction too (autodiff of the reference would transpose its broadcasts into XLA reductions).


def _row_sum(x):
    return fixed_order_reduce(x, "sum")[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _softmax_rows(x2, log, impl, config):
    """x ``[rows, n]`` -> softmax / log_softmax rows (the op behind the public functions)."""
    if impl == "pallas":
        return _softmax_pallas(x2, log=log, config=config)
    return _softmax_ref(x2, log=log)


def _softmax_rows_fwd(x2, log, impl, config):
    y = _softmax_rows(x2, log, impl, config)
    return y, y


def _softmax_rows_bwd(log, impl, config, y, g):
    del impl, config
    y32, g32 = exact_f32(y), exact_f32(g)
    if log:
        dx = g32 - jnp.exp(y32) * _row_sum(g32)
    else:
        dx = y32 * (g32 - _row_sum(g32 * y32))
    return (dx.astype(y.dtype),)


_softmax_rows.defvjp(_softmax_rows_fwd, _softmax_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _sum_rows(x2, divide, out_dtype, impl, config):
    """x ``[rows, n]`` -> row sums (means) ``[rows]`` in ``out_dtype``."""
    if impl == "pallas":
        return _sum_pallas(x2, divide=divide, out_dtype=out_dtype, config=config)
    return _sum_ref(x2, divide=divide, out_dtype=out_dtype)


def _sum_rows_fwd(x2, divide, out_dtype, impl, config):
    # The residual is an empty row of x's dtype and length: the backward needs only n and dtype.
    return _sum_rows(x2, divide, out_dtype, impl, config), jnp.zeros((0, x2.shape[1]), x2.dtype)


def _sum_rows_bwd(divide, out_dtype, impl, config, like, g):
    del out_dtype, impl, config
    n = like.shape[1]
    g32 = exact_f32(g)[:, None]
    if divide:
        g32 = g32 / n
    return (jnp.broadcast_to(g32, (g.shape[0], n)).astype(like.dtype),)


_sum_rows.defvjp(_sum_rows_fwd, _sum_rows_bwd)


# -------------------------------------------------------------------------------------- public API


def _axes(op: str, axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = tuple(_checks.normalize_axis(op, int(a), ndim) for a in axes)
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: repeated axis in {axis!r}")
    return out


def _to_rows(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, tuple[int, ...]]:
    """Move ``axes`` last and flatten: ``([rows, n], shape of the moved array)``."""
    k = len(axes)
    moved = jnp.moveaxis(x, axes, tuple(range(x.ndim - k, x.ndim))) if k else x
    rows, n = math.prod(moved.shape[: x.ndim - k]), math.prod(moved.shape[x.ndim - k:])
    return moved.reshape(rows, n), moved.shape


def _softmax_public(op, x, axis, implementation, config, log):
    impl = be.resolve_implementation(implementation, op)
    _checks.check_float(op, "x", x)
    axes = _axes(op, axis, x.ndim)
    if impl == "xla":
        fn = jax.nn.log_softmax if log else jax.nn.softmax
        return fn(x, axis=axes if len(axes) != 1 else axes[0])
    if x.size == 0:
        return jnp.zeros(x.shape, x.dtype)
    x2, moved_shape = _to_rows(x, axes)
    out = _softmax_rows(x2, log, impl, config)
    k = len(axes)
    return jnp.moveaxis(out.reshape(moved_shape), tuple(range(x.ndim - k, x.ndim)), axes)


def softmax(
    x: jax.Array,
    axis: int | Sequence[int] | None = -1,
    *,
    implementation: str | None = None,
    config: RowConfig | None = None,
) -> jax.Array:
    """Batch-invariant ``jax.nn.softmax``: ``exp(x - max) / sum(exp(x - max))`` along ``axis``.

    Args:
      x: bf16/fp16/fp32 array of any shape.
      axis: the normalised axis or axes (default: last; axes other than the last are moved last
        with a transpose).
      implementation: None (Pallas on GPU, reference elsewhere), "pallas", "reference" or "xla".
      config: override ``row_config`` (``RowConfig``); the bits depend on it.

    Returns: x's shape and dtype; max, exponentials and sums in fp32, rounded once.
    """
    return _softmax_public("softmax", x, axis, implementation, config, log=False)


def log_softmax(
    x: jax.Array,
    axis: int | Sequence[int] | None = -1,
    *,
    implementation: str | None = None,
    config: RowConfig | None = None,
) -> jax.Array:
    """Batch-invariant ``jax.nn.log_softmax``: ``x - max - log(sum(exp(x - max)))`` along ``axis``.

    Arguments and result as ``softmax``.
    """
    return _softmax_public("log_softmax", x, axis, implementation, config, log=True)


def _sum_public(op, x, axis, dtype, keepdims, implementation, config, divide):
    impl = be.resolve_implementation(implementation, op)
    _checks.check_float(op, "x", x)
    out_dtype = _checks.check_out_dtype(op, x.dtype if dtype is None else dtype)
    axes = _axes(op, axis, x.ndim)
    if impl == "xla":
        # The caller's dtype, not out_dtype: jnp given dtype=bf16 reduces in bf16 (and divides by n
        # rounded to bf16), while its default accumulates a bf16 input in fp32.
        fn = jnp.mean if divide else jnp.sum
        return fn(x, axis=axes, dtype=dtype, keepdims=keepdims)
    x2, moved_shape = _to_rows(x, axes)
    rows, n = x2.shape
    if rows == 0 or n == 0:
        out = jnp.full((rows,), jnp.nan if divide else 0.0, out_dtype)
    else:
        out = _sum_rows(x2, divide, out_dtype, impl, config)
    out = out.reshape(moved_shape[: x.ndim - len(axes)])
    if keepdims:
        out = jnp.expand_dims(out, axes)
    return out


def sum(  # mirrors jnp.sum (shadows the builtin inside this module)
    x: jax.Array,
    axis: int | Sequence[int] | None = -1,
    *,
    dtype: Any = None,
    keepdims: bool = False,
    implementation: str | None = None,
    config: RowConfig | None = None,
) -> jax.Array:
    """Batch-invariant ``jnp.sum`` along ``axis`` with fp32 accumulation.

    Args:
      x: bf16/fp16/fp32 array of any shape.
      axis: the reduced axis or axes (default: last; ``None``: all; others are moved last).
      dtype: output dtype (bf16/fp16/fp32; default: x's dtype, as ``jnp.sum``). The sum is always
        accumulated in fp32 and rounded once.
      keepdims: keep the reduced axes with size 1.
      implementation: None (Pallas on GPU, reference elsewhere), "pallas", "reference" or "xla".
      config: override ``row_config`` (``RowConfig``); the bits depend on it.
    """
    return _sum_public("sum", x, axis, dtype, keepdims, implementation, config, divide=False)


def mean(
    x: jax.Array,
    axis: int | Sequence[int] | None = -1,
    *,
    dtype: Any = None,
    keepdims: bool = False,
    implementation: str | None = None,
    config: RowConfig | None = None,
) -> jax.Array:
    """Batch-invariant ``jnp.mean`` along ``axis``: the fp32 sum divided by the count, rounded once.

    Arguments as ``sum``.
    """
    return _sum_public("mean", x, axis, dtype, keepdims, implementation, config, divide=True)


def softmax_reference(x: jax.Array, axis: int | Sequence[int] | None = -1) -> jax.Array:
    """The plain-jnp path of ``softmax`` (invariant by construction on every backend)."""
    return softmax(x, axis, implementation="reference")


def log_softmax_reference(x: jax.Array, axis: int | Sequence[int] | None = -1) -> jax.Array:
    """The plain-jnp path of ``log_softmax`` (invariant by construction on every backend)."""
    return log_softmax(x, axis, implementation="reference")


def sum_reference(x: jax.Array, axis: int | Sequence[int] | None = -1, *, dtype: Any = None,
                  keepdims: bool = False) -> jax.Array:
    """The plain-jnp path of ``sum`` (invariant by construction on every backend)."""
    return sum(x, axis, dtype=dtype, keepdims=keepdims, implementation="reference")


def mean_reference(x: jax.Array, axis: int | Sequence[int] | None = -1, *, dtype: Any = None,
                   keepdims: bool = False) -> jax.Array:
    """The plain-jnp path of ``mean`` (invariant by construction on every backend)."""
    return mean(x, axis, dtype=dtype, keepdims=keepdims, implementation="reference")
