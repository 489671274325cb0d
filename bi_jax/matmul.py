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
  Every output element is one fp32 accumulator that runs over K in ascending blocks of a fixed
  ``block_k`` inside a single program (no split-K, no stream-K, no atomics); the bias is added in fp32
  and the result is rounded once. The accumulation order therefore depends on K alone, never on M or
  on the other rows, so row ``i`` of the output has the same bits for any batch. The M/N tile, warps
  and stages follow M (``matmul_config``): on the GPU, Triton chains the per-block MMAs into one
  accumulator whatever the tile, and ``tests/test_matmul.py`` proves bitwise equality across every
  config the policy can choose. The reference path multiplies and adds elementwise in a fixed
  sequential K order, so it is invariant by construction on every backend, the CPU included (XLA's own
  ``jnp.dot`` is not, even on the CPU).

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
    one accumulator; we keep it fixed per dtype (``_BLOCK_K``) anyway. ``block_m``, ``block_n``,
    ``num_warps`` and ``num_stages`` are free (proven bit-neutral by the cross-config test).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8  # programs along M that share a band of B columns (L2 reuse); no numerics

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"MatmulConfig.{name}={v} must be a power of two >= 16")


_BLOCK_K = {jnp.dtype(jnp.bfloat16): 64, jnp.dtype(jnp.float16): 64, jnp.dtype(jnp.float32): 32}


def matmul_config(m: int, n: int, k: int, dtype: Any) -> MatmulConfig:
    """The tile policy: follows M and N (bit-neutral), with ``block_k`` fixed per dtype.

    Tuned on an H100 (bf16, Llama-3-8B projection shapes; scratch sweep of 15 configs per point, all
    of which gave identical bits): narrow N tiles for small M so enough programs stream the weights,
    128x256 tiles with 8 warps once M fills the machine.
    """
    del k
    dtype = jnp.dtype(dtype)
    bk = _BLOCK_K[dtype]
    wide = n > 8192
    if dtype == jnp.float32:
        if m <= 16:
            return MatmulConfig(16, 64, bk, num_warps=4, num_stages=4)
        if m <= 64:
            return MatmulConfig(64, 64, bk, num_warps=4, num_stages=4)
        return MatmulConfig(128, 64, bk, num_warps=4, num_stages=3)
    if m <= 16:
        return MatmulConfig(16, 128 if wide else 32, bk, num_warps=4, num_stages=4)
    if m <= 64:
        if wide:
            return MatmulConfig(64, 128, bk, num_warps=4, num_stages=4)
        return MatmulConfig(16, 64, bk, num_warps=4, num_stages=6)
    if m <= 512 and not wide:
        return MatmulConfig(128, 128, bk, num_warps=4, num_stages=4)
    return MatmulConfig(128, 256, bk, num_warps=8, num_stages=4)


def shipped_configs(dtype: Any) -> tuple[MatmulConfig, ...]:
    """Every config ``matmul_config`` can choose for ``dtype`` (for the cross-config tests)."""
    return tuple(
        dict.fromkeys(
            matmul_config(m, n, 4096, dtype) for n in (4096, 28672) for m in (1, 32, 64, 256, 4096)
        )
    )


# ------------------------------------------------------------------------------------------ kernel


def _matmul_kernel(
    a_ref, b_ref, *rest, m, n, k, has_bias, precision, block_m, block_n, block_k, group_m
):
    """One program computes a ``[block_m, block_n]`` tile of one batch element, all of K."""
    bias_ref, o_ref = (rest[0], rest[1]) if has_bias else (None, rest[0])
    batch = be.program_id(0)
    # Grouped ordering of the (M, N) tiles: consecutive programs reuse the same B columns from L2.
    pid = be.program_id(1)
    num_m, num_n = be.cdiv(m, block_m), be.cdiv(n, block_n)
    width = group_m * num_n
    first_m = (pid // width) * group_m
    rows_in_group = jnp.minimum(num_m - first_m, group_m)
    pid_m = first_m + (pid % width) % rows_in_group
    pid_n = (pid % width) // rows_in_group

    rows = pid_m * block_m + jnp.arange(block_m)
    cols = pid_n * block_n + jnp.arange(block_n)
    row_ok, col_ok = rows < m, cols < n

    def body(kb, acc):
        ks = kb * block_k + jnp.arange(block_k)
        k_ok = ks < k
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
        return acc + jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)

    acc = lax.fori_loop(0, be.cdiv(k, block_k), body, jnp.zeros((block_m, block_n), jnp.float32))
    if bias_ref is not None:
        bias = be.load(bias_ref.at[be.ds(pid_n * block_n, block_n)], mask=col_ok, other=0.0)
        acc = acc + bias.astype(jnp.float32)[None, :]
    be.store(  # [block_m, block_n]
        o_ref.at[batch, be.ds(pid_m * block_m, block_m), be.ds(pid_n * block_n, block_n)],
        acc.astype(o_ref.dtype),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def _bmm_pallas(a, b, bias, *, out_dtype, precision, config):
    """Launcher: a [B, M, K], b [B, K, N], bias [N] | None -> [B, M, N]."""
    nb, m, k = a.shape
    n = b.shape[2]
    cfg = config or matmul_config(m, n, k, a.dtype)
    kernel = functools.partial(
        _matmul_kernel,
        m=m,
        n=n,
        k=k,
        has_bias=bias is not None,
        precision=precision,
        block_m=cfg.block_m,
        block_n=cfg.block_n,
        block_k=cfg.block_k,
        group_m=cfg.group_m,
    )
    grid = (nb, be.cdiv(m, cfg.block_m) * be.cdiv(n, cfg.block_n))
    call = be.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((nb, m, n), out_dtype),
        grid=grid,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        name="bi_jax_matmul",
    )
    return call(a, b) if bias is None else call(a, b, bias)


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
        a_c, b_c = ab
        for t in range(_REF_K_CHUNK):
            acc = acc + a_c[:, :, t, None] * b_c[:, None, t, :]
        return acc, None

    acc, _ = lax.scan(step, jnp.zeros((nb, m, n), jnp.float32), (a_steps, b_steps))
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    return acc.astype(out_dtype)


def _bmm_xla(a, b, bias, *, out_dtype, precision):
    acc = lax.dot_general(
        a, b, (((2,), (1,)), ((0,), (0,))), precision=precision, preferred_element_type=jnp.float32
    )
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    return acc.astype(out_dtype)


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
        return _bmm_pallas(a, b, bias, out_dtype=out_dtype, precision=precision, config=config)
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
