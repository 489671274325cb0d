"""Decode attention against a KV cache: one new token per row, GQA 32/8 heads, D = 128, bf16.

One panel per context length S, x = batch size B. The figure of merit is KV-cache bandwidth: the
kernel must read ``2 B S Hkv D`` bytes of K and V; it is reported in GB/s and as a fraction of the
measured copy bandwidth (read + write, so a pure read stream can exceed 100%). Lines: XLA's default,
the bi_jax kernels, and jax's example Pallas decode kernel
(``jax.experimental.pallas.ops.gpu.decode_attention.gqa``; it transposes the cache to
[B, Hkv, S, D] first, and that copy is part of its time).

Points whose cache exceeds ``--max-kv-gb`` are skipped (every line).
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp

from benchmarks import common
from bi_jax import _backend, timing

CONTEXTS = (1024, 4096, 16384, 32768)
BATCHES = (1, 8, 32, 64, 128, 256)
REFERENCE_MAX_B = 64


def _jax_example_make():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import decode_attention as jdec
    interpret = _backend.interpret_mode()

    def fn(q, k, v, lengths):
        s = k.shape[1]
        splits = 16 if s % 16 == 0 and s // 16 >= 16 else max(1, s // 16)
        out = jdec.gqa(q[:, 0], k, v, kv_seq_len=lengths, k_splits=splits, interpret=interpret)
        return out[:, None]

    return fn


def build(opts: argparse.Namespace) -> common.Sweep:
    quick = opts.quick
    hq, hkv, d = (4, 2, 32) if quick else (32, 8, 128)
    dtype = jnp.dtype(opts.dtype or "bfloat16")
    xs = tuple(opts.xs or ((1, 2, 4) if quick else BATCHES))
    contexts = tuple(opts.contexts or ((64, 128) if quick else CONTEXTS))
    reference_max = (opts.reference_max if opts.reference_max is not None
                     else None if quick else REFERENCE_MAX_B)
    max_kv = opts.max_kv_gb * 1e9
    item = dtype.itemsize

    def factory(impl: str):
        def make():
            op = common.bi_op("decode_attention", "attention")
            return lambda q, k, v, lengths: op(q, k, v, lengths, implementation=impl)

        return make

    lines = common.standard_lines(factory, reference_max=reference_max, x_name="B")
    lines.append(common.Line(
        "jax_example", "jax example Pallas decode kernel, ops.gpu.decode_attention.gqa",
        _jax_example_make))

    cases = []
    for s in contexts:
        key = jax.random.key(300 + s)
        kv_bytes = lambda b, s=s: 2 * b * s * hkv * d * item

        def inputs(b, s=s, key=key):
            q = timing.random_array(jax.random.fold_in(key, 0), (b, 1, hq, d), dtype)
            k = timing.random_array(jax.random.fold_in(key, 1), (b, s, hkv, d), dtype)
            v = timing.random_array(jax.random.fold_in(key, 2), (b, s, hkv, d), dtype)
            return q, k, v, jnp.full((b,), s, jnp.int32)

        def skip(b, kv_bytes=kv_bytes):
            if kv_bytes(b) > max_kv:
                return f"KV cache of {kv_bytes(b) / 1e9:.1f} GB exceeds --max-kv-gb"
            return None

        def metrics(b, t, copy_gbps, kv_bytes=kv_bytes):
            kv_gbps = kv_bytes(b) / (t.median_ms * 1e-3) / 1e9
            return {"kv_gbps": kv_gbps,
                    "frac_copy_bw": kv_gbps / copy_gbps if copy_gbps else None}

        cases.append(common.Case(
            name=f"context {s}, {hq}/{hkv} heads, D={d}",
            xs=xs,
            inputs=inputs,
            head=common.rows_head,
            params={"S": s, "Hq": hq, "Hkv": hkv, "D": d, "dtype": dtype.name, "lengths": "S"},
            bytes_accessed=lambda b, kv_bytes=kv_bytes: kv_bytes(b) + 2 * b * hq * d * item,
            flops=lambda b, s=s: 4 * b * hq * d * s,
            metrics=metrics,
            skip=skip,
        ))
    return common.Sweep(
        op="decode",
        title=f"decode attention (1 new token, full cache), {hq}/{hkv} heads, D={d}, {dtype.name}",
        x_label="B (batch size)",
        cases=cases,
        lines=lines,
        ratios=[("pallas", "xla"), ("pallas", "jax_example"), ("reference", "xla")],
        table_metrics=[("kv_gbps", "KV GB/s", "{:.0f}"), ("frac_copy_bw", "of copy BW", "{:.0%}")],
        notes=common.reference_note(reference_max, "B") + [
            "KV GB/s = 2 B S Hkv D bytes / time (reads only); copy BW counts read + write",
            f"points with a KV cache above {opts.max_kv_gb} GB skipped (--max-kv-gb)",
            "every row attends to its full context (lengths = S)",
        ],
    )
