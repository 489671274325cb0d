"""bf16 matmul ``[M, K] @ [K, N]`` on the Llama-3-8B projection shapes, M = 1..8192.

Weights are rotated through several copies (``timing.rotation_copies``) so they come from HBM, as in
a model where each layer has its own. Columns: TFLOP/s (2 M N K flops) and weight bandwidth
(K N bytes read / time), the bound that matters at small M.
"""

from __future__ import annotations

import argparse
import functools
import math

import jax
import jax.numpy as jnp

from benchmarks import common
from bi_jax import timing

# (name, K, N) of Llama-3-8B: fused QKV, attention output, fused gate+up, down projection.
SHAPES = (
    ("QKV", 4096, 6144),
    ("attn out", 4096, 4096),
    ("gate+up", 4096, 28672),
    ("down", 14336, 4096),
)
QUICK_SHAPES = (("quick a", 64, 96), ("quick b", 128, 48))
REFERENCE_MAX_M = 256  # the plain-jnp reference is K/16 elementwise passes over [M, N]


def parse_shapes(text: str) -> tuple[tuple[str, int, int], ...]:
    """'4096x6144,14336x4096' -> ((name, K, N), ...)."""
    shapes = []
    for item in text.split(","):
        try:
            k, n = (int(v) for v in item.lower().split("x"))
        except ValueError as exc:
            raise ValueError(f"--shapes: {item!r} is not KxN (e.g. 4096x6144)") from exc
        shapes.append((f"K={k} N={n}", k, n))
    return tuple(shapes)


def build(opts: argparse.Namespace) -> common.Sweep:
    shapes = (parse_shapes(opts.shapes) if opts.shapes
              else QUICK_SHAPES if opts.quick else SHAPES)
    dtype = jnp.dtype(opts.dtype or "bfloat16")
    xs = tuple(opts.xs or (common.QUICK_TOKENS if opts.quick else common.TOKENS))
    reference_max = (opts.reference_max if opts.reference_max is not None
                     else None if opts.quick else REFERENCE_MAX_M)
    item = dtype.itemsize

    def factory(impl: str):
        def make():
            op = common.bi_op("matmul", "matmul")
            return lambda a, b: op(a, b, implementation=impl)

        return make

    cases = []
    for i, (name, k, n) in enumerate(shapes):
        key = jax.random.key(100 + i)

        @functools.cache
        def weight(key=key, k=k, n=n):
            return timing.random_array(jax.random.fold_in(key, 1), (k, n), dtype,
                                       scale=1 / math.sqrt(k))

        def inputs(m, key=key, k=k, weight=weight):
            return timing.random_array(jax.random.fold_in(key, 0), (m, k), dtype), weight()

        def metrics(m, t, copy_gbps, k=k, n=n):
            med_s = t.median_ms * 1e-3
            return {"tflops": t.tflops, "weight_gbps": k * n * item / med_s / 1e9}

        cases.append(common.Case(
            name=f"{name}: K={k} N={n}",
            xs=xs,
            inputs=inputs,
            head=common.rows_head,
            params={"K": k, "N": n, "dtype": dtype.name},
            bytes_accessed=lambda m, k=k, n=n: (m * k + k * n + m * n) * item,
            flops=lambda m, k=k, n=n: 2 * m * n * k,
            metrics=metrics,
        ))
    return common.Sweep(
        op="matmul",
        title=f"matmul [M, K] @ [K, N], {dtype.name}, Llama-3-8B projections (weights from HBM)",
        x_label="M (tokens)",
        cases=cases,
        lines=common.standard_lines(factory, reference_max=reference_max, x_name="M"),
        ratios=[("pallas", "xla"), ("reference", "xla")],
        table_metrics=[("tflops", "TFLOP/s", "{:.1f}"), ("weight_gbps", "weight GB/s", "{:.0f}")],
        notes=common.reference_note(reference_max, "M")
        + ["TFLOP/s = 2 M N K / time; weight GB/s = K N bytes / time"],
    )
