"""The other row ops: RMSNorm, LayerNorm, softmax, sum and mean over the last axis, one panel each.

The fused add+RMSNorm and log_softmax over a vocabulary have sweeps of their own (``rmsnorm``,
``log_softmax``); this one covers the rest of issue 8's second target (norms, softmax, reductions
at 1 to 8192 rows), bf16 by default:

* ``rms_norm(x, w)`` and ``layer_norm(x, w, b)`` over ``--hidden`` (8192) columns;
* ``softmax`` over ``--hidden`` columns (one block per row) and over ``--vocab`` (128256) columns
  (the split path that log_softmax shares);
* ``sum`` and ``mean`` over ``--hidden`` columns (result in x's dtype).

Bytes are what each op must move: read x (and the vectors), write the result.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common
from bi_jax import timing

VOCAB = 128256


def _call(impl: str):
    """The line's function: each case's input is ``{op name: (arrays...)}`` (the dict key is part
    of the pytree structure, so it is static under jit and every case compiles its own op)."""
    import bi_jax

    calls = {
        "rms_norm": lambda x, w: bi_jax.rms_norm(x, w, implementation=impl),
        "layer_norm": lambda x, w, b: bi_jax.layer_norm(x, w, b, implementation=impl),
        "softmax": lambda x: bi_jax.softmax(x, axis=-1, implementation=impl),
        "sum": lambda x: bi_jax.sum(x, axis=-1, implementation=impl),
        "mean": lambda x: bi_jax.mean(x, axis=-1, implementation=impl),
    }

    def fn(d: dict[str, tuple[Any, ...]]):
        ((name, args),) = d.items()
        return calls[name](*args)

    return fn


def build(opts: argparse.Namespace) -> common.Sweep:
    quick = opts.quick
    hidden = opts.hidden or (256 if quick else 8192)
    vocab = opts.vocab or (1000 if quick else VOCAB)
    dtype = jnp.dtype(opts.dtype or "bfloat16")
    xs = tuple(opts.xs or (common.QUICK_TOKENS if quick else common.TOKENS))
    reference_max = opts.reference_max if opts.reference_max is not None else (
        None if quick else 64)
    item = dtype.itemsize
    key = jax.random.key(3)
    w = (1.0 + timing.random_array(jax.random.fold_in(key, 1), (hidden,), jnp.float32,
                                   scale=0.5)).astype(dtype)
    b = timing.random_array(jax.random.fold_in(key, 2), (hidden,), dtype, scale=0.5)

    def case(op: str, cols: int, vectors: tuple[Any, ...], scale: float, label: str,
             out_cols: int) -> common.Case:
        def inputs(t: int):
            x = timing.random_array(jax.random.fold_in(key, cols), (t, cols), dtype, scale=scale)
            return ({op: (x, *vectors)},)

        vec_bytes = sum(v.size for v in vectors) * item
        return common.Case(
            name=f"{label}, {dtype.name}",
            xs=xs,
            inputs=inputs,
            head=common.rows_head,
            params={"op": op, "columns": cols, "dtype": dtype.name},
            bytes_accessed=lambda t: t * (cols + out_cols) * item + vec_bytes,
            metrics=common.bandwidth_metrics,
        )

    cases = [
        case("rms_norm", hidden, (w,), 2.0, f"rms_norm, hidden {hidden}", hidden),
        case("layer_norm", hidden, (w, b), 2.0, f"layer_norm (weight, bias), hidden {hidden}",
             hidden),
        case("softmax", hidden, (), 4.0, f"softmax, {hidden} columns", hidden),
        case("softmax", vocab, (), 8.0, f"softmax, {vocab} columns", vocab),
        case("sum", hidden, (), 2.0, f"sum, {hidden} columns", 1),
        case("mean", hidden, (), 2.0, f"mean, {hidden} columns", 1),
    ]

    def factory(impl: str):
        return lambda: _call(impl)

    return common.Sweep(
        op="rows",
        title=f"Row ops over the last axis ({dtype.name}): norms, softmax, sum, mean",
        x_label="tokens (rows)",
        cases=cases,
        lines=common.standard_lines(factory, reference_max=reference_max, x_name="tokens"),
        ratios=[("pallas", "xla"), ("reference", "xla")],
        table_metrics=[("gbps", "GB/s", "{:.0f}"), ("frac_copy_bw", "of copy BW", "{:.0%}")],
        notes=common.reference_note(reference_max, "tokens")
        + ["bytes = read x (and the weight / bias vectors) + write the result"],
    )
