"""Batch-invariant normalization: ``rms_norm`` (with a fused residual add) and ``layer_norm``.

Shapes:
  ``rms_norm(x, weight=None, residual=None)``: x ``[..., n]``, weight ``[n]``, residual x's shape ->
  ``[..., n]``; with ``residual``: the pair ``(normed, s)`` where ``s = x + residual``.
  ``layer_norm(x, weight=None, bias=None)``: x ``[..., n]``, weight and bias ``[n]`` ->
  ``[..., n]``.
  The last axis is normalised; the leading axes are rows.

Dtypes: bfloat16, float16 and float32 inputs, weights and biases (mixed freely); statistics and the
whole affine transform in fp32, the output rounded once to x's dtype:
``rms_norm = x * rsqrt(mean(x^2) + eps) * weight`` and
``layer_norm = (x - mean) * rsqrt(var + eps) * weight + bias`` with the biased variance
``mean((x - mean)^2)`` of the centred row (16-bit rows of 513-16384 columns: the same statistics
from one reduction of the row shifted by its first element, ``_shifted_stats``). The fused residual sum
``s`` is rounded to x's dtype and the norm is computed from the rounded ``s``, so both outputs
agree bit for bit with
``s = (x + residual).astype(x.dtype); rms_norm(s)`` computed unfused by the same implementation.

Invariance:
  The Pallas kernels are the row kernels of ``bi_jax.reductions``: ``block_rows`` whole rows per
  program, the row in fixed blocks of ``RowConfig.block`` (one block, read once and kept in
  registers, up to ``MAX_SINGLE_BLOCK`` = 16384 elements; otherwise the row is re-read block by
  block: two passes for rms_norm, three for layer_norm, with the statistics accumulated lane by lane
  in an fp32 block and reduced once). The config comes from ``row_config(n, dtype)``, never from the
  row count, and rows never share a reduction, so every output row has the same bits whatever the
  other rows and their number. The residual add happens in the same program that normalises the row.
  At up to 64 one-block rows, 2-8 programs per row (``reductions.write_tiles``, chosen from the row
  count: a launch choice) each run that same whole-row reduction and write one column tile;
  where a layer_norm program's registers would cost a second wave (bf16/fp16, e.g. 397-528 rows
  of 8192 columns on 132 SMs) it writes its row in reloaded pieces (``_write_parts``, also a
  launch choice: the same elementwise arithmetic).
  The reference path reduces with ``reductions.fixed_order_reduce`` (sequential chunks, fixed
  pairwise tree, elementwise only) and computes the per-row statistics lane-aligned
  (``reductions.row_map``; the product with the weight is rounded before the bias add): invariant
  by construction on every backend. ``implementation="xla"`` (``jnp.mean`` etc.) promises nothing.

Gradients: custom VJPs in plain jnp, shared by the Pallas and reference paths; the statistics are
recomputed from the saved input (or ``s``) with ``fixed_order_reduce``, so the row gradients (d x,
d residual) are batch-invariant by construction; d weight and d bias sum over the rows in a fixed
order (deterministic, not invariant: they depend on the whole batch by definition).

A row holding inf/NaN gives NaN in that row only.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bi_jax import _backend as be
from bi_jax import _checks
from bi_jax.reductions import (
    RowConfig,
    exact_f32,
    fixed_order_reduce,
    launch_rows,
    load_tile,
    load_vector,
    pad_lanes,
    row_config,
    row_map,
    store_tile,
    write_tiles,
)

__all__ = ["layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference"]

_F32 = jnp.float32

# ------------------------------------------------------------------------------------------ kernels


def _rms_norm_kernel(*refs, rows, n, block_rows, block, eps, has_weight, has_residual, tiles=1):
    """``block_rows`` rows: x, [weight], [residual] -> out, [s = x + residual] (``[rows, n]``).

    ``tiles > 1`` (one block per row): this program writes column tile ``program_id(1)``."""
    refs = list(refs)
    x_ref = refs.pop(0)
    w_ref = refs.pop(0) if has_weight else None
    r_ref = refs.pop(0) if has_residual else None
    o_ref = refs.pop(0)
    s_ref = refs.pop(0) if has_residual else None
    r0 = be.program_id(0) * block_rows
    tile = functools.partial(load_tile, r0=r0, rows=rows, n=n, block_rows=block_rows, block=block,
                             other=0.0)
    num_blocks = -(-n // block)

    def load_row(c0, write_sum, width=block):  # x (+ residual, rounded) as fp32, and its mask
        x, mask = tile(x_ref, c0=c0, block=width)  # [block_rows, width]
        if r_ref is not None:
            x = (x.astype(_F32) + tile(r_ref, c0=c0, block=width)[0].astype(_F32)).astype(
                x_ref.dtype)
            x = be.interpret_pin(x)  # XLA:CPU may drop the bf16 round trip where s is not stored
            if write_sum:
                store_tile(s_ref, r0, c0, x, mask, block_rows=block_rows, block=width)
        return x.astype(_F32), mask

    def write(c0, x, rstd, mask, width=block):
        y = x * rstd
        if w_ref is not None:
            y = y * load_vector(w_ref, c0, n=n, block=width)
        store_tile(o_ref, r0, c0, y, mask, block_rows=block_rows, block=width)

    if num_blocks == 1:  # the row in registers: read once
        x, mask = load_row(0, write_sum=tiles == 1)
        sq = be.interpret_pin(x * x)  # XLA:CPU fuses the product into the sum differently
        rstd = be.interpret_pin(lax.rsqrt(jnp.sum(sq, axis=1, keepdims=True) / n + eps))  # [rows, 1]
        if tiles == 1:
            write(0, x, rstd, mask)
        else:  # this program's columns only, reloaded: the same elementwise arithmetic
            width = block // tiles
            c0 = be.program_id(1) * width
            xt, mask_t = load_row(c0, write_sum=True, width=width)
            write(c0, xt, rstd, mask_t, width)
        return

    def sum_squares(i, acc):  # pass 1 (writes s once)
        x = load_row(i * block, write_sum=True)[0]
        return acc + x * x

    acc = lax.fori_loop(0, num_blocks, sum_squares, jnp.zeros((block_rows, block), _F32))
    rstd = lax.rsqrt(jnp.sum(acc, axis=1, keepdims=True) / n + eps)

    def normalize(i, carry):  # pass 2 (recomputes the same rounded s from x and residual)
        x, mask = load_row(i * block, write_sum=False)
        write(i * block, x, rstd, mask)
        return carry

    lax.fori_loop(0, num_blocks, normalize, 0)


def _shifted_stats(x, mask, first, *, n, eps):
    """Mean and rstd of one-block rows from one block-wide reduction: ``x [rows, block]`` fp32
    (masked columns are ignored), ``first [rows, 1]`` each row's first element -> ``[rows, 1]``.

    With ``e = x - first``, the sums of ``e`` and ``e * e`` go through one two-operand reduction
    (a stack along a minor axis of two), so the cross-warp step and its barriers run once instead
    of twice: ``mean = first + sum(e) / n``, ``var = max(sum(e^2) / n - (sum(e) / n)^2, 0)``.
    H100 probe, 8192 bf16 columns, 2026-12-07: 1.66 / 2.21 / 2.78 us at 2 / 16 / 64 rows against
    1.79 / 2.46 / 2.94 us for the mean and then the centred squares (5-10% less up to 128 rows,
    under 1% from 1024 rows, where the read dominates); two separate sums in one program were
    slower than both from 1024 rows. Shifting by a row element bounds the cancellation:
    ``(mean - first)^2 <= (n - 1) var`` for any element (Samuelson). Near the worst case, a row
    whose first element is a spike of ~3000 deviations, the largest output of an fp16 row was off
    by 0.66 ULP (two-pass statistics: 0.35), and every output stays within one ULP of its row's
    largest (``test_layer_norm_one_pass_statistics_near_their_worst``); without the shift an
    offset mean alone breaks that. Used for 16-bit rows of one program each (more than 512
    columns: the measured case); fp32 rows and tiles of several short rows keep the two-pass
    statistics. Deterministic and row-local, hence as invariant as the two-pass form.
    """
    e = jnp.where(mask, x - first, 0.0)
    sums = jnp.sum(be.interpret_pin(jnp.stack([e, e * e], axis=-1)), axis=1)  # [rows, 2]
    s1, s2 = (s[:, None] for s in jnp.unstack(sums, axis=-1))
    m1 = s1 / n
    mu = be.interpret_pin(first + m1)
    rstd = be.interpret_pin(lax.rsqrt(jnp.maximum(s2 / n - m1 * m1, 0.0) + eps))
    return mu, rstd


def _layer_norm_kernel(*refs, rows, n, block_rows, block, eps, has_weight, has_bias, tiles=1,
                      parts=1):
    """``block_rows`` rows: x ``[rows, n]``, [weight, bias ``[n]``] -> out ``[rows, n]``.

    ``tiles > 1`` (one block per row): this program writes column tile ``program_id(1)``.
    ``parts > 1`` (one block per row): it writes its columns in ``parts`` pieces, one after the
    other, each reloaded (``_write_parts``)."""
    refs = list(refs)
    x_ref = refs.pop(0)
    w_ref = refs.pop(0) if has_weight else None
    b_ref = refs.pop(0) if has_bias else None
    o_ref = refs.pop(0)
    r0 = be.program_id(0) * block_rows
    tile = functools.partial(load_tile, x_ref, r0, rows=rows, n=n, block_rows=block_rows,
                             block=block, other=0.0)
    num_blocks = -(-n // block)

    def load_row(c0, width=block):
        x, mask = tile(c0, block=width)
        return x.astype(_F32), mask

    def write(c0, centred, rstd, mask, width=block):
        y = centred * rstd
        if w_ref is not None:
            y = y * load_vector(w_ref, c0, n=n, block=width)
        if b_ref is not None:
            y = be.interpret_pin(y) + load_vector(b_ref, c0, n=n, block=width)  # no FMA on the CPU
        store_tile(o_ref, r0, c0, y, mask, block_rows=block_rows, block=width)

    if num_blocks == 1:  # the row in registers: read once
        x, mask = load_row(0)
        # the statistics materialised in interpret mode: XLA:CPU may fuse the divide and rsqrt
        # into the elementwise loops that use them, vectorised differently per program
        if jnp.dtype(x_ref.dtype).itemsize == 2 and block_rows == 1:  # one reduction
            mu, rstd = _shifted_stats(x, mask, tile(0, block=1)[0].astype(_F32), n=n, eps=eps)
            d = jnp.where(mask, x - mu, 0.0)
        else:  # two reductions in sequence: the mean, then the centred squares
            mu = be.interpret_pin(jnp.sum(x, axis=1, keepdims=True) / n)  # [block_rows, 1]
            d = jnp.where(mask, x - mu, 0.0)
            rstd = be.interpret_pin(
                lax.rsqrt(jnp.sum(be.interpret_pin(d * d), axis=1, keepdims=True) / n + eps))
        if tiles * parts == 1:
            write(0, d, rstd, mask)
            return
        width = block // (tiles * parts)  # this program's columns, reloaded piece by piece:
        for k in range(parts):  # the same elementwise arithmetic
            c0 = (be.program_id(1) * parts + k) * width
            xt, mask_t = load_row(c0, width)
            write(c0, jnp.where(mask_t, xt - mu, 0.0), rstd, mask_t, width)
        return

    zeros = jnp.zeros((block_rows, block), _F32)
    acc = lax.fori_loop(0, num_blocks, lambda i, a: a + load_row(i * block)[0], zeros)
    mu = jnp.sum(acc, axis=1, keepdims=True) / n

    def centred(i):
        x, mask = load_row(i * block)
        return jnp.where(mask, x - mu, 0.0), mask

    def sum_squares(i, a):
        d = centred(i)[0]
        return a + d * d

    acc = lax.fori_loop(0, num_blocks, sum_squares, zeros)
    rstd = lax.rsqrt(jnp.sum(acc, axis=1, keepdims=True) / n + eps)

    def normalize(i, carry):
        d, mask = centred(i)
        write(i * block, d, rstd, mask)
        return carry

    lax.fori_loop(0, num_blocks, normalize, 0)


# --------------------------------------------------------------------------------------- launchers


def _rms_norm_pallas(x2, weight, residual2, *, eps, config):
    """x ``[rows, n]``, weight ``[n]`` | None, residual ``[rows, n]`` | None -> out (, s)."""
    rows, n = x2.shape
    cfg = config or row_config(n, x2.dtype)
    out = jax.ShapeDtypeStruct(x2.shape, x2.dtype)
    operands = tuple(a for a in (x2, weight, residual2) if a is not None)
    return launch_rows(
        _rms_norm_kernel, operands, (out, out) if residual2 is not None else out, rows=rows,
        config=cfg, name="bi_jax_add_rms_norm" if residual2 is not None else "bi_jax_rms_norm",
        tiles=write_tiles(rows, cfg, n),
        n=n, eps=float(eps), has_weight=weight is not None, has_residual=residual2 is not None,
    )


_SM_REGISTERS, _SM_THREADS = 65536, 2048  # per SM, sm_80 and sm_90
# Registers per thread of the one-block layer_norm kernel (16 elements of the row per thread), as
# allocated (in steps of 8): whole, and writing its row in pieces. ncu, H100, 2026-11-25: 39 and 32
# at blocks of 2048, 4096 and 8192 columns (4, 8 and 16 warps); again under the one-reduction
# statistics (2026-12-07, bf16 with weight and bias): 40 whole, 32 / 32 / 26 in pieces.
_WHOLE_REGS, _PIECES_REGS = 40, 32


def _write_parts(rows: int, config: RowConfig, n: int, dtype: Any) -> int:
    """Pieces a one-program-per-row layer_norm writes its row in (no numerics: the launch only).

    Holding the row and its centred copy, the kernel needs ``_WHOLE_REGS`` registers per thread:
    3 / 6 / 12 programs of 16 / 8 / 4 warps fit on an SM, where the thread limit allows 4 / 8 / 16.
    Rows between the two counts (times the SMs) take two waves where they could take one. Writing
    the row in pieces, each reloaded (from L1/L2: just read) and centred again with the same
    ``mu``, needs ``_PIECES_REGS``: one wave. The reload costs wherever it saves no wave, so the
    pieces are used only there, and only for 2-byte dtypes (fp32 rows of 8192: 51 registers,
    bandwidth-bound, 1.01-1.04x slower with pieces). Probe (H100, bf16, time with pieces / whole):

    - 8192 columns, 4 pieces: 0.91-0.99 at 400-528 rows (1.04 at 397); 1.03-1.24 at 128-384 and
      640-8192 rows. fp16: 0.89-0.98.
    - 4096 columns, 2 pieces: 0.89-0.93 at 800-1056 rows (4 pieces 0.91-0.94).
    - 2048 columns, 2 pieces: 0.88-0.91 at 1600-2112 rows (4 pieces 0.95-0.96).
    """
    threads = 32 * config.num_warps
    if (not 2048 <= config.block <= 8192 or config.block != 16 * threads  # as measured
            or config.block_rows > 1 or n > config.block or jnp.dtype(dtype).itemsize != 2):
        return 1

    def programs_per_sm(regs):
        return min(_SM_THREADS // threads, _SM_REGISTERS // (regs * threads))

    sms = be.sm_count()
    if programs_per_sm(_WHOLE_REGS) * sms < rows <= programs_per_sm(_PIECES_REGS) * sms:
        return 4 if config.num_warps == 16 else 2
    return 1


def _layer_norm_pallas(x2, weight, bias, *, eps, config):
    """x ``[rows, n]``, weight / bias ``[n]`` | None -> ``[rows, n]``."""
    rows, n = x2.shape
    cfg = config or row_config(n, x2.dtype)
    operands = tuple(a for a in (x2, weight, bias) if a is not None)
    tiles = write_tiles(rows, cfg, n)
    parts = _write_parts(rows, cfg, n, x2.dtype) if tiles == 1 else 1
    return launch_rows(
        _layer_norm_kernel, operands, jax.ShapeDtypeStruct(x2.shape, x2.dtype), rows=rows,
        config=cfg, name="bi_jax_layer_norm", tiles=tiles, n=n, eps=float(eps),
        has_weight=weight is not None, has_bias=bias is not None, parts=parts,
    )


# --------------------------------------------------------------------------------------- reference


def _padded_vector(v):
    """weight / bias ``[n]`` as an fp32 ``[1, n_padded]`` row, zero-padded as ``pad_lanes``."""
    return pad_lanes(exact_f32(v)[None, :], 0.0)


def _rms_norm_ref(x2, weight, *, eps):
    """x ``[rows, n]`` -> rms_norm rows, invariant by construction."""
    n = x2.shape[-1]
    x = pad_lanes(exact_f32(x2), 0.0)
    rstd = row_map(lambda t: lax.rsqrt(t / n + eps), fixed_order_reduce(x * x, "sum"))[:, None]
    y = x * rstd
    if weight is not None:
        y = y * _padded_vector(weight)
    return y[:, :n].astype(x2.dtype)


def _add_rms_norm_ref(x2, weight, residual2, *, eps):
    """As ``_rms_norm_pallas``: the rounded sum ``s`` (if ``residual2``) and its rms_norm."""
    if residual2 is None:
        return _rms_norm_ref(x2, weight, eps=eps)
    s = (exact_f32(x2) + exact_f32(residual2)).astype(x2.dtype)
    return _rms_norm_ref(s, weight, eps=eps), s


def _layer_norm_ref(x2, weight, bias, *, eps):
    """x ``[rows, n]`` -> layer_norm rows, invariant by construction."""
    n = x2.shape[-1]
    x = pad_lanes(exact_f32(x2), 0.0)
    mu = row_map(lambda t: t / n, fixed_order_reduce(x, "sum"))[:, None]
    d = jnp.where(jnp.arange(x.shape[-1]) < n, x - mu, 0.0)
    rstd = row_map(lambda t: lax.rsqrt(t / n + eps), fixed_order_reduce(d * d, "sum"))[:, None]
    y = d * rstd
    if weight is not None:
        y = y * _padded_vector(weight)
    if bias is not None:
        # The barrier rounds ``y * weight`` before the add: XLA:CPU contracted the two into an FMA
        # in some loop bodies and not in others (vector body vs remainder, which moves with the row
        # count), a 1-ULP batch variance the property test caught.
        y = lax.optimization_barrier(y) + _padded_vector(bias)
    return y[:, :n].astype(x2.dtype)


def _rms_norm_xla(x, weight, *, eps):
    x32 = x.astype(_F32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(_F32)
    return y.astype(x.dtype)


def _layer_norm_xla(x, weight, bias, *, eps):
    x32 = x.astype(_F32)
    mu = jnp.mean(x32, axis=-1, keepdims=True)
    y = (x32 - mu) * lax.rsqrt(jnp.var(x32, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(_F32)
    if bias is not None:
        y = y + bias.astype(_F32)
    return y.astype(x.dtype)


# -------------------------------------------------------------------------- canonical ops with VJP
#
# The kernels have no backward pass of their own: the gradients below are plain jnp with every row
# reduction done by ``fixed_order_reduce``, so the gradient of a row (d x, d residual) is
# batch-invariant by construction. Weight and bias gradients sum over the rows, also in a fixed
# order (deterministic; a sum over the batch cannot be batch-invariant).


def _row_sum(v):
    return fixed_order_reduce(v, "sum")[:, None]  # [rows, n] -> [rows, 1]


def _column_sum(v, like):
    """Sum of ``v [rows, n]`` over the rows in a fixed order, in ``like``'s dtype."""
    return fixed_order_reduce(v.T, "sum").astype(like.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _rms_norm_rows(x2, weight, residual2, eps, impl, config):
    """x ``[rows, n]`` (+ residual) -> rms_norm rows (, s): the op behind ``rms_norm``."""
    if impl == "pallas":
        return _rms_norm_pallas(x2, weight, residual2, eps=eps, config=config)
    return _add_rms_norm_ref(x2, weight, residual2, eps=eps)


def _rms_norm_rows_fwd(x2, weight, residual2, eps, impl, config):
    out = _rms_norm_rows(x2, weight, residual2, eps, impl, config)
    if residual2 is None:
        return out, (x2, weight, None)
    return out, (out[1], weight, jnp.zeros((0,), residual2.dtype))  # s, and residual's dtype


def _rms_norm_rows_bwd(eps, impl, config, saved, g):
    del impl, config
    s, weight, residual_like = saved
    g_out, g_sum = (g, None) if residual_like is None else g
    x = exact_f32(s)
    n = x.shape[1]
    rstd = lax.rsqrt(_row_sum(x * x) / n + eps)
    gy = exact_f32(g_out)
    gw = gy if weight is None else gy * exact_f32(weight)[None, :]
    dx = rstd * gw - x * (rstd * rstd * rstd * (_row_sum(gw * x) / n))
    d_weight = None if weight is None else _column_sum(gy * (x * rstd), weight)
    if residual_like is None:
        return dx.astype(s.dtype), d_weight, None
    ds = dx + exact_f32(g_sum)
    return ds.astype(s.dtype), d_weight, ds.astype(residual_like.dtype)


_rms_norm_rows.defvjp(_rms_norm_rows_fwd, _rms_norm_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _layer_norm_rows(x2, weight, bias, eps, impl, config):
    """x ``[rows, n]`` -> layer_norm rows: the op behind ``layer_norm``."""
    if impl == "pallas":
        return _layer_norm_pallas(x2, weight, bias, eps=eps, config=config)
    return _layer_norm_ref(x2, weight, bias, eps=eps)


def _layer_norm_rows_fwd(x2, weight, bias, eps, impl, config):
    return _layer_norm_rows(x2, weight, bias, eps, impl, config), (x2, weight, bias)


def _layer_norm_rows_bwd(eps, impl, config, saved, g):
    del impl, config
    x2, weight, bias = saved
    x = exact_f32(x2)
    n = x.shape[1]
    d = x - _row_sum(x) / n
    rstd = lax.rsqrt(_row_sum(d * d) / n + eps)
    xhat = d * rstd
    gy = exact_f32(g)
    gx = gy if weight is None else gy * exact_f32(weight)[None, :]
    dx = rstd * (gx - _row_sum(gx) / n - xhat * (_row_sum(gx * xhat) / n))
    d_weight = None if weight is None else _column_sum(gy * xhat, weight)
    d_bias = None if bias is None else _column_sum(gy, bias)
    return dx.astype(x2.dtype), d_weight, d_bias


_layer_norm_rows.defvjp(_layer_norm_rows_fwd, _layer_norm_rows_bwd)


# -------------------------------------------------------------------------------------- public API


def _check_x(op: str, x: Any) -> None:
    _checks.check_float(op, "x", x)
    if x.ndim < 1:
        raise ValueError(f"{op}: x must have at least one axis (the normalised one), got shape ()")


def _check_vector(op: str, name: str, v: Any, x: Any) -> None:
    _checks.check_float(op, name, v)
    _checks.check_shape(op, name, v, (x.shape[-1],), f"the last axis of x {tuple(x.shape)}")


def rms_norm(
    x: jax.Array,
    weight: jax.Array | None = None,
    *,
    eps: float = 1e-6,
    residual: jax.Array | None = None,
    implementation: str | None = None,
    config: RowConfig | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Batch-invariant RMSNorm over the last axis, optionally fused with a residual add.

    Args:
      x: ``[..., n]``, bf16/fp16/fp32.
      weight: optional ``[n]`` scale, multiplied in fp32 (``x * rstd * weight``, one rounding).
      eps: added to the mean square before the reciprocal square root.
      residual: optional array of x's shape. Then ``s = x + residual`` (added in fp32, rounded to
        x's dtype) is computed once in the kernel, normalised, and returned too.
      implementation: None (Pallas on GPU, reference elsewhere), "pallas", "reference" or "xla".
      config: override ``reductions.row_config`` (``RowConfig``); the bits depend on it.

    Returns:
      ``[..., n]`` in x's dtype; with ``residual``: ``(rms_norm(s) * weight, s)``.
    """
    op = "rms_norm"
    impl = be.resolve_implementation(implementation, op)
    _check_x(op, x)
    if weight is not None:
        _check_vector(op, "weight", weight, x)
    if residual is not None:
        _checks.check_float(op, "residual", residual)
        _checks.check_shape(op, "residual", residual, x.shape, "the shape of x")
    n = x.shape[-1]
    if impl != "xla" and x.size:
        r2 = None if residual is None else residual.reshape(-1, n)
        res = _rms_norm_rows(x.reshape(-1, n), weight, r2, float(eps), impl, config)
        return jax.tree.map(lambda a: a.reshape(x.shape), res)
    if impl == "xla":
        s = x if residual is None else x + residual.astype(x.dtype)
        out = _rms_norm_xla(s, weight, eps=eps)
        return out if residual is None else (out, s)
    out = jnp.zeros(x.shape, x.dtype)  # empty x
    return out if residual is None else (out, jnp.zeros(x.shape, x.dtype))


def layer_norm(
    x: jax.Array,
    weight: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    eps: float = 1e-5,
    implementation: str | None = None,
    config: RowConfig | None = None,
) -> jax.Array:
    """Batch-invariant LayerNorm over the last axis.

    Args:
      x: ``[..., n]``, bf16/fp16/fp32.
      weight, bias: optional ``[n]`` scale and shift, applied in fp32 before the one rounding.
      eps: added to the (biased) variance before the reciprocal square root.
      implementation: None (Pallas on GPU, reference elsewhere), "pallas", "reference" or "xla".
      config: override ``reductions.row_config`` (``RowConfig``); the bits depend on it.

    Returns:
      ``[..., n]`` in x's dtype.
    """
    op = "layer_norm"
    impl = be.resolve_implementation(implementation, op)
    _check_x(op, x)
    for name, v in (("weight", weight), ("bias", bias)):
        if v is not None:
            _check_vector(op, name, v, x)
    n = x.shape[-1]
    if impl == "xla":
        return _layer_norm_xla(x, weight, bias, eps=eps)
    if x.size == 0:
        return jnp.zeros(x.shape, x.dtype)
    return _layer_norm_rows(x.reshape(-1, n), weight, bias, float(eps), impl, config).reshape(
        x.shape)


def rms_norm_reference(
    x: jax.Array, weight: jax.Array | None = None, *, eps: float = 1e-6,
    residual: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The plain-jnp path of ``rms_norm`` (invariant by construction on every backend)."""
    return rms_norm(x, weight, eps=eps, residual=residual, implementation="reference")


def layer_norm_reference(
    x: jax.Array, weight: jax.Array | None = None, bias: jax.Array | None = None, *,
    eps: float = 1e-5,
) -> jax.Array:
    """The plain-jnp path of ``layer_norm`` (invariant by construction on every backend)."""
    return layer_norm(x, weight, bias, eps=eps, implementation="reference")
