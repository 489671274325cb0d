"""Causal prefill attention, GQA with 32 query heads / 8 KV heads, D = 128, bf16, [B, T, H, D].

One panel per batch size B, x = sequence length T. Besides XLA's default, the bi_jax kernels are
compared with cuDNN's flash attention through ``jax.nn.dot_product_attention(...,
implementation="cudnn")`` (GPU only; a failure is recorded with its reason). The invariance check
here is sequence slicing: the first T0 tokens of batch row 0 must have the same bits at every T
(causal attention never looks ahead).

XLA's default materialises the [B, Hq, T, T] scores; points where they would exceed
``--max-scores-gb`` are skipped for the XLA line.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import common
from bi_jax import _backend, timing

SEQLENS = (1024, 2048, 4096, 8192, 16384)
BATCHES = (1, 2, 4, 8)
REFERENCE_MAX_TOKENS = 4096  # B * T: the reference's elementwise products take ~B*T MB per block


def build(opts: argparse.Namespace) -> common.Sweep:
    quick = opts.quick
    hq, hkv, d = (4, 2, 32) if quick else (32, 8, 128)
    dtype = jnp.dtype(opts.dtype or "bfloat16")
    xs = tuple(opts.xs or ((16, 32, 64) if quick else SEQLENS))
    batches = tuple(opts.batches or ((1, 2) if quick else BATCHES))
    reference_max = (opts.reference_max if opts.reference_max is not None
                     else None if quick else REFERENCE_MAX_TOKENS)
    max_scores = opts.max_scores_gb * 1e9
    item = dtype.itemsize

    def factory(impl: str):
        def make():
            op = common.bi_op("attention", "attention")
            return lambda q, k, v: op(q, k, v, causal=True, implementation=impl)

        return make

    def make_cudnn():
        if not _backend.has_gpu():
            raise RuntimeError("cuDNN attention needs a CUDA GPU")
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")

    def cudnn_skip(case, t):
        return None if _backend.has_gpu() else "cuDNN needs a CUDA GPU"

    lines = common.standard_lines(factory, reference_max=reference_max, x_name="T")

    def xla_skip(case, t):
        b = case.params["B"]
        gb = b * hq * t * t * 4 / 1e9
        if b * hq * t * t * 4 > max_scores:
            return f"XLA would materialise {gb:.1f} GB of fp32 scores (> --max-scores-gb)"
        return None

    def reference_skip(case, t):
        b = case.params["B"]
        if reference_max is not None and b * t > reference_max:
            return f"reference line skipped above B*T={reference_max} tokens (--reference-max)"
        return None

    by_key = {ln.key: ln for ln in lines}
    by_key["xla"].skip = xla_skip
    by_key["reference"].skip = reference_skip
    lines.append(common.Line(
        "cudnn", "cuDNN flash attention, jax.nn.dot_product_attention (not batch-invariant)",
        make_cudnn, skip=cudnn_skip))

    cases = []
    for b in batches:
        key = jax.random.key(200 + b)

        def inputs(t, b=b, key=key):
            q = timing.random_array(jax.random.fold_in(key, 0), (b, t, hq, d), dtype, axis=1)
            k = timing.random_array(jax.random.fold_in(key, 1), (b, t, hkv, d), dtype, axis=1)
            v = timing.random_array(jax.random.fold_in(key, 2), (b, t, hkv, d), dtype, axis=1)
            return q, k, v

        cases.append(common.Case(
            name=f"B={b}, {hq}/{hkv} heads, D={d}",
            xs=xs,
            inputs=inputs,
            # Batch row 0, leading n tokens: the same bits at every T if sequence-invariant.
            head=lambda out, n: out[:1, :n],
            params={"B": b, "Hq": hq, "Hkv": hkv, "D": d, "dtype": dtype.name, "causal": True},
            bytes_accessed=lambda t, b=b: (2 * b * t * hq * d + 2 * b * t * hkv * d) * item,
            flops=lambda t, b=b: 4 * b * hq * d * t * (t + 1) // 2,
            metrics=lambda t, tm, bw: {"tflops": tm.tflops},
        ))
    return common.Sweep(
        op="attention",
        title=f"causal prefill attention, {hq} q heads / {hkv} KV heads, D={d}, {dtype.name}",
        x_label="T (sequence length)",
        cases=cases,
        lines=lines,
        ratios=[("pallas", "xla"), ("pallas", "cudnn"), ("reference", "xla")],
        table_metrics=[("tflops", "TFLOP/s", "{:.1f}")],
        notes=common.reference_note(reference_max, "B*T") + [
            "TFLOP/s counts the causal half: 4 B Hq D T (T + 1) / 2",
            "invariance: leading tokens of batch row 0 compared across T (sequence slicing)",
            f"XLA line skipped where its fp32 scores exceed {opts.max_scores_gb} GB",
        ],
    )
