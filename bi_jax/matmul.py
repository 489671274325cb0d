"""Batch-invariant matrix multiplication: ``matmul`` and ``dot_general``.

Shapes:
  ``matmul(a, b, bias=None)``: a ``[..., K]``, b ``[K, N]``, bias ``[N]`` -> ``[..., N]``.
  ``dot_general(lhs, rhs, dimension_numbers)``: any ``lax.dot_general`` dimension numbers; the
  contraction is canonicalised to a batched ``[B, M, K] @ [B, K, N]`` (B = the batch dimensions, M =
  lhs free dims, N = rhs free dims), and the output has ``lax.dot_general``'s layout.

Dtypes: bfloat16, float16 and float32 inputs (mixed inputs are promoted), float32 accumulation, the
output in ``out_dtype`` / ``preferred_element_type`` (default: the promoted input dtype). For float32
inputs ``precision`` follows XLA on GPU: DEFAULT and HIGH mean TF32 products, HIGHEST means IEEE
float32 products.

Invariance:
  Every output element is a fixed two-level fp32 sum over K: K is cut into the fewest chunks of at
  most 8192 elements, all but the last of one size, the even share rounded up to a multiple of 512
  (``_k_chunk``, a function of K alone: K = 14336 is 7168 + 7168); inside a chunk one fresh
  accumulator runs over ascending ``block_k`` blocks (chained MMAs), and the chunk partials join a
  running total in ascending order, ``((0 + p0) + p1) + ...``; the bias is added in fp32 and the
  result is rounded once. The order depends on K alone, never on M or on the other rows, so row
  ``i`` of the output has the same bits for any batch (no atomics, no data-dependent split). What
  follows M (``matmul_config``) is only how the work is launched: the M/N tile, warps and stages,
  and whether each chunk partial gets its own program (``split_k``, for small M and K > 8192, summed
  in the same order by a second kernel) or one program walks all chunks of its tile, and which
  kernel runs: the Triton one, or on Hopper from M = 129 (bf16/fp16, no bias, K and N multiples of
  64), a persistent Mosaic GPU kernel (TMA + wgmma). Both chain the per-block MMAs into one
  accumulator whatever the tile, and ``tests/test_matmul.py`` proves bitwise equality across every
  config the policy can choose and the Mosaic configs, in both launch modes (on the GPU). The
  reference path multiplies and adds elementwise in a fixed sequential K order, so it is invariant
  by construction on every backend, the CPU included (XLA's own ``jnp.dot`` is not, even on the
  CPU).

Gradients: a custom VJP computes ``d lhs = g @ rhs^T`` and ``d rhs = lhs^T @ g`` with the same
implementation as the forward pass (so ``d lhs`` is batch-invariant too; ``d rhs`` sums over the
batch and is deterministic, not invariant).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bi_jax import _backend as be
from bi_jax import _checks
from bi_jax.reductions import exact_f32

# ------------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Tile shape and launch parameters of the Pallas matmul kernel.

    ``block_k`` is part of the numerics only if the compiler does not chain the per-block MMAs into
    one accumulator; we keep it fixed per dtype (``_BLOCK_K``) anyway, and it must divide the K
    chunk. ``block_m``, ``block_n``, ``num_warps``, ``num_stages``, ``group_m`` and ``split_k`` are
    free (proven bit-neutral by the cross-config test).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8  # programs along M that share a band of B columns (L2 reuse); no numerics
    split_k: bool = False  # one program per (tile, K chunk) + an ordered sum kernel; no numerics
    kernel: str = "triton"  # "mosaic": the Hopper kernel (block_m 128, no bias); no numerics

    def __post_init__(self) -> None:
        if self.kernel not in ("triton", "mosaic"):
            raise ValueError(f"MatmulConfig.kernel={self.kernel!r} must be 'triton' or 'mosaic'")
        if self.kernel == "mosaic" and (self.block_m != 2 * _MOSAIC_WG_ROWS
                                        or self.block_n not in _MOSAIC_BLOCK_N):
            raise ValueError(f"MatmulConfig: the Mosaic kernel needs block_m=128 and block_n in "
                             f"{_MOSAIC_BLOCK_N}, got {self}")
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if self.kernel == "mosaic" and name == "block_n":
                continue
            if v < 16 or v & (v - 1):
                raise ValueError(f"MatmulConfig.{name}={v} must be a power of two >= 16")


_BLOCK_K = {jnp.dtype(jnp.bfloat16): 64, jnp.dtype(jnp.float16): 64, jnp.dtype(jnp.float32): 32}
# The K chunks: K elements summed into one fresh fp32 partial before it joins the running total.
# Part of the numerics: ``_k_chunk`` makes them a function of K alone (never of M, the tile or the
# launch mode), so the K order of every output element is the same for any batch. Read at trace
# time (tests shrink them to reach several chunks with small K).
_K_CHUNK = 8192  # the most K elements in one chunk
_K_CHUNK_ALIGN = 512  # chunk sizes are multiples of this (and so of every block_k and TMA tile)


def _k_chunk(k: int) -> int:
    """Elements per K chunk for a contraction of ``k``: the fewest chunks of at most ``_K_CHUNK``,
    as equal as ``_K_CHUNK_ALIGN`` allows, the last one taking the remainder (K = 14336: 7168 +
    7168; 28672: 4 x 7168; 8192 or less: one chunk). Equal chunks keep a split-K launch's longest
    item short: at M = 256, K = 14336 the 8192 + 6144 split left the Mosaic kernel 1.15x slower
    than cuBLAS, which splits K in two as well."""
    chunks = max(1, -(-k // _K_CHUNK))
    align = math.gcd(_K_CHUNK, _K_CHUNK_ALIGN)
    return max(1, -(-k // (chunks * align))) * align


def matmul_config(m: int, n: int, k: int, dtype: Any) -> MatmulConfig:
    """The tile policy: follows M, N and K (bit-neutral), with ``block_k`` fixed per dtype.

    Tuned on an H100 (bf16, Llama-3-8B projection shapes, every candidate bitwise equal). On
    Hopper, bf16/fp16 with M > 128 runs the Mosaic GPU kernel where it can (``_mosaic_config``);
    otherwise the Triton kernel (``_triton_config``).
    """
    if be.is_hopper() and m > 128:
        cfg = _mosaic_config(m, n, k, dtype)
        if cfg is not None:
            return cfg
    return _triton_config(m, n, k, dtype)


def _triton_config(m: int, n: int, k: int, dtype: Any) -> MatmulConfig:
    """The Triton kernel's tile policy: narrow tiles with deep pipelines while the weights
    dominate; one program per (tile, K chunk) (``split_k``) when K has several chunks and M is too
    small to fill the machine with tiles; once M fills it, 128x256 or 128x128 tiles with 8 warps,
    whichever wastes less of the last wave of tiles over the SMs (a 128x128 tile does half the
    work at ~0.86 of the rate).
    """
    dtype = jnp.dtype(dtype)
    bk = _BLOCK_K[dtype]
    wide = n > 8192
    chunked = k > _K_CHUNK
    if dtype == jnp.float32:
        if m <= 16:
            return MatmulConfig(16, 64, bk, num_warps=4, num_stages=4, split_k=chunked)
        if m <= 64:
            return MatmulConfig(64, 64, bk, num_warps=4, num_stages=4, split_k=chunked)
        return MatmulConfig(128, 64, bk, num_warps=4, num_stages=3)
    if chunked and m <= 512:
        if m <= 32:
            return MatmulConfig(16, 64, bk, num_warps=4, num_stages=8, split_k=True)
        if m <= 128:
            return MatmulConfig(64, 64, bk, num_warps=4, num_stages=6, split_k=True)
        if m <= 256:
            return MatmulConfig(128, 128, bk, num_warps=4, num_stages=4, split_k=True)
        return MatmulConfig(128, 128, bk, num_warps=8, num_stages=3, split_k=True)
    if wide:
        if m <= 16:
            return MatmulConfig(16, 128, bk, num_warps=4, num_stages=4)
        if m <= 64:
            return MatmulConfig(64, 128, bk, num_warps=4, num_stages=4)
        if m <= 128:
            return MatmulConfig(128, 128, bk, num_warps=8, num_stages=3)
    else:
        if m <= 32:
            return _narrow_config(m, n, bk)
        if m <= 64 and n <= 4096:
            return MatmulConfig(16, 64, bk, num_warps=4, num_stages=6)
        if m <= 128:
            return MatmulConfig(64, 64, bk, num_warps=4, num_stages=6)
        if m <= 256:
            return MatmulConfig(64, 128, bk, num_warps=4, num_stages=4)
    big = MatmulConfig(128, 256, bk, num_warps=8, num_stages=4 if wide else 3)
    small = MatmulConfig(128, 128, bk, num_warps=4, num_stages=4)
    # time ~ waves x work per tile / rate: 2 / 1 for a 128x256 tile, 1 / rate for a 128x128 one
    return big if 2 * _waves(m, n, big) * _SMALL_TILE_RATE <= _waves(m, n, small) else small


def _narrow_config(m: int, n: int, bk: int) -> MatmulConfig:
    """M <= 32, N <= 8192, one K chunk: 16-row tiles, the widest of 64/32/16 columns that still
    gives ``_NARROW_MIN_TILES`` tiles. A program streams its column strip of the weights at a
    roughly fixed time per ``block_k`` step, so wide tiles read faster per program, but too few
    programs leave SMs idle (N = 2048 in 16x64 tiles: 32 programs, 1.4 TB/s at K = 8192; in 16x16
    tiles: 128 programs, 2.0 TB/s). H100 sweep, 2026-11-25, every candidate bitwise equal."""
    bn = next((w for w in (64, 32) if -(-m // 16) * -(-n // w) >= _NARROW_MIN_TILES), 16)
    if bn == 64:
        return MatmulConfig(16, 64, bk, num_warps=4, num_stages=8)
    if bn == 32:
        return MatmulConfig(16, 32, bk, num_warps=4, num_stages=12)
    # 2 warps read fastest while the rows are few (M <= 8: K = 8192, N = 2048 in 16.7 us against
    # 18.4 with one warp), one warp from M = 9 (18.2 against 20.6)
    return MatmulConfig(16, 16, bk, num_warps=2 if m <= 8 else 1, num_stages=10)


_NARROW_MIN_TILES = 96  # programs the narrow tiles aim for (of 132 SMs; 128 at N = 2048 in 16x16)
_SMS = 132  # streaming multiprocessors of an H100 SXM: sizes the waves below, never the bits
_SMALL_TILE_RATE = 0.86  # a 128x128 tile computes at ~0.86 of a 128x256 tile's rate (H100 sweep)


def _waves(m: int, n: int, cfg: MatmulConfig, items_per_tile: int = 1) -> int:
    """Waves of ``cfg``'s work items (``items_per_tile`` per tile) over the SMs (the last one partly
    idle: wave quantisation)."""
    return -(-(-(-m // cfg.block_m) * -(-n // cfg.block_n) * items_per_tile) // _SMS)


def shipped_configs(dtype: Any) -> tuple[MatmulConfig, ...]:
    """Every config ``matmul_config`` can choose for ``dtype`` (for the cross-config tests)."""
    ms = (1, 16, 32, 64, 128, 256, 512, 4096)
    return tuple(
        dict.fromkeys(
            matmul_config(m, n, k, dtype)
            for k in (4096, 14336)
            for n in (512, 2048, 4096, 6144, 28672)
            for m in ms
        )
    )


# ------------------------------------------------------------------------------------------ kernel


def _tile_coords(pid, m, n, block_m, block_n, group_m):
    """Grouped ordering of the (M, N) tiles: consecutive programs reuse the same B columns (L2)."""
    num_m, num_n = be.cdiv(m, block_m), be.cdiv(n, block_n)
    width = group_m * num_n
    first_m = (pid // width) * group_m
    rows_in_group = jnp.minimum(num_m - first_m, group_m)
    return first_m + (pid % width) % rows_in_group, (pid % width) // rows_in_group


def _chunk_partial(a_ref, b_ref, batch, pid_m, pid_n, chunk, *, m, n, k, precision, block_m,
                   block_n, block_k, k_chunk):
    """fp32 ``[block_m, block_n]`` sum over K chunk ``chunk``: a fresh accumulator, chained MMAs
    over the chunk's ``block_k`` blocks in ascending order (the same code in both launch modes)."""
    rows = pid_m * block_m + jnp.arange(block_m)
    cols = pid_n * block_n + jnp.arange(block_n)
    row_ok, col_ok = rows < m, cols < n
    per_chunk = k_chunk // block_k
    first = chunk * per_chunk
    count = jnp.minimum(per_chunk, be.cdiv(k, block_k) - first)

    def body(j, acc):
        kb = first + j
        k_ok = kb * block_k + jnp.arange(block_k) < k
        a = be.load(  # [block_m, block_k]
            a_ref.at[batch, be.ds(pid_m * block_m, block_m), be.ds(kb * block_k, block_k)],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = be.load(  # [block_k, block_n]
            b_ref.at[batch, be.ds(kb * block_k, block_k), be.ds(pid_n * block_n, block_n)],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        return acc + _block_dot(a, b, precision)

    return lax.fori_loop(0, count, body, jnp.zeros((block_m, block_n), jnp.float32))


def _block_dot(a, b, precision):
    """``[block_m, block_k] @ [block_k, block_n]`` in fp32: one MMA per block on the GPU, where an
    output element's bits do not depend on the tile (the GPU cross-config test). In interpret mode
    an ascending-k sum of elementwise fp32 products instead: XLA:CPU's dot picks its summation
    order from the operand shapes (a 16- or 32-column tile sums differently from a 64-column one),
    which would make the tile policy move bits there."""
    if not be.interpret_mode():
        return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)
    zeros = jnp.zeros((a.shape[0], b.shape[1]), jnp.float32)
    return _add_products_ascending_k(zeros, a.astype(jnp.float32), b.astype(jnp.float32))


def _add_products_ascending_k(acc, a, b):
    """``((acc + a[..., :, 0] b[..., 0, :]) + a[..., :, 1] b[..., 1, :]) + ...``: fp32 ``a [..., M, C]``
    and ``b [..., C, N]`` into ``acc [..., M, N]``, elementwise in ascending k (no dot, no tree:
    nothing XLA plans per shape can reorder the sum)."""
    for t in range(a.shape[-1]):
        acc = acc + a[..., :, t, None] * b[..., None, t, :]
    return acc


def _finish(total, bias_ref, o_ref, batch, row0, col0, rows_n, cols_n, m, n):
    """Add the bias in fp32, round once, store the ``[rows_n, cols_n]`` tile at (row0, col0)."""
    rows = row0 + jnp.arange(rows_n)
    cols = col0 + jnp.arange(cols_n)
    col_ok = cols < n
    if bias_ref is not None:
        bias = be.load(bias_ref.at[be.ds(col0, cols_n)], mask=col_ok, other=0.0)
        total = total + bias.astype(jnp.float32)[None, :]
    be.store(
        o_ref.at[batch, be.ds(row0, rows_n), be.ds(col0, cols_n)],
        total.astype(o_ref.dtype),
        mask=(rows < m)[:, None] & col_ok[None, :],
    )


def _fused_kernel(a_ref, b_ref, *rest, m, n, k, has_bias, precision, block_m, block_n, block_k,
                  group_m, k_chunk):
    """One program owns a ``[block_m, block_n]`` tile and all of K: ``((p0 + p1) + p2) + ...``."""
    bias_ref, o_ref = (rest[0], rest[1]) if has_bias else (None, rest[0])
    batch = be.program_id(0)
    pid_m, pid_n = _tile_coords(be.program_id(1), m, n, block_m, block_n, group_m)
    partial = functools.partial(
        _chunk_partial, a_ref, b_ref, batch, pid_m, pid_n, m=m, n=n, k=k, precision=precision,
        block_m=block_m, block_n=block_n, block_k=block_k, k_chunk=k_chunk,
    )
    # Written as one loop over the chunks from a zero total: unrolling it, or peeling chunk 0,
    # makes Triton spill the 128x256 accumulators (3-9x slower on an H100).
    total = lax.fori_loop(
        0, be.cdiv(k, k_chunk), lambda c, t: t + partial(c), jnp.zeros((block_m, block_n), jnp.float32)
    )
    _finish(total, bias_ref, o_ref, batch, pid_m * block_m, pid_n * block_n, block_m, block_n, m, n)


def _split_kernel(a_ref, b_ref, p_ref, *, m, n, k, precision, block_m, block_n, block_k, group_m,
                  k_chunk):
    """Program (batch, tile, chunk) writes the fp32 partial of one K chunk to ``p_ref``."""
    batch, chunk = be.program_id(0), be.program_id(2)
    pid_m, pid_n = _tile_coords(be.program_id(1), m, n, block_m, block_n, group_m)
    part = _chunk_partial(
        a_ref, b_ref, batch, pid_m, pid_n, chunk, m=m, n=n, k=k, precision=precision,
        block_m=block_m, block_n=block_n, block_k=block_k, k_chunk=k_chunk,
    )
    rows = pid_m * block_m + jnp.arange(block_m)
    cols = pid_n * block_n + jnp.arange(block_n)
    be.store(  # [block_m, block_n]
        p_ref.at[chunk, batch, be.ds(pid_m * block_m, block_m), be.ds(pid_n * block_n, block_n)],
        part,
        mask=(rows < m)[:, None] & (cols < n)[None, :],
    )


_SUM_ROWS, _SUM_COLS = 16, 256  # tile of the partial-sum kernel (no numerics)


def _sum_kernel(p_ref, *rest, m, n, chunks, has_bias):
    """Sum the K-chunk partials of one tile in ascending chunk order, as ``_fused_kernel`` does."""
    bias_ref, o_ref = (rest[0], rest[1]) if has_bias else (None, rest[0])
    batch = be.program_id(0)
    row0, col0 = be.program_id(1) * _SUM_ROWS, be.program_id(2) * _SUM_COLS
    mask = ((row0 + jnp.arange(_SUM_ROWS)) < m)[:, None] & ((col0 + jnp.arange(_SUM_COLS)) < n)[None, :]

    def part(c):
        return be.load(
            p_ref.at[c, batch, be.ds(row0, _SUM_ROWS), be.ds(col0, _SUM_COLS)], mask=mask, other=0.0
        )

    total = lax.fori_loop(0, chunks, lambda c, t: t + part(c), jnp.zeros(mask.shape, jnp.float32))
    _finish(total, bias_ref, o_ref, batch, row0, col0, _SUM_ROWS, _SUM_COLS, m, n)


@functools.partial(jax.jit, static_argnames=("out_dtype", "precision", "config", "key"))
def _bmm_pallas(a, b, bias, *, out_dtype, precision, config, key):
    """Launcher: a [B, M, K], b [B, K, N], bias [N] | None -> [B, M, N].

    Jitted so that identical calls (a model's layers) lower once per executable and share one
    compiled kernel. With the Mosaic kernels lowered per call site, the 1B needle demo did not
    finish in 540 s on an H100; with the jit it took 149 s.
    ``key`` (``be.trace_key()`` and the K chunk constants, which tests patch) only keys the jit
    cache."""
    del key
    nb, m, k = a.shape
    n = b.shape[2]
    cfg = config or matmul_config(m, n, k, a.dtype)
    k_chunk = _k_chunk(k)
    if k_chunk % cfg.block_k:
        raise ValueError(f"matmul: block_k={cfg.block_k} must divide the K chunk {k_chunk}")
    if cfg.kernel == "mosaic":
        if bias is None and _mosaic_supported(m, n, k, a.dtype):
            return _bmm_mosaic(a, b, out_dtype=out_dtype, cfg=cfg)
        # a bias or a shape the TMA cannot tile: the Triton kernel (its own tile), the same bits
        cfg = _triton_config(m, n, k, a.dtype)
    chunks = be.cdiv(k, k_chunk)
    params = dict(m=m, n=n, k=k, precision=precision, block_m=cfg.block_m, block_n=cfg.block_n,
                  block_k=cfg.block_k, group_m=cfg.group_m, k_chunk=k_chunk)
    tiles = be.cdiv(m, cfg.block_m) * be.cdiv(n, cfg.block_n)
    operands = (a, b) if bias is None else (a, b, bias)
    if not cfg.split_k or chunks == 1:
        return be.pallas_call(
            functools.partial(_fused_kernel, has_bias=bias is not None, **params),
            out_shape=jax.ShapeDtypeStruct((nb, m, n), out_dtype),
            grid=(nb, tiles),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            name="bi_jax_matmul",
        )(*operands)
    partials = be.pallas_call(
        functools.partial(_split_kernel, **params),
        out_shape=jax.ShapeDtypeStruct((chunks, nb, m, n), jnp.float32),
        grid=(nb, tiles, chunks),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        name="bi_jax_matmul_split_k",
    )(a, b)
    return _sum_partials(partials, bias, out_dtype)


def _sum_partials(partials, bias, out_dtype):
    """partials [chunks, B, M, N] fp32 -> [B, M, N]: ``_sum_kernel``'s ordered sum (+ bias)."""
    chunks, nb, m, n = partials.shape
    return be.pallas_call(
        functools.partial(_sum_kernel, m=m, n=n, chunks=chunks, has_bias=bias is not None),
        out_shape=jax.ShapeDtypeStruct((nb, m, n), out_dtype),
        grid=(nb, be.cdiv(m, _SUM_ROWS), be.cdiv(n, _SUM_COLS)),
        num_warps=4,
        num_stages=1,
        name="bi_jax_matmul_split_k_sum",
    )(partials, *(() if bias is None else (bias,)))


# ------------------------------------------------------------------------- Mosaic GPU (Hopper)

_MOSAIC_WG_ROWS = 64  # rows of one wgmma accumulator (one compute warpgroup)
# A boxes (rows) in the tile that M ends in: a warpgroup's v rows in M (a multiple of 8) are
# the boxes of v's set bits. A box that crossed the end of A (the TMA's zero fill) made the
# kernel up to 1.2x slower on an H100 (M = 136, K = 14336: 59.8 against 51.4 us at M = 192).
_MOSAIC_EDGE_BOXES = (64, 32, 16, 8)
_MOSAIC_EPI_COLS = 64  # the epilogue stores the output in [64, 64] pieces (two SMEM slots)
# block_n of the Mosaic kernel -> (A/B pipeline stages that fit the SMEM beside a bf16/fp16
# output, tile rate relative to a 128x256 tile, measured on an H100; 128x64 from attn-out at
# M = 256: 128 of its tiles took 17.2 us, 64 tiles of 128x128 22.5 us)
_MOSAIC_TILES = {256: (4, 1.0), 192: (4, 0.93), 128: (6, 0.86), 64: (8, 0.56)}
_MOSAIC_BLOCK_N = tuple(_MOSAIC_TILES)
_MOSAIC_SMEM_BYTES = 232448 - 1024  # an H100 CTA's shared memory, less room for the barriers


def _mosaic_smem(cfg: MatmulConfig, dtype: Any, out_dtype: Any) -> tuple[int, int]:
    """(stages, bytes): the K ring's stages that fit beside the epilogue's two output slots per
    warpgroup (at most ``cfg.num_stages``; fewer for an fp32 output), and the SMEM they take."""
    out = 2 * 2 * _MOSAIC_WG_ROWS * _MOSAIC_EPI_COLS * jnp.dtype(out_dtype).itemsize
    stage = (cfg.block_m + cfg.block_n) * cfg.block_k * jnp.dtype(dtype).itemsize
    stages = min(cfg.num_stages, (_MOSAIC_SMEM_BYTES - out) // stage)
    if stages < 2:
        raise ValueError(f"matmul: {cfg} leaves room for {stages} pipeline stage(s) in SMEM")
    return stages, out + stages * stage


def _mosaic_supported(m: int, n: int, k: int, dtype: Any) -> bool:
    """Shapes the Mosaic kernel takes: bf16/fp16, K and N multiples of the TMA's 64-element
    (128-byte) swizzle tile, and at least one full tile in each dimension (a block never exceeds
    its array). M is padded to a multiple of 8 (the TMA's row tile) by the launcher."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and k % 64 == 0 and n % 64 == 0 and m >= 128 and n >= 256)


def _mosaic_config(m: int, n: int, k: int, dtype: Any) -> MatmulConfig | None:
    """The Mosaic GPU kernel's config for a shape (None where it cannot run): 128x256, 128x192,
    128x128 or 128x64 tiles, whichever wastes least of the last wave of work items over the SMs
    (the narrower tiles run at ~0.93, ~0.86 and ~0.56 of the widest one's rate, H100; 128x64
    wins where 128x128 leaves most SMs idle, e.g. K = N = 4096 at M = 129-256). Up to M = 256 with
    several K chunks, each (tile, chunk) is an item of its own (``split_k``): a tile's whole K
    would leave most SMs idle.

    ``matmul_config`` takes it on Hopper from M = 129; its bits are the Triton kernel's. On an
    H100 it was as fast or faster at every M of the matmul sweep from 256, and at M = 129-192
    (0.87-1.19 of XLA on the Llama-3-8B shapes, where the Triton kernel ran 1.14-3.55).
    """
    dtype = jnp.dtype(dtype)
    if not _mosaic_supported(m, n, k, dtype):
        return None
    split = k > _K_CHUNK and m <= 256
    items = be.cdiv(k, _k_chunk(k)) if split else 1

    def cost(bn):  # time ~ waves of items x work per item / rate
        tile = MatmulConfig(128, bn, _BLOCK_K[dtype], kernel="mosaic")
        return _waves(m, n, tile, items) * bn / _MOSAIC_TILES[bn][1]

    bn = min(_MOSAIC_BLOCK_N, key=cost)
    return MatmulConfig(128, bn, _BLOCK_K[dtype], num_stages=_MOSAIC_TILES[bn][0], split_k=split,
                        kernel="mosaic")


def _mosaic_kernel(a_ref, b_ref, o_ref, scratch, *, m, n, k, cfg, k_chunk, n_cta):
    """Warp-specialised, persistent matmul: two compute warpgroups (64 rows each) and one TMA
    producer per CTA; CTA ``c`` runs items ``c, c + n_cta, ...``, an item being a tile (grouped
    along M as ``_tile_coords``) or, with ``cfg.split_k``, one K chunk of a tile (chunk-major);
    no numerics. In the tile that M ends in, each warpgroup's A rows in M arrive as boxes of 64,
    32, 16 and 8 rows that end in M (``_MOSAIC_EDGE_BOXES``), on the warpgroup's own barrier; a
    warpgroup whose rows are all past M loads, computes and stores nothing, it only releases
    the ring slots. The arithmetic is ``_fused_kernel``'s: per K chunk a fresh fp32 accumulator
    takes the chunk's ``block_k`` blocks in ascending order (wgmma, chained into the
    accumulator), and ``total = ((0 + p0) + p1) + ...`` is rounded once. With ``split_k`` the
    chunk partials go to ``o_ref`` ([chunks, B, M, N], fp32) for ``_sum_kernel``'s same sum."""
    plgpu = be.mgpu
    a_smem, b_smem, o_smem, a_bar, a_edge, b_bar, free = scratch
    bm, bn, bk, stages = cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    n_blocks, per_chunk = be.cdiv(k, bk), k_chunk // bk
    chunks = be.cdiv(k, k_chunk)
    split = cfg.split_k and chunks > 1
    tiles_m, tiles_n = be.cdiv(m, bm), be.cdiv(n, bn)
    per_batch = tiles_m * tiles_n
    n_tiles = a_ref.shape[0] * per_batch
    n_items = n_tiles * (chunks if split else 1)
    wg, cta = lax.axis_index("wg"), lax.axis_index("cta")
    n_mine = lax.div(i32(n_items) - cta + n_cta - 1, i32(n_cta))

    def ring_start(t):  # K blocks this CTA's items before item t took from the ring, in closed
        # form (a count carried through the item loop ran ~4 us slower per kernel on an H100)
        if not split:
            return t * n_blocks
        short = per_chunk - (n_blocks - (chunks - 1) * per_chunk)  # the last chunk's shortfall
        first_last = lax.div(jnp.maximum(i32((chunks - 1) * n_tiles) - cta, 0) + n_cta - 1,
                             i32(n_cta))  # this CTA's first item in the last chunk
        return t * per_chunk - jnp.maximum(t - first_last, 0) * short

    def item(t):  # (chunk or 0, batch, first row, first column, first K block, K blocks)
        g = cta + t * n_cta
        c, g = (lax.div(g, i32(n_tiles)), lax.rem(g, i32(n_tiles))) if split else (i32(0), g)
        batch, g = lax.div(g, i32(per_batch)), lax.rem(g, i32(per_batch))
        pid_m, pid_n = _tile_coords(g, m, n, bm, bn, cfg.group_m)
        if not split:  # static K loop bounds
            return c, batch, pid_m * bm, pid_n * bn, 0, n_blocks
        first = c * per_chunk
        return c, batch, pid_m * bm, pid_n * bn, first, jnp.minimum(per_chunk, n_blocks - first)

    @be.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        lay = plgpu.Layout.WGMMA
        rows = be.ds(wg * _MOSAIC_WG_ROWS, _MOSAIC_WG_ROWS)

        def tile(t, _):
            c, batch, row0, col0, first, count = item(t)
            g0 = ring_start(t)
            my_row0 = row0 + wg * _MOSAIC_WG_ROWS

            def chunk(start, n_chunk_blocks):  # one fresh accumulator over ring blocks start, ...
                def mma(acc_ref):
                    @be.loop(0, n_chunk_blocks)
                    def _(i):
                        slot = lax.rem(start + i, i32(stages))
                        @be.when(row0 + bm <= m)
                        def _():
                            plgpu.barrier_wait(a_bar.at[slot])

                        @be.when(row0 + bm > m)
                        def _():
                            plgpu.barrier_wait(a_edge.at[wg * stages + slot])

                        plgpu.barrier_wait(b_bar.at[slot])
                        plgpu.wgmma(acc_ref, a_smem.at[slot, rows], b_smem.at[slot])
                        plgpu.wgmma_wait(1)  # the previous block's wgmma is done: free its slot

                        @be.when(i > 0)
                        def _():
                            plgpu.barrier_arrive(free.at[lax.rem(start + i + stages - 1,
                                                                 i32(stages))])

                    plgpu.wgmma_wait(0)
                    last = start + n_chunk_blocks - 1
                    plgpu.barrier_arrive(free.at[lax.rem(last, i32(stages))])
                    return acc_ref[...]

                return be.run_scoped(mma, plgpu.ACC((_MOSAIC_WG_ROWS, bn), jnp.float32))

            @be.when(my_row0 < m)
            def _rows():
                if split:  # this chunk's partial, unrounded
                    out, lead = chunk(g0, count), (c, batch)
                else:
                    def fold(ci, total):
                        first_c = ci * per_chunk
                        return total + chunk(g0 + first_c,
                                             jnp.minimum(per_chunk, n_blocks - first_c))

                    zero = plgpu.layout_cast(jnp.full((_MOSAIC_WG_ROWS, bn), 0.0, jnp.float32),
                                             lay)
                    out = lax.fori_loop(0, chunks, fold, zero).astype(o_ref.dtype)
                    lead = (batch,)
                pieces = bn // _MOSAIC_EPI_COLS
                for j in range(pieces):
                    # the slots alternate across tiles too (an odd piece count would otherwise
                    # reuse the slot of the previous tile's last store, which may be in flight)
                    piece = o_smem.at[wg, lax.rem(t * pieces + j, i32(2))]
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # this slot's last store left
                    piece[...] = out[:, j * _MOSAIC_EPI_COLS:(j + 1) * _MOSAIC_EPI_COLS]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        piece, o_ref.at[(*lead, be.ds(my_row0, _MOSAIC_WG_ROWS),
                                         be.ds(col0 + j * _MOSAIC_EPI_COLS, _MOSAIC_EPI_COLS))])

            @be.when(my_row0 >= m)
            def _padding():  # rows past M (the last tile of M = 129..192, ...): nothing loaded for
                # them, nothing to compute or store; release the item's ring slots, and let every
                # store leave the output slots (the next item may start on either slot)
                @be.loop(0, count)
                def _(i):
                    slot = lax.rem(g0 + i, i32(stages))
                    plgpu.barrier_wait(b_bar.at[slot])
                    plgpu.barrier_arrive(free.at[slot])

                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            return _

        lax.fori_loop(0, n_mine, tile, None)
        plgpu.wait_smem_to_gmem(0)

    @be.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def tile(t, _):
            _, batch, row0, col0, first, count = item(t)
            g0 = ring_start(t)

            @be.loop(0, count)
            def _(i):
                g = g0 + i
                slot = lax.rem(g, i32(stages))

                @be.when(g >= stages)
                def _():
                    plgpu.barrier_wait(free.at[slot])

                ks = be.ds((first + i) * bk, bk)

                @be.when(row0 + bm <= m)
                def _():  # all rows in M: one box
                    plgpu.copy_gmem_to_smem(a_ref.at[batch, be.ds(row0, bm), ks], a_smem.at[slot],
                                            a_bar.at[slot])

                def edge_box(h, off, size, go):  # warpgroup h's rows off.. of the last tile
                    @be.when(go)
                    def _():
                        h0 = row0 + h * _MOSAIC_WG_ROWS
                        plgpu.copy_gmem_to_smem(
                            a_ref.at[batch, be.ds(h0 + off, size), ks],
                            a_smem.at[slot, be.ds(h * _MOSAIC_WG_ROWS + off, size)],
                            a_edge.at[h * stages + slot])

                def edge_arrive(h, go):  # a box warpgroup h's rows do not need
                    @be.when(go)
                    def _():
                        plgpu.barrier_arrive(a_edge.at[h * stages + slot])

                @be.when(row0 + bm > m)
                def _():  # the tile that M ends in: each warpgroup's rows in M, in boxes that end
                    # in M, on its own barrier (a warpgroup past M has nothing to wait for)
                    for h in range(bm // _MOSAIC_WG_ROWS):
                        h0 = row0 + h * _MOSAIC_WG_ROWS
                        v = jnp.clip(m - h0, 0, _MOSAIC_WG_ROWS)  # a multiple of 8 (M is padded)
                        for size in _MOSAIC_EDGE_BOXES:
                            bit = lax.bitwise_and(v, size) != 0
                            for off in range(0, _MOSAIC_WG_ROWS, 2 * size):  # larger boxes' rows
                                edge_box(h, off, size,
                                         bit & (lax.bitwise_and(v, ~(2 * size - 1)) == off))
                            edge_arrive(h, (v > 0) & ~bit)

                plgpu.copy_gmem_to_smem(b_ref.at[batch, ks, be.ds(col0, bn)], b_smem.at[slot],
                                        b_bar.at[slot])
            return _

        lax.fori_loop(0, n_mine, tile, None)
        g_end = ring_start(n_mine)

        @be.loop(jnp.maximum(g_end - stages, 0), g_end)
        def _last(g):  # see the last slots released before the CTA's barriers go away
            plgpu.barrier_wait(free.at[lax.rem(g, i32(stages))])


def _bmm_mosaic(a, b, *, out_dtype, cfg):
    """Launcher of ``_mosaic_kernel``: a [B, M, K], b [B, K, N] -> [B, M, N] (no bias); with
    ``cfg.split_k`` and several K chunks, fp32 chunk partials and ``_sum_partials``."""
    nb, m, k = a.shape
    n = b.shape[2]
    if m % 8:  # rows are independent: zero rows in, their outputs dropped
        return _bmm_mosaic(jnp.pad(a, ((0, 0), (0, -m % 8), (0, 0))), b, out_dtype=out_dtype,
                           cfg=cfg)[:, :m]
    k_chunk = _k_chunk(k)
    chunks = be.cdiv(k, k_chunk)
    split = cfg.split_k and chunks > 1
    final_dtype, out_dtype = out_dtype, jnp.float32 if split else out_dtype
    dt = a.dtype
    itemsize = jnp.dtype(dt).itemsize
    tr = (be.mgpu.TilingTransform((8, 128 // itemsize)), be.mgpu.SwizzleTransform(128))
    out_item = jnp.dtype(out_dtype).itemsize
    out_tr = (be.mgpu.TilingTransform((8, 128 // out_item)), be.mgpu.SwizzleTransform(128)) \
        if _MOSAIC_EPI_COLS * out_item >= 128 else ()
    st = _mosaic_smem(cfg, dt, out_dtype)[0]
    cfg = dataclasses.replace(cfg, num_stages=st)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    scratch = (
        be.mgpu.SMEM((st, bm, bk), dt, transforms=tr),
        be.mgpu.SMEM((st, bk, bn), dt, transforms=tr),
        be.mgpu.SMEM((2, 2, _MOSAIC_WG_ROWS, _MOSAIC_EPI_COLS), out_dtype, transforms=out_tr),
        be.mgpu.Barrier(num_barriers=st),  # a block loaded
        # a block of the tile that M ends in loaded: warpgroup 0's rows, then warpgroup 1's
        be.mgpu.Barrier(num_arrivals=len(_MOSAIC_EDGE_BOXES), num_barriers=2 * st),
        be.mgpu.Barrier(num_barriers=st),  # b block loaded
        be.mgpu.Barrier(num_arrivals=2, num_barriers=st),  # slot free (both warpgroups done)
    )
    n_items = nb * be.cdiv(m, bm) * be.cdiv(n, bn) * (chunks if split else 1)
    n_cta = min(n_items, be.sm_count())

    def entry(a_ref, b_ref, o_ref):
        be.run_scoped(
            lambda *sc: _mosaic_kernel(a_ref, b_ref, o_ref, sc, m=m, n=n, k=k, cfg=cfg,
                                       k_chunk=k_chunk, n_cta=n_cta),
            *scratch, collective_axes="wg")

    out = be.mosaic_kernel(
        entry, out_type=jax.ShapeDtypeStruct((chunks, nb, m, n) if split else (nb, m, n),
                                             out_dtype),
        grid=(n_cta,), grid_names=("cta",), num_threads=3, thread_name="wg",
    )(a, b)
    return _sum_partials(out, None, final_dtype) if split else out


# --------------------------------------------------------------------------------------- reference

_REF_K_CHUNK = 16  # k steps unrolled per scan iteration of the reference


def _bmm_reference(a, b, bias, *, out_dtype):
    """a [B, M, K], b [B, K, N], bias [N] | None -> [B, M, N], invariant by construction.

    ``acc[b, i, j] = ((0 + a[i,0] b[0,j]) + a[i,1] b[1,j]) + ...`` in fp32, elementwise, in ascending
    k: no dot, no tree reduction, so nothing XLA chooses per shape can reorder the sum.
    """
    nb, m, k = a.shape
    n = b.shape[2]
    steps = -(-k // _REF_K_CHUNK)
    kp = steps * _REF_K_CHUNK
    a32 = jnp.pad(exact_f32(a), ((0, 0), (0, 0), (0, kp - k)))
    b32 = jnp.pad(exact_f32(b), ((0, 0), (0, kp - k), (0, 0)))
    a_steps = a32.reshape(nb, m, steps, _REF_K_CHUNK).transpose(2, 0, 1, 3)  # [S, B, M, C]
    b_steps = b32.reshape(nb, steps, _REF_K_CHUNK, n).transpose(1, 0, 2, 3)  # [S, B, C, N]

    def step(acc, ab):
        return _add_products_ascending_k(acc, *ab), None

    acc, _ = lax.scan(step, jnp.zeros((nb, m, n), jnp.float32), (a_steps, b_steps))
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    return acc.astype(out_dtype)


def _bmm_xla(a, b, bias, *, out_dtype, precision):
    """XLA's default dot. Without a bias it asks for ``out_dtype`` directly, as ``jnp.dot`` does
    (cuBLAS still accumulates in fp32): an fp32 result and a separate cast ran up to 1.2x slower on
    an H100 (bf16, M >= 256), which would flatter the Pallas / XLA ratios. With a bias: fp32
    accumulator + bias, one rounding."""
    dims = (((2,), (1,)), ((0,), (0,)))
    if bias is None:
        return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=out_dtype)
    acc = lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)
    return (acc + bias.astype(jnp.float32)).astype(out_dtype)


# -------------------------------------------------------------------------- canonical op with VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _bmm(a, b, bias, out_dtype, precision, implementation, config):
    """The one canonical op: a [B, M, K] @ b [B, K, N] (+ bias [N]) -> [B, M, N] in out_dtype."""
    nb, m, k = a.shape
    n = b.shape[2]
    if m == 0 or n == 0 or nb == 0:
        return jnp.zeros((nb, m, n), out_dtype)
    if k == 0:
        out = jnp.zeros((nb, m, n), jnp.float32)
        return (out if bias is None else out + bias.astype(jnp.float32)).astype(out_dtype)
    if implementation == "pallas":
        return _bmm_pallas(a, b, bias, out_dtype=out_dtype, precision=precision, config=config,
                           key=(be.trace_key(), _K_CHUNK, _K_CHUNK_ALIGN))
    if implementation == "reference":
        return _bmm_reference(a, b, bias, out_dtype=out_dtype)
    return _bmm_xla(a, b, bias, out_dtype=out_dtype, precision=precision)


def _bmm_fwd(a, b, bias, out_dtype, precision, implementation, config):
    return _bmm(a, b, bias, out_dtype, precision, implementation, config), (a, b, bias)


def _bmm_bwd(out_dtype, precision, implementation, config, res, g):
    a, b, bias = res
    del out_dtype, config
    gt = jnp.result_type(g.dtype, a.dtype)
    da = _bmm(
        g.astype(gt),
        jnp.swapaxes(b, 1, 2).astype(gt),
        None,
        a.dtype,
        precision,
        implementation,
        None,
    )
    db = _bmm(
        jnp.swapaxes(a, 1, 2).astype(gt),
        g.astype(gt),
        None,
        b.dtype,
        precision,
        implementation,
        None,
    )
    dbias = None if bias is None else g.astype(jnp.float32).sum((0, 1)).astype(bias.dtype)
    return da, db, dbias


_bmm.defvjp(_bmm_fwd, _bmm_bwd)


# -------------------------------------------------------------------------------------- public API

_HIGHEST = lax.Precision.HIGHEST


def _kernel_precision(precision: Any, dtype: Any) -> lax.Precision:
    """DEFAULT/HIGH -> TF32 for fp32 inputs (as XLA on GPU), HIGHEST -> IEEE fp32."""
    if precision is None:
        cfg = str(jax.config.jax_default_matmul_precision or "").lower()
        precision = _HIGHEST if cfg in ("highest", "float32", "fp32") else lax.Precision.DEFAULT
    if isinstance(precision, (tuple, list)):
        if len(precision) != 2:
            raise ValueError(f"precision must be one value or a (lhs, rhs) pair, got {precision!r}")
        precision = (
            _HIGHEST
            if _HIGHEST in tuple(lax.Precision(p) for p in precision)
            else lax.Precision.DEFAULT
        )
    if isinstance(precision, str):
        precision = lax.Precision(precision)
    if not isinstance(precision, lax.Precision):
        raise NotImplementedError(f"precision {precision!r} is not supported (use lax.Precision)")
    if jnp.dtype(dtype) != jnp.float32:
        return lax.Precision.DEFAULT
    return _HIGHEST if precision == _HIGHEST else lax.Precision.DEFAULT


def _operand_dtype(op: str, *xs: Any) -> jnp.dtype:
    for name, x in zip(("lhs", "rhs"), xs):
        _checks.check_float(op, name, x)
    return jnp.dtype(jnp.result_type(*xs))


def matmul(
    a: jax.Array,
    b: jax.Array,
    *,
    bias: jax.Array | None = None,
    precision: Any = None,
    out_dtype: Any = None,
    implementation: str | None = None,
    config: MatmulConfig | None = None,
) -> jax.Array:
    """Batch-invariant ``a @ b (+ bias)``.

    Args:
      a: ``[..., K]``, bf16/fp16/fp32; the leading dims are rows (the batch).
      b: ``[K, N]``, bf16/fp16/fp32 (promoted with ``a``).
      bias: optional ``[N]``, added in fp32 before the single rounding.
      precision: for fp32 inputs, ``lax.Precision.HIGHEST`` gives IEEE fp32 products; DEFAULT/HIGH
        give TF32 on the GPU (as XLA). Ignored for bf16/fp16.
      out_dtype: output dtype (default: the promoted input dtype).
      implementation: None (Pallas on GPU, reference elsewhere), "pallas", "reference" or "xla".
      config: override the tile policy (``MatmulConfig``); bits do not depend on it.

    Returns:
      ``[..., N]`` in ``out_dtype``.

    Invariance: row ``i`` of the output has the same bits whatever the other rows and the number of
    rows (see the module docstring); ``implementation="xla"`` promises nothing.
    """
    impl = be.resolve_implementation(implementation, "matmul")
    dtype = _operand_dtype("matmul", a, b)
    if a.ndim < 1 or b.ndim != 2:
        raise ValueError(
            f"matmul: expected a [..., K] and b [K, N], got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if a.shape[-1] != b.shape[0]:
        raise ValueError(
            f"matmul: contraction sizes differ: a {tuple(a.shape)} has K={a.shape[-1]}, "
            f"b {tuple(b.shape)} has K={b.shape[0]}"
        )
    n = b.shape[1]
    if bias is not None:
        _checks.check_float("matmul", "bias", bias)
        _checks.check_shape("matmul", "bias", bias, (n,), f"N of b {tuple(b.shape)}")
    out_dtype = _checks.check_out_dtype("matmul", dtype if out_dtype is None else out_dtype)
    lead = a.shape[:-1]
    a3 = a.astype(dtype).reshape(1, math.prod(lead), a.shape[-1])
    b3 = b.astype(dtype)[None]
    out = _bmm(a3, b3, bias, out_dtype, _kernel_precision(precision, dtype), impl, config)
    return out.reshape(*lead, n)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
    *,
    implementation: str | None = None,
) -> jax.Array:
    """Batch-invariant drop-in for ``lax.dot_general``.

    Accepts every ``lax.dot_general`` dimension-numbers form ``(((lhs_contract), (rhs_contract)),
    ((lhs_batch), (rhs_batch)))`` and the keyword arguments Flax passes, so
    ``nnx.Linear(..., dot_general=bi_jax.dot_general)`` and ``nnx.Einsum`` work unchanged.

    Shapes: the output is ``batch dims + lhs free dims + rhs free dims``, as ``lax.dot_general``.
    Dtypes: bf16/fp16/fp32 (promoted), fp32 accumulation, output ``preferred_element_type`` (default:
    the promoted input dtype). ``out_sharding`` is applied with ``jax.sharding.reshard`` when given.

    Invariance: every output element is reduced over the contracting dims in one fixed order that
    depends on the contraction size only; rows (lhs free dims) and batch elements never mix.
    """
    impl = be.resolve_implementation(implementation, "dot_general")
    dtype = _operand_dtype("dot_general", lhs, rhs)
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(d) for d in x) for x in (lc, rc, lb, rb))
    _check_dims(lhs, rhs, lc, rc, lb, rb)
    lf = tuple(d for d in range(lhs.ndim) if d not in lc and d not in lb)
    rf = tuple(d for d in range(rhs.ndim) if d not in rc and d not in rb)
    batch_shape = tuple(lhs.shape[d] for d in lb)
    lf_shape = tuple(lhs.shape[d] for d in lf)
    rf_shape = tuple(rhs.shape[d] for d in rf)
    nb, m, n = math.prod(batch_shape), math.prod(lf_shape), math.prod(rf_shape)
    k = math.prod(lhs.shape[d] for d in lc)
    a3 = jnp.transpose(lhs.astype(dtype), lb + lf + lc).reshape(nb, m, k)
    b3 = jnp.transpose(rhs.astype(dtype), rb + rc + rf).reshape(nb, k, n)
    out_dtype = _checks.check_out_dtype(
        "dot_general", dtype if preferred_element_type is None else preferred_element_type
    )
    out = _bmm(a3, b3, None, out_dtype, _kernel_precision(precision, dtype), impl, None)
    out = out.reshape(batch_shape + lf_shape + rf_shape)
    if out_sharding is not None:
        out = jax.sharding.reshard(out, out_sharding)
    return out


def _check_dims(
    lhs, rhs, lc: Sequence[int], rc: Sequence[int], lb: Sequence[int], rb: Sequence[int]
) -> None:
    shapes = f"lhs {tuple(lhs.shape)}, rhs {tuple(rhs.shape)}"
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(
            f"dot_general: contracting dims {lc} vs {rc} / batch dims {lb} vs {rb} differ in "
            f"number ({shapes})"
        )
    for dims, x, side in ((lc + lb, lhs, "lhs"), (rc + rb, rhs, "rhs")):
        if any(not 0 <= d < x.ndim for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(
                f"dot_general: {side} dims {dims} are out of range or repeated for rank {x.ndim} "
                f"({shapes})"
            )
    for kind, ld, rd in (("contracting", lc, rc), ("batch", lb, rb)):
        for i, j in zip(ld, rd):
            if lhs.shape[i] != rhs.shape[j]:
                raise ValueError(
                    f"dot_general: {kind} dim {i} of lhs (size {lhs.shape[i]}) and dim {j} of rhs "
                    f"(size {rhs.shape[j]}) differ ({shapes})"
                )


def matmul_reference(
    a: jax.Array, b: jax.Array, *, bias: jax.Array | None = None, out_dtype: Any = None
) -> jax.Array:
    """The plain-jnp path of ``matmul`` (invariant by construction on every backend)."""
    return matmul(a, b, bias=bias, out_dtype=out_dtype, implementation="reference")
