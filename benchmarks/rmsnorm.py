"""Fused residual add + RMSNorm: ``rms_norm(x, w, residual=r) -> (normed, x + r)``, 8192 bf16.

This is the sweep that answers a published chart: at 4096 tokens on an H100, a non-invariant CUDA
kernel took 0.156 ms, a batch-invariant Triton kernel 0.214 ms and batch-invariant PyTorch 1.30 ms;
those three numbers are drawn as markers at 4096 tokens. Achieved bandwidth counts the bytes the
op must move (read x, r and w; write normed and x + r) against the measured copy bandwidth.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import common
from bi_jax import timing

PUBLISHED = [
    {"x": 4096, "ms": 0.156, "label": "published H100: non-invariant CUDA kernel",
     "color": "#17becf", "marker": "*"},
    {"x": 4096, "ms": 0.214, "label": "published H100: batch-invariant Triton kernel",
     "color": "#ff7f0e", "marker": "P"},
    {"x": 4096, "ms": 1.30, "label": "published H100: batch-invariant PyTorch",
     "color": "#7f7f7f", "marker": "X"},
]

PUBLISHED_NOTE = (
    "markers: published H100 times at 4096 tokens (non-invariant CUDA 0.156 ms, "
    "batch-invariant Triton 0.214 ms, batch-invariant PyTorch 1.30 ms)"
)


def build(opts: argparse.Namespace) -> common.Sweep:
    hidden = opts.hidden or (256 if opts.quick else 8192)
    dtype = jnp.dtype(opts.dtype or "bfloat16")
    xs = tuple(opts.xs or (common.QUICK_TOKENS if opts.quick else common.TOKENS))
    reference_max = opts.reference_max
    key = jax.random.key(0)
    weight = (1.0 + timing.random_array(jax.random.fold_in(key, 2), (hidden,), jnp.float32,
                                        scale=0.5)).astype(dtype)

    def inputs(t: int):
        x = timing.random_array(jax.random.fold_in(key, 0), (t, hidden), dtype, scale=2.0)
        r = timing.random_array(jax.random.fold_in(key, 1), (t, hidden), dtype, scale=2.0)
        return x, r, weight

    def factory(impl: str):
        def make():
            op = common.bi_op("rms_norm", "norm")
            return lambda x, r, w: op(x, w, residual=r, implementation=impl)

        return make

    item = dtype.itemsize
    case = common.Case(
        name=f"hidden {hidden}, {dtype.name}, fused residual add",
        xs=xs,
        inputs=inputs,
        head=common.rows_head,
        params={"hidden": hidden, "dtype": dtype.name, "residual": True},
        bytes_accessed=lambda t: (4 * t * hidden + hidden) * item,
        metrics=common.bandwidth_metrics,
    )
    markers = PUBLISHED if hidden == 8192 and dtype == jnp.bfloat16 else []
    return common.Sweep(
        op="rmsnorm",
        title=f"Fused add + RMSNorm (hidden {hidden}, {dtype.name}): (x + r, rmsnorm(x + r) * w)",
        x_label="tokens (rows)",
        cases=[case],
        lines=common.standard_lines(factory, reference_max=reference_max, x_name="tokens"),
        ratios=[("pallas", "xla"), ("reference", "xla")],
        table_metrics=[("gbps", "GB/s", "{:.0f}"), ("frac_copy_bw", "of copy BW", "{:.0%}")],
        notes=common.reference_note(reference_max, "tokens")
        + ["bytes = read x, r (tokens x hidden) and w (hidden) + write normed and x + r"]
        + ([PUBLISHED_NOTE] if markers else []),
        markers=markers,
        key_xs=[4096],  # the published comparison point
    )
