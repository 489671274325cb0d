"""Batch-invariant data and tensor parallelism through ``jax.shard_map`` over a ``jax.sharding.Mesh``.

Shapes (``D`` = the number of devices along the mesh axis):
  ``data_parallel(fn, mesh)(x, *shared)``: x ``[M, ...]`` with its rows split over the devices (padded
  to a multiple of ``D``; the padding rows are dropped), the other arguments replicated.
  ``column_parallel_linear(x, w, bias)``: x ``[..., K]`` replicated, w ``[K, N]`` and bias ``[N]``
  split along N -> ``[..., N]`` split along N (no communication).
  ``row_parallel_linear(x, w, bias)``: x ``[..., K]`` split along K, w ``[K, N]`` split along K, bias
  ``[N]`` replicated -> ``[..., N]`` replicated. Each device computes an fp32 partial ``[..., N]``
  over its ``K / D`` slice; the partials are combined across devices.
  ``tensor_parallel_mlp(x, w_gate, w_up, w_down)``: the Megatron pattern (gate/up column-parallel,
  ``silu(gate) * up`` local, down row-parallel), x ``[..., H]`` -> ``[..., H]`` replicated.
  ``fixed_order_combine(partials)``: ``[D, ...]`` fp32 -> ``[...]``, ``((p0 + p1) + p2) + ...``.

Invariance:
  Data parallelism: every bi_jax op keeps rows independent, so a row computed on a device that holds
  ``M / D`` rows has the same bits as on one device holding all ``M`` (the per-device op is invariant
  to its own batch size). Column parallelism: each output column is one whole-K accumulation on one
  device, the same as on one device. Row parallelism with ``combine="fixed"`` (the default): each
  device's partial is a bi_jax matmul over its K slice (invariant), the fp32 partials are
  ``all_gather``-ed (a copy, exact) and summed elementwise in device order ``p0 + p1 + ... + p{D-1}``
  in fp32, the bias is added in fp32 and the result is rounded once. The order depends on ``D``
  alone, never on M, so for a fixed device count row ``i`` has the same bits for every batch size and
  position. (It is not the same bits as the one-device matmul: the K sum is split differently.)
  ``combine="psum"`` uses ``lax.psum`` (NCCL all-reduce on the GPU), whose algorithm (ring, tree,
  chunking) the library picks from the message size and the topology: it promises nothing and is kept
  for comparison. (With ``D = 2`` any order of a two-term fp32 sum gives the same bits, so psum cannot
  vary there; it can from ``D = 3``.)

The ops inside run with ``implementation=`` as everywhere in bi_jax. ``implementation="pallas"``
works under ``shard_map`` (on the CPU in interpret mode, checked by ``tests/test_parallel.py``). A
Pallas call cannot be partitioned by XLA's SPMD partitioner, so shard through these helpers (or your
own ``shard_map``) rather than by handing sharded arrays to a plain ``jax.jit``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bi_jax.matmul import matmul
from bi_jax.reductions import exact_f32

COMBINES = ("fixed", "psum")


def make_mesh(num_devices: int | None = None, axis: str = "x", devices: Sequence[Any] | None = None) -> Mesh:
    """A one-axis ``Mesh`` over the first ``num_devices`` devices (default: all of them), in order.

    The device order of the mesh is the order of the fixed combine: keep it fixed for reproducible bits.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"make_mesh: asked for {num_devices} devices, {len(devices)} available")
    return Mesh(np.array(devices[:n]), (axis,))


def _axis_size(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}")
    return int(mesh.shape[axis])


def _check_divisible(op: str, what: str, size: int, d: int, axis: str) -> None:
    if size % d:
        raise ValueError(f"{op}: {what} = {size} is not divisible by the {d} devices of mesh axis {axis!r}")


# ------------------------------------------------------------------------------ fixed-order combine


def fixed_order_combine(partials: jax.Array) -> jax.Array:
    """``[D, ...] -> [...]``: ``((p[0] + p[1]) + p[2]) + ...`` elementwise in fp32, in index order.

    Only elementwise adds, unrolled in Python: the order is fixed by ``D`` and independent of the
    other dimensions on every backend.
    """
    p = exact_f32(partials)
    acc = p[0]
    for i in range(1, p.shape[0]):
        acc = acc + p[i]
    return acc


def _combine(partial: jax.Array, axis: str, combine: str) -> jax.Array:
    """Inside ``shard_map``: sum the per-device fp32 ``partial`` over mesh axis ``axis``."""
    if combine == "fixed":
        return fixed_order_combine(lax.all_gather(partial, axis, axis=0, tiled=False))
    return lax.psum(partial, axis)


def _check_combine(op: str, combine: str) -> None:
    if combine not in COMBINES:
        raise ValueError(f"{op}: combine must be one of {COMBINES}, got {combine!r}")


def _finish(acc: jax.Array, bias: jax.Array | None, out_dtype: Any) -> jax.Array:
    if bias is not None:
        acc = acc + exact_f32(bias)
    return acc.astype(out_dtype)


# ------------------------------------------------------------------------------- data parallelism


def data_parallel(
    fn: Callable[..., Any],
    mesh: Mesh,
    *,
    axis: str = "x",
    batched_argnums: Sequence[int] = (0,),
    jit: bool = True,
) -> Callable[..., Any]:
    """Run ``fn`` with the leading (batch) axis of ``batched_argnums`` split over mesh axis ``axis``.

    The other arguments are replicated. The batch is padded with zero rows to a multiple of the
    device count and the padding is dropped from every output leaf (outputs must carry the batch on
    axis 0). With a batch-invariant ``fn`` (every bi_jax op) each row gets the bits it gets on one
    device.
    """
    d = _axis_size(mesh, axis)
    batched = tuple(batched_argnums)

    def wrapped(*args):
        n = args[batched[0]].shape[0]
        for i in batched:
            if args[i].shape[0] != n:
                raise ValueError(
                    "data_parallel: batched arguments disagree on the batch size: "
                    f"{[tuple(args[j].shape) for j in batched]}"
                )
        pad = -n % d
        args = [
            jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) if i in batched and pad else a
            for i, a in enumerate(args)
        ]
        specs = tuple(P(axis) if i in batched else P() for i in range(len(args)))
        out = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(axis), check_vma=False)(*args)
        return jax.tree.map(lambda o: o[:n], out)

    return jax.jit(wrapped) if jit else wrapped


# ----------------------------------------------------------------------------- tensor parallelism


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "out_dtype", "implementation"))
def column_parallel_linear(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None = None,
    *,
    mesh: Mesh,
    axis: str = "x",
    out_dtype: Any = None,
    implementation: str | None = None,
) -> jax.Array:
    """``x @ w + bias`` with ``w`` ``[K, N]`` and ``bias`` ``[N]`` split along N over ``axis``.

    x ``[..., K]`` is replicated; the output ``[..., N]`` is split along N (a global array: index it
    or feed it to ``row_parallel_linear``). No cross-device reduction: each column is computed by
    ``bi_jax.matmul`` on one device, with the bits of the one-device matmul.
    """
    op = "column_parallel_linear"
    d = _axis_size(mesh, axis)
    _check_divisible(op, "N (w.shape[1])", w.shape[-1], d, axis)
    lead = (None,) * (x.ndim - 1)

    def local(x, w, *b):
        return matmul(x, w, bias=b[0] if b else None, out_dtype=out_dtype, implementation=implementation)

    args = (x, w) if bias is None else (x, w, bias)
    specs = (P(), P(None, axis)) + (() if bias is None else (P(axis),))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(*lead, axis), check_vma=False)(*args)


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "combine", "out_dtype", "implementation"))
def row_parallel_linear(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None = None,
    *,
    mesh: Mesh,
    axis: str = "x",
    combine: str = "fixed",
    out_dtype: Any = None,
    implementation: str | None = None,
) -> jax.Array:
    """``x @ w + bias`` with x's last axis and w's first axis (K) split over mesh axis ``axis``.

    Each device computes an fp32 partial ``x_d @ w_d`` (``bi_jax.matmul``, ``out_dtype=float32``).
    ``combine="fixed"``: the partials are all-gathered and summed in device order in fp32 (batch
    invariant for a fixed device count); ``combine="psum"``: ``lax.psum`` (for comparison; promises
    nothing). The bias (replicated) is added in fp32 and the result rounded once to ``out_dtype``
    (default: the promoted dtype of x and w). The output is replicated.
    """
    op = "row_parallel_linear"
    _check_combine(op, combine)
    d = _axis_size(mesh, axis)
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"{op}: contraction sizes differ: x {tuple(x.shape)}, w {tuple(w.shape)}")
    _check_divisible(op, "K (w.shape[0])", w.shape[0], d, axis)
    out_dtype = jnp.result_type(x, w) if out_dtype is None else out_dtype
    lead = (None,) * (x.ndim - 1)

    def local(x, w, *b):
        partial = matmul(x, w, out_dtype=jnp.float32, implementation=implementation)
        return _finish(_combine(partial, axis, combine), b[0] if b else None, out_dtype)

    args = (x, w) if bias is None else (x, w, bias)
    specs = (P(*lead, axis), P(axis, None)) + (() if bias is None else (P(),))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(*args)


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "combine", "implementation"))
def tensor_parallel_mlp(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    mesh: Mesh,
    axis: str = "x",
    combine: str = "fixed",
    implementation: str | None = None,
) -> jax.Array:
    """Megatron-style SwiGLU MLP: ``(silu(x @ w_gate) * (x @ w_up)) @ w_down``, one ``shard_map``.

    x ``[..., H]`` replicated; w_gate, w_up ``[H, F]`` split along F (column-parallel); w_down
    ``[F, H]`` split along F (row-parallel). The intermediate ``[..., F / D]`` never leaves its device
    and is computed as in ``bi_jax.llama``'s MLP; the down projection's fp32 partials are
    combined as in ``row_parallel_linear``. Output ``[..., H]`` in x's dtype, replicated.
    """
    op = "tensor_parallel_mlp"
    _check_combine(op, combine)
    d = _axis_size(mesh, axis)
    _check_divisible(op, "F (w_gate.shape[1])", w_gate.shape[1], d, axis)
    if w_up.shape != w_gate.shape or w_down.shape != w_gate.shape[::-1] or x.shape[-1] != w_gate.shape[0]:
        raise ValueError(
            f"{op}: expected x [..., H], w_gate/w_up [H, F], w_down [F, H]; got x {tuple(x.shape)}, "
            f"w_gate {tuple(w_gate.shape)}, w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)}"
        )
    dtype = x.dtype
    mm = functools.partial(matmul, implementation=implementation)

    def local(x, wg, wu, wd):
        h = jax.nn.silu(mm(x, wg)) * mm(x, wu)  # as bi_jax.llama's MLP; elementwise, per row
        return _finish(_combine(mm(h, wd, out_dtype=jnp.float32), axis, combine), None, dtype)

    specs = (P(), P(None, axis), P(None, axis), P(axis, None))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(
        x, w_gate, w_up, w_down
    )


__all__ = [
    "COMBINES",
    "column_parallel_linear",
    "data_parallel",
    "fixed_order_combine",
    "make_mesh",
    "row_parallel_linear",
    "tensor_parallel_mlp",
]
