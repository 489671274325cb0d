"""log_softmax over a 128256-entry vocabulary (Llama 3), bf16 logits (or ``--dtype float32``).

Achieved bandwidth counts one read and one write of the logits, against the measured copy bandwidth.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import common
from bi_jax import timing

VOCAB = 128256


def build(opts: argparse.Namespace) -> common.Sweep:
    vocab = opts.vocab or (1000 if opts.quick else VOCAB)
    dtype = jnp.dtype(opts.dtype or "bfloat16")
    xs = tuple(opts.xs or (common.QUICK_TOKENS if opts.quick else common.TOKENS))
    reference_max = opts.reference_max
    key = jax.random.key(1)

    def inputs(t: int):
        return (timing.random_array(key, (t, vocab), dtype, scale=8.0),)

    def factory(impl: str):
        def make():
            op = common.bi_op("log_softmax", "reductions")
            return lambda x: op(x, axis=-1, implementation=impl)

        return make

    case = common.Case(
        name=f"vocab {vocab}, {dtype.name}",
        xs=xs,
        inputs=inputs,
        head=common.rows_head,
        params={"vocab": vocab, "dtype": dtype.name},
        bytes_accessed=lambda t: 2 * t * vocab * dtype.itemsize,
        metrics=common.bandwidth_metrics,
    )
    return common.Sweep(
        op="log_softmax",
        title=f"log_softmax over a {vocab}-entry vocabulary ({dtype.name} logits)",
        x_label="tokens (rows)",
        cases=[case],
        lines=common.standard_lines(factory, reference_max=reference_max, x_name="tokens"),
        ratios=[("pallas", "xla"), ("reference", "xla")],
        table_metrics=[("gbps", "GB/s", "{:.0f}"), ("frac_copy_bw", "of copy BW", "{:.0%}")],
        notes=common.reference_note(reference_max, "tokens")
        + ["bytes = read the logits once + write the result once"],
    )
